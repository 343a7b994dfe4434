"""What one round trip between two local processes costs here: the hop nuclide adds to every call.

A sync call crosses gateway -> instance -> gateway; the bare ASGI baseline answers in the HTTP
process. This measures that hop alone, with a 1-byte message echoed by a second process: over
ZeroMQ (a ROUTER and a DEALER on tcp loopback, as the gateway and an instance talk) and over a
unix socket pair (the cheapest IPC there is, no I/O threads). Bounded in time, loopback only; the
echo process is ours and is stopped after each run.

``python -m tests.bench.ipc zmq PORT`` and ``python -m tests.bench.ipc unix FD`` are the echo ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BYE = b"bye"


def _echo_zmq(port: int) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    sock.send(b"hello")
    while True:
        msg = sock.recv()
        if msg == BYE:
            break
        sock.send(msg)
    sock.close()
    ctx.term()


def _echo_unix(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    while True:
        msg = sock.recv(64)
        if not msg or msg == BYE:
            break
        sock.sendall(msg)


def _child(argv: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.bench.ipc", *argv], cwd=ROOT, pass_fds=pass_fds,
                            stdin=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def zmq_round_trip_us(seconds: float) -> float:
    """Mean microseconds of a 1-byte ROUTER -> DEALER -> ROUTER round trip over tcp loopback."""
    import zmq

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    proc = _child(["zmq", str(port)])
    try:
        if not router.poll(10_000):
            raise RuntimeError("the ZeroMQ echo process did not connect within 10 s")
        ident, _ = router.recv_multipart()
        n, start = 0, time.perf_counter()
        end = start + seconds
        while True:
            router.send_multipart([ident, b"x"])
            router.recv_multipart()
            n += 1
            now = time.perf_counter()
            if now >= end:
                break
        router.send_multipart([ident, BYE])
        return (now - start) / n * 1e6
    finally:
        _stop(proc)
        router.close()
        ctx.term()


def unix_round_trip_us(seconds: float) -> float:
    """Mean microseconds of a 1-byte round trip over a unix socket pair."""
    ours, theirs = socket.socketpair()
    proc = _child(["unix", str(theirs.fileno())], pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        n, start = 0, time.perf_counter()
        end = start + seconds
        while True:
            ours.sendall(b"x")
            if not ours.recv(64):
                raise RuntimeError("the unix socket echo process exited")
            n += 1
            now = time.perf_counter()
            if now >= end:
                break
        ours.sendall(BYE)
        return (now - start) / n * 1e6
    finally:
        _stop(proc)
        ours.close()


if __name__ == "__main__":
    if sys.argv[1] == "zmq":
        _echo_zmq(int(sys.argv[2]))
    else:
        _echo_unix(int(sys.argv[2]))
    os._exit(0)
