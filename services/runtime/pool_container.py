"""A warm pool container of the docker backend: the runtime imported, waiting on stdin to become one instance.

``python3 -m services.runtime.pool_container`` is what a pool container runs (see
``services/deployer/backends/docker/warm_pool.py``). It imports the runtime once, then reads one
specialisation frame (``shared/poolframe.py`` draws it) from its stdin, which only a holder of
Docker API access can write (the deployer attaches to the container's stdin through the Engine
API; no network endpoint). The frame's code is an uncompressed tar of ``<name>/<version>/...``.

The code is unpacked into ``CODE_ROOT`` (a tmpfs of the container), writable as an instance's code
directory is on every backend, the data limit set, stdin closed, and the process
goes on as :func:`services.runtime.loop.serve`: READY to the gateway, calls, BYE, exit codes
exactly as a cold instance. A container is specialised once (the engine closes its stdin when
the deployer detaches, and this reads one frame): one function's code never lands in a process
that served another. A malformed frame is a platform fault: exit code 1, the reason on stderr.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import tarfile
from typing import Any, BinaryIO

from shared.poolframe import CODE_ROOT, BadFrame, read_header

EXIT_BAD_FRAME = 1


class _Bounded:
    """A reader of the next ``n`` bytes of a stream, for tarfile's stream mode."""

    def __init__(self, stream: BinaryIO, n: int) -> None:
        self.stream = stream
        self.left = n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.stream.read(size) if size else b""
        self.left -= len(data)
        return data


def unpack_code(stream: BinaryIO, code_len: int, root: str) -> None:
    """Extract the code tar (regular files and directories only, nothing outside ``root``); it stays writable."""
    bounded = _Bounded(stream, code_len)
    real_root = os.path.realpath(root)
    try:
        with tarfile.open(fileobj=bounded, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                name = os.path.normpath(member.name)
                target = os.path.realpath(os.path.join(real_root, name))
                if os.path.isabs(name) or name.startswith("..") or not target.startswith(real_root + os.sep):
                    raise BadFrame(f"code entry {member.name!r} escapes {root}")
                if member.isdir():
                    os.makedirs(target, 0o755, exist_ok=True)
                elif member.isfile():
                    os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None  # a regular file always has one
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                    with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
                        while block := source.read(1 << 20):
                            out.write(block)
                else:
                    raise BadFrame(f"code entry {member.name!r} is not a regular file or directory")
    except tarfile.TarError as exc:
        raise BadFrame(f"bad code archive: {exc}") from None
    while bounded.left:  # the tar's end padding, so stdin is at the frame's end
        if not bounded.read(1 << 16):
            raise BadFrame("stdin closed inside the code archive")
    # left writable: the code directory is the function's scratch on every backend


def specialise(stream: BinaryIO) -> dict[str, Any] | None:
    """Read the frame, unpack the code, set the limits and working directory; the config to serve."""
    got = read_header(stream)
    if got is None:
        return None
    header, code_len = got
    unpack_code(stream, code_len, CODE_ROOT)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # one frame, ever: nothing more is read from the deployer
    os.close(devnull)
    memory = int(header.get("memory_bytes") or 0)
    if memory > 0:  # what an image-built instance gets as a ulimit: a handler's MemoryError, not the OOM killer
        resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    cwd = str(header.get("cwd") or CODE_ROOT)
    os.chdir(cwd)
    sys.path[0] = cwd  # what `python -m services.runtime` started in the code directory has
    return header["config"]


def _idle_term(signum: int, frame: Any) -> None:
    raise SystemExit(0)  # PID 1 of the container: without a handler SIGTERM would be ignored


def main() -> int:
    signal.signal(signal.SIGTERM, _idle_term)
    import asyncio  # noqa: F401 (the runtime imports it on demand: for async handlers, warm here)

    import services.runtime.loop as loop  # the point of the pool: imported before the function is known

    stdin = sys.stdin.buffer
    try:
        config = specialise(stdin)
    except (BadFrame, OSError) as exc:
        print(f"nuclide pool: could not become an instance: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_FRAME
    if config is None:
        return 0  # stdin closed before a frame: the deployer let this container go
    return loop.serve(config)


if __name__ == "__main__":
    sys.exit(main())
