"""Proportional memory (PSS) of processes, from /proc/<pid>/smaps_rollup.

PSS charges each shared page to the processes that map it in equal parts, so the
PSS of N instances summed is what they cost together; RSS would count the shared
interpreter and library pages N times.
"""

from __future__ import annotations

from typing import Iterable

FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty", "Swap")


def rollup(pid: int) -> dict[str, int] | None:
    """The smaps_rollup figures of ``pid`` in bytes, or None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            text = fh.read()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    return out if "Pss" in out else None


def total(pids: Iterable[int]) -> dict[str, int]:
    """Field-wise sums over ``pids`` (those that are gone count nothing), plus how many were read."""
    sums = {k: 0 for k in FIELDS}
    counted = 0
    for pid in pids:
        r = rollup(pid)
        if r is None:
            continue
        counted += 1
        for k, v in r.items():
            sums[k] += v
    sums["processes"] = counted
    return sums


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


MB = 1_000_000  # decimal megabytes, as the targets are written (stricter than MiB)
