"""The gateway's wiring and its lean invoke path (raw ASGI, no framework, no store round trip).

:class:`Gateway` starts the gateway's parts and wires them together: the broker (broker.py),
the store and deployer RPC clients, the store's feed into the catalogue of functions and
groups and the deploy waiters (catalogue.py), scale to zero (scaler.py), async calls and
their ingress (calls.py, ingress.py), task calls (taskcalls.py), the call graph and load it
publishes (traces.py) and its metrics (telemetry.py). It keeps what is its own: its place
among the gateways (a beat to the store), stuck instances, the API token, and the two
invoke paths: the HTTP server (http.py) hands sync invocations to
:meth:`Gateway.invoke_direct`; ``make_asgi`` sends the other invoke routes to
:meth:`Gateway.invoke` and everything else to the FastAPI control plane in ``control.py``.
What goes into an INVOKE and what comes out of a RESULT is in invocation.py. (Past 400
lines: the two paths share each step, and the hot one reads best in one place.)
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import zmq
from prometheus_client import generate_latest

from shared import protocol, tracecontext
from shared.aiosock import RpcClient
from shared.auth import check_bearer
from shared.config import Settings
from shared.curve import Keys
from shared.errors import NotFound, NuclideError, Unavailable
from shared.failures import result_error
from shared.gateways import GATEWAY_BEAT_S, GATEWAY_TTL_S, gateway_record
from shared.logs import get_logger
from shared.names import invoke_target
from shared.statefeed import StateFeed
from shared.deployerclient import DeployerClient
from shared.storeclient import StoreClient
from services.gateway.broker import Broker, Call, Instance
from services.gateway.async_calls import AsyncCalls
from services.gateway.catalogue import Catalogue, Deploys, FunctionInfo
from services.gateway.ingress import Ingress
from services.gateway.invocation import (
    ASYNC_CONTROL, Answer, async_answer, error_answer, execute_payload, function_headers, in_text_mode, read_body,
    result_answer, wants_async,
)
from services.gateway.scaler import Scaler
from services.gateway.taskcalls import TaskCalls
from services.gateway.telemetry import Telemetry, registry_for
from services.gateway.traces import Publisher, Traces

log = get_logger(__name__)


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
            answer = error_answer(NuclideError("internal error; see the gateway log"), self.call.call_id)
        self.req.respond(*self.gateway.answer(self.req.headers, answer))

    def set_exception(self, exc: BaseException) -> None:
        self._done = True
        call = self.call
        if not isinstance(exc, NuclideError):
            exc = NuclideError(str(exc))
        self.gateway._record(call, "FAILED", exc.http_status, exc.message)
        self.gateway.telemetry.call_done(call, exc.http_status)
        self.req.respond(*self.gateway.answer(self.req.headers, error_answer(exc, call.call_id)))


def new_call_id() -> str:
    """A new call's id: 32 hex digits, the time in milliseconds then 80 random bits."""
    # a call id is a capability of sorts (it names the call in URLs and fetches its result), so it must
    # not be guessable from another one: 80 random bits. They follow the time in milliseconds (48 bits, as
    # in UUIDv7), so new ids land at the end of the store's index of calls, not at random places in it
    # (wholly random ids cost SQLite about 19 us per recorded call against 7 us at 300,000 rows)
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


class Gateway:
    def __init__(self, settings: Settings, ctx: zmq.Context, token: str, keys: Keys) -> None:
        self.settings = settings
        self.keys = keys  # its CURVE keys (shared/curve.py): every socket it opens uses them
        self.token = token.encode()
        self.ctx = ctx
        self.catalogue = Catalogue(settings)
        self.counters = {"invocations": 0, "cold_starts": 0, "scaled_to_zero": 0, "woken": 0}
        self.telemetry = Telemetry()  # per-function counters, rendered by GET /metrics (telemetry.py)
        self._metrics_registry = registry_for(self)
        self.optimizer_status: dict[str, Any] | None = None  # read from the store by GET /metrics
        self.service_metrics: dict[str, Any] | None = None  # the store's metrics.get, read by GET /metrics
        self.traces = Traces()  # the call graph, published by self.publisher
        self._prefix = os.urandom(4).hex()
        self.boot_id = self._prefix  # owner of the async calls this gateway process dispatches
        self.record = gateway_record(settings, self.boot_id)  # what the store's feed tells of this gateway
        self.gateways: dict[str, dict[str, Any]] = {self.boot_id: self.record}  # live gateways, this one too
        self.beat_ok_at = time.monotonic()  # when the store last took this gateway's beat
        self.started_at = time.time()
        # set by start(): the parts that own sockets, and those that work with them
        self.store: StoreClient | None = None
        self.deployer: DeployerClient | None = None
        self.broker: Broker | None = None
        self.feed: StateFeed | None = None
        self.publisher: Publisher | None = None
        self.deploys: Deploys | None = None
        self.scaler: Scaler | None = None
        self.calls: AsyncCalls | None = None
        self.taskcalls: TaskCalls | None = None
        self.ingress: Ingress | None = None
        self._bg: set[asyncio.Task] = set()
        self._fusionizer_host = settings.advertised_host
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
        # the sockets it binds first: a port in use fails the start at once, before the clients below
        # wait for the store's and deployer's public keys on a first start (shared/curve.py read_public)
        self.broker = Broker(self.ctx, s.gateway_router, s.queue_limit, self._instance_ready, self._instance_gone,
                             self._on_task_call, self._on_stuck, self.add_reports,
                             link=s.instance_link if s.backend in ("process", "docker") else "",
                             peers=self.peer_records, keys=self.keys, admits=self._admits)
        self.publisher = Publisher(self.ctx, s.gateway_pub, self.traces, self.telemetry, self.broker, self.boot_id,
                                   self.keys)
        self.store = StoreClient(RpcClient(self.ctx, s.store_rpc, "store", self.keys))
        self.deployer = DeployerClient(RpcClient(self.ctx, s.deployer_rpc, "deployer", self.keys))
        self.deploys = Deploys(self.store, self.broker)
        self.scaler = Scaler(self.catalogue, self.broker, self.store, self.counters, self._background)
        self.feed = StateFeed(self.ctx, s.store_pub, self.store.rpc, self._on_snapshot, self._on_event, self.keys)
        self.calls = AsyncCalls(s, self.boot_id, self.catalogue, self.store, self.broker, self.telemetry,
                                self.scaler.touch, self.feed.synced, self.new_call_id, lambda: self.beat_ok_at)
        self.taskcalls = TaskCalls(self.catalogue, self.broker, self.calls, self.traces, self.scaler.touch,
                                   self.new_call_id, self._fusionizer_host)
        self.ingress = Ingress(s, self.ctx, self.token, self.catalogue, self.calls, self.feed.synced, self.keys)
        self.feed.start()
        self._background(self._announce())
        self._background(self.publisher.flush_traces())
        self._background(self.publisher.publish_load())
        self.calls.start()
        self._background(self.scaler.sweep_idle())
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
                await self.store.gateway_bye(self.boot_id, timeout_s=2.0)
            except NuclideError as exc:
                log.warning("could not say BYE to the store", error=exc.message)
        for closer in (self.broker, self.feed, self.store, self.deployer, self.publisher):
            if closer is not None:
                closer.close()

    # ----- state from the store ------------------------------------------------

    def _on_snapshot(self, snap: dict[str, Any]) -> None:
        self.catalogue.load(snap)
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
                live = await self.store.gateway_announce(self.record, timeout_s=GATEWAY_BEAT_S * 2)
                self.beat_ok_at = time.monotonic()
                self.gateways = {g["id"]: g for g in live["gateways"]}
                self.gateways[self.boot_id] = self.record
                if self.calls is not None and self.calls.holding:
                    await self.calls.resume_after_stall()
            except NuclideError as exc:
                log.warning("could not announce this gateway to the store", error=exc.message)
            await asyncio.sleep(GATEWAY_BEAT_S)

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        catalogue = self.catalogue
        if kind == "function.changed":
            catalogue.apply_function(data["function"])
        elif kind == "function.deleted":
            name = data["name"]
            catalogue.functions.pop(name, None)
            if self.broker:
                self.broker.fail_function(name, NotFound(f"function '{name}' was deleted"))
        elif kind == "group.changed":
            group = data["group"]
            catalogue.groups[group["id"]] = group
            if group["replicas_desired"] == 0 and self.scaler is not None:
                self.scaler.wake_if_waiting(group)
        elif kind == "group.deleted":
            catalogue.groups.pop(data["group_id"], None)
        elif kind == "gateway.changed":
            self.gateways[data["gateway"]["id"]] = data["gateway"]
        elif kind == "gateway.gone":
            if data["id"] != self.boot_id:
                self.gateways.pop(data["id"], None)
        elif kind == "regroup.changed":
            if self.deploys is not None:
                self.deploys.regroup_changed(data["regroup"])
        elif kind == "deploy.failed":
            if self.deploys is not None:
                self.deploys.deploy_failed(data)
        elif kind == "instance.changed":
            inst = data.get("instance") or {}
            if inst.get("state") == "exited" and self.broker:
                # the last log line usually says why (a memory limit, a traceback's last line)
                last = (inst.get("error") or "").strip().splitlines()[-1:] or [""]
                detail = f"instance exited with code {inst.get('exit_code')}" + (f": {last[0][:300]}" if last[0] else "")
                self.broker.instance_exited(inst["id"], detail)

    # ----- what the broker tells ------------------------------------------------------

    def _admits(self, inst: Instance) -> str | None:
        """Why an instance (its key checked) may not serve what its READY lists: only its group's members."""
        group = self.catalogue.groups.get(inst.group)
        if group is None:
            # not seen yet (this gateway just started, or its feed lags): its next heartbeat asks again
            return f"group '{inst.group}' is not known (yet)"
        members = set(group.get("members") or ()) | set(group.get("ready_members") or ())
        strangers = sorted(set(inst.functions) - members)
        if strangers:
            return f"{', '.join(strangers)} not in group '{inst.group}'"
        return None

    def _instance_ready(self, inst: Instance) -> None:
        assert self.deploys is not None
        self._background(self.deploys.instance_ready(inst))

    def _instance_gone(self, inst: Instance, reason: str) -> None:
        pass  # the deployer owns instance lifecycles; the store learns exits from it

    def _on_task_call(self, ident: bytes, msg: Any) -> None:
        assert self.taskcalls is not None
        self._background(self.taskcalls.call(ident, msg.header, msg.body))

    def add_reports(self, header: dict[str, Any]) -> None:
        """What an instance reported of the task calls it served in-process (services/gateway/taskcalls.py)."""
        assert self.taskcalls is not None
        self.taskcalls.add_reports(header)

    def _on_stuck(self, inst: Instance, call: Call) -> None:
        """An instance kept a call past its timeout without answering: have the deployer replace it."""
        log.warning("instance stuck past a call's timeout; replacing it", instance=inst.name,
                    function=call.function, timeout_s=call.timeout_s)
        assert self.broker is not None
        self.broker.drop(inst, f"stuck past the {call.timeout_s:g} s timeout of '{call.function}'")

        async def kill() -> None:
            assert self.deployer is not None
            try:
                await self.deployer.instance_replace(inst.name, timeout_s=5.0)
            except NuclideError as exc:
                log.warning("could not have a stuck instance replaced", error=exc.message)

        self._background(kill())

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def metrics(self) -> bytes:
        """Prometheus text format (the families are listed in services/gateway/telemetry.py)."""
        return generate_latest(self._metrics_registry)

    # ----- auth -----------------------------------------------------------------

    def check_token(self, authorization: str | bytes | None) -> None:
        check_bearer(authorization, self.token)

    # ----- the invoke path ----------------------------------------------------------

    def new_call_id(self) -> str:
        return new_call_id()

    async def invoke(self, scope: dict, receive: Any, send: Any, name: str, mode: str, path: str = "/") -> None:
        """An invocation through ASGI: async ones, and sync ones when the app runs under another server."""
        call_id = self.new_call_id()
        try:
            answer = await self._invoke(scope, receive, name, mode, path, call_id)
        except NuclideError as exc:
            answer = error_answer(exc, call_id)
        status, headers, body = self.answer(scope["headers"], answer)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _invoke(self, scope: dict, receive: Any, name: str, mode: str, path: str,
                      call_id: str) -> Answer:
        raw_headers = scope["headers"]
        info = self._check_access(name, raw_headers)
        body = await self._read_body(scope, receive, name)
        if mode == "async" or wants_async(raw_headers):
            return await self._submit_async(name, body, scope.get("nuclide.headers", raw_headers), call_id)
        if self.catalogue.functions.get(name) is not info:  # redeployed or deleted while the body was read
            info = self._check_access(name, raw_headers)
        call = self._new_call(info, scope["method"], path, scope["query_string"], raw_headers, body, mode, call_id)
        fut = call.future = asyncio.get_running_loop().create_future()
        self._submit(call)
        try:
            result, rbody = await fut
        except NuclideError as exc:
            self._record(call, "FAILED", exc.http_status, exc.message)
            self.telemetry.call_done(call, exc.http_status)
            raise
        return self._finish(call, result, rbody)

    # the direct path (services/gateway/http.py): no ASGI, no task, no future per call

    def direct_target(self, method: str, path: str,
                      headers: list[tuple[bytes, bytes]]) -> tuple[str, str, str] | None:
        """(function, mode, path below it) when a request is a sync invocation the HTTP server answers directly."""
        target = invoke_target(method, path)
        if target is None or target[1] == "async" or wants_async(headers):
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
            req.respond(*self.answer(req.headers, error_answer(exc, call_id)))

    def _submit(self, call: Call) -> None:
        """Hand a sync call to the broker; one it refuses (its queue is full) is answered, so counted, here."""
        assert self.broker is not None
        try:
            self.broker.submit(call)
        except NuclideError as exc:
            self.telemetry.call_done(call, exc.http_status)
            raise

    def refuse_direct(self, req: Any) -> None:
        req.respond(*self.answer(req.headers, error_answer(self.catalogue.body_too_large(req.name, req.refused),
                                                           self.new_call_id())))

    def answer(self, raw_headers: list, answer: Answer) -> Answer:
        """An invocation's answer, the Fusionizer's text when the caller wants it (services/gateway/fusionizer.py)."""
        return in_text_mode(raw_headers, answer, self.settings.fusionizer_mode)

    def _check_access(self, name: str, raw_headers: list) -> FunctionInfo:
        """The function's info, once the caller may invoke it (a private one needs the token)."""
        info = self.catalogue.functions.get(name)
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
        content_type = traceparent = tracestate = None
        for k, v in headers:
            key = k.lower()
            if key == "content-type":
                content_type = content_type or v
            elif key == "traceparent":
                traceparent = v
            elif key == "tracestate":
                tracestate = v
        trace = tracecontext.from_headers(call_id, traceparent, tracestate)
        headers.append(["fusionizer-server-address", self._fusionizer_host])
        content_type = content_type or ""
        if mode == "execute":
            body, content_type = execute_payload(body)
        assert self.broker is not None and self.scaler is not None
        if info.state == "failed" and not self.broker.routes.get(name):
            first = info.last_error.strip().splitlines()[0] if info.last_error.strip() else "see its logs"
            raise Unavailable(f"function '{name}' has no running instance because its deployment failed: {first};"
                              " fix it and deploy again", {"function": name})
        timeout_s = info.timeout_s
        now = time.time()
        header = protocol.invoke_header(call_id, name, int((now + timeout_s) * 1000), method=method, path=path,
                                        query=query.decode("latin-1"), headers=headers, content_type=content_type,
                                        mode=mode, trace_id=trace.trace_id, trace_flags=trace.flags,
                                        parent_span=trace.parent_span, tracestate=trace.tracestate)
        call = Call(call_id, name, header, body, None, timeout_s)
        call.wall = now
        call.cold = self.scaler.touch(info)
        self.counters["invocations"] += 1
        if call.cold:
            self.counters["cold_starts"] += 1
        self.telemetry.started(name, call.cold)
        return call

    def _finish(self, call: Call, result: dict[str, Any], rbody: bytes) -> Answer:
        """The HTTP answer for a call's RESULT; records the call and its trace."""
        name = call.function
        status = int(result.get("status", 200))
        took_ms = round((time.time() - call.wall) * 1000, 3)
        self.traces.add_call(name, took_ms, status)
        self.telemetry.call_done(call, status)
        if status < 500:
            self._record(call, "DONE", status, None)
        else:
            self._record(call, "FAILED", status, result_error(result, rbody))
        return result_answer(call.call_id, call.cold, status, result, rbody)

    def _record(self, call: Call, status: str, code: int, error: str | None) -> None:
        """Record a finished sync call, with its trace (the caller's span when the request named one)."""
        if self.calls is not None:
            header = call.header
            self.calls.record_sync((call.call_id, call.function, status, call.wall, time.time(), code, error, call.cold,
                                    None, "http", header.get("trace_id"), header.get("parent_span"), False))

    async def _submit_async(self, name: str, body: bytes, raw_headers: list, call_id: str) -> Answer:
        """202 once the call is durable; its result is kept (GET /calls/{id}) and may be called back."""
        assert self.calls is not None
        hdrs = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        forwarded = function_headers(raw_headers, ASYNC_CONTROL)
        trace = tracecontext.from_headers(call_id, hdrs.get("traceparent"), hdrs.get("tracestate"))
        call_id, duplicate = await self.calls.submit(
            name, body, content_type=hdrs.get("content-type", ""), headers=forwarded, source="http", call_id=call_id,
            idempotency_key=hdrs.get("x-idempotency-key") or None,
            callback_url=hdrs.get("x-callback-url"), trace=trace)
        return async_answer(call_id, duplicate)

    async def _read_body(self, scope: dict, receive: Any, name: str) -> bytes:
        return await read_body(scope, receive, self.catalogue.body_limit(name),
                               lambda size: self.catalogue.body_too_large(name, size))


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
