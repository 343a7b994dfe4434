"""The processes a benchmark starts: each in a session of its own, recorded, and always stopped.

Every process a scenario starts goes through :class:`Processes`: it runs in a
session (process group) of its own, is recorded with its kernel start time, and
is stopped by signalling the whole group (SIGTERM, then SIGKILL after a
timeout). The benchmark process also makes itself a child subreaper, so an
instance orphaned by a deployer that died is reparented to it instead of to
init; :meth:`Processes.sweep` at the end finds and kills anything still alive
and reports it, so a leak is visible in the JSON rather than silent.
"""

from __future__ import annotations

import contextlib
import os

import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from shared.procs import alive as is_alive, become_subreaper, descendants, start_time  # noqa: F401 (re-exported)

STOP_TIMEOUT_S = 10.0


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process (all its threads) has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def children_of(ppid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid and fields[0] != "Z":
            kids.append(int(entry))
    return kids


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:300]
    except OSError:
        return ""


def reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_group_or_pid(pid: int, sig: int) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
            return
    except (ProcessLookupError, PermissionError):
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class Processes:
    """Every process the benchmark started, and the means to stop them all."""

    def __init__(self) -> None:
        self.started: list[dict[str, Any]] = []
        self.subreaper = False

    def record(self, pid: int, what: str) -> None:
        if not any(p["pid"] == pid for p in self.started):
            self.started.append({"pid": pid, "start_time": start_time(pid), "what": what})

    def record_tree(self, pid: int, what: str) -> None:
        self.record(pid, what)
        for child in descendants(pid):
            self.record(child, f"{what} (child)")

    def spawn(self, argv: list[str], what: str, log_path: Path, cwd: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.record(proc.pid, what)
        return proc

    def stop(self, proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the process's group, SIGKILL it after ``timeout_s``; returns the exit code."""
        if proc.poll() is None:
            _kill_group_or_pid(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group_or_pid(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # anything left in its group (a worker it forked) goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode

    def wait_gone(self, pids: list[int], timeout_s: float) -> list[int]:
        """Wait for ``pids`` (recorded ones) to exit; returns those still alive at the deadline."""
        starts = {p["pid"]: p["start_time"] for p in self.started}
        deadline = time.monotonic() + timeout_s
        while True:
            reap_zombies()
            alive = [pid for pid in pids if is_alive(pid, starts.get(pid))]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.05)

    def kill(self, pids: list[int]) -> None:
        for pid in pids:
            _kill_group_or_pid(pid, signal.SIGKILL)
        self.wait_gone(pids, 5)

    def sweep(self, grace_s: float = 3.0) -> list[dict[str, Any]]:
        """Kill whatever is still alive (recorded processes, orphans reparented to us); report it."""
        reap_zombies()
        leftovers: dict[int, dict[str, Any]] = {}
        for p in self.started:
            if is_alive(p["pid"], p["start_time"]):
                leftovers[p["pid"]] = {**p, "cmd": cmdline(p["pid"])}
        if self.subreaper:
            for pid in children_of(os.getpid()):
                leftovers.setdefault(pid, {"pid": pid, "start_time": start_time(pid), "what": "orphan",
                                           "cmd": cmdline(pid)})
        if not leftovers:
            return []
        # give them a moment: something stopping may just be finishing its drain
        lingering = self.wait_gone(list(leftovers), grace_s)
        for pid in lingering:
            _kill_group_or_pid(pid, signal.SIGTERM)
        self.kill(self.wait_gone(lingering, grace_s))
        return [leftovers[pid] for pid in lingering]


def wait_exit(proc: subprocess.Popen, timeout_s: float) -> int:
    """Wait for ``proc`` to exit, waking the moment it does.

    ``Popen.wait(timeout)`` polls with sleeps that double up to 50 ms, which rounds
    a 200 ms process up to the next step of that schedule; a pidfd wakes at once.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return proc.wait(timeout_s)
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
    finally:
        os.close(fd)
    if not ready:
        raise subprocess.TimeoutExpired(proc.args, timeout_s)
    return proc.wait()
