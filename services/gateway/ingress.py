"""Async ingress besides HTTP: a PULL socket for invoke messages, a SUB socket for topics, cron.

PULL (``gateway_pull``, any producer connects a PUSH)::

    frame 0  b"NUC1"
    frame 1  b"INVOKE"
    frame 2  msgpack map: {"function": str, optional "call_id", "content_type",
             "headers" ([[name, value], ...]), "idempotency_key", "callback_url", "token"}
    frame 3  the payload (raw bytes)

Each accepted message becomes a durable call (``shared/ingress.py`` has a helper).
While stored-but-unacknowledged submissions pile up the gateway stops reading, so
the producer's queue fills and its send blocks at its high-water mark instead of
messages being dropped. A message for an unknown function is recorded FAILED with
"function 'x' not found"; a malformed one is logged, counted and dropped. A message for a
private function needs a ``token``: the ``ingress_token`` setting or the API token; without
one it is recorded FAILED (never run) and counted as ``refused``.

SUB (``gateway_sub``, bound; producers connect a PUB): ``[topic, payload]`` or
``[topic, NUC1, INVOKE, header, payload]``. Every function with a ``kind: topic``
trigger for that topic gets the payload as an async call. Best effort, like core
NATS: a message published while nobody listens is gone. A private subscriber gets only
messages of the second form whose header carries the token, as on PULL; the others
skip it and are counted as ``topic_refused``.

Cron: ``kind: cron`` triggers (``interval`` or ``schedule``, in ``attributes.timezone``) submit
an async call with the trigger's body and headers (nuclio's ``attributes.event``) on time. Every
gateway keeps the same clock of ticks and submits each one under the idempotency key
``cron:<trigger>:<tick ms>``, so with several gateways the store keeps one call per tick and a
gateway that dies leaves the ticks to the others. A private function's cron triggers run without
a token: the platform itself fires them, on the schedule its owner deployed.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from typing import TYPE_CHECKING, Any

import zmq

from shared import protocol, tracecontext
from shared.aiosock import AsyncSocket
from shared.curve import PRODUCER_DOMAIN, Keys
from shared.errors import NuclideError, ProtocolError
from shared.logs import get_logger
from shared.triggers import parse_cron

if TYPE_CHECKING:  # pragma: no cover
    from shared.config import Settings
    from services.gateway.async_calls import AsyncCalls
    from services.gateway.catalogue import Catalogue

log = get_logger(__name__)

PAUSE_ABOVE = 4096  # unacknowledged ingress submissions before the PULL socket stops being read
RESUME_BELOW = 1024
CRON_TICK_S = 0.25


def private_refusal(function: str) -> str:
    return (f"function '{function}' is private: an ingress message for it needs a 'token' in its header (the"
            " gateway's ingress_token setting or the API token); see shared/ingress.py's Producer(token=...)")


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


class Ingress:
    """``token``: the API token (a message carrying it, or the ``ingress_token`` setting, reaches private
    functions); ``synced``: set once the store's feed is in sync (cron waits for the functions)."""

    def __init__(self, settings: Settings, ctx: zmq.Context, token: bytes, catalogue: Catalogue, calls: AsyncCalls,
                 synced: asyncio.Event, keys: Keys) -> None:
        self.settings = settings
        self.keys = keys
        self.ctx = ctx
        self.token = token
        self.catalogue = catalogue
        self.calls = calls
        self.synced = synced
        self.pending = 0
        self.counters = {"accepted": 0, "malformed": 0, "refused": 0, "topic_messages": 0, "topic_calls": 0,
                         "topic_refused": 0, "cron_calls": 0}
        self._pull: AsyncSocket | None = None
        self._sub: AsyncSocket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._cron_next: dict[tuple[str, str], float] = {}

    def start(self) -> None:
        s = self.settings
        pull = self.ctx.socket(zmq.PULL)
        sub = self.ctx.socket(zmq.SUB)
        if self.keys.producers:
            # producer_public_keys is set: CURVE from those keys only (services' keys too)
            self.keys.server(pull, PRODUCER_DOMAIN)
            self.keys.server(sub, PRODUCER_DOMAIN)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, 10_000)
        pull.bind(s.gateway_pull)
        self._pull = AsyncSocket(pull, self._on_pull)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.bind(s.gateway_sub)
        self._sub = AsyncSocket(sub, self._on_topic)
        self._spawn(self._cron_loop())

    def may_reach(self, token: Any) -> bool:
        """Whether a message's ``token`` opens private functions: the ingress token or the API token."""
        if not isinstance(token, (str, bytes)) or not token:
            return False
        given = token.encode() if isinstance(token, str) else token
        wanted = [self.token, self.settings.ingress_token.encode()]
        return any(w and hmac.compare_digest(given, w) for w in wanted)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----- PULL ----------------------------------------------------------------------

    def _on_pull(self, frames: list[bytes]) -> None:
        try:
            msg = protocol.decode(frames)
            if msg.command != protocol.INVOKE:
                raise ProtocolError(f"expected INVOKE, got {msg.command!r}")
            function = msg.header.get("function")
            if not isinstance(function, str) or not function:
                raise ProtocolError("INVOKE needs a 'function' name in its header")
            headers = msg.header.get("headers") or []
            if not isinstance(headers, list) or not all(
                    isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, (str, bytes)) for x in h)
                    for h in headers):
                raise ProtocolError("'headers' must be a list of [name, value] string pairs")
        except ProtocolError as exc:
            self.counters["malformed"] += 1
            log.warning("dropped malformed ingress message", error=str(exc), dropped=self.counters["malformed"])
            return
        info = self.catalogue.functions.get(function)
        if info is not None and info.private and not self.may_reach(msg.header.get("token")):
            # recorded, never run: the producer can look the call up and see why
            self.counters["refused"] += 1
            log.warning("refused an ingress message for a private function without its token", function=function,
                        refused=self.counters["refused"])
            self._spawn(self._refuse(function, msg.header.get("call_id"), private_refusal(function)))
            return
        if len(msg.body) > self.catalogue.body_limit(function):
            # recorded, not silently dropped: the producer can look the call up and see why
            self.counters["oversized"] = self.counters.get("oversized", 0) + 1
            self._spawn(self._refuse(function, msg.header.get("call_id"),
                                     self.catalogue.body_too_large(function, len(msg.body)).message))
            return
        try:
            call_id = msg.header.get("call_id")
            meta = self.calls.prepare(
                function, content_type=msg.header.get("content_type") or "",
                headers=[[_text(k), _text(v)] for k, v in headers], source="zmq",
                idempotency_key=msg.header.get("idempotency_key"), callback_url=msg.header.get("callback_url"),
                call_id=call_id,
                trace=tracecontext.from_traceparent(msg.header.get("traceparent"), msg.header.get("tracestate")))
        except NuclideError as exc:
            self.counters["malformed"] += 1
            log.warning("dropped ingress message", function=function, error=exc.message)
            return
        # no task per message: the batch's one store round trip acknowledges all of them
        self.pending += 1
        if self.pending >= PAUSE_ABOVE and self._pull is not None:
            self._pull.pause()
        waiter = asyncio.get_running_loop().create_future()
        waiter.add_done_callback(self._accepted)
        self.calls.enqueue(meta, msg.body, waiter)

    def _accepted(self, fut: asyncio.Future) -> None:
        self.pending -= 1
        if not fut.cancelled() and fut.exception() is None:
            self.counters["accepted"] += 1
        if self.pending <= RESUME_BELOW and self._pull is not None:
            self._pull.resume()

    async def _refuse(self, function: str, call_id: Any, error: str) -> None:
        try:
            await self.calls.submit(function, b"", source="zmq", call_id=call_id if isinstance(call_id, str) else None,
                                    refused=error)
        except NuclideError as exc:
            log.warning("could not record a refused ingress message", function=function, error=exc.message)

    # ----- topics ---------------------------------------------------------------------

    def _on_topic(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.counters["malformed"] += 1
            return
        topic = frames[0].decode("utf-8", "replace")
        content_type = ""
        idempotency_key = None
        token: Any = None
        if len(frames) == 2:
            payload = frames[1]
        else:
            try:
                msg = protocol.decode(frames[1:])
            except ProtocolError as exc:
                self.counters["malformed"] += 1
                log.warning("dropped malformed topic message", topic=topic[:80], error=str(exc))
                return
            payload, content_type = msg.body, msg.header.get("content_type") or ""
            key = msg.header.get("idempotency_key") or None  # per function: a repeat reaches each subscriber once
            if not isinstance(content_type, str) or not isinstance(key, (str, type(None))):
                self.counters["malformed"] += 1
                log.warning("dropped malformed topic message", topic=topic[:80],
                            error="content_type and idempotency_key must be strings")
                return
            idempotency_key = key
            token = msg.header.get("token")
        self.counters["topic_messages"] += 1
        opens_private: bool | None = None  # checked once, for the first private subscriber
        for info in list(self.catalogue.functions.values()):
            if topic in info.topics:
                if info.private:
                    if opens_private is None:
                        opens_private = self.may_reach(token)
                    if not opens_private:
                        self.counters["topic_refused"] += 1
                        log.warning("topic message skips a private subscriber: it carries no token",
                                    topic=topic[:80], function=info.name, refused=self.counters["topic_refused"])
                        continue
                self.counters["topic_calls"] += 1
                self._spawn(self._submit_quietly(info.name, payload, content_type, "topic",
                                                 [["x-nuclide-topic", topic]], idempotency_key))

    async def _submit_quietly(self, function: str, payload: bytes, content_type: str, source: str,
                              headers: list[list[str]], idempotency_key: str | None = None) -> None:
        try:
            await self.calls.submit(function, payload, content_type=content_type, source=source, headers=headers,
                                    idempotency_key=idempotency_key)
        except NuclideError as exc:
            log.warning("trigger call not accepted", function=function, source=source, error=exc.message)

    # ----- cron -----------------------------------------------------------------------

    async def _cron_loop(self) -> None:
        await self.synced.wait()
        while True:
            now = time.time()
            live: set[tuple[str, str]] = set()
            for info in list(self.catalogue.functions.values()):
                for trig in info.cron:
                    key = (info.name, f"{trig['name']}|{trig.get('interval_s')}|{trig.get('schedule')}"
                                      f"|{trig.get('timezone')}")
                    live.add(key)
                    due = self._cron_next.get(key)
                    if due is None:
                        self._cron_next[key] = self._next(trig, now)
                        continue
                    if due <= now:
                        self.counters["cron_calls"] += 1
                        # every gateway fires each tick; the key makes the store keep one call per tick
                        self._spawn(self._submit_quietly(
                            info.name, trig["body"], trig["content_type"], "cron",
                            [*trig["headers"], ["x-nuclide-trigger", trig["name"]]],
                            f"cron:{trig['name'][:100]}:{int(due * 1000)}"))
                        self._cron_next[key] = self._next(trig, max(now, due))
            for key in set(self._cron_next) - live:
                del self._cron_next[key]
            await asyncio.sleep(CRON_TICK_S)

    @staticmethod
    def _next(trig: dict[str, Any], after: float) -> float:
        """The next tick after ``after``: intervals count from the epoch, so every gateway has the same ticks."""
        if trig.get("interval_s"):
            interval = float(trig["interval_s"])
            return (math.floor(after / interval) + 1) * interval
        return parse_cron(trig["schedule"], tz=trig["timezone"]).next_after(after)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for sock in (self._pull, self._sub):
            if sock is not None:
                sock.close()
