"""The store service: RPC on a ROUTER, change events on a PUB with sequence numbers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import zmq

from shared import protocol
from shared.aiosock import AsyncRpcServer
from shared.config import Settings
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
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        try:
            self.pub.bind(settings.store_pub)
            self.rpc = AsyncRpcServer(ctx, settings.store_rpc, self.handle, name="store")
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
        st = self.state
        if method == "ping":
            return {"ok": True, "seq": st.seq()}
        if method == "health":
            age = time.time() - st.deployer_seen_at
            problem = self._writable()
            return {
                "store": problem is None,
                "store_error": problem,
                "deployer": age < DEPLOYER_REPORT_INTERVAL_S * HEARTBEAT_LIVENESS,
                "deployer_age_s": round(age, 3),
            }
        if method == "deployer.report":
            st.deployer_seen_at = time.time()
            if "metrics" in args:
                self.metrics.report("deployer", args["metrics"], args.get("interval_s", DEPLOYER_REPORT_INTERVAL_S))
            return {"ok": True}
        if method == "metrics.report":
            self.metrics.report(args.get("service"), args.get("metrics"), args.get("interval_s"))
            return {"ok": True}
        if method == "metrics.get":
            return self.metrics_snapshot()
        if method == "snapshot":
            return st.snapshot()
        if method == "function.get":
            return st.get_function(required(args, "name", str))
        if method == "function.list":
            return st.list_functions()
        if method == "version.get":
            return st.get_version(required(args, "name", str), required(args, "version", int))
        if method == "blob.get":
            digest = required(args, "digest", str)
            return {"digest": digest}, [st.blobs.get(digest)]
        if method == "instances.list":
            return st.instances_of(optional(args, "group_id", str))
        if method.startswith("calls."):
            return self.handle_calls(method, args, bodies)
        if method == "gateways.list":
            return st.live_gateways(GATEWAY_TTL_S)
        if method == "groups.list":
            return st.list_groups()
        if method == "regroup.get":
            return st.get_regroup(required(args, "id", int))
        if method == "group.spec":
            return st.group_spec(required(args, "group_id", str))
        if method == "kv.get":
            return st.kv_get(required(args, "key", str))
        if method == "kv.put":
            st.kv_put(required(args, "key", str), args.get("value"))  # any msgpack value: stored as given
            return {"ok": True}
        if method == "runtime.list":
            return st.list_runtimes()
        if method == "runtime.get":
            return st.get_runtime(required(args, "name", str))
        if method == "function.put":
            spec = required(args, "spec", dict)
            warnings = strings(args, "warnings", [])
            result, events = st.put_function(required(args, "name", str), spec, warnings, bodies[0] if bodies else b"")
        elif method == "runtime.put":
            result, events = st.put_runtime(required(args, "runtime", dict), optional(args, "image_id", str, ""))
        elif method == "runtime.delete":
            result, events = st.delete_runtime(required(args, "name", str))
        elif method == "groups.set":
            result, events = st.set_groups(args.get("setup"))
        elif method == "group.scale":
            result, events = st.scale_group(required(args, "group_id", str), required(args, "replicas", int),
                                            optional(args, "reason", str, ""))
        elif method == "function.replicas":
            replicas = args.get("replicas")
            if replicas is not None and (not isinstance(replicas, int) or isinstance(replicas, bool)):
                raise InvalidRequest("replicas must be an integer, or null to give replicas back to the autoscaler")
            result, events = st.set_replicas_override(required(args, "name", str), replicas)
        elif method == "function.delete":
            result, events = st.delete_function(required(args, "name", str))
        elif method == "instance.started":
            events = st.instance_started(
                required(args, "id", str), required(args, "group_id", str), required(args, "group_version", int),
                optional(args, "backend", str, ""), optional(args, "pid", int),
            )
            result = {"ok": True}
        elif method == "instance.ready":
            functions = optional(args, "functions", dict, {})
            events = st.instance_ready(
                required(args, "id", str), required(args, "group_id", str), required(args, "group_version", int), dict(functions)
            )
            result = {"ok": True}
        elif method == "instance.exited":
            events = st.instance_exited(required(args, "id", str), optional(args, "exit_code", int), optional(args, "error", str))
            result = {"ok": True}
        elif method == "instances.gone":
            result, events = st.instances_gone(strings(args, "ids"), optional(args, "reason", str, "gone"))
        elif method == "gateway.announce":
            result, events = st.announce_gateway(required(args, "gateway", dict), GATEWAY_TTL_S)
        elif method == "gateway.bye":
            result, events = st.gateway_bye(required(args, "id", str))
        elif method == "deploy.failed":
            events = st.deploy_failed(
                required(args, "group_id", str), required(args, "group_version", int),
                optional(args, "error", str, "deploy failed"), optional(args, "log_tail", str, ""),
                strings(args, "tasks") if "tasks" in args else None,
            )
            result = {"ok": True}
        else:
            raise InvalidRequest(f"unknown store method {method!r}")
        self.publish(events)
        return result

    def metrics_snapshot(self) -> dict[str, Any]:
        """The store's own families and the other services' newest snapshots, for a gateway's GET /metrics."""
        leader = bool(getattr(self.db, "leading", True)) and self.lost is None
        try:
            calls = self.calls.counts()
        except (*self.db.errors, OSError):  # the families without the call counts, rather than no families
            calls = {}
        own = self.metrics.snapshot(self.db.dialect, leader, calls)
        return {"store": own, "services": self.metrics.services()}

    def handle_calls(self, method: str, args: dict[str, Any], bodies: tuple[bytes, ...]) -> Any:
        calls = self.calls
        if method == "calls.submit":
            return calls.submit(list(required(args, "calls", list)), bodies)
        if method == "calls.update":
            return {"changed": calls.update(list(required(args, "updates", list)), bodies)}
        if method == "calls.record_sync":
            if "rows" in args:
                return {"recorded": calls.record_sync_rows(list(required(args, "rows", list)))}
            return {"recorded": calls.record_sync(list(required(args, "calls", list)))}
        if method == "calls.claim":
            claimed, payloads = calls.claim(required(args, "owner", str), optional(args, "limit", int, 1000),
                                            GATEWAY_TTL_S)
            return claimed, payloads
        if method == "calls.get":
            return calls.get(required(args, "id", str))
        if method == "calls.result":
            rec, body = calls.result(required(args, "id", str))
            return rec, [body]
        if method == "calls.list":
            return calls.list(optional(args, "function", str), optional(args, "status", str), optional(args, "limit", int, 100),
                              optional(args, "source", str), optional(args, "before", (int, float)))
        if method == "calls.redrive":
            return calls.redrive(required(args, "id", str))
        if method == "calls.purge":
            return {"purged": calls.purge(required(args, "status", str), optional(args, "function", str))}
        if method == "calls.owned":
            ids = strings(args, "ids")
            if len(ids) > 1000:
                raise InvalidRequest(f"calls.owned takes at most 1000 ids, not {len(ids)}")
            return calls.owned(required(args, "owner", str), ids)
        if method == "calls.take_callback":
            return {"taken": calls.take_callback(required(args, "id", str), required(args, "owner", str))}
        if method == "calls.pending_callbacks":
            pending = calls.pending_callbacks(required(args, "owner", str), optional(args, "limit", int, 100))
            bodies_out = [p.pop("result_b") for p in pending]
            return pending, bodies_out
        if method == "calls.counts":
            return calls.counts()
        raise InvalidRequest(f"unknown store method {method!r}")

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
