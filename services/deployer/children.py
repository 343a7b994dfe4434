"""The deployer's child processes: those a waiter reaps, and a sweep that reaps all the others.

The process backend makes the deployer a child subreaper, so that a forked
instance's init (whose parent, the zygote's first child, exits at once) becomes
the deployer's child and its exit code can be read. The price: every process
below the deployer that outlives its parent is re-parented to it too, and stays
a zombie until the deployer reaps it. Seen here, one per build step and one per
stopped cold instance: bubblewrap's own init (PID 1 of the sandbox), whose
parent, the outer bwrap, exits as soon as the command's exit status reaches it,
before the init itself is gone; and a zygote whose bwrap was stopped first.

So every child someone waits for is known here: asyncio's subprocesses, started
through :meth:`Children.exec` (asyncio's child watcher reaps them and reads their
status), and the pids a waiter of ours reaps itself (:meth:`own`, forked
instances). :meth:`sweep` reaps the zombies among all other children, never one
whose status a waiter still wants. No sweep runs while a start is under way: a
child that exits at once can be a zombie before its pid is known here.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import contextmanager
from typing import Any, Iterator

from shared.logs import get_logger
from shared.procs import become_subreaper, children, zombie

log = get_logger(__name__)

# How often orphans are reaped. A zombie holds nothing but its pid and exit status, so a
# second is plenty; sane range 0.1-10 s.
SWEEP_INTERVAL_S = 1.0


class Children:
    def __init__(self) -> None:
        self.subreaper = False  # orphans below us become our children: set by become_subreaper()
        self._procs: dict[int, asyncio.subprocess.Process] = {}  # asyncio's to reap
        self._owned: set[int] = set()  # a waiter of ours reaps these
        self._starting = 0

    def become_subreaper(self) -> bool:
        """Adopt the orphans below this process (and reap them); False where Linux does not allow it."""
        self.subreaper = become_subreaper()
        return self.subreaper

    async def exec(self, *argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
        """``asyncio.create_subprocess_exec``, its child known to the sweep."""
        with self.starting():
            proc = await asyncio.create_subprocess_exec(*argv, **kwargs)
            self._procs[proc.pid] = proc
        return proc

    @contextmanager
    def starting(self) -> Iterator[None]:
        """Around a start whose child the caller will :meth:`own` once it knows the pid: no sweep meanwhile."""
        self._starting += 1
        try:
            yield
        finally:
            self._starting -= 1

    def own(self, pid: int) -> None:
        """A waiter of ours reaps ``pid`` (and reads its status): the sweep leaves it alone."""
        self._owned.add(pid)

    def disown(self, pid: int) -> None:
        """``pid`` was reaped by its waiter; the number may come back as another process."""
        self._owned.discard(pid)

    def sweep(self) -> list[int]:
        """Reap the zombie children no waiter wants; returns their pids."""
        if self._starting:
            return []
        for pid, proc in list(self._procs.items()):
            if proc.returncode is not None:  # reaped by asyncio: the pid may be reused
                del self._procs[pid]
        reaped = []
        for pid in children(os.getpid()):
            if pid in self._owned or pid in self._procs or not zombie(pid):
                continue
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if done:
                reaped.append(pid)
        return reaped

    async def run(self) -> None:
        """Sweep every SWEEP_INTERVAL_S while this process is a subreaper."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            if self.subreaper:
                reaped = self.sweep()
                if reaped:
                    log.debug("reaped orphaned processes", pids=reaped)
