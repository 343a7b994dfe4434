"""The API token: NUCLIDE_TOKEN when set, else generated once and kept in <var>/token (mode 0600)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from shared.config import Settings

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
