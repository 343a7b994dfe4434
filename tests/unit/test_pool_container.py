"""The warm pool's specialisation frame: what the deployer writes, what a pool container reads and unpacks."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
from pathlib import Path

import msgpack
import pytest

from services.runtime.pool_container import unpack_code
from shared.poolframe import MAX_HEADER_BYTES, SIGNATURE, BadFrame, encode, read_header


def code_tar(files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


def test_frame_layout_is_pinned() -> None:
    frame = encode({"instance_id": "i"}, 64, "/c", b"TAR")
    header = msgpack.packb({"config": {"instance_id": "i"}, "memory_bytes": 64, "cwd": "/c"}, use_bin_type=True)
    assert frame == b"NUCPOOL1" + struct.pack(">IQ", len(header), 3) + header + b"TAR"


def test_round_trip_unpacks_writable_code_and_stops_at_the_frame_end(tmp_path: Path) -> None:
    tar = code_tar({"f/1/main.py": b"def handler(c, e):\n    return 1\n", "f/1/pkg/mod.py": b"X = 2\n"})
    stream = io.BytesIO(encode({"instance_id": "i", "functions": []}, 1 << 20, "/c", tar) + b"AFTER")
    header, code_len = read_header(stream)
    assert header == {"config": {"instance_id": "i", "functions": []}, "memory_bytes": 1 << 20, "cwd": "/c"}
    unpack_code(stream, code_len, str(tmp_path))
    assert stream.read() == b"AFTER", "exactly the frame is consumed"
    assert (tmp_path / "f/1/pkg/mod.py").read_bytes() == b"X = 2\n"
    # the code directory is the function's scratch on every backend: its owner writes next to the code
    assert stat.S_IMODE((tmp_path / "f/1/main.py").stat().st_mode) & 0o200
    assert stat.S_IMODE((tmp_path / "f/1").stat().st_mode) & 0o200
    (tmp_path / "f/1/new.py").write_text("x")


def test_closed_stdin_before_a_frame_is_no_frame() -> None:
    assert read_header(io.BytesIO(b"")) is None


@pytest.mark.parametrize("data,needle", [
    (b"NUCPOOL2" + struct.pack(">IQ", 1, 0) + b"\x80", "bad signature"),
    (SIGNATURE + struct.pack(">IQ", MAX_HEADER_BYTES + 1, 0), "too large"),
    (SIGNATURE + struct.pack(">IQ", 1, 0) + b"\xc1", "bad header"),
    (SIGNATURE + struct.pack(">IQ", 2, 0) + msgpack.packb([1]), "must be a map"),
    (SIGNATURE + struct.pack(">IQ", 10, 0) + b"abc", "stdin closed inside"),
])
def test_malformed_frames_are_refused(data: bytes, needle: str) -> None:
    with pytest.raises(BadFrame, match=needle):
        read_header(io.BytesIO(data))


def test_entries_outside_the_code_root_or_not_plain_files_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("f/1/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    for tar, needle in [(code_tar({"../escape.py": b"x"}), "escapes"),
                        (code_tar({"/abs.py": b"x"}), "escapes"),
                        (code_tar({}, [link]), "not a regular file")]:
        target = tmp_path / os.urandom(4).hex()
        target.mkdir()
        with pytest.raises(BadFrame, match=needle):
            unpack_code(io.BytesIO(tar), len(tar), str(target))
    assert not (tmp_path / "escape.py").exists()
