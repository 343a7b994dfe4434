"""Looking at local processes through /proc: start times, liveness, descendants (Linux)."""

from __future__ import annotations

import ctypes
import os

PR_SET_CHILD_SUBREAPER = 36


def start_time(pid: int) -> str | None:
    """The kernel's start time of a pid, to tell a live process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(pid: int, started: str | None = None) -> bool:
    """True while the pid runs (not a zombie) and, given ``started``, is still the same process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    if started is not None and (len(fields) < 20 or fields[19] != started):
        return False
    return fields[0] != "Z"


def zombie(pid: int) -> bool:
    """True when the pid has exited and waits to be reaped by its parent."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (of any of its threads)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        below = children(stack.pop())
        found.extend(below)
        stack.extend(below)
    return found


def become_subreaper() -> bool:
    """Orphans below this process (a double-forked child, instances of a deployer that died) become its
    children instead of init's, so it can find and reap them."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
