"""The optimizer service: follows the gateway's call traces and load, applies a strategy's setups, scales groups."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import zmq

from shared import protocol
from shared.aiosock import AsyncSocket, RpcClient
from shared.config import Settings
from shared.errors import BuildFailed, Conflict, DeadlineExceeded, NuclideError, ProtocolError
from shared.gateways import GATEWAY_BEAT_S
from shared.logs import get_logger
from shared.storeclient import StoreClient
from services.optimizer.metrics import OptimizerMetrics
from services.optimizer.scaling import Autoscaling
from services.optimizer.strategies.base import Strategy
from services.optimizer.callgraph import GRAPH_WINDOW_S, EdgeBuckets, aggregate

log = get_logger(__name__)

TRACE_KEEP = 200_000  # newest edges and calls kept in memory
STATUS_INTERVAL_S = 1.0
APPLY_TIMEOUT_S = 300.0
APPLY_POLL_S = 0.2  # how often a regroup under way is looked at


class Optimizer:
    def __init__(self, settings: Settings, ctx: zmq.Context, strategy: Strategy) -> None:
        self.settings = settings
        self.strategy = strategy
        self.store = StoreClient(RpcClient(ctx, settings.store_rpc, "store"))
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"trace")
        sub.setsockopt(zmq.SUBSCRIBE, b"load")  # per-function concurrency, for the autoscaler
        sub.connect(settings.gateway_pub)
        # every gateway's traces: the call graph is the sum of what each gateway routed (shared/gateways.py)
        self._pubs = {settings.gateway_pub}
        self._sub_sock = sub
        self._sub = AsyncSocket(sub, self._on_trace)
        # (monotonic time, caller, callee, sync, local, mean took_ms, calls) and (time, function, took_ms, status)
        self.edges: deque[tuple[float, Any, str, bool, bool, float, int]] = deque(maxlen=TRACE_KEEP)
        self.calls: deque[tuple[float, str, float, int]] = deque(maxlen=TRACE_KEEP)
        self.graph = EdgeBuckets()  # the same edges summed over GRAPH_WINDOW_S, for the status's "graph"
        # entry calls and edges heard since the start, and from which gateways' PUBs (GET /optimizer's "traced")
        self.traced = {"calls": 0, "edges": 0}
        self.status: dict[str, Any] = {"strategy": strategy.name, "state": "starting", "rounds": [],
                                       "current_setup": [], "best_setup": None, "best_median_ms": None}
        self.autoscaling = Autoscaling(settings, self.store)
        self.metrics = OptimizerMetrics()  # what a gateway's GET /metrics shows of the optimizer

    def _on_trace(self, frames: list[bytes]) -> None:
        try:
            topic, msg = protocol.decode_published(frames)
        except ProtocolError as exc:
            log.warning("dropped malformed trace", error=str(exc))
            return
        if topic == b"load":
            self.autoscaling.on_load(msg.header)
            return
        now = time.monotonic()
        self.traced["calls"] += len(msg.header.get("calls") or ())
        self.traced["edges"] += len(msg.header.get("edges") or ())
        for e in msg.header.get("edges") or []:
            # [caller, callee, sync, local, mean took_ms, calls]; calls is 1 when absent
            if isinstance(e, list) and len(e) in (5, 6):
                try:
                    edge = (now, e[0], str(e[1]), bool(e[2]), bool(e[3]), float(e[4]), int(e[5]) if len(e) == 6 else 1)
                except (TypeError, ValueError):
                    continue
                self.edges.append(edge)
                self.graph.add(*edge)
        for c in msg.header.get("calls") or []:
            if isinstance(c, list) and len(c) == 3:
                self.calls.append((now, str(c[0]), float(c[1]), int(c[2])))

    async def current_setup(self) -> list[list[str]]:
        groups = await self.store.groups_list()
        return [sorted(g) for g in groups["setup"]]

    async def apply(self, setup: list[list[str]]) -> None:
        """Set a setup and wait until it is in force; raises when it fails (the setup in force stays)."""
        result = await self.store.groups_set(setup)
        regroup = result.get("regroup")
        deadline = time.monotonic() + APPLY_TIMEOUT_S
        while regroup is not None and regroup["state"] == "deploying":
            if time.monotonic() > deadline:
                self.metrics.regroup("failed")
                raise DeadlineExceeded(f"setup {setup} did not take over within {APPLY_TIMEOUT_S:g} s")
            await asyncio.sleep(APPLY_POLL_S)
            regroup = await self.store.regroup_get(regroup["id"])
        if regroup is not None and regroup["state"] == "failed":
            self.metrics.regroup("failed")
            raise BuildFailed(f"setup {setup} failed: {regroup['error']}")
        if regroup is not None and regroup["state"] != "done":
            self.metrics.regroup("failed")
            raise Conflict(f"setup {setup} was {regroup['state']}: {regroup['error']}")
        self.metrics.regroup("applied")
        self.status["current_setup"] = await self.current_setup()

    def decide(self, setup: list[list[str]], decision: str, reason: str, **evidence: Any) -> None:
        entry = {"round": len(self.status["rounds"]) + 1, "at": time.time(), "setup": setup,
                 "decision": decision, "reason": reason, **evidence}
        self.status["rounds"].append(entry)
        self.metrics.decided(decision)
        del self.status["rounds"][:-200]
        log.info("optimizer decision", **entry)

    async def _report(self) -> None:
        while True:
            try:  # first, and on its own: a gateway counts the optimizer down when these stop
                await self.store.metrics_report("optimizer", self.metrics.snapshot(self.traced, self.autoscaling.scaled),
                                                STATUS_INTERVAL_S, timeout_s=2.0)
            except NuclideError as exc:
                log.warning("metrics not reported", error=exc.message)
            try:
                self.status["current_setup"] = await self.current_setup()
                self.status["updated_at"] = time.time()
                self.status["graph"] = aggregate(self.graph.edges(), time.monotonic() - GRAPH_WINDOW_S)
                self.status["graph_window_s"] = GRAPH_WINDOW_S
                self.status["traced"] = {**self.traced, "gateways": sorted(self._pubs)}
                self.status["scaling"] = self.autoscaling.status()
                await self.store.kv_put("optimizer", self.status, timeout_s=2.0)
            except Exception as exc:  # the store may be restarting; report again next time
                log.warning("status not reported", error=repr(exc))
            await asyncio.sleep(STATUS_INTERVAL_S)

    def _strategy_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.status["state"] = f"failed: {task.exception()!r}"
            log.error("strategy failed", error=repr(task.exception()))

    def follow_gateways(self, gateways: list[dict[str, Any]]) -> None:
        """Subscribe to the traces of every live gateway, each once (the configured one until any is known)."""
        wanted = {str(g["pub"]) for g in gateways if isinstance(g, dict) and g.get("pub")}
        if not wanted:
            return
        for endpoint in sorted(wanted - self._pubs):
            self._sub_sock.connect(endpoint)
            self._pubs.add(endpoint)
            log.info("following a gateway's traces", endpoint=endpoint)
        for endpoint in sorted(self._pubs - wanted):
            self._sub_sock.disconnect(endpoint)
            self._pubs.discard(endpoint)

    async def _watch_gateways(self) -> None:
        while True:
            try:
                self.follow_gateways(await self.store.gateways_list())
            except NuclideError as exc:
                log.info("could not list the gateways; will retry", error=exc.message)
            await asyncio.sleep(GATEWAY_BEAT_S)

    async def serve(self, stop: asyncio.Event) -> None:
        watcher = asyncio.ensure_future(self._watch_gateways())
        reporter = asyncio.ensure_future(self._report())
        runner = asyncio.ensure_future(self.strategy.run(self))
        runner.add_done_callback(self._strategy_done)
        scaler = asyncio.ensure_future(self.autoscaling.run())
        log.info("optimizer ready", strategy=self.strategy.name)
        await stop.wait()  # a strategy that finishes (a schedule played out) leaves the status reported
        for task in (watcher, reporter, runner, scaler):
            task.cancel()
        self._sub.close()
        self.store.close()
