"""The store's own counters, and the newest metrics snapshot each other service reported (shared/svcmetrics.py)."""

from __future__ import annotations

import time
from typing import Any

from shared.errors import InvalidRequest
from shared.svcmetrics import RPC_BUCKETS_S, SERVICES, Histogram, labelled, single

# methods that only read; every other one may write (a method this list forgets is timed as a write)
READ_METHODS = frozenset({
    "ping", "health", "snapshot", "function.get", "function.list", "version.get", "blob.get", "instances.list",
    "gateways.list", "groups.list", "regroup.get", "group.spec", "kv.get", "runtime.list", "runtime.get",
    "calls.get", "calls.result", "calls.list", "calls.owned", "calls.pending_callbacks", "calls.counts", "calls.trace",
    "metrics.get",
})
# distinct method label values kept: the store's methods number about 50; a peer sending made-up names
# must not grow the series without bound (those count as "other")
MAX_METHODS = 100
MAX_SNAPSHOT_FAMILIES = 64  # a reported snapshot larger than this is refused


def method_class(method: str) -> str:
    return "read" if method in READ_METHODS else "write"


class StoreMetrics:
    """Counters the store bumps per RPC (a dict increment and a bisect), rendered by the gateway."""

    def __init__(self) -> None:
        self.rpcs: dict[tuple[str, str], int] = {}
        self.rpc_seconds = {"read": Histogram(RPC_BUCKETS_S), "write": Histogram(RPC_BUCKETS_S)}
        self.methods: set[str] = set()
        self.events_published = 0
        self.storage_errors = 0
        # service -> (monotonic time received, its report period in seconds, its snapshot)
        self.reports: dict[str, tuple[float, float, dict[str, Any]]] = {}

    def served(self, method: str, outcome: str, took_s: float) -> None:
        if method not in self.methods:
            if len(self.methods) >= MAX_METHODS:
                method = "other"
            else:
                self.methods.add(method)
        key = (method, outcome)
        self.rpcs[key] = self.rpcs.get(key, 0) + 1
        self.rpc_seconds[method_class(method)].observe(took_s)

    def report(self, service: Any, snapshot: Any, interval_s: Any) -> None:
        """A service's snapshot (``metrics.report`` or the deployer's ``deployer.report``): kept, newest only."""
        if service not in SERVICES or service == "store":
            raise InvalidRequest(f"metrics.report takes service 'deployer' or 'optimizer', not {service!r}")
        if not isinstance(snapshot, dict) or len(snapshot) > MAX_SNAPSHOT_FAMILIES:
            raise InvalidRequest(f"metrics must be a map of at most {MAX_SNAPSHOT_FAMILIES} families")
        if not isinstance(interval_s, (int, float)) or isinstance(interval_s, bool) or not 0 < interval_s <= 600:
            raise InvalidRequest("interval_s must be the report period in seconds (0 < interval_s <= 600)")
        self.reports[service] = (time.monotonic(), float(interval_s), snapshot)

    def snapshot(self, database: str, leader: bool, calls: dict[str, int]) -> dict[str, Any]:
        return {
            "nuclide_store_rpcs": labelled(self.rpcs),
            "nuclide_store_rpc_seconds": labelled(self.rpc_seconds),
            "nuclide_store_events_published": single(self.events_published),
            "nuclide_store_database_info": [[database, 1]],
            "nuclide_store_leader": single(int(leader)),
            "nuclide_store_storage_errors": single(self.storage_errors),
            "nuclide_store_calls": labelled(calls),
        }

    def services(self) -> dict[str, dict[str, Any]]:
        """The other services' newest snapshots with their age on this store's clock (so no two clocks meet)."""
        now = time.monotonic()
        return {service: {"age_s": round(now - at, 3), "interval_s": interval_s, "metrics": snap}
                for service, (at, interval_s, snap) in self.reports.items()}
