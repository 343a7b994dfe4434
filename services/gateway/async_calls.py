"""Async calls in the gateway: durable submission, dispatch, retries, dead letters, callbacks.

Every async call (HTTP ``X-Nuclide-Async``, the ZeroMQ PUSH ingress, topics,
cron, ``context.call_async``) is written to the store, in batches of up to
``async_batch_max`` per transaction, before it is acknowledged; then it runs
like a sync call. Completions, RUNNING marks and the records of sync calls go
to the store in batches too, off the invoke path; when the store is down they
wait in memory and are sent once it is back.

A failed attempt (a 5xx, a timeout, a crashed instance) is retried with the
function's backoff until ``spec.retry.maxAttempts`` or ``maxEventAge``; then
the call is DEAD (a dead letter, redrivable). Each call is owned by this
gateway's boot id; at start, and every few seconds, the gateway claims the
non-final calls nobody alive owns (a previous boot's, redriven ones), so calls
that were RUNNING when a gateway, store or instance died run again, counted in
``attempts``. A callback is marked ``sending`` durably before it is POSTed, so a
crash never reports one attempt's result twice. Every write to a call is fenced by
ownership, and only the owner takes its callback: a gateway that stalled past its
liveness (its calls claimed by another) records and posts nothing late, holds its
dispatches until the store says which calls are still its own, and forgets the rest.

The gateway keeps at most ASYNC_INFLIGHT_MAX calls in memory; beyond that new
calls are stored unowned and claimed as room frees up, so async calls wait in
the durable queue instead of being refused.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import httpx

from shared import protocol, tracecontext
from shared.errors import DeadlineExceeded, InvalidRequest, NotFound, NuclideError, Unavailable
from shared.failures import bounded, result_error
from shared.gateways import GATEWAY_TTL_S
from shared.logs import get_logger
from shared.netpolicy import CallbackPolicy
from shared.triggers import DEFAULT_RETRY, backoff_s
from services.gateway.broker import Call

if TYPE_CHECKING:  # pragma: no cover
    from shared.config import Settings
    from shared.storeclient import StoreClient
    from services.gateway.broker import Broker
    from services.gateway.catalogue import Catalogue, FunctionInfo
    from services.gateway.telemetry import Telemetry

log = get_logger(__name__)

ASYNC_INFLIGHT_MAX = 20_000  # async calls held in memory; more wait in the store
FLUSH_DELAY_S = 0.002  # how long a submission waits for others to share its transaction
UPDATE_FLUSH_S = 0.02
RECORD_FLUSH_S = 0.1
CLAIM_INTERVAL_S = 2.0
STORE_RETRY_S = 0.5
OWNED_BATCH = 500  # call ids per ownership check after a stall
UNSURE_MAX = 100_000  # calls whose storing was not confirmed, kept to be run if the store holds them
UNSURE_KEEP_S = 60.0  # how long such a call may still turn up in the store (a slow store's late commit)
SUBMIT_TIMEOUT_S = 15.0  # an async submission not stored by then is refused (503), never half-accepted
CALLBACK_TIMEOUT_S = 10.0
_CALL_ID = re.compile(r"^[A-Za-z0-9._:-]{1,80}$")
MAX_IDEMPOTENCY_KEY = 256
MAX_CONTENT_TYPE = 256


class AsyncCall:
    __slots__ = ("id", "function", "payload", "content_type", "headers", "attempts", "max_attempts", "callback_url",
                 "queued_at", "source", "parent_id", "callback_state", "trace")

    def __init__(self, meta: dict[str, Any], payload: bytes) -> None:
        self.id = meta["id"]
        self.function = meta["function"]
        self.payload = payload
        self.content_type = meta.get("content_type") or ""
        self.headers = meta.get("headers") or []
        self.attempts = int(meta.get("attempts", 0))
        self.max_attempts = int(meta.get("max_attempts", 1))
        self.callback_url = meta.get("callback_url")
        self.callback_state = meta.get("callback_state")
        self.queued_at = float(meta.get("queued_at") or time.time())
        self.source = meta.get("source", "http")
        self.parent_id = meta.get("parent_id")
        # its W3C trace as it was submitted; a call stored before calls had one starts a trace of its own
        self.trace = tracecontext.from_header_map(self.id, meta)


class AsyncCalls:
    """``touch``: the scaler's (a cold start, and a wake for a group at zero); ``synced``: set once the store's
    feed is in sync (functions and their retry policies known); ``heard_at``: the monotonic time of this gateway's
    last beat the store took (shared/gateways.py)."""

    def __init__(self, settings: Settings, boot_id: str, catalogue: Catalogue, store: StoreClient, broker: Broker,
                 telemetry: Telemetry, touch: Callable[[FunctionInfo], bool], synced: asyncio.Event,
                 new_call_id: Callable[[], str], heard_at: Callable[[], float]) -> None:
        self.settings = settings
        self.boot = boot_id
        self.catalogue = catalogue
        self.store = store
        self.broker = broker
        self.telemetry = telemetry
        self.touch = touch
        self.synced = synced
        self.new_call_id = new_call_id
        self.heard_at = heard_at
        self.callback_policy = CallbackPolicy.parse(settings.callback_allow)
        self.inflight: dict[str, AsyncCall] = {}
        self._submits: list[tuple[dict[str, Any], bytes, asyncio.Future]] = []
        self._updates: dict[str, tuple[dict[str, Any], bytes | None]] = {}  # call id -> merged update
        self._updates_lock = asyncio.Lock()
        # (id, function, status, queued_at, finished_at, code, error, cold[, parent_id, source]): SYNC_ROW_FIELDS
        self._records: list[tuple] = []
        self._submit_flush: asyncio.TimerHandle | None = None
        self._update_flush: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._http: httpx.AsyncClient | None = None
        self.counters = {"submitted": 0, "done": 0, "dead": 0, "failed": 0, "retried": 0, "ingress_dropped": 0}
        # after a stall past GATEWAY_TTL_S (see hold()): calls not dispatched until the store says they are still ours
        self.holding = False
        self.held: dict[str, AsyncCall] = {}
        # calls this gateway sent to be stored as its own whose storing it could not confirm (the store went away
        # between commit and reply): the claim loop asks the store which it holds and runs those (see _adopt_unsure)
        self.unsure: dict[str, tuple[AsyncCall, float]] = {}

    def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=CALLBACK_TIMEOUT_S, trust_env=False)
        self._spawn(self._claim_loop())
        self._spawn(self._record_loop())

    async def stop(self) -> None:
        await self._flush_updates_now()
        await self._flush_records_now()
        for task in self._tasks:
            task.cancel()
        if self._http is not None:
            await self._http.aclose()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----- submission ---------------------------------------------------------------

    def prepare(self, function: str, *, content_type: str = "", headers: list | None = None, source: str = "http",
                idempotency_key: str | None = None, callback_url: str | None = None, call_id: str | None = None,
                parent_id: str | None = None, refused: str | None = None,
                trace: tracecontext.TraceFields | None = None) -> dict[str, Any]:
        """The stored form of a new async call; ``refused`` records it FAILED with that reason instead.

        ``trace``: the W3C trace it is part of (shared/tracecontext.py); without one it starts its own."""
        if call_id is not None and (not isinstance(call_id, str) or not _CALL_ID.match(call_id)):
            raise InvalidRequest("call_id must be 1-80 letters, digits, '.', '_', ':' or '-'")
        if idempotency_key is not None and (not isinstance(idempotency_key, str)
                                            or not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY):
            raise InvalidRequest(f"idempotency_key must be a string of 1-{MAX_IDEMPOTENCY_KEY} characters")
        callback_url = self.callback_policy.check_url(callback_url)
        if not isinstance(content_type, str) or len(content_type) > MAX_CONTENT_TYPE:
            raise InvalidRequest(f"content_type must be a string of at most {MAX_CONTENT_TYPE} characters")
        info = self.catalogue.functions.get(function)
        meta: dict[str, Any] = {
            "id": call_id or self.new_call_id(), "function": function, "kind": "async", "source": source,
            "max_attempts": int(info.retry["max_attempts"]) if info else 1,
            "idempotency_key": idempotency_key, "callback_url": callback_url, "content_type": content_type,
            "headers": headers or [], "parent_id": parent_id, "queued_at": time.time(),
        }
        if trace is None:
            trace = tracecontext.TraceFields(tracecontext.new_trace_id(meta["id"]), 0, None, None)
        meta.update(trace_id=trace.trace_id, trace_flags=trace.flags, parent_span=trace.parent_span,
                    tracestate=trace.tracestate)
        if info is None:
            # recorded, not dropped: the producer can find out what happened to its message
            meta.update(status="FAILED", error=f"function '{function}' not found")
        elif refused:
            meta.update(status="FAILED", error=refused)
        runnable = "status" not in meta
        meta["owner"] = self.boot if runnable and len(self.inflight) < ASYNC_INFLIGHT_MAX else None
        return meta

    def enqueue(self, meta: dict[str, Any], payload: bytes, waiter: asyncio.Future | None = None) -> None:
        """Queue a call for the next store transaction; it runs once stored (``waiter`` gets the outcome)."""
        self._submits.append((meta, payload, waiter))
        if len(self._submits) >= self.settings.async_batch_max:
            self._flush_submits()
        elif self._submit_flush is None:
            self._submit_flush = asyncio.get_running_loop().call_later(FLUSH_DELAY_S, self._flush_submits)

    async def submit(self, function: str, payload: bytes, **kw: Any) -> tuple[str, bool]:
        """Store an async call durably, then run it; returns (call id, was a duplicate)."""
        meta = self.prepare(function, **kw)
        fut = asyncio.get_running_loop().create_future()
        self.enqueue(meta, payload, fut)
        try:
            stored = await asyncio.wait_for(fut, SUBMIT_TIMEOUT_S + 1)
        except asyncio.TimeoutError:
            raise Unavailable("the store did not confirm the call in time, so it was not accepted; retry") from None
        return stored["id"], bool(stored["duplicate"])

    def _flush_submits(self) -> None:  # noqa: D401 (batches go out as soon as they are full)
        self._submit_flush = None
        if not self._submits:
            return
        batch = self._submits[: self.settings.async_batch_max]
        del self._submits[: len(batch)]
        self._spawn(self._store_submits(batch))
        if self._submits:
            self._flush_submits()

    async def _store_submits(self, batch: list[tuple[dict[str, Any], bytes, asyncio.Future | None]]) -> None:
        metas = [m for m, _, _ in batch]
        payloads = [p for _, p, _ in batch]
        deadline = time.monotonic() + SUBMIT_TIMEOUT_S
        retried = False
        while True:
            try:
                results = await self.store.calls_submit(metas, payloads, timeout_s=5.0)
                break
            except NuclideError as exc:
                if time.monotonic() > deadline or isinstance(exc, InvalidRequest):
                    log.warning("async calls not stored", count=len(batch), error=exc.message)
                    if not isinstance(exc, InvalidRequest):  # an attempt may have been stored, its reply lost
                        self._add_unsure((meta, payload) for meta, payload, _ in batch)
                    for _, _, fut in batch:
                        if fut is not None and not fut.done():
                            fut.set_exception(Unavailable(f"the call could not be stored: {exc.message}"))
                    return
                retried = True
                await asyncio.sleep(STORE_RETRY_S)
        for (meta, payload, fut), res in zip(batch, results):
            if res.get("status") == "REFUSED":
                log.warning("async call refused by the store", function=meta.get("function"), error=res["error"])
                if fut is not None and not fut.done():
                    fut.set_exception(InvalidRequest(f"the call was not stored: {res['error']}"))
                continue
            if not res["duplicate"]:
                self.counters["submitted"] += 1
                if meta.get("owner") == self.boot:
                    ac = AsyncCall(meta, payload)
                    self.inflight[ac.id] = ac
                    self._dispatch(ac)
            elif retried and res["id"] == meta["id"]:
                # the same call again: most likely an earlier attempt of this batch was stored and its reply lost
                self._add_unsure([(meta, payload)])
            if fut is not None and not fut.done():
                fut.set_result(res)

    def _add_unsure(self, calls: Iterable[tuple[dict[str, Any], bytes]]) -> None:
        now = time.monotonic()
        for meta, payload in calls:
            if meta.get("owner") == self.boot and len(self.unsure) < UNSURE_MAX:
                self.unsure[meta["id"]] = (AsyncCall(meta, payload), now)
        if self.unsure and self._claim_wanted is not None:
            self._claim_wanted.set()

    async def _adopt_unsure(self) -> None:
        """Run the calls of :attr:`unsure` the store holds as this gateway's and unfinished (nothing else will: no
        other gateway claims a live gateway's calls); forget the rest once a late commit is no longer possible."""
        ids = [call_id for call_id in self.unsure if call_id not in self.inflight][:OWNED_BATCH]
        owned = set(await self.store.calls_owned(self.boot, ids, timeout_s=5.0)) if ids else set()
        now = time.monotonic()
        for call_id in list(self.unsure):
            ac, since = self.unsure[call_id]
            if call_id in owned and call_id not in self.inflight:
                log.info("running an async call whose storing was not confirmed but which the store holds",
                         call_id=call_id)
                del self.unsure[call_id]
                self.counters["submitted"] += 1
                self.inflight[call_id] = ac
                self._dispatch(ac)
            elif call_id in self.inflight or now - since > UNSURE_KEEP_S:
                del self.unsure[call_id]

    # ----- dispatch -------------------------------------------------------------------

    # ----- ownership after a stall ----------------------------------------------------------

    def hold(self) -> None:
        """This gateway's beats stopped reaching the store for longer than GATEWAY_TTL_S (it was stopped, starved or
        cut off): other gateways may have claimed its calls and run them. Dispatch nothing until
        :meth:`resume_after_stall` has asked the store which calls are still this gateway's."""
        if not self.holding:
            log.warning("this gateway was not heard by the store for too long; holding async calls until the store"
                        " says which are still ours")
        self.holding = True

    def stalled(self) -> bool:
        return self.holding or time.monotonic() - self.heard_at() > GATEWAY_TTL_S

    async def resume_after_stall(self) -> None:
        """Forget the calls another gateway took meanwhile (their late results are fenced off by the store), then
        dispatch the held ones that are still ours."""
        ids = list(self.inflight)
        owned: set[str] = set()
        for i in range(0, len(ids), OWNED_BATCH):
            owned.update(await self.store.calls_owned(self.boot, ids[i:i + OWNED_BATCH], timeout_s=5.0))
        lost = [call_id for call_id in ids if call_id not in owned]
        for call_id in lost:
            self.inflight.pop(call_id, None)
            self.held.pop(call_id, None)
        if lost:
            log.warning("async calls taken over by another gateway while this one stalled", count=len(lost))
        self.holding = False
        held, self.held = self.held, {}
        for ac in held.values():
            if ac.id in self.inflight:
                self._dispatch(ac)

    def _dispatch(self, ac: AsyncCall) -> None:
        if self.stalled():
            self.held[ac.id] = ac
            return
        info = self.catalogue.functions.get(ac.function)
        now = time.time()
        if info is None:
            self._finish(ac, "FAILED", error=f"function '{ac.function}' not found")
            return
        if now - ac.queued_at > info.retry["max_event_age_s"]:
            self._finish(ac, "DEAD", error=f"the call is older than the function's maxEventAge"
                                           f" ({info.retry['max_event_age_s']:g} s)")
            return
        ac.attempts += 1
        self._update({"id": ac.id, "status": "RUNNING", "attempts": ac.attempts, "started_at": now,
                      "owner": self.boot})
        header = protocol.invoke_header(
            ac.id, ac.function, int((now + info.timeout_s) * 1000), parent_id=ac.parent_id, path=f"/{ac.function}",
            headers=ac.headers + [["fusionizer-server-address", self.settings.advertised_host]],
            content_type=ac.content_type, attempt=ac.attempts, trace_id=ac.trace.trace_id,
            trace_flags=ac.trace.flags, parent_span=ac.trace.parent_span, tracestate=ac.trace.tracestate)
        fut = asyncio.get_running_loop().create_future()
        cold = self.touch(info)
        if cold:
            self._update({"id": ac.id, "cold_start": 1})
        self.telemetry.started(ac.function, cold)
        dispatched = time.monotonic()
        self.broker.submit(Call(ac.id, ac.function, header, ac.payload, fut, info.timeout_s), bounded=False)
        fut.add_done_callback(lambda f: self._attempt_done(ac, f, dispatched))

    def _attempt_done(self, ac: AsyncCall, fut: asyncio.Future, dispatched: float) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            result, body = fut.result()
            took_ms = result.get("took_ms")
            if isinstance(took_ms, (int, float)):
                # RUNNING was marked when the call was handed to the broker; the instance's own
                # duration gives when it really started, so durations and timings are true
                self._update({"id": ac.id, "started_at": time.time() - took_ms / 1000})
            status = int(result.get("status", 200))
            self.telemetry.finished(ac.function, status, time.monotonic() - dispatched)
            if status < 500:
                self._finish(ac, "DONE", code=status, content_type=result.get("content_type") or "", body=body)
                return
            error = result_error(result, body)
        else:
            status = getattr(exc, "http_status", 500)
            self.telemetry.finished(ac.function, status, time.monotonic() - dispatched)
            error = bounded(exc.message if isinstance(exc, NuclideError) else repr(exc))
            if isinstance(exc, NotFound):
                self._finish(ac, "FAILED", code=404, error=error)
                return
        info = self.catalogue.functions.get(ac.function)
        retry = info.retry if info else DEFAULT_RETRY
        if ac.attempts < ac.max_attempts and time.time() - ac.queued_at < retry["max_event_age_s"]:
            delay = backoff_s(retry, ac.attempts)
            self.counters["retried"] += 1
            self.telemetry.retried(ac.function)
            self._update({"id": ac.id, "status": "PENDING", "error": error, "next_attempt_at": time.time() + delay})
            asyncio.get_running_loop().call_later(delay, self._redispatch, ac)
            return
        self._finish(ac, "DEAD", code=status, error=f"failed {ac.attempts} time(s); last error: {error}",
                     body=body if exc is None else None,
                     content_type=(result.get("content_type") or "") if exc is None else "")

    def _redispatch(self, ac: AsyncCall) -> None:
        if ac.id in self.inflight:
            self._dispatch(ac)

    def _finish(self, ac: AsyncCall, status: str, *, code: int | None = None, error: str | None = None,
                content_type: str = "", body: bytes | None = None) -> None:
        self.inflight.pop(ac.id, None)
        update: dict[str, Any] = {"id": ac.id, "status": status, "finished_at": time.time(), "error": error,
                                  "attempts": ac.attempts}
        if code is not None:
            update["result_status"] = int(code)
        if body is not None:
            update["has_result"] = True
            update["result_content_type"] = content_type
        self._update(update, body)
        self.counters[status.lower()] = self.counters.get(status.lower(), 0) + 1
        if ac.function in self.catalogue.functions:  # a name no function has never becomes a label
            self.telemetry.async_finished(ac.function, status)
        if ac.callback_url and ac.callback_state != "sending":
            self._spawn(self._callback(ac, status, code, content_type, body or b"", error))
        # room for calls waiting unowned in the store
        if len(self.inflight) < ASYNC_INFLIGHT_MAX // 2 and self._claim_wanted is not None:
            self._claim_wanted.set()

    async def _callback(self, ac: AsyncCall, status: str, code: int | None, content_type: str, body: bytes,
                        error: str | None) -> None:
        # durable 'sending' first, and only by the call's owner: after a crash this attempt's result is never
        # posted again, and a gateway that stalled past its liveness (its call claimed and run by another) posts
        # nothing
        await self._flush_updates_now()
        if not await self._take_callback(ac.id):
            log.info("callback left to the gateway that owns the call now", call_id=ac.id)
            return
        duration = time.time() - ac.queued_at
        headers = {"X-Call-Id": ac.id, "X-Function-Status": str(code if code is not None else 500),
                   "X-Call-Status": status, "X-Duration-Seconds": f"{duration:.6f}",
                   "Content-Type": content_type or ("application/json" if error else "application/octet-stream")}
        payload = body if status == "DONE" else json.dumps({"error": error or status}).encode()
        state = "failed"
        try:
            assert self._http is not None
            # checked again here: the host's name may resolve to an address inside the platform's network
            await self.callback_policy.check_resolved(str(ac.callback_url))
            resp = await self._http.post(str(ac.callback_url), content=payload, headers=headers)
            state = "sent" if resp.status_code < 400 else "failed"
        except InvalidRequest as exc:
            log.warning("callback refused", call_id=ac.id, url=ac.callback_url, error=exc.message)
        except httpx.HTTPError as exc:
            log.warning("callback failed", call_id=ac.id, url=ac.callback_url, error=str(exc))
        self._update({"id": ac.id, "callback_state": state})

    async def _take_callback(self, call_id: str) -> bool:
        while True:
            try:
                reply = await self.store.calls_take_callback(call_id, self.boot, timeout_s=5.0)
                return bool(reply["taken"])
            except NuclideError as exc:
                log.warning("store unavailable to take a callback; will retry", call_id=call_id, error=exc.message)
                await asyncio.sleep(STORE_RETRY_S)

    # ----- batched writes -------------------------------------------------------------

    def _update(self, update: dict[str, Any], body: bytes | None = None) -> None:
        # a fast call's RUNNING and DONE usually meet here: one row update instead of two
        previous = self._updates.pop(update["id"], None)
        if previous is not None:
            merged = {**previous[0], **update}
            if previous[0].get("has_result") and not update.get("has_result"):
                body = previous[1]
            update = merged
        self._updates[update["id"]] = (update, body)
        if self._update_flush is None:
            self._update_flush = asyncio.get_running_loop().call_later(UPDATE_FLUSH_S, self._kick_updates)

    def _kick_updates(self) -> None:
        self._update_flush = None
        self._spawn(self._flush_updates_now())

    async def _flush_updates_now(self) -> None:
        # one flush at a time: a batch kept after a failure must not land after a newer one for the same call
        # (a RUNNING retried after its DONE went through would leave the call RUNNING for ever)
        async with self._updates_lock:
            await self._flush_updates_locked()

    async def _flush_updates_locked(self) -> None:
        while self._updates:
            ids = list(self._updates)[:512]
            batch = [self._updates.pop(i) for i in ids]
            # each write is fenced by this gateway's ownership (services/store/durable_calls.py)
            updates = [{**u, "if_owner": self.boot} for u, _ in batch]
            bodies = [b or b"" for u, b in batch if u.get("has_result")]
            try:
                await self.store.calls_update(updates, bodies, timeout_s=5.0)
            except NuclideError as exc:
                log.warning("store unavailable for call updates; keeping them", pending=len(batch), error=exc.message)
                for u, b in batch:  # newer updates of the same calls merge over these on the next _update
                    if u["id"] in self._updates:
                        later, later_body = self._updates.pop(u["id"])
                        self._updates[u["id"]] = ({**u, **later}, later_body if later.get("has_result") else b)
                    else:
                        self._updates[u["id"]] = (u, b)
                await asyncio.sleep(STORE_RETRY_S)

    def record_sync(self, record: tuple) -> None:
        self._records.append(record)  # a tuple: the invoke path pays for no dict

    async def _record_loop(self) -> None:
        while True:
            await asyncio.sleep(RECORD_FLUSH_S)
            await self._flush_records_now()

    async def _flush_records_now(self) -> None:
        if not self._records:
            return
        batch, self._records = self._records[:5000], self._records[5000:]
        try:
            # the tuples as they are (services/store/durable_calls.py SYNC_ROW_FIELDS): no dict per call
            await self.store.calls_record_sync(batch, timeout_s=5.0)
        except NuclideError:
            if len(self._records) < 100_000:  # records of sync calls are not worth unbounded memory
                self._records[:0] = batch

    # ----- recovery ---------------------------------------------------------------------

    _claim_wanted: asyncio.Event | None = None

    async def _claim_loop(self) -> None:
        self._claim_wanted = asyncio.Event()
        await self.synced.wait()  # retry policies and functions must be known first
        while True:
            try:
                if self.unsure:
                    await self._adopt_unsure()
                await self._claim_once()
            except NuclideError as exc:
                log.info("claiming calls failed; will retry", error=exc.message)
            try:
                await asyncio.wait_for(self._claim_wanted.wait(), CLAIM_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
            self._claim_wanted.clear()

    async def _claim_once(self) -> None:
        room = ASYNC_INFLIGHT_MAX - len(self.inflight)
        if room <= 0:
            return
        limit = min(room, protocol.MAX_BATCH)  # the store hands out no more: each payload is a frame of its reply
        metas, payloads = await self.store.calls_claim(self.boot, limit, timeout_s=10.0)
        now = time.time()
        for meta, payload in zip(metas, payloads):
            if meta["id"] in self.inflight:
                continue
            ac = AsyncCall(meta, payload)
            self.inflight[ac.id] = ac
            due = meta.get("next_attempt_at")
            if meta.get("was_running"):
                log.info("retrying a call that was running when its gateway or instance stopped", call_id=ac.id,
                         attempts=ac.attempts)
            if due and due > now:
                asyncio.get_running_loop().call_later(due - now, self._redispatch, ac)
            elif ac.attempts >= ac.max_attempts and meta.get("was_running"):
                # its last attempt was cut off; give it one more rather than losing it silently
                ac.max_attempts = ac.attempts + 1
                self._dispatch(ac)
            else:
                self._dispatch(ac)
        if len(metas) == limit and self._claim_wanted is not None:  # a full batch: more may be waiting
            self._claim_wanted.set()


def deadline_error(function: str, timeout_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"function '{function}' did not finish within its {timeout_s:g} s timeout (spec.timeout)",
                            {"function": function, "timeout_s": timeout_s})
