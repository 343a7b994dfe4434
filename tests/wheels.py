"""Pure-Python wheels made by tests, so installing requirements needs no package index."""

from __future__ import annotations

import base64
import hashlib
import tempfile
import zipfile
from pathlib import Path

# Below /var/tmp, not /tmp: a sandboxed build has a private /tmp but sees the host's /var/tmp (read-only).
WHEEL_PARENT = Path("/var/tmp")


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def make_wheel(directory: Path, name: str, version: str, source: str) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` with one module ``name`` holding ``source``; return its path."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": source.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: nuclide-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(path, data) for path, data in files.items()] + [f"{dist}/RECORD,,"]
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def wheel_dir() -> Path:
    """A fresh directory for wheels that a sandboxed build can read (remove it when done)."""
    path = Path(tempfile.mkdtemp(prefix="nuclide-wheels-", dir=WHEEL_PARENT))
    path.chmod(0o755)
    return path
