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
        "traces",
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


def split_function_path(path: str) -> tuple[str, str]:
    """(first segment, the path below it): ``/fn/a/b`` -> ("fn", "/a/b"), ``/fn`` and ``/fn/`` -> ("fn", "/").

    What a function sees as ``event.path`` is the part below its own name, as a nuclio function
    reached on its own port sees the path below ``/``.
    """
    name, _, rest = path.lstrip("/").partition("/")
    return name, "/" + rest


def invoke_target(method: str, path: str) -> tuple[str, str, str] | None:
    """(function, mode, path below the function) when a request is an invocation, else None.

    POST /{name}[/sub/path] invokes (GET/PUT/DELETE /{name} are the control plane, as in the
    Fusionizer); /functions/{name}/invoke[/sub/path] takes any method, so handlers that branch on
    event.method can be reached with all of them.
    """
    first, rest = split_function_path(path)
    if first == "functions":
        name, below = split_function_path(rest)
        action, sub = split_function_path(below)
        if action == "invoke" and name:
            return name, "http", sub
        if action == "execute" and sub == "/" and name and method == "POST":
            return name, "execute", "/"
        return None
    if method != "POST" or not first:
        return None
    if first == "async-function":
        name, sub = split_function_path(rest)
        return (name, "async", sub) if name else None
    if first.lower() in RESERVED_NAMES:
        return None
    return first, "http", rest
