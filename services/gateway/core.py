"""The gateway's state and its lean invoke path (raw ASGI, no framework, no store round trip).

:class:`Gateway` owns the broker, the store and deployer RPC clients and the
catalog of functions (followed from the store's events). ``asgi`` sends invoke
routes straight to :meth:`Gateway.invoke` and everything else to the FastAPI
control plane in ``control.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from typing import Any

import zmq
from prometheus_client import generate_latest

from shared import protocol
from shared.aiosock import RpcClient
from shared.auth import check_bearer, may_call_private
from shared.config import Settings
from shared.errors import (
    DeadlineExceeded, Forbidden, InvalidRequest, NotFound, NuclideError, PayloadTooLarge, TooManyRequests,
    Unavailable,
)
from shared.failures import bounded, result_error
from shared.gateways import GATEWAY_BEAT_S, GATEWAY_TTL_S, gateway_record
from shared.logs import get_logger
from shared.names import invoke_target
from shared.statefeed import StateFeed
from services.gateway import fusionizer
from services.gateway.broker import Broker, Call, Instance
from services.gateway.async_calls import AsyncCalls
from services.gateway.http import valid_header
from services.gateway.ingress import Ingress
from services.gateway.load import LOAD_PUBLISH_S, LOAD_SAMPLE_S, LoadMeter
from services.gateway.telemetry import Telemetry, registry_for
from shared.triggers import DEFAULT_RETRY, max_body_bytes, validate_triggers

log = get_logger(__name__)

_JSON_CT = (b"content-type", b"application/json")
IDLE_SWEEP_S = 1.0  # how often idle groups are looked for
TRACE_FLUSH_S = 0.1  # how often the call graph is published
_SKIP_RESPONSE_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


class FunctionInfo:
    """What the invoke path needs to know about a function, kept from store events."""

    __slots__ = ("name", "private", "timeout_s", "state", "version", "group_id", "last_error", "retry", "cron",
                 "topics", "min_replicas", "idle_timeout_s", "max_body", "allow_calls_from")

    def __init__(self, record: dict[str, Any]) -> None:
        self.name = record["name"]
        self.private = bool(record.get("private", False))
        self.timeout_s = float(record.get("timeout_s") or 30.0)
        self.state = record.get("state")
        self.version = record.get("version")
        self.group_id = (record.get("group") or {}).get("id")
        self.last_error = record.get("last_error") or ""
        spec = record.get("spec") or {}
        self.min_replicas = int(spec.get("min_replicas", 1))
        self.idle_timeout_s = float(spec.get("idle_timeout_s") or 300.0)
        self.retry = {**DEFAULT_RETRY, **(spec.get("retry") or {})}
        self.allow_calls_from = frozenset(str(n) for n in spec.get("allow_calls_from") or ())
        try:
            triggers = validate_triggers(tuple(spec.get("triggers") or ()))
        except NuclideError:
            triggers = []
        self.cron = [t for t in triggers if t["kind"] == "cron"]
        self.topics = [t["topic"] for t in triggers if t["kind"] == "topic"]
        self.max_body = max_body_bytes(triggers)  # (bytes, http trigger name) the function asks for, or None


class DeployOutcome:
    __slots__ = ("ok", "error", "log_tail")

    def __init__(self, ok: bool, error: str = "", log_tail: str = "") -> None:
        self.ok, self.error, self.log_tail = ok, error, log_tail


_TRUE = (b"true", b"1", b"yes")
# never handed to function code: the caller's credentials are for the gateway only
_CREDENTIALS = frozenset({b"authorization"})
# read by the gateway's async path (submission, callback, idempotency), not part of the call itself
_ASYNC_CONTROL = _CREDENTIALS | {b"x-nuclide-async", b"x-callback-url", b"x-idempotency-key"}


def function_headers(raw_headers: list, drop: frozenset[bytes] = _CREDENTIALS) -> list[list[str]]:
    """The request's headers as the function sees them: every path that makes a call of a request uses this."""
    # names are lowercased by every server we run under, but not by contract: compare them lowercased
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in raw_headers if k.lower() not in drop]


def _wants_async(raw_headers: list) -> bool:
    for k, v in raw_headers:
        if k.lower() == b"x-nuclide-async" and v.strip().lower() in _TRUE:
            return True
    return False


class _DirectAnswer:
    """Stands in for a call's future on the direct path: the broker's result answers the request at once."""

    __slots__ = ("gateway", "req", "call", "_done")

    def __init__(self, gateway: "Gateway", req: Any, call: Call) -> None:
        self.gateway, self.req, self.call, self._done = gateway, req, call, False

    def done(self) -> bool:
        return self._done

    def set_result(self, value: tuple[dict[str, Any], bytes]) -> None:
        self._done = True
        try:
            answer = self.gateway._finish(self.call, value[0], value[1])
        except Exception:  # never lose the answer (nor the other results of a batch) to a bug here
            log.exception("could not build the answer of a call", call_id=self.call.call_id)
            answer = self.gateway.error_response(NuclideError("internal error; see the gateway log"),
                                                 self.call.call_id)
        self.req.respond(*self.gateway.answer(self.req.headers, answer))

    def set_exception(self, exc: BaseException) -> None:
        self._done = True
        call = self.call
        if not isinstance(exc, NuclideError):
            exc = NuclideError(str(exc))
        self.gateway._record(call.call_id, call.function, call.wall, "FAILED", exc.http_status, exc.message, call.cold)
        self.gateway.telemetry.call_done(call, exc.http_status)
        self.req.respond(*self.gateway.answer(self.req.headers, self.gateway.error_response(exc, call.call_id)))


def json_body(status: int, payload: Any) -> tuple[int, bytes]:
    return status, json.dumps(payload, separators=(",", ":")).encode()


def error_payload(exc: NuclideError) -> dict[str, Any]:
    return {"error": exc.to_wire()}


class Gateway:
    def __init__(self, settings: Settings, ctx: zmq.Context, token: str) -> None:
        self.settings = settings
        self.token = token.encode()
        self.ctx = ctx
        self.functions: dict[str, FunctionInfo] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.last_used: dict[str, float] = {}  # group id -> monotonic time of its last call
        self._waking: set[str] = set()
        self.counters = {"invocations": 0, "cold_starts": 0, "scaled_to_zero": 0, "woken": 0}
        self.telemetry = Telemetry()  # per-function counters, rendered by GET /metrics (telemetry.py)
        self._metrics_registry = registry_for(self)
        self.optimizer_status: dict[str, Any] | None = None  # read from the store by GET /metrics
        self.service_metrics: dict[str, Any] | None = None  # the store's metrics.get, read by GET /metrics
        self._started_mono = time.monotonic()
        self.deploy_waiters: dict[tuple[str, int], asyncio.Future] = {}
        self.regroup_waiters: dict[int, asyncio.Future] = {}  # regroup id -> its record once it ended
        self._prefix = os.urandom(4).hex()
        self.boot_id = self._prefix  # owner of the async calls this gateway process dispatches
        self.record = gateway_record(settings, self.boot_id)  # what the store's feed tells of this gateway
        self.gateways: dict[str, dict[str, Any]] = {self.boot_id: self.record}  # live gateways, this one too
        self.beat_ok_at = time.monotonic()  # when the store last took this gateway's beat
        self._counter = itertools.count(1)
        self.started_at = time.time()
        self.store: RpcClient | None = None
        self.deployer: RpcClient | None = None
        self.broker: Broker | None = None
        self.feed: StateFeed | None = None
        self.calls: AsyncCalls | None = None
        self.ingress: Ingress | None = None
        self._bg: set[asyncio.Task] = set()
        self._fusionizer_host = settings.advertised_host
        self.pub: zmq.Socket | None = None
        # (caller, callee, sync, local) -> [calls, total ms] since the last flush: a chain's edges
        # repeat on every call, so they are summed here instead of kept (and published) one by one
        self.trace_edges: dict[tuple[Any, Any, bool, bool], list[float]] = {}
        self.trace_calls: list[list[Any]] = []  # [function, took_ms, status] of entry calls
        self.log_followers = 0  # open GET /functions/{name}/logs?follow=true responses (nuclide_log_followers)
        self.stopping = False

    async def start(self) -> None:
        """Open the sockets and start the background work; a failure (a port taken) closes what was opened."""
        try:
            self._start()
        except BaseException:
            await self.stop()
            raise

    def _start(self) -> None:
        s = self.settings
        self.store = RpcClient(self.ctx, s.store_rpc, "store")
        self.deployer = RpcClient(self.ctx, s.deployer_rpc, "deployer")
        self.broker = Broker(self.ctx, s.gateway_router, s.queue_limit, self._instance_ready, self._instance_gone,
                             self._on_task_call, self._on_stuck, self.add_reports,
                             link=s.instance_link if s.backend in ("process", "docker") else "", peers=self.peer_records)
        self.feed = StateFeed(self.ctx, s.store_pub, self.store, self._on_snapshot, self._on_event)
        self.feed.start()
        self._background(self._announce())
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 10_000)
        self.pub.bind(s.gateway_pub)
        self._background(self._flush_traces())
        self._background(self._publish_load())
        self.calls = AsyncCalls(self)
        self.calls.start()
        self._background(self._idle_sweeper())
        self.ingress = Ingress(self)
        self.ingress.start()

    async def stop(self) -> None:
        self.stopping = True
        if self.ingress is not None:
            self.ingress.close()
        if self.calls is not None:
            try:
                await asyncio.wait_for(self.calls.stop(), 5.0)
            except asyncio.TimeoutError:
                pass
        for task in self._bg:
            task.cancel()
        if self.store is not None:
            try:  # gone at once: its async calls (flushed above) go to the other gateways without a wait
                await self.store.call("gateway.bye", {"id": self.boot_id}, timeout_s=2.0)
            except NuclideError as exc:
                log.warning("could not say BYE to the store", error=exc.message)
        for closer in (self.broker, self.feed, self.store, self.deployer):
            if closer is not None:
                closer.close()
        if self.pub is not None:
            self.pub.close(linger=0)

    # ----- state from the store ------------------------------------------------

    def _on_snapshot(self, snap: dict[str, Any]) -> None:
        self.functions = {rec["name"]: FunctionInfo(rec) for rec in snap.get("functions", [])}
        self.groups = {g["id"]: g for g in snap.get("groups", [])}
        self.gateways = {g["id"]: g for g in snap.get("gateways", [])}
        self.gateways[self.boot_id] = self.record

    def peer_records(self) -> list[dict[str, Any]]:
        """The live gateways, this one included: what the broker tells instances to connect to."""
        return list(self.gateways.values())

    async def _announce(self) -> None:
        """Beat to the store every GATEWAY_BEAT_S: the other gateways and the deployer learn of this one, and
        the async calls it owns stay its own."""
        assert self.store is not None
        while True:
            if time.monotonic() - self.beat_ok_at > GATEWAY_TTL_S and self.calls is not None:
                self.calls.hold()  # others may have taken our calls meanwhile (services/gateway/async_calls.py)
            try:
                live = await self.store.call("gateway.announce", {"gateway": self.record}, timeout_s=GATEWAY_BEAT_S * 2)
                self.beat_ok_at = time.monotonic()
                self.gateways = {g["id"]: g for g in live["gateways"]}
                self.gateways[self.boot_id] = self.record
                if self.calls is not None and self.calls.holding:
                    await self.calls.resume_after_stall()
            except NuclideError as exc:
                log.warning("could not announce this gateway to the store", error=exc.message)
            await asyncio.sleep(GATEWAY_BEAT_S)

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "function.changed":
            self.apply_function(data["function"])
        elif kind == "function.deleted":
            name = data["name"]
            self.functions.pop(name, None)
            if self.broker:
                self.broker.fail_function(name, NotFound(f"function '{name}' was deleted"))
        elif kind == "group.changed":
            group = data["group"]
            self.groups[group["id"]] = group
            if group["replicas_desired"] == 0:
                self._wake_if_waiting(group)
        elif kind == "group.deleted":
            self.groups.pop(data["group_id"], None)
        elif kind == "gateway.changed":
            self.gateways[data["gateway"]["id"]] = data["gateway"]
        elif kind == "gateway.gone":
            if data["id"] != self.boot_id:
                self.gateways.pop(data["id"], None)
        elif kind == "regroup.changed":
            regroup = data["regroup"]
            fut = self.regroup_waiters.get(int(regroup["id"]))
            if fut is not None and not fut.done() and regroup["state"] != "deploying":
                fut.set_result(regroup)
        elif kind == "deploy.failed":
            fut = self.deploy_waiters.get((data["group_id"], int(data["group_version"])))
            if fut is not None and not fut.done():
                fut.set_result(DeployOutcome(False, data.get("error", "deploy failed"), data.get("log_tail", "")))
        elif kind == "instance.changed":
            inst = data.get("instance") or {}
            if inst.get("state") == "exited" and self.broker:
                # the last log line usually says why (a memory limit, a traceback's last line)
                last = (inst.get("error") or "").strip().splitlines()[-1:] or [""]
                detail = f"instance exited with code {inst.get('exit_code')}" + (f": {last[0][:300]}" if last[0] else "")
                self.broker.instance_exited(inst["id"], detail)

    def apply_function(self, record: dict[str, Any]) -> None:
        self.functions[record["name"]] = FunctionInfo(record)

    def _instance_ready(self, inst: Instance) -> None:
        self._background(self._report_ready(inst))

    async def _report_ready(self, inst: Instance) -> None:
        assert self.store is not None
        try:
            await self.store.call("instance.ready", {
                "id": inst.id.decode(errors="replace"), "group_id": inst.group,
                "group_version": inst.group_version, "functions": inst.functions,
            })
        except NuclideError as exc:
            log.warning("could not report instance ready", error=str(exc))
        fut = self.deploy_waiters.get((inst.group, inst.group_version))
        if fut is not None and not fut.done():
            fut.set_result(DeployOutcome(True))

    # ----- scale to zero -----------------------------------------------------------------

    def touch(self, info: FunctionInfo) -> bool:
        """Note a call for a function; wake its group if it is scaled to zero. True: a cold start."""
        gid = info.group_id
        if gid is None:
            return False
        self.last_used[gid] = time.monotonic()
        group = self.groups.get(gid)
        if group is not None and group["replicas_desired"] == 0:
            self._wake(gid, "a call arrived")
        assert self.broker is not None
        return not self.broker.routes.get(info.name)

    def _wake(self, gid: str, reason: str) -> None:
        if gid in self._waking:
            return
        self._waking.add(gid)
        self.counters["woken"] += 1

        async def wake() -> None:
            assert self.store is not None
            try:
                await self.store.call("group.scale", {"group_id": gid, "replicas": 1, "reason": reason})
            except NuclideError as exc:
                log.warning("could not wake a scaled-to-zero group", group=gid, error=exc.message)
            finally:
                self._waking.discard(gid)

        self._background(wake())

    def _wake_if_waiting(self, group: dict[str, Any]) -> None:
        assert self.broker is not None
        if any(self.broker.queues.get(name) for name in group["members"]):
            self._wake(group["id"], "calls are waiting")

    async def _idle_sweeper(self) -> None:
        """Scale groups whose every task allows it (minReplicas 0) to zero after their idle timeout."""
        while True:
            await asyncio.sleep(IDLE_SWEEP_S)
            now = time.monotonic()
            assert self.broker is not None and self.store is not None
            for gid, group in list(self.groups.items()):
                if group.get("regroup"):
                    continue  # proposed by a regroup under way: idle by nature until it takes over
                members = [self.functions.get(name) for name in group["members"]]
                if group["replicas_desired"] == 0:
                    self._wake_if_waiting(group)
                    continue
                if group["state"] != "ready" or not members or any(m is None or m.min_replicas > 0 for m in members):
                    continue
                idle_s = max(m.idle_timeout_s for m in members if m is not None)
                # calls through the other gateways count too: the instances say when they last ran one
                used = max([self.last_used.get(gid, self._started_mono), *(
                    inst.last_call_at for inst in self.broker.instances.values() if inst.group == gid)])
                if now - used < idle_s:
                    continue
                busy = any(self.broker.queues.get(name) for name in group["members"]) or any(
                    inst.inflight for inst in self.broker.instances.values() if inst.group == gid)
                if busy:
                    continue
                try:
                    await self.store.call("group.scale", {"group_id": gid, "replicas": 0,
                                                          "reason": f"idle for {idle_s:g} s"})
                    self.counters["scaled_to_zero"] += 1
                    log.info("scaled to zero", group=gid, idle_s=idle_s)
                except NuclideError as exc:
                    log.warning("could not scale to zero", group=gid, error=exc.message)

    def metrics(self) -> bytes:
        """Prometheus text format (the families are listed in services/gateway/telemetry.py)."""
        return generate_latest(self._metrics_registry)

    def _on_stuck(self, inst: Instance, call: Call) -> None:
        """An instance kept a call past its timeout without answering: have the deployer replace it."""
        log.warning("instance stuck past a call's timeout; replacing it", instance=inst.id.decode(errors="replace"),
                    function=call.function, timeout_s=call.timeout_s)
        assert self.broker is not None
        self.broker._drop_instance(inst, f"stuck past the {call.timeout_s:g} s timeout of '{call.function}'")

        async def kill() -> None:
            assert self.deployer is not None
            try:
                await self.deployer.call("instance.replace", {"id": inst.id.decode(errors="replace")}, timeout_s=5.0)
            except NuclideError as exc:
                log.warning("could not have a stuck instance replaced", error=exc.message)

        self._background(kill())

    def _instance_gone(self, inst: Instance, reason: str) -> None:
        pass  # the deployer owns instance lifecycles; the store learns exits from it

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def wait_deployed(self, group_id: str, group_version: int, timeout_s: float) -> DeployOutcome:
        assert self.broker is not None
        for inst in self.broker.instances.values():
            if inst.group == group_id and inst.group_version == group_version:
                return DeployOutcome(True)
        key = (group_id, group_version)
        fut = self.deploy_waiters.get(key)
        if fut is None:
            fut = self.deploy_waiters[key] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"the deployment did not become ready within {timeout_s:g} s; it continues in the background,"
                " check GET /functions/{name}"
            ) from None
        finally:
            if fut.done():
                self.deploy_waiters.pop(key, None)

    async def wait_regrouped(self, regroup_id: int, timeout_s: float) -> dict[str, Any]:
        """The regroup's record once it has ended (done, failed, superseded or cancelled)."""
        assert self.store is not None
        fut = self.regroup_waiters.get(regroup_id)
        if fut is None:
            fut = self.regroup_waiters[regroup_id] = asyncio.get_running_loop().create_future()
        regroup: dict[str, Any] = {}
        try:
            # it may have ended before this waiter was there to see the event
            regroup = await self.store.call("regroup.get", {"id": regroup_id})
            if regroup["state"] == "deploying":
                regroup = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
            return regroup
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the new setup did not take over within {timeout_s:g} s; it continues in the"
                                   " background, check GET /groups") from None
        finally:
            if fut.done() or regroup.get("state", "deploying") != "deploying":
                self.regroup_waiters.pop(regroup_id, None)

    # ----- traces ---------------------------------------------------------------------

    async def _flush_traces(self) -> None:
        """Publish the call graph in batches (topic "trace"), off the invoke path."""
        while True:
            await asyncio.sleep(TRACE_FLUSH_S)
            if not self.trace_edges and not self.trace_calls:
                continue
            summed, self.trace_edges = self.trace_edges, {}
            self.telemetry.add_edges(summed.items())
            calls, self.trace_calls = self.trace_calls, []
            # [caller, callee, sync, local, mean ms, calls]
            edges = [[*key, round(total / n, 3), int(n)] for key, (n, total) in summed.items()]
            try:
                assert self.pub is not None
                self.pub.send_multipart(protocol.encode_published(b"trace", {"edges": edges, "calls": calls}), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # traces are best effort: subscribers see a gap in the sample, nothing else

    async def _publish_load(self) -> None:
        """Publish each function's mean concurrency (in flight plus queued) for the autoscaler (topic "load")."""
        meter = LoadMeter()
        per_report = max(1, round(LOAD_PUBLISH_S / LOAD_SAMPLE_S))
        while True:
            await asyncio.sleep(LOAD_SAMPLE_S)
            broker = self.broker
            if broker is None:
                continue
            meter.sample((call.function for call in broker.pending.values()), broker.queues)
            if meter.samples < per_report:
                continue
            report = {"gateway": self.boot_id, "interval_s": LOAD_PUBLISH_S, "functions": meter.take()}
            try:
                assert self.pub is not None
                self.pub.send_multipart(protocol.encode_published(b"load", report), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # best effort, like traces: the optimizer holds its decisions through a gap

    def add_edge(self, caller: Any, callee: Any, sync: bool, local: bool, took_ms: float, n: int = 1) -> None:
        key = (caller, callee, sync, local)
        slot = self.trace_edges.get(key)
        if slot is None:
            self.trace_edges[key] = [n, took_ms * n]
        else:
            slot[0] += n
            slot[1] += took_ms * n

    def add_reports(self, header: dict[str, Any]) -> None:
        """What an instance reported of the task calls it served in-process: edges, and the calls that failed."""
        self.add_edges(header.get("edges"))
        failed = header.get("failed_calls")
        if failed:
            self.record_failed_task_calls(failed)

    def record_failed_task_calls(self, rows: Any) -> None:
        """Record in-process task calls that failed: [call_id, parent_id, function, status, error, queued_at,
        finished_at] each, as sync calls of their own under their caller's (source "call")."""
        if not isinstance(rows, list):
            return
        for row in rows:
            try:
                call_id, parent_id, function, status, error, queued_at, finished_at = row
                if not (isinstance(call_id, str) and isinstance(function, str) and isinstance(status, int)
                        and isinstance(parent_id, (str, type(None))) and isinstance(error, str)):
                    continue
                self._record_failed_task_call(call_id, function, parent_id, status, bounded(error), float(queued_at),
                                              float(finished_at))
            except (TypeError, ValueError):
                continue  # a malformed row is dropped, like a malformed edge

    def add_edges(self, edges: Any) -> None:
        """Edges an instance reported with a RESULT or HEARTBEAT: [caller, callee, sync, local, mean ms, calls]."""
        if not isinstance(edges, list):
            return
        for e in edges:
            try:
                n = int(e[5]) if len(e) > 5 else 1
                if n >= 1:  # a count below one is malformed (and would divide by zero at the flush)
                    self.add_edge(e[0], e[1], e[2] is True, e[3] is True, float(e[4]), n)
            except (TypeError, ValueError, IndexError, KeyError):
                continue  # a malformed edge is dropped: traces are best effort

    # ----- task-to-task calls ---------------------------------------------------------

    def _on_task_call(self, ident: bytes, msg: Any) -> None:
        self._background(self._task_call(ident, msg.header, msg.body))

    async def _task_call(self, ident: bytes, header: dict[str, Any], body: bytes) -> None:
        assert self.broker is not None
        call_id = str(header.get("call_id") or self.new_call_id())
        name = str(header.get("function", ""))
        sync = not header.get("async")
        started = time.perf_counter()
        error: str | None = None
        try:
            info = self.functions.get(name)
            if info is None:
                raise NotFound(f"function '{name}' not found")
            if info.private:
                self._check_task_caller(info, header)
            deadline_ms = int(time.time() * 1000 + info.timeout_s * 1000)
            if sync and isinstance(header.get("deadline_ms"), int):
                deadline_ms = min(deadline_ms, header["deadline_ms"])
            invoke_header = dict(header, call_id=call_id, deadline_ms=deadline_ms)
            invoke_header["headers"] = list(header.get("headers") or []) + [
                ["fusionizer-server-address", self._fusionizer_host]]
            if not sync:
                assert self.calls is not None
                new_id, _ = await self.calls.submit(name, body, content_type=str(header.get("content_type") or ""),
                                                    headers=list(header.get("headers") or []), source="call",
                                                    parent_id=header.get("parent_id"), call_id=call_id)
                # the RESULT answers the caller's request id; the body names the durable call
                self.broker.reply(ident, {"call_id": call_id, "status": 202, "content_type": "application/json"},
                                  json.dumps({"call_id": new_id}).encode())
                self.add_edge(header.get("caller"), name, False, False, 0.0)
                return
            fut = asyncio.get_running_loop().create_future()
            timeout_s = max(0.001, deadline_ms / 1000 - time.time())
            self.touch(info)
            self.broker.submit(Call(call_id, name, invoke_header, body, fut, timeout_s))
            result, rbody = await fut
            out_header = {"call_id": call_id, "status": int(result.get("status", 200)),
                          "content_type": result.get("content_type") or "", "headers": result.get("headers") or []}
            if out_header["status"] >= 500:
                error = result_error(result, rbody)
        except NuclideError as exc:
            out_header = {"call_id": call_id, "status": exc.http_status, "content_type": "application/json"}
            rbody = json.dumps(error_payload(exc)).encode()
            if not sync:
                self.broker.reply(ident, out_header, rbody)
                return
            error = exc.message if exc.http_status >= 500 else None
        took_ms = (time.perf_counter() - started) * 1000
        self.add_edge(header.get("caller"), name, sync, False, took_ms)
        if error is not None:  # a failed task call is recorded as the in-process ones are (add_reports)
            parent_id = header.get("parent_id")
            now = time.time()
            self._record_failed_task_call(call_id, name, parent_id if isinstance(parent_id, str) else None,
                                          out_header["status"], error, now - took_ms / 1000, now)
        if sync:
            self.broker.reply(ident, out_header, rbody)

    def _check_task_caller(self, callee: FunctionInfo, header: dict[str, Any]) -> None:
        """Raise Forbidden unless the instance behind a task call may call this private function.

        The caller is the instance the CALL names, as the broker knows it (its group and the functions it
        serves, from its registration), and the function it is running, when that is one of those."""
        assert self.broker is not None
        inst_id = header.get("instance")
        inst = self.broker.instances.get(inst_id.encode()) if isinstance(inst_id, str) else None
        caller = header.get("caller")
        group = inst.group if inst is not None else None
        caller_fn = caller if inst is not None and isinstance(caller, str) and caller in inst.functions else None
        if not may_call_private(callee.group_id, callee.allow_calls_from, group, caller_fn):
            who = f"function '{caller_fn}'" if caller_fn else "a caller outside any function of this platform"
            raise Forbidden(f"function '{callee.name}' is private: {who} may not call it (only functions of its"
                            f" fusion group and those its spec.allowCallsFrom names may)")

    # ----- auth -----------------------------------------------------------------

    def check_token(self, authorization: str | bytes | None) -> None:
        check_bearer(authorization, self.token)

    # ----- the invoke path ----------------------------------------------------------

    def new_call_id(self) -> str:
        return f"{self._prefix}{next(self._counter):010x}"

    def error_response(self, exc: NuclideError, call_id: str) -> tuple[int, list, bytes]:
        status, payload = json_body(exc.http_status, error_payload(exc))
        headers = [_JSON_CT]
        if isinstance(exc, TooManyRequests):
            headers.append((b"retry-after", str(exc.details.get("retry_after_s", 1)).encode()))
        headers.append((b"x-call-id", call_id.encode()))
        return status, headers, payload

    async def invoke(self, scope: dict, receive: Any, send: Any, name: str, mode: str, path: str = "/") -> None:
        """An invocation through ASGI: async ones, and sync ones when the app runs under another server."""
        call_id = self.new_call_id()
        try:
            answer = await self._invoke(scope, receive, name, mode, path, call_id)
        except NuclideError as exc:
            answer = self.error_response(exc, call_id)
        status, headers, body = self.answer(scope["headers"], answer)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _invoke(self, scope: dict, receive: Any, name: str, mode: str, path: str,
                      call_id: str) -> tuple[int, list, bytes]:
        raw_headers = scope["headers"]
        info = self._check_access(name, raw_headers)
        body = await self._read_body(scope, receive, name)
        if mode == "async" or _wants_async(raw_headers):
            return await self._submit_async(name, body, scope.get("nuclide.headers", raw_headers), call_id)
        if self.functions.get(name) is not info:  # redeployed or deleted while the body was read
            info = self._check_access(name, raw_headers)
        call = self._new_call(info, scope["method"], path, scope["query_string"], raw_headers, body, mode, call_id)
        fut = call.future = asyncio.get_running_loop().create_future()
        self._submit(call)
        try:
            result, rbody = await fut
        except NuclideError as exc:
            self._record(call_id, name, call.wall, "FAILED", exc.http_status, exc.message, call.cold)
            self.telemetry.call_done(call, exc.http_status)
            raise
        return self._finish(call, result, rbody)

    # the direct path (services/gateway/http.py): no ASGI, no task, no future per call

    def direct_target(self, method: str, path: str,
                      headers: list[tuple[bytes, bytes]]) -> tuple[str, str, str] | None:
        """(function, mode, path below it) when a request is a sync invocation the HTTP server answers directly."""
        target = invoke_target(method, path)
        if target is None or target[1] == "async" or _wants_async(headers):
            return None
        return target

    def invoke_direct(self, req: Any) -> None:
        """Start a sync invocation read by the HTTP server; ``req.respond`` gets the answer."""
        call_id = self.new_call_id()
        try:
            info = self._check_access(req.name, req.headers)
            call = self._new_call(info, req.method, req.path, req.query, req.headers, req.body, req.mode, call_id)
            call.future = _DirectAnswer(self, req, call)
            self._submit(call)
        except NuclideError as exc:
            req.respond(*self.answer(req.headers, self.error_response(exc, call_id)))

    def _submit(self, call: Call) -> None:
        """Hand a sync call to the broker; one it refuses (its queue is full) is answered, so counted, here."""
        assert self.broker is not None
        try:
            self.broker.submit(call)
        except NuclideError as exc:
            self.telemetry.call_done(call, exc.http_status)
            raise

    def body_limit(self, name: str) -> int:
        """The largest invocation body ``name`` takes: its http trigger's maxRequestBodySize, else max_body_bytes;
        never more than max_body_ceiling_bytes."""
        info = self.functions.get(name)
        asked = info.max_body if info is not None else None
        if asked is None:
            return self.settings.max_body_bytes
        return min(asked[0], self.settings.max_body_ceiling_bytes)

    def body_too_large(self, name: str, size: int | None) -> PayloadTooLarge:
        """The 413 for a body over ``name``'s limit: which limit, where it comes from, and the ceiling."""
        s = self.settings
        info = self.functions.get(name)
        asked = info.max_body if info is not None else None
        body = f"request body is {size} bytes" if size is not None else "request body is"
        ceiling = f"max_body_ceiling_bytes, {s.max_body_ceiling_bytes}"
        if asked is None:
            return PayloadTooLarge(
                f"{body} over the {s.max_body_bytes} byte invoke limit (max_body_bytes); a function may ask for"
                f" more with spec.triggers.<http trigger>.attributes.maxRequestBodySize, up to the platform's"
                f" ceiling ({ceiling} bytes)")
        limit = min(asked[0], s.max_body_ceiling_bytes)
        capped = (f", capped by the platform's ceiling ({ceiling} bytes)" if asked[0] > limit
                  else f"; the platform's ceiling is {ceiling} bytes")
        return PayloadTooLarge(
            f"{body} over the {limit} byte limit of function '{name}' (its"
            f" spec.triggers.{asked[1]}.attributes.maxRequestBodySize is {asked[0]}{capped})")

    def refuse_direct(self, req: Any) -> None:
        req.respond(*self.answer(req.headers, self.error_response(self.body_too_large(req.name, req.refused),
                                                                  self.new_call_id())))

    def answer(self, raw_headers: list, answer: tuple[int, list, bytes]) -> tuple[int, list, bytes]:
        """An invocation's answer; a failed one in text mode is the Fusionizer's (services/gateway/fusionizer.py)."""
        status = answer[0]
        if status < 400 or not fusionizer.is_task_failure(status):
            return answer  # the success path pays one comparison
        accept = next((v.decode("latin-1") for k, v in raw_headers if k.lower() == b"accept"), None)
        if not fusionizer.wants_text(accept, self.settings.fusionizer_mode):
            return answer
        content_type = next((v.decode("latin-1") for k, v in answer[1] if k == b"content-type"), "")
        headers = [(k, v) for k, v in answer[1] if k != b"content-type"]
        headers.append((b"content-type", fusionizer.TEXT.encode()))
        return fusionizer.FAILED_STATUS, headers, fusionizer.failure_text(content_type, answer[2])

    def _check_access(self, name: str, raw_headers: list) -> FunctionInfo:
        """The function's info, once the caller may invoke it (a private one needs the token)."""
        info = self.functions.get(name)
        if info is None:
            raise NotFound(f"function '{name}' not found")
        if info.private:
            auth = None
            for k, v in raw_headers:
                if k.lower() == b"authorization":
                    auth = v
                    break
            self.check_token(auth)
        return info

    def _new_call(self, info: FunctionInfo, method: str, path: str, query: bytes, raw_headers: list, body: bytes,
                  mode: str, call_id: str) -> Call:
        """The call to submit to the broker (its future is set by the caller)."""
        name = info.name
        headers = function_headers(raw_headers)
        content_type = next((v for k, v in headers if k.lower() == "content-type"), None)
        headers.append(["fusionizer-server-address", self._fusionizer_host])
        content_type = content_type or ""
        if mode == "execute":
            body, content_type = self._execute_payload(body)
        assert self.broker is not None
        if info.state == "failed" and not self.broker.routes.get(name):
            first = info.last_error.strip().splitlines()[0] if info.last_error.strip() else "see its logs"
            raise Unavailable(f"function '{name}' has no running instance because its deployment failed: {first};"
                              " fix it and deploy again", {"function": name})
        timeout_s = info.timeout_s
        now = time.time()
        header = {
            "call_id": call_id,
            "parent_id": None,
            "function": name,
            "method": method,
            "path": path,
            "query": query.decode("latin-1"),
            "headers": headers,
            "content_type": content_type,
            "deadline_ms": int((now + timeout_s) * 1000),
            "mode": mode,
        }
        call = Call(call_id, name, header, body, None, timeout_s)
        call.wall = now
        call.cold = self.touch(info)
        self.counters["invocations"] += 1
        if call.cold:
            self.counters["cold_starts"] += 1
        self.telemetry.started(name, call.cold)
        return call

    def _finish(self, call: Call, result: dict[str, Any], rbody: bytes) -> tuple[int, list, bytes]:
        """The HTTP answer for a call's RESULT; records the call and its trace."""
        name = call.function
        status = int(result.get("status", 200))
        took_ms = round((time.time() - call.wall) * 1000, 3)
        self.trace_calls.append([name, took_ms, status])
        self.telemetry.call_done(call, status)
        if status < 500:
            self._record(call.call_id, name, call.wall, "DONE", status, None, call.cold)
        else:
            self._record(call.call_id, name, call.wall, "FAILED", status, result_error(result, rbody), call.cold)
        out_headers = []
        for k, v in result.get("headers") or ():
            key = k.lower()
            if key in _SKIP_RESPONSE_HEADERS or key == "content-type":
                continue
            name_b, value_b = k.encode("latin-1", "replace"), str(v).encode("latin-1", "replace")
            if valid_header(name_b, value_b):
                out_headers.append((name_b, value_b))
        out_headers.append((b"content-type", (result.get("content_type") or "application/octet-stream").encode(
            "latin-1", "replace")))
        if call.cold:
            out_headers.append((b"x-nuclide-cold-start", b"true"))
        out_headers.append((b"x-call-id", call.call_id.encode()))
        return status, out_headers, rbody

    def _record(self, call_id: str, name: str, queued_at: float, status: str, code: int, error: str | None,
                cold: bool = False) -> None:
        if self.calls is not None:
            self.calls.record_sync((call_id, name, status, queued_at, time.time(), code, error, cold))

    def _record_failed_task_call(self, call_id: str, name: str, parent_id: str | None, code: int, error: str,
                                 queued_at: float, finished_at: float) -> None:
        """A task call that failed, recorded as a sync call of its own under its caller's (source "call")."""
        if self.calls is not None:
            self.calls.record_sync((call_id, name, "FAILED", queued_at, finished_at, code, error, False, parent_id,
                                    "call"))

    async def _submit_async(self, name: str, body: bytes, raw_headers: list, call_id: str) -> tuple[int, list, bytes]:
        """202 once the call is durable; its result is kept (GET /calls/{id}) and may be called back."""
        assert self.calls is not None
        hdrs = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        forwarded = function_headers(raw_headers, _ASYNC_CONTROL)
        call_id, duplicate = await self.calls.submit(
            name, body, content_type=hdrs.get("content-type", ""), headers=forwarded, source="http", call_id=call_id,
            idempotency_key=hdrs.get("x-idempotency-key") or None,
            callback_url=hdrs.get("x-callback-url"))
        payload = json.dumps({"call_id": call_id, "status_url": f"/calls/{call_id}", "duplicate": duplicate}).encode()
        return 202, [_JSON_CT, (b"x-call-id", call_id.encode())], payload

    async def _read_body(self, scope: dict, receive: Any, name: str) -> bytes:
        limit = self.body_limit(name)
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    raise InvalidRequest("Content-Length is not a number") from None
                if declared > limit:
                    raise self.body_too_large(name, declared)
                break
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidRequest("client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise self.body_too_large(name, None)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @staticmethod
    def _execute_payload(body: bytes) -> tuple[bytes, str]:
        """The Service FaaS execute route: body {"payload": "<string>"} -> the payload string."""
        try:
            doc = json.loads(body or b"null")
        except ValueError:
            raise InvalidRequest('execute needs a JSON body like {"payload": "<string>"}') from None
        if not isinstance(doc, dict) or "payload" not in doc:
            raise InvalidRequest('execute needs a JSON body like {"payload": "<string>"}')
        payload = doc["payload"]
        if not isinstance(payload, str):
            payload = json.dumps(payload)
        return payload.encode(), "text/plain; charset=utf-8"


def make_asgi(gateway: Gateway, control: Any) -> Any:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            target = invoke_target(scope["method"], scope["path"])
            if target is not None:
                await gateway.invoke(scope, receive, send, *target)
                return
            if scope["method"] == "HEAD":
                # HEAD is GET without the body (RFC 9110); the HTTP server sends no body for a HEAD request
                scope = dict(scope, method="GET")
        await control(scope, receive, send)

    return app
