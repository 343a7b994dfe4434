"""Blobs (function zips), content-addressed by sha256: files beside SQLite, or a table of PostgreSQL."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

from shared.errors import InvalidRequest, NotFound
from services.store.db import SqlDatabase


def check_digest(digest: str) -> str:
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidRequest(f"blob digest {digest!r:.80} is not a sha256 hex digest")
    return digest


class Blobs(Protocol):
    def put(self, data: bytes) -> str: ...

    def get(self, digest: str) -> bytes: ...


class BlobStore:
    """Content-addressed files: blobs/ab/cdef... named by their sha256 (kept out of SQLite's WAL)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / digest[:2] / digest[2:]

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return digest

    def get(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found") from None


class DbBlobStore:
    """Blobs in the table blob_data, so every store replica on one PostgreSQL reaches them (no shared disk)."""

    def __init__(self, db: SqlDatabase) -> None:
        self.db = db

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.db.execute("INSERT INTO blob_data (digest, data) VALUES (?, ?) ON CONFLICT DO NOTHING", (digest, data))
        return digest

    def get(self, digest: str) -> bytes:
        row = self.db.one("SELECT data FROM blob_data WHERE digest=?", (check_digest(digest),))
        if row is None:
            raise NotFound(f"blob {digest} not found")
        return bytes(row[0])


def open_blobs(db: SqlDatabase, var_dir: Path) -> Blobs:
    """Where the store keeps zips for ``db``: files under <var_dir>/blobs for SQLite, the database otherwise."""
    return BlobStore(var_dir / "blobs") if db.dialect == "sqlite" else DbBlobStore(db)
