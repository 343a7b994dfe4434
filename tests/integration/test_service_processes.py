"""The running services hold no io_uring ring (see shared.seccomp.deny_io_uring for why)."""

from __future__ import annotations

import os

from tests.stack import Stack


def rings_of(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]"
        except OSError:
            pass
    return count


def test_every_service_runs_without_io_uring(stack: Stack) -> None:
    assert stack.client.get("/healthz").status_code == 200
    for name, proc in stack.procs.items():
        assert proc.poll() is None, f"{name} is not running"
        status = open(f"/proc/{proc.pid}/status").read()
        assert "\nSeccomp:\t2\n" in status, f"{name} runs without its seccomp filter"
        assert rings_of(proc.pid) == 0, f"{name} holds an io_uring ring"
