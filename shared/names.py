"""Function names: the one place that decides what a deployable name may look like."""

from __future__ import annotations

import re

from shared.errors import InvalidRequest

# Names that are, or may become, gateway routes; a function with one of these
# names would shadow an API path such as /docs or /healthz.
RESERVED_NAMES: frozenset[str] = frozenset(
    {
        "functions",
        "function",
        "calls",
        "groups",
        "runtimes",
        "healthz",
        "health",
        "metrics",
        "docs",
        "redoc",
        "openapi.json",
        "optimizer",
        "async-function",
        "api",
        "static",
        "favicon.ico",
        "system",
        "version",
        "login",
        "admin",
        "ui",
    }
)

# 63 chars keeps a name usable as a DNS label / container name suffix.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def validate_function_name(name: str) -> str:
    """Return ``name`` unchanged, or raise InvalidRequest saying how to fix it."""
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise InvalidRequest(
            f"function name {name!r} is invalid: use 1-63 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    # Case-insensitive because URLs and some filesystems fold case.
    if name.lower() in RESERVED_NAMES:
        raise InvalidRequest(f"function name {name!r} is reserved for the API; choose another name")
    return name
