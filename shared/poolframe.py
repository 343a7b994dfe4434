"""The specialisation frame the deployer writes to a warm pool container's stdin, and its reader.

The deployer's warm pool (``services/deployer/backends/docker/warm_pool.py``) writes it through
the Engine API; ``python3 -m services.runtime.pool_container`` in the container reads it::

    8 bytes   b"NUCPOOL1"                  signature and version
    4 bytes   header length H              big endian
    8 bytes   code length C                big endian
    H bytes   header                       msgpack map: config (the instance config, as an image-built
                                           instance reads it), memory_bytes, cwd
    C bytes   code                         an uncompressed tar of <name>/<version>/... below CODE_ROOT
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

import msgpack

SIGNATURE = b"NUCPOOL1"
_LENGTHS = struct.Struct(">IQ")
MAX_HEADER_BYTES = 1 << 20
MAX_CODE_BYTES = 1 << 30  # a tar of the group's code directories; the tmpfs and the memory limit cap it sooner
CODE_ROOT = "/nuclide/functions"  # a tmpfs in a pool container: where an image-built instance has its code


class BadFrame(ValueError):
    """The specialisation frame is not what the deployer writes."""


def encode(config: dict[str, Any], memory_bytes: int, cwd: str, code_tar: bytes) -> bytes:
    """The frame the deployer writes to a pool container's stdin."""
    header = msgpack.packb({"config": config, "memory_bytes": int(memory_bytes), "cwd": cwd}, use_bin_type=True)
    return SIGNATURE + _LENGTHS.pack(len(header), len(code_tar)) + header + code_tar


def read_exactly(stream: BinaryIO, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            raise BadFrame("stdin closed inside the specialisation frame")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_header(stream: BinaryIO) -> tuple[dict[str, Any], int] | None:
    """The frame's header and the code's length; None when stdin closed before a frame began."""
    first = stream.read(len(SIGNATURE))
    if not first:
        return None
    head = first + read_exactly(stream, len(SIGNATURE) + _LENGTHS.size - len(first))
    if head[:len(SIGNATURE)] != SIGNATURE:
        raise BadFrame(f"bad signature {head[:len(SIGNATURE)]!r}")
    header_len, code_len = _LENGTHS.unpack(head[len(SIGNATURE):])
    if header_len > MAX_HEADER_BYTES or code_len > MAX_CODE_BYTES:
        raise BadFrame(f"frame too large (header {header_len} bytes, code {code_len} bytes)")
    try:
        header = msgpack.unpackb(read_exactly(stream, header_len), raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise BadFrame(f"bad header: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("config"), dict):
        raise BadFrame("the header must be a map with the instance config")
    return header, code_len
