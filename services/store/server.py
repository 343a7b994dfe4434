"""The store service: RPC on a ROUTER (dispatched by the METHODS table), change events on a PUB with sequence numbers."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import zmq

from shared import protocol
from shared.aiosock import AsyncRpcServer
from shared.config import Settings
from shared.curve import Keys
from shared.errors import InvalidRequest, NuclideError, Unavailable
from shared.gateways import GATEWAY_TTL_S
from shared.rpcargs import optional, required, strings
from shared.liveness import DEPLOYER_REPORT_INTERVAL_S, HEARTBEAT_LIVENESS
from shared.logs import get_logger
from shared.service import settle_gc
from services.store.blobs import open_blobs
from services.store.databases import open_database
from services.store.db import LeadershipLost, SqlDatabase
from services.store.durable_calls import CallStore
from services.store.metrics import StoreMetrics
from services.store.state import Change, StoreState

log = get_logger(__name__)

CALL_EXPIRY_INTERVAL_S = 60.0
LEAD_CHECK_INTERVAL_S = 1.0  # how soon a store notices a lost database connection (and leader lock) when idle


class StoreServer:
    def __init__(self, settings: Settings, ctx: zmq.Context, db: SqlDatabase | None = None) -> None:
        self.settings = settings
        self.db = db or open_database(settings)
        self.state = StoreState(self.db, open_blobs(self.db, settings.var_dir))
        self.calls = CallStore(self.db)
        self.storage_errors = 0  # database errors since the last write that went through
        self.metrics = StoreMetrics()  # what GET /metrics on a gateway shows of the store and the other services
        self.lost: str | None = None  # why this store must stop serving (another store leads its database)
        self.lost_event = asyncio.Event()
        keys = Keys.load(settings, "store")
        self.pub = keys.server(ctx.socket(zmq.PUB))  # change events: services only
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        try:
            self.pub.bind(settings.store_pub)
            self.rpc = AsyncRpcServer(ctx, settings.store_rpc, self.handle, "store", keys)
        except zmq.ZMQError:
            self.pub.close(linger=0)  # a standby taking over retries once the old leader's ports are free
            raise

    def publish(self, events: list[Change]) -> None:
        self.metrics.events_published += len(events)
        for topic, data in events:
            seq = data.pop("seq")
            try:
                self.pub.send_multipart(
                    protocol.encode_published(topic.encode(), {"seq": seq, "kind": topic, "data": data}), zmq.NOBLOCK
                )
            except zmq.Again:  # subscribers resync from a snapshot when they see a gap
                log.warning("event dropped: PUB queue full", topic=topic, seq=seq)

    def handle(self, method: str, args: dict[str, Any], bodies: tuple[bytes, ...]) -> Any:
        started = time.perf_counter()
        outcome = "internal"
        try:
            result = self._guarded(method, args, bodies)
            outcome = "ok"
            return result
        except NuclideError as exc:
            outcome = exc.code
            raise
        finally:
            self.metrics.served(method, outcome, time.perf_counter() - started)

    def _guarded(self, method: str, args: dict[str, Any], bodies: tuple[bytes, ...]) -> Any:
        try:
            return self._handle(method, args, bodies)
        except self.db.integrity_errors:
            raise
        except (*self.db.errors, OSError) as exc:
            # the disk or the database file failed us (read-only, full, I/O error), not the request: say so,
            # and start the next request on a fresh connection, so service resumes once the disk is back
            self._storage_failed(exc)
            raise Unavailable(f"the store cannot use its database right now ({type(exc).__name__}: {exc});"
                              " nothing was changed: retry once its disk is writable again") from None

    def _storage_failed(self, exc: BaseException) -> None:
        self.storage_errors += 1
        self.metrics.storage_errors += 1
        if self.storage_errors == 1 or self.storage_errors % 100 == 0:  # one line, not a traceback per request
            log.error("database error", error=f"{type(exc).__name__}: {exc}", errors=self.storage_errors)
        try:
            self.db.reopen()
        except LeadershipLost as lost:
            self._lose(str(lost))
        except self.db.errors as again:
            log.warning("database could not be reopened yet", error=str(again))

    def _lose(self, why: str) -> None:
        """Another store leads the database now: stop serving at once (exit 1, a supervisor restarts a standby)."""
        if self.lost is None:
            log.error("no longer the leading store; stopping", error=why)
            self.lost = why
            self.lost_event.set()

    def _writable(self) -> str | None:
        """Why the database cannot be written now, or None when a write goes through."""
        try:
            self.db.probe_write()
        except (*self.db.errors, OSError) as exc:
            self._storage_failed(exc)
            return f"{type(exc).__name__}: {exc}"
        if self.storage_errors:
            log.info("database writable again", errors=self.storage_errors)
            self.storage_errors = 0
        return None

    def _handle(self, method: str, args: dict[str, Any], bodies: tuple[bytes, ...]) -> Any:
        handler = METHODS.get(method)
        if handler is None:
            raise InvalidRequest(f"unknown store method {method!r}")
        return handler(self, args, bodies)

    def health(self) -> dict[str, Any]:
        """Whether a write goes through now, and whether the deployer beat recently (GET /healthz shows both)."""
        age = time.time() - self.state.deployer_seen_at
        problem = self._writable()
        return {
            "store": problem is None,
            "store_error": problem,
            "deployer": age < DEPLOYER_REPORT_INTERVAL_S * HEARTBEAT_LIVENESS,
            "deployer_age_s": round(age, 3),
        }

    def deployer_report(self, args: dict[str, Any]) -> dict[str, Any]:
        """The deployer's beat and metrics (in memory only: a restarted store hears the next within seconds)."""
        self.state.deployer_seen_at = time.time()
        if "metrics" in args:
            self.metrics.report("deployer", args["metrics"], args.get("interval_s", DEPLOYER_REPORT_INTERVAL_S))
        return {"ok": True}

    def metrics_snapshot(self) -> dict[str, Any]:
        """The store's own families and the other services' newest snapshots, for a gateway's GET /metrics."""
        leader = bool(getattr(self.db, "leading", True)) and self.lost is None
        try:
            calls = self.calls.counts()
        except (*self.db.errors, OSError):  # the families without the call counts, rather than no families
            calls = {}
        own = self.metrics.snapshot(self.db.dialect, leader, calls)
        return {"store": own, "services": self.metrics.services()}

    async def expire_calls(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                removed = self.calls.expire(self.settings.call_retention_s)
                if removed:
                    log.info("expired finished calls", count=removed)
            except Exception:
                log.exception("call expiry failed")
            try:
                await asyncio.wait_for(stop.wait(), CALL_EXPIRY_INTERVAL_S)
            except asyncio.TimeoutError:
                pass

    async def watch_lead(self, stop: asyncio.Event) -> None:
        """Notice a broken database connection while idle too: reconnect, or stop when another store leads."""
        while not stop.is_set() and self.lost is None:
            try:
                self.db.check_lead()
            except self.db.errors as exc:
                self._storage_failed(exc)
            try:
                await asyncio.wait_for(stop.wait(), LEAD_CHECK_INTERVAL_S)
            except asyncio.TimeoutError:
                pass

    async def serve(self, stop: asyncio.Event) -> int:
        settle_gc()
        log.info("store ready", rpc=self.settings.store_rpc, pub=self.settings.store_pub, db=self.db.describe())
        tasks = [asyncio.ensure_future(self.expire_calls(stop)), asyncio.ensure_future(self.watch_lead(stop))]
        lost = asyncio.ensure_future(self.lost_event.wait())
        await asyncio.wait([asyncio.ensure_future(stop.wait()), lost], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        log.info("store stopping")
        self.rpc.close()
        self.pub.close(linger=0)
        self.db.close()
        return 1 if self.lost else 0


# ----- the dispatch table: one small handler per store method ---------------------------------------------------
# A handler reads its arguments (each checked, so a wrong one is an InvalidRequest naming it) and returns the reply,
# or (reply, bodies) to send raw frames after it. A method that changes what subscribers follow is wrapped in
# ``_publishing``: its handler returns (reply, events) and the events are published once the change is committed.

Args = dict[str, Any]
Bodies = tuple[bytes, ...]
Handler = Callable[[StoreServer, Args, Bodies], Any]
Mutation = Callable[[StoreState, Args, Bodies], tuple[Any, list[Change]]]


def _publishing(mutate: Mutation) -> Handler:
    def handler(server: StoreServer, args: Args, bodies: Bodies) -> Any:
        result, events = mutate(server.state, args, bodies)
        server.publish(events)
        return result
    return handler


def _blob_get(s: StoreServer, a: Args, b: Bodies) -> Any:
    digest = required(a, "digest", str)
    return {"digest": digest}, [s.state.blobs.get(digest)]


def _metrics_report(s: StoreServer, a: Args, b: Bodies) -> Any:
    s.metrics.report(a.get("service"), a.get("metrics"), a.get("interval_s"))  # each checked there, named
    return {"ok": True}


def _kv_put(s: StoreServer, a: Args, b: Bodies) -> Any:
    s.state.kv_put(required(a, "key", str), a.get("value"))  # any msgpack value: stored as given
    return {"ok": True}


def _function_put(st: StoreState, a: Args, b: Bodies) -> tuple[Any, list[Change]]:
    spec = required(a, "spec", dict)
    warnings = strings(a, "warnings", [])
    return st.put_function(required(a, "name", str), spec, warnings, b[0] if b else b"")


def _function_replicas(st: StoreState, a: Args, b: Bodies) -> tuple[Any, list[Change]]:
    replicas = a.get("replicas")
    if replicas is not None and (not isinstance(replicas, int) or isinstance(replicas, bool)):
        raise InvalidRequest("replicas must be an integer, or null to give replicas back to the autoscaler")
    return st.set_replicas_override(required(a, "name", str), replicas)


def _instance_started(st: StoreState, a: Args, b: Bodies) -> tuple[Any, list[Change]]:
    return {"ok": True}, st.instance_started(
        required(a, "id", str), required(a, "group_id", str), required(a, "group_version", int),
        optional(a, "backend", str, ""), optional(a, "pid", int))


def _instance_ready(st: StoreState, a: Args, b: Bodies) -> tuple[Any, list[Change]]:
    functions = optional(a, "functions", dict, {})
    return {"ok": True}, st.instance_ready(
        required(a, "id", str), required(a, "group_id", str), required(a, "group_version", int), dict(functions))


def _instance_exited(st: StoreState, a: Args, b: Bodies) -> tuple[Any, list[Change]]:
    return {"ok": True}, st.instance_exited(required(a, "id", str), optional(a, "exit_code", int),
                                            optional(a, "error", str))


def _deploy_failed(st: StoreState, a: Args, b: Bodies) -> tuple[Any, list[Change]]:
    return {"ok": True}, st.deploy_failed(
        required(a, "group_id", str), required(a, "group_version", int),
        optional(a, "error", str, "deploy failed"), optional(a, "log_tail", str, ""),
        strings(a, "tasks") if "tasks" in a else None)


def _calls_record_sync(s: StoreServer, a: Args, b: Bodies) -> Any:
    if "rows" in a:  # tuples in SYNC_ROW_FIELDS order, as the gateway batches them
        return {"recorded": s.calls.record_sync_rows(list(required(a, "rows", list)))}
    return {"recorded": s.calls.record_sync(list(required(a, "calls", list)))}


def _calls_result(s: StoreServer, a: Args, b: Bodies) -> Any:
    rec, body = s.calls.result(required(a, "id", str))
    return rec, [body]


def _calls_owned(s: StoreServer, a: Args, b: Bodies) -> Any:
    ids = strings(a, "ids")
    if len(ids) > 1000:
        raise InvalidRequest(f"calls.owned takes at most 1000 ids, not {len(ids)}")
    return s.calls.owned(required(a, "owner", str), ids)


def _calls_pending_callbacks(s: StoreServer, a: Args, b: Bodies) -> Any:
    pending = s.calls.pending_callbacks(required(a, "owner", str), optional(a, "limit", int, 100))
    return pending, [p.pop("result_b") for p in pending]


METHODS: dict[str, Handler] = {
    # the store itself
    "ping": lambda s, a, b: {"ok": True, "seq": s.state.seq()},
    "health": lambda s, a, b: s.health(),
    "deployer.report": lambda s, a, b: s.deployer_report(a),
    "metrics.report": _metrics_report,
    "metrics.get": lambda s, a, b: s.metrics_snapshot(),
    "snapshot": lambda s, a, b: s.state.snapshot(),
    "kv.get": lambda s, a, b: s.state.kv_get(required(a, "key", str)),
    "kv.put": _kv_put,
    # functions, versions, blobs
    "function.get": lambda s, a, b: s.state.get_function(required(a, "name", str)),
    "function.list": lambda s, a, b: s.state.list_functions(),
    "function.put": _publishing(_function_put),
    "function.delete": _publishing(lambda st, a, b: st.delete_function(required(a, "name", str))),
    "function.replicas": _publishing(_function_replicas),
    "version.get": lambda s, a, b: s.state.get_version(required(a, "name", str), required(a, "version", int)),
    "blob.get": _blob_get,
    # runtimes
    "runtime.list": lambda s, a, b: s.state.list_runtimes(),
    "runtime.get": lambda s, a, b: s.state.get_runtime(required(a, "name", str)),
    "runtime.put": _publishing(lambda st, a, b: st.put_runtime(required(a, "runtime", dict),
                                                               optional(a, "image_id", str, ""))),
    "runtime.delete": _publishing(lambda st, a, b: st.delete_runtime(required(a, "name", str))),
    # fusion groups and replicas
    "groups.list": lambda s, a, b: s.state.list_groups(),
    "groups.set": _publishing(lambda st, a, b: st.set_groups(a.get("setup"))),
    "regroup.get": lambda s, a, b: s.state.get_regroup(required(a, "id", int)),
    "group.spec": lambda s, a, b: s.state.group_spec(required(a, "group_id", str)),
    "group.scale": _publishing(lambda st, a, b: st.scale_group(required(a, "group_id", str),
                                                               required(a, "replicas", int),
                                                               optional(a, "reason", str, ""))),
    "deploy.failed": _publishing(_deploy_failed),
    # instances
    "instances.list": lambda s, a, b: s.state.instances_of(optional(a, "group_id", str)),
    "instance.started": _publishing(_instance_started),
    "instance.ready": _publishing(_instance_ready),
    "instance.exited": _publishing(_instance_exited),
    "instances.gone": _publishing(lambda st, a, b: st.instances_gone(strings(a, "ids"),
                                                                     optional(a, "reason", str, "gone"))),
    # gateways
    "gateways.list": lambda s, a, b: s.state.live_gateways(GATEWAY_TTL_S),
    "gateway.announce": _publishing(lambda st, a, b: st.announce_gateway(required(a, "gateway", dict),
                                                                         GATEWAY_TTL_S)),
    "gateway.bye": _publishing(lambda st, a, b: st.gateway_bye(required(a, "id", str))),
    # calls: kept in the store's database, not followed by subscribers, so nothing is published
    "calls.submit": lambda s, a, b: s.calls.submit(list(required(a, "calls", list)), b),
    "calls.update": lambda s, a, b: {"changed": s.calls.update(list(required(a, "updates", list)), b)},
    "calls.record_sync": _calls_record_sync,
    "calls.claim": lambda s, a, b: s.calls.claim(required(a, "owner", str), optional(a, "limit", int, 1000),
                                                 GATEWAY_TTL_S),
    "calls.get": lambda s, a, b: s.calls.get(required(a, "id", str)),
    "calls.result": _calls_result,
    "calls.list": lambda s, a, b: s.calls.list(optional(a, "function", str), optional(a, "status", str),
                                               optional(a, "limit", int, 100), optional(a, "source", str),
                                               optional(a, "before", (int, float))),
    "calls.redrive": lambda s, a, b: s.calls.redrive(required(a, "id", str)),
    "calls.purge": lambda s, a, b: {"purged": s.calls.purge(required(a, "status", str),
                                                            optional(a, "function", str))},
    "calls.owned": _calls_owned,
    "calls.take_callback": lambda s, a, b: {"taken": s.calls.take_callback(required(a, "id", str),
                                                                          required(a, "owner", str))},
    "calls.pending_callbacks": _calls_pending_callbacks,
    "calls.counts": lambda s, a, b: s.calls.counts(),
    "calls.trace": lambda s, a, b: s.calls.trace(required(a, "trace_id", str)),
}
