"""The running services hold no io_uring ring (see shared.seccomp.deny_io_uring for why)."""

from __future__ import annotations

from tests.stack import Stack, io_uring_rings


def test_every_service_runs_without_io_uring(stack: Stack) -> None:
    assert stack.client.get("/healthz").status_code == 200
    for name, proc in stack.procs.items():
        assert proc.poll() is None, f"{name} is not running"
        status = open(f"/proc/{proc.pid}/status").read()
        assert "\nSeccomp:\t2\n" in status, f"{name} runs without its seccomp filter"
        assert io_uring_rings(proc.pid) == 0, f"{name} holds an io_uring ring"
