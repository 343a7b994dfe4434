"""The API token: NUCLIDE_TOKEN when set, else generated once and kept in <var>/token (mode 0600); the check of it."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from shared.config import Settings
from shared.errors import Unauthorized

TOKEN_FILE = "token"


def token_path(settings: Settings) -> Path:
    return settings.var_dir / TOKEN_FILE


def load_or_create_token(settings: Settings) -> str:
    if settings.token:
        return str(settings.token)
    path = token_path(settings)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    return token


def bearer_is(authorization: str | bytes | None, token: bytes) -> bool:
    """True when ``authorization`` is ``Bearer <token>`` (the scheme in any case) and ``token`` is not empty."""
    if isinstance(authorization, str):
        authorization = authorization.encode("latin-1", "replace")
    if not authorization or not token:
        return False
    scheme, _, value = authorization.partition(b" ")
    # compare_digest: how long the comparison takes says nothing about how much of the token matched
    return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), token)


def check_bearer(authorization: str | bytes | None, token: bytes) -> None:
    """Raise Unauthorized unless ``authorization`` is ``Bearer <token>`` (the scheme in any case)."""
    if not authorization:
        raise Unauthorized("missing token: send 'Authorization: Bearer <token>' (nuclide up prints it)")
    if not bearer_is(authorization, token):
        raise Unauthorized("invalid token: send 'Authorization: Bearer <token>' with the token nuclide up printed")


def may_call_private(callee_group: str | None, allow_calls_from: frozenset[str] | tuple[str, ...],
                     caller_group: str | None, caller_function: str | None) -> bool:
    """Whether a task call may reach a private function: from its own fusion group, or from a function its
    ``spec.allowCallsFrom`` names (``"*"``: any function). A caller the gateway cannot tie to a running
    function of the platform (no registered instance, or a function that instance does not serve) gets no
    more than the group check; with neither, the call is refused."""
    if caller_group is not None and callee_group is not None and caller_group == callee_group:
        return True
    return caller_function is not None and ("*" in allow_calls_from or caller_function in allow_calls_from)
