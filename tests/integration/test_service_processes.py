"""The service processes: no io_uring ring (see shared.seccomp.deny_io_uring), and a failed start ends in its error."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.stack import Stack, io_uring_rings


def test_every_service_runs_without_io_uring(stack: Stack) -> None:
    assert stack.client.get("/healthz").status_code == 200
    for name, proc in stack.procs.items():
        assert proc.poll() is None, f"{name} is not running"
        status = open(f"/proc/{proc.pid}/status").read()
        assert "\nSeccomp:\t2\n" in status, f"{name} runs without its seccomp filter"
        assert io_uring_rings(proc.pid) == 0, f"{name} holds an io_uring ring"


@pytest.mark.parametrize("endpoint", ["gateway_router", "gateway_pub"])
def test_gateway_whose_port_is_taken_exits_with_its_error(tmp_path: Path, endpoint: str) -> None:
    # the gateway has sockets on its loop when these binds fail; the context closed them under
    # the loop and uvloop aborted the process (SIGABRT, `errno == EEXIST`) with nothing logged
    stack = Stack(tmp_path / "var")
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
            stack.start_service("gateway", {f"NUCLIDE_{endpoint.upper()}": busy})
            code = stack.procs["gateway"].wait(60)
        log = stack.service_log("gateway")
        assert code == 1, f"gateway ended with {code}; its log:\n{log[-3000:]}"
        assert "fatal error" in log and "Address already in use" in log and busy in log
    finally:
        stack.stop()
