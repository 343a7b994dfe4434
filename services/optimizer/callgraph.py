"""The call graph the optimizer reports (GET /optimizer's ``graph``): task-call edges summed over a window."""

from __future__ import annotations

from typing import Any, Iterable

GRAPH_WINDOW_S = 600.0  # the reported graph sums the edges traced this far back (the dashboard's "last 10 minutes")
GRAPH_MAX_EDGES = 200  # the busiest edges kept in the report: a status stays small whatever the traffic

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
