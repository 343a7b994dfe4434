"""The gateway's Prometheus metrics: plain integers on the invoke path, families and labels built at scrape time.

The invoke path only bumps integers in per-function slots (a dict lookup, an
increment, a ``bisect`` over a short tuple of bucket bounds for a histogram);
nothing of ``prometheus_client`` runs per call. :class:`GatewayCollector` turns
those integers, and what the gateway already knows (instances, queues, ready
replicas from the store's events), into metric families when ``GET /metrics``
asks, so a scrape costs in proportion to the number of functions, once.

Names follow OpenFaaS's gateway where one exists (``gateway_function_invocation_total``,
``gateway_functions_seconds``, ``gateway_function_invocation_started``,
``gateway_service_count``), so its Grafana dashboards and alerts work unchanged;
nuclide's own families start with ``nuclide_``. Only deployed functions are
labelled: a name a caller or an instance sent but no function has never becomes
a label value, so the number of series stays bounded by the catalogue.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric, UnknownMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from services.gateway.svcmetrics import ServiceCollector

if TYPE_CHECKING:
    from services.gateway.broker import Call

# upper bounds of gateway_functions_seconds, in seconds: Prometheus' default buckets (what OpenFaaS uses,
# so its dashboards' quantiles read the same), with finer ones below 5 ms where a warm call lands (~0.4 ms)
CALL_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# a cold start: a fork from a zygote takes milliseconds, a container or a fresh interpreter up to seconds
COLD_START_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# a deploy wait: a cached artifact is ready in a second, a pip install in minutes
DEPLOY_BUCKETS_S = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Histogram:
    """Fixed buckets with a plain count each; cumulated only when rendered."""

    __slots__ = ("bounds", "counts", "sum_s")

    @property
    def count(self) -> int:
        return sum(self.counts)

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum_s = 0.0

    def observe(self, value_s: float) -> None:
        # bisect_left: the first bound >= the value, so a value equal to a bound counts in it (le is <=)
        self.counts[bisect_left(self.bounds, value_s)] += 1
        self.sum_s += value_s

    def buckets(self) -> list[tuple[str, float]]:
        out = []
        total = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts):
            total += count
            out.append((bound, total))
        return out


class FunctionStats:
    """One function's counters since the gateway started."""

    __slots__ = ("started", "codes", "cold_starts", "cold_start_seconds", "async_finished", "retries",
                 "deploys")

    def __init__(self) -> None:
        self.started = 0
        # HTTP status -> durations of the calls answered with it (their count is the invocation counter)
        self.codes: dict[int, Histogram] = {}
        self.cold_starts = 0
        self.cold_start_seconds = Histogram(COLD_START_BUCKETS_S)
        self.async_finished: dict[str, int] = {}  # DONE / FAILED / DEAD -> async calls
        self.retries = 0
        self.deploys: dict[str, Histogram] = {}  # "ok" / "failed" -> deploy waits


class Telemetry:
    """The counters the gateway bumps as calls go; read by :class:`GatewayCollector`."""

    def __init__(self) -> None:
        self.functions: dict[str, FunctionStats] = {}
        # (caller or "", callee, fused) -> task calls, summed from the call graph the gateway publishes
        self.task_calls: dict[tuple[str, str, bool], int] = {}

    def of(self, name: str) -> FunctionStats:
        stats = self.functions.get(name)
        if stats is None:
            stats = self.functions[name] = FunctionStats()
        return stats

    # ----- the invoke path: integers only -------------------------------------------------

    def started(self, name: str, cold: bool) -> None:
        stats = self.of(name)
        stats.started += 1
        if cold:
            stats.cold_starts += 1

    def finished(self, name: str, code: int, took_s: float) -> None:
        codes = self.of(name).codes
        hist = codes.get(code)
        if hist is None:
            hist = codes[code] = Histogram(CALL_BUCKETS_S)
        hist.observe(took_s)

    def call_done(self, call: "Call", code: int) -> None:
        """A sync call's answer: its status and duration, and how long a cold one waited for an instance."""
        self.finished(call.function, code, time.time() - call.wall)
        if call.cold and call.sent_at and call.queued_at:
            self.of(call.function).cold_start_seconds.observe(call.sent_at - call.queued_at)

    # ----- async calls, deploys, the call graph: off the hot path ---------------------------

    def async_finished(self, name: str, status: str) -> None:
        counts = self.of(name).async_finished
        counts[status] = counts.get(status, 0) + 1

    def retried(self, name: str) -> None:
        self.of(name).retries += 1

    def deploy_waited(self, name: str, ok: bool, took_s: float) -> None:
        deploys = self.of(name).deploys
        outcome = "ok" if ok else "failed"
        hist = deploys.get(outcome)
        if hist is None:
            hist = deploys[outcome] = Histogram(DEPLOY_BUCKETS_S)
        hist.observe(took_s)

    def add_edges(self, edges: Iterable[tuple[tuple[Any, Any, bool, bool], list[float]]]) -> None:
        """Task-call edges as the gateway sums them between trace flushes: ((caller, callee, sync, local), [n, ms])."""
        task_calls = self.task_calls
        for (caller, callee, _sync, local), (n, _ms) in edges:
            if not isinstance(callee, str):
                continue
            key = (caller if isinstance(caller, str) else "", callee, local)
            task_calls[key] = task_calls.get(key, 0) + int(n)

    def forget(self, deployed: Iterable[str]) -> None:
        """Drop what is kept of functions no longer deployed (their series end; Prometheus reads a counter
        that restarts from zero as a reset)."""
        keep = set(deployed)
        for name in [n for n in self.functions if n not in keep]:
            del self.functions[name]
        for key in [k for k in self.task_calls if k[1] not in keep]:
            del self.task_calls[key]


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


class GatewayCollector(Collector):  # reads the gateway it is given (Any: core imports this module)
    """Builds every family from the gateway's state at scrape time.

    It reads many parts of the gateway (catalogue, groups, broker, async calls, ingress, counters), so it is
    handed the gateway rather than each of them.
    """

    def __init__(self, gw: Any) -> None:
        self.gw = gw

    def collect(self) -> Iterator[Metric]:
        gw = self.gw
        tel = gw.telemetry
        deployed = sorted(gw.catalogue.functions)
        tel.forget(deployed)
        yield from self._openfaas(gw, tel, deployed)
        yield from self._per_function(gw, tel, deployed)
        yield from self._gateway_totals(gw)
        yield from self._autoscaler(gw)

    @staticmethod
    def _autoscaler(gw: Any) -> Iterator[Metric]:
        """The optimizer's latest decision per group, as it reported it to the store (GET /optimizer's "scaling");
        nothing when it has not reported. Only groups this gateway knows become label values."""
        scaling = (getattr(gw, "optimizer_status", None) or {}).get("scaling") or {}
        decisions = scaling.get("groups") or {}
        families = [
            ("observed_concurrency", "calls in flight plus queued, the group's members together, newest sample"),
            ("stable_concurrency", "mean concurrency over the stable window"),
            ("panic_concurrency", "mean concurrency over the panic window"),
            ("target_concurrency", "calls in flight per instance the autoscaler aims at"),
            ("desired_replicas", "replicas the autoscaler (or a manual override) wants"),
            ("panic", "1 while the group is in panic mode (a burst: scaling up, never down)"),
        ]
        out = {key: GaugeMetricFamily(f"nuclide_autoscaler_{key}", doc, labels=["group"]) for key, doc in families}
        for gid in sorted(decisions):
            if gid not in gw.catalogue.groups:
                continue
            d = decisions[gid]
            for key, _ in families:
                value = d.get("desired" if key == "desired_replicas" else key)
                if isinstance(value, bool):
                    value = int(value)
                if isinstance(value, (int, float)):
                    out[key].add_metric([gid], value)
        yield from out.values()

    @staticmethod
    def _openfaas(gw: Any, tel: Telemetry, deployed: list[str]) -> Iterator[Metric]:
        total = _counter("gateway_function_invocation", "calls of a function answered, by HTTP status"
                         " (sync invocations and async attempts)", ("function_name", "code"))
        # OpenFaaS's Go client names this counter without "_total", which prometheus_client always appends
        # to a counter: untyped keeps the series name dashboards query (rate() works on it all the same)
        started = UnknownMetricFamily("gateway_function_invocation_started", "calls of a function started",
                                      labels=["function_name"])
        seconds = HistogramMetricFamily("gateway_functions_seconds", "seconds from taking a call to its answer",
                                        labels=["function_name", "code"])
        service = GaugeMetricFamily("gateway_service_count", "ready replicas of a function (its group's instances)",
                                    labels=["function_name"])
        for name in deployed:
            stats = tel.functions.get(name)
            if stats is not None:
                for code, hist in sorted(stats.codes.items()):
                    total.add_metric([name, str(code)], hist.count)
                    seconds.add_metric([name, str(code)], hist.buckets(), hist.sum_s)
                started.add_metric([name], stats.started)
            info = gw.catalogue.functions[name]
            group = gw.catalogue.groups.get(info.group_id) if info.group_id else None
            service.add_metric([name], int(group.get("replicas_ready") or 0) if group else 0)
        yield from (total, started, seconds, service)

    @staticmethod
    def _per_function(gw: Any, tel: Telemetry, deployed: list[str]) -> Iterator[Metric]:
        cold = _counter("nuclide_function_cold_starts", "calls that waited for an instance to start",
                        ("function_name",))
        cold_s = HistogramMetricFamily("nuclide_function_cold_start_seconds",
                                       "seconds a cold call waited for an instance", labels=["function_name"])
        async_calls = _counter("nuclide_function_async_calls", "async calls finished, by status (DONE, FAILED,"
                               " DEAD)", ("function_name", "status"))
        dead = _counter("nuclide_function_dead_letters", "async calls dead-lettered (redrivable)",
                        ("function_name",))
        retries = _counter("nuclide_function_retries", "async call attempts retried after a failure",
                           ("function_name",))
        queue = GaugeMetricFamily("nuclide_function_queue_depth", "calls waiting in this gateway for a free"
                                  " instance", labels=["function_name"])
        deploy = HistogramMetricFamily("nuclide_function_deploy_seconds", "seconds a deploy request waited for"
                                       " its instances (build included), by outcome",
                                       labels=["function_name", "outcome"])
        tasks = _counter("nuclide_task_calls", "task-to-task calls, in-process in a fusion group (fused) or"
                         " through the gateway (remote)", ("caller", "function_name", "mode"))
        queues = gw.broker.queues if gw.broker is not None else {}
        for name in deployed:
            queue.add_metric([name], len(queues.get(name) or ()))
            stats = tel.functions.get(name)
            if stats is None:
                continue
            cold.add_metric([name], stats.cold_starts)
            cold_s.add_metric([name], stats.cold_start_seconds.buckets(), stats.cold_start_seconds.sum_s)
            for status, n in sorted(stats.async_finished.items()):
                async_calls.add_metric([name, status], n)
            dead.add_metric([name], stats.async_finished.get("DEAD", 0))
            retries.add_metric([name], stats.retries)
            for outcome, hist in sorted(stats.deploys.items()):
                deploy.add_metric([name, outcome], hist.buckets(), hist.sum_s)
        for (caller, callee, fused), n in sorted(tel.task_calls.items()):
            tasks.add_metric([caller, callee, "fused" if fused else "remote"], n)
        yield from (cold, cold_s, async_calls, dead, retries, queue, deploy, tasks)

    @staticmethod
    def _gateway_totals(gw: Any) -> Iterator[Metric]:
        """The unlabelled families nuclide has always exported (dashboards and tests name them)."""
        for key, doc in (("invocations", "HTTP invocations through this gateway"),
                         ("cold_starts", "invocations that waited for an instance to start"),
                         ("scaled_to_zero", "groups scaled to zero after idling"),
                         ("woken", "scaled-to-zero groups woken by a call")):
            family = _counter(f"nuclide_{'wakeups' if key == 'woken' else key}", doc)
            family.add_metric([], gw.counters[key])
            yield family
        if gw.calls is not None:
            for key, value in gw.calls.counters.items():
                family = _counter(f"nuclide_async_{key}", f"async calls: {key}")
                family.add_metric([], value)
                yield family
        if gw.ingress is not None:
            for key, value in gw.ingress.counters.items():
                family = _counter(f"nuclide_ingress_{key}", f"ZeroMQ ingress: {key}")
                family.add_metric([], value)
                yield family
        # several gateways: which one this is (each is scraped on its own), and how many it knows are live
        info = GaugeMetricFamily("nuclide_gateway_info", "this gateway: its boot id and name (value 1)",
                                 labels=["gateway_id", "gateway_name"])
        info.add_metric([gw.boot_id, gw.settings.gateway_name], 1)
        yield info
        yield GaugeMetricFamily("nuclide_gateways", "live gateways this one knows of, itself included",
                                value=len(gw.gateways))
        if gw.broker is not None:
            yield GaugeMetricFamily("nuclide_instances", "instances connected to this gateway",
                                    value=len(gw.broker.instances))
            yield GaugeMetricFamily("nuclide_queued_calls", "calls waiting for a free instance, all functions",
                                    value=sum(len(q) for q in gw.broker.queues.values()))
        yield GaugeMetricFamily("nuclide_log_followers", "open log-following responses (GET /functions/{name}/logs"
                                "?follow=true)", value=gw.log_followers)


def registry_for(gw: Any) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one, which would add this process's metrics
    and could hold collectors of another gateway started in the same process by a test)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gw))
    registry.register(ServiceCollector(lambda: gw.service_metrics))  # the other services' families
    return registry
