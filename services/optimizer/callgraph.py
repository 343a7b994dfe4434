"""The call graph the optimizer reports (GET /optimizer's ``graph``): task-call edges summed over a window."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable, Iterator

GRAPH_WINDOW_S = 600.0  # the reported graph sums the edges traced this far back (the dashboard's "last 10 minutes")
GRAPH_MAX_EDGES = 200  # the busiest edges kept in the report: a status stays small whatever the traffic
# Edges are summed into buckets as they come, so a report reads (window / bucket) x edge kinds sums, not every
# traced batch: 200,000 raw edges took 215 ms to sum on this machine, once a second.
GRAPH_BUCKET_S = 10.0  # 1-60: the window moves by this much
GRAPH_BUCKET_KEYS = 10_000  # distinct (caller, callee, sync, local) per bucket; more are dropped (and counted)

# one traced edge as the optimizer keeps it: (monotonic time, caller, callee, sync, local, mean took_ms, calls)
Edge = tuple[float, Any, str, bool, bool, float, int]


def aggregate(edges: Iterable[Edge], since: float, limit: int = GRAPH_MAX_EDGES) -> list[dict[str, Any]]:
    """Sum the edges traced at or after ``since`` per (caller, callee): the busiest ``limit`` of them.

    Each is ``{caller, callee, calls, fused, remote, sync, mean_ms}``: ``fused`` calls ran in-process
    (caller and callee in one group), ``remote`` ones through the gateway; ``sync`` of them waited for
    the answer; ``mean_ms`` is the mean duration of those synchronous calls (None without any: an
    asynchronous call returns at once). An edge without a caller (nothing to draw it from) is left out.
    ``edges`` are oldest first (as traced), so the newest are read back until one is older than ``since``.
    """
    sums: dict[tuple[str, str], list[float]] = {}  # -> [calls, fused, sync, sync ms total]
    ordered = reversed(edges) if hasattr(edges, "__reversed__") else reversed(list(edges))
    for at, caller, callee, sync, local, mean_ms, calls in ordered:
        if at < since:
            break
        if not caller or calls < 1:
            continue
        slot = sums.setdefault((str(caller), str(callee)), [0, 0, 0, 0.0])
        slot[0] += calls
        if local:
            slot[1] += calls
        if sync:
            slot[2] += calls
            slot[3] += mean_ms * calls
    rows = [{"caller": caller, "callee": callee, "calls": int(n), "fused": int(fused), "remote": int(n - fused),
             "sync": int(sync), "mean_ms": round(total_ms / sync, 3) if sync else None}
            for (caller, callee), (n, fused, sync, total_ms) in sums.items()]
    rows.sort(key=lambda r: (-r["calls"], r["caller"], r["callee"]))
    return rows[:max(0, limit)]


class EdgeBuckets:
    """Traced edges summed per (caller, callee, sync, local) in buckets of ``bucket_s``, the last ``window_s``
    of them; :meth:`edges` gives them in :func:`aggregate`'s form, each stamped with its bucket's start."""

    def __init__(self, window_s: float = GRAPH_WINDOW_S, bucket_s: float = GRAPH_BUCKET_S,
                 max_keys: int = GRAPH_BUCKET_KEYS) -> None:
        self.window_s, self.bucket_s, self.max_keys = window_s, bucket_s, max_keys
        # (bucket start, {(caller, callee, sync, local): [calls, total ms]}), oldest first
        self.buckets: deque[tuple[float, dict[tuple[str, str, bool, bool], list[float]]]] = deque()
        self.dropped = 0  # edges of a key a full bucket had no room for

    def add(self, at: float, caller: Any, callee: str, sync: bool, local: bool, mean_ms: float, calls: int) -> None:
        """Count one traced edge; one without a caller, a count or a finite duration is not part of the graph."""
        if not caller or calls < 1 or not math.isfinite(mean_ms):
            return
        caller = str(caller)  # what an instance reported: a name, or anything msgpack carries
        start = at - at % self.bucket_s
        if not self.buckets or self.buckets[-1][0] < start:
            self.buckets.append((start, {}))
            while self.buckets[0][0] < start - self.window_s - self.bucket_s:
                self.buckets.popleft()
        sums = self.buckets[-1][1]
        key = (caller, callee, sync, local)
        slot = sums.get(key)
        if slot is None:
            if len(sums) >= self.max_keys:
                self.dropped += 1
                return
            slot = sums[key] = [0, 0.0]
        slot[0] += calls
        slot[1] += mean_ms * calls

    def edges(self) -> Iterator[Edge]:
        for start, sums in self.buckets:
            for (caller, callee, sync, local), (calls, total_ms) in sums.items():
                yield (start, caller, callee, sync, local, total_ms / calls if calls else 0.0, int(calls))
