"""The store's, the deployer's and the optimizer's families on the gateway's GET /metrics, from the store's snapshot.

``GET /metrics`` asks the store for ``metrics.get`` once per scrape (the store's own counters
and the newest snapshot each other service reported to it, with its age on the store's clock);
:func:`service_families` turns that answer into metric families. Pure: unit tests call it with
a snapshot. A service whose snapshot is older than :data:`STALE_PERIODS` of its report periods
(or absent), or the store when it did not answer, is left out and ``nuclide_service_up`` says 0
for it. Only families and label counts listed in ``shared/svcmetrics.py`` are rendered.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.liveness import HEARTBEAT_LIVENESS
from shared.svcmetrics import FAMILIES, SERVICES

# a snapshot this many report periods old means the service stopped reporting (as for heartbeats)
STALE_PERIODS = HEARTBEAT_LIVENESS
# series rendered per family at most: the services' labels are bounded (the store's methods, a few outcomes
# and reasons), so this only stops a faulty report from growing a scrape without bound
MAX_ROWS = 500


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _buckets(value: Any) -> tuple[list[tuple[str, float]], float] | None:
    """A wire histogram {"bounds", "counts", "sum_s"} as cumulative buckets and a sum; None when malformed."""
    if not isinstance(value, dict):
        return None
    bounds, counts, sum_s = value.get("bounds"), value.get("counts"), value.get("sum_s")
    if (not isinstance(bounds, list) or not isinstance(counts, list) or len(counts) != len(bounds) + 1
            or not all(_number(b) for b in bounds) or not all(_number(c) and c >= 0 for c in counts)
            or not _number(sum_s) or any(a >= b for a, b in zip(bounds, bounds[1:]))):
        return None
    out = []
    total = 0.0
    for bound, count in zip([*(repr(float(b)) for b in bounds), "+Inf"], counts):
        total += count
        out.append((bound, total))
    return out, float(sum_s)


def _family(name: str, rows: Any) -> Metric:
    spec = FAMILIES[name]
    family: Metric
    if spec.kind == "counter":
        family = CounterMetricFamily(name, spec.help, labels=list(spec.labels))
    elif spec.kind == "gauge":
        family = GaugeMetricFamily(name, spec.help, labels=list(spec.labels))
    else:
        family = HistogramMetricFamily(name, spec.help, labels=list(spec.labels))
    for row in rows[:MAX_ROWS] if isinstance(rows, list) else ():
        if not isinstance(row, list) or len(row) != len(spec.labels) + 1 or not all(isinstance(v, str) for v in row[:-1]):
            continue
        labels, value = row[:-1], row[-1]
        if spec.kind == "histogram":
            parsed = _buckets(value)
            if parsed is not None:
                family.add_metric(labels, parsed[0], parsed[1])  # type: ignore[attr-defined]
        elif _number(value):
            family.add_metric(labels, value)  # type: ignore[attr-defined]
    return family


def _fresh(report: Any) -> dict[str, Any] | None:
    """A reported snapshot's families, or None when it is missing, malformed or stale."""
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict):
        return None
    age_s, interval_s = report.get("age_s"), report.get("interval_s")
    if not _number(age_s) or not _number(interval_s) or age_s > STALE_PERIODS * interval_s:
        return None
    return report["metrics"]


def service_families(answer: dict[str, Any] | None) -> Iterator[Metric]:
    """Families from the store's ``metrics.get`` answer; ``None``: the store did not answer."""
    snapshots: dict[str, dict[str, Any] | None] = {service: None for service in SERVICES}
    if isinstance(answer, dict):
        store = answer.get("store")
        snapshots["store"] = store if isinstance(store, dict) else None
        reports = answer.get("services")
        if isinstance(reports, dict):
            for service in SERVICES[1:]:
                snapshots[service] = _fresh(reports.get(service))
    up = GaugeMetricFamily("nuclide_service_up", "1 while a service's metrics are current: the store answered"
                           f" this scrape; the deployer and the optimizer reported within {STALE_PERIODS} of"
                           " their report periods", labels=["service"])
    for service in SERVICES:
        up.add_metric([service], int(snapshots[service] is not None))
    yield up
    for name, spec in FAMILIES.items():
        snap = snapshots[spec.service]
        if snap is not None:
            yield _family(name, snap.get(name))


class ServiceCollector(Collector):
    """Renders what ``latest()`` returns: the store's newest ``metrics.get`` answer, fetched by GET /metrics."""

    def __init__(self, latest: Callable[[], dict[str, Any] | None]) -> None:
        self.latest = latest

    def collect(self) -> Iterator[Metric]:
        yield from service_families(self.latest())
