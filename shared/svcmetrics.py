"""The store's, the deployer's and the optimizer's metrics: plain counters in each service, one catalogue of families.

Each service keeps integers (and :class:`Histogram` counts) where things happen and, on its
report period, sends a *snapshot* to the store: ``{family name: [[label values..., value], ...]}``,
a value being a number or a histogram's ``{"bounds", "counts", "sum_s"}``. The store keeps the
newest snapshot of each service with the time it arrived (``metrics.get``), and the gateway
renders them at scrape time (``services/gateway/svcmetrics.py``), so an operator scrapes one
target. :data:`FAMILIES` is the one list of what may be rendered: its names, types, labels and
HELP text; a family or a label count it does not know is dropped, which bounds the series a
service can create.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, NamedTuple

# a store RPC is served in well under a millisecond from SQLite's cache; a write waits on fsync or PostgreSQL
RPC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
# a build: a cached artifact is found in milliseconds, a pip install or an image build takes minutes
BUILD_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

SERVICES = ("store", "deployer", "optimizer")


class Family(NamedTuple):
    service: str
    kind: str  # counter, gauge, histogram
    labels: tuple[str, ...]
    help: str


# names as rendered (a counter's "_total" is added by prometheus_client)
FAMILIES: dict[str, Family] = {
    "nuclide_store_rpcs": Family("store", "counter", ("method", "outcome"),
                                 "store RPCs served, by method and outcome (ok, or the error's wire code)"),
    "nuclide_store_rpc_seconds": Family("store", "histogram", ("class",),
                                        "seconds the store took to handle an RPC, by method class (read, write)"),
    "nuclide_store_events_published": Family("store", "counter", (), "change events the store published"),
    "nuclide_store_database_info": Family("store", "gauge", ("database",),
                                          "the store's database kind (sqlite, postgresql); value 1"),
    "nuclide_store_leader": Family("store", "gauge", (), "1 while this store leads its database (the one writer)"),
    "nuclide_store_storage_errors": Family("store", "counter", (),
                                           "database errors the store met (disk full, read-only, connection lost)"),
    "nuclide_store_calls": Family("store", "gauge", ("status",), "calls the store keeps, by status"),
    "nuclide_deployer_builds": Family("deployer", "counter", ("outcome",),
                                      "group versions prepared to run (code and environment, cached ones"
                                      " included), by outcome (ok, failed)"),
    "nuclide_deployer_build_seconds": Family("deployer", "histogram", ("outcome",),
                                             "seconds preparing a group version took, by outcome"),
    "nuclide_deployer_instances_started": Family("deployer", "counter", (), "instances the deployer started"),
    "nuclide_deployer_instances_exited": Family("deployer", "counter", ("reason",),
                                                "instances that ended, by reason (stopped: asked to; crash: exited"
                                                " on their own; gone: found no longer running)"),
    "nuclide_deployer_restart_backoffs": Family("deployer", "counter", (),
                                                "restarts of a group delayed by backoff (after a crash or a failed"
                                                " start)"),
    "nuclide_deployer_instances": Family("deployer", "gauge", ("backend",), "instances running, by backend"),
    "nuclide_deployer_zygote_forks": Family("deployer", "counter", (),
                                            "instances forked from a long-lived zygote (process backend)"),
    "nuclide_deployer_zygote_warm_hits": Family("deployer", "counter", (),
                                                "forks whose zygote was already running (no zygote start waited"
                                                " for)"),
    "nuclide_optimizer_rounds": Family("optimizer", "counter", ("decision",),
                                       "optimizer rounds, by decision (applied, kept, reverted, refused, ...)"),
    "nuclide_optimizer_regroups": Family("optimizer", "counter", ("result",),
                                         "fusion setups the optimizer set, by result (applied, failed, reverted)"),
    "nuclide_optimizer_traced_calls": Family("optimizer", "counter", (), "entry calls heard in the gateways' traces"),
    "nuclide_optimizer_traced_edges": Family("optimizer", "counter", (),
                                             "task-call edges heard in the gateways' traces"),
    "nuclide_optimizer_scaler_decisions": Family("optimizer", "counter", ("direction",),
                                                 "replica changes the autoscaler applied, by direction (up, down)"),
}


class Histogram:
    """Fixed buckets with a plain count each (the last one +Inf); sent as is, cumulated by the renderer."""

    __slots__ = ("bounds", "counts", "sum_s")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum_s = 0.0

    def observe(self, value_s: float) -> None:
        self.counts[bisect_left(self.bounds, value_s)] += 1  # le is <=: a value equal to a bound counts in it
        self.sum_s += value_s

    def wire(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum_s": self.sum_s}


def labelled(counts: dict[Any, Any]) -> list[list[Any]]:
    """{label value or tuple of them: number or Histogram} -> snapshot rows, sorted."""
    rows = []
    for key in sorted(counts, key=str):
        value = counts[key]
        labels = list(key) if isinstance(key, tuple) else [key]
        rows.append([*labels, value.wire() if isinstance(value, Histogram) else value])
    return rows


def single(value: float) -> list[list[Any]]:
    """An unlabelled family's snapshot rows."""
    return [[value]]
