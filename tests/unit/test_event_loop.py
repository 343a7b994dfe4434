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


# a service whose start fails half-way: two sockets the loop watches (added, not yet polled),
# then a port that is taken; "service" ends it the services' way (shared.entry), "plain"
# destroys the context the way the services did before (close_all missing)
FAILED_START = textwrap.dedent("""
    import asyncio, socket, sys, types
    import zmq
    from shared import entry, service
    from shared.aiosock import RpcClient
    from shared.curve import memory_keys

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = f"tcp://127.0.0.1:{taken.getsockname()[1]}"

    async def serve(settings, ctx, stop):
        RpcClient(ctx, "tcp://127.0.0.1:9", "store", memory_keys())
        RpcClient(ctx, "tcp://127.0.0.1:9", "deployer", memory_keys())
        ctx.socket(zmq.ROUTER).bind(busy)

    async def without_close_all(settings, serve, stop):
        ctx = zmq.Context.instance()
        try:
            return await serve(settings, ctx, stop)
        finally:
            ctx.destroy(linger=0)

    wrap = entry.serve_with_context if sys.argv[1] == "service" else without_close_all
    assert service.install_event_loop() == "uvloop"
    settings = types.SimpleNamespace(max_frame_bytes=1 << 20)
    sys.exit(service.run(lambda stop: wrap(settings, serve, stop), "probe"))
""")


def failed_start(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FAILED_START, mode], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_a_start_that_fails_half_way_exits_with_its_error_not_a_libuv_abort() -> None:
    # libuv registers a watched FD with epoll at its next poll; Context.destroy() closed the
    # watched sockets before that poll, and the poll's EPOLL_CTL_ADD met EBADF: SIGABRT on
    # uv__io_poll's assertion `errno == EEXIST`, the error that made the start fail never logged
    plain = failed_start("plain")
    assert plain.returncode == -6 and "errno == EEXIST" in plain.stderr, \
        f"the unguarded sequence should abort here; the probe is broken: {plain.returncode} {plain.stderr[-2000:]}"
    guarded = failed_start("service")
    out = guarded.stdout + guarded.stderr
    assert guarded.returncode == 1, out[-3000:]
    assert "Address already in use" in out and "fatal error" in out
