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


def check_bearer(authorization: str | bytes | None, token: bytes) -> None:
    """Raise Unauthorized unless ``authorization`` is ``Bearer <token>`` (the scheme in any case)."""
    if isinstance(authorization, str):
        authorization = authorization.encode("latin-1", "replace")
    if not authorization:
        raise Unauthorized("missing token: send 'Authorization: Bearer <token>' (nuclide up prints it)")
    scheme, _, value = authorization.partition(b" ")
    # compare_digest: how long the comparison takes says nothing about how much of the token matched
    if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), token):
        raise Unauthorized("invalid token: send 'Authorization: Bearer <token>' with the token nuclide up printed")
