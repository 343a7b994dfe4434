"""The services' event loop runs without io_uring (shared.service.install_event_loop).

uvloop's libuv queues epoll changes on an io_uring ring and aborts the process when
the kernel takes fewer than queued; the services turn io_uring off for themselves so
libuv uses plain epoll_ctl. These tests run the real thing in a child process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# a uvloop loop that watches a socket, then reports whether it holds an io_uring ring and
# what io_uring_setup answers this process
PROBE = textwrap.dedent("""
    import asyncio, ctypes, errno, json, os, socket, sys
    from shared.service import install_event_loop
    from tests.stack import io_uring_rings
    name = install_event_loop() if sys.argv[1] == "service" else "plain"
    if name == "plain":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        got = loop.create_future()
        loop.add_reader(a.fileno(), lambda: got.done() or got.set_result(a.recv(1)))
        b.send(b"x")
        await got
        loop.remove_reader(a.fileno())
        return type(loop).__module__, io_uring_rings(os.getpid())

    loop_module, rings = asyncio.run(main())
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)
    fd = libc.syscall(425, 1, params)  # io_uring_setup(1 entry)
    print(json.dumps({"loop": name, "module": loop_module, "rings": rings,
                      "setup_errno": 0 if fd >= 0 else ctypes.get_errno()}))
""")


def probe(mode: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_services_run_uvloop_without_an_io_uring_ring() -> None:
    plain = probe("plain")
    if plain["setup_errno"]:
        pytest.skip(f"this kernel gives no io_uring at all (errno {plain['setup_errno']}): nothing to turn off")
    assert plain["rings"] >= 1, "uvloop without the services' setup should hold a ring here; the probe is broken"
    service = probe("service")
    assert service["loop"] == "uvloop" and service["module"].startswith("uvloop")
    assert service["rings"] == 0
    assert service["setup_errno"] == 38  # ENOSYS: "not supported", so libraries fall back
