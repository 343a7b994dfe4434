"""The sending phase: invoke messages over ZeroMQ PUSH, ZeroMQ PUB on a topic, or async HTTP, paced and bounded."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import quote

import zmq

from shared.ingress import Producer
from tests.load import http1
from tests.load.report import Sent

SEND_TIMEOUT_MS = 5000  # a PUSH send blocked this long (nobody reading) ends the sending phase
PUB_SETTLE_S = 0.5  # a PUB drops what it sends before its connection is up (ZeroMQ's slow joiner)
HTTP_TIMEOUT_S = 30.0
GIVE_UP_AFTER_FAILURES = 100  # http: transport failures in a row that end the sending phase


@dataclass
class Plan:
    count: int  # at most this many messages
    rate: float  # messages per second; 0 = as fast as possible
    duration_s: float  # stop sending after this long

    def ticks(self, clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> Iterator[int]:
        """Yield 0, 1, 2, ... each at its due time, until the count or the duration is reached."""
        t0 = clock()
        for i in range(self.count):
            if self.rate > 0:
                due = t0 + i / self.rate
                if due - t0 >= self.duration_s:
                    return
                delay = due - clock()
                if delay > 0:
                    sleep(delay)
            if clock() - t0 >= self.duration_s:
                return
            yield i

    def stopped_by(self, sent: int) -> str:
        return "count" if sent >= self.count else "duration"


def payload(run: str, seq: int) -> bytes:
    return json.dumps({"load": run, "seq": seq}, separators=(",", ":")).encode()


def call_id(run: str, seq: int) -> str:
    return f"{run}-{seq:07d}"


def _context() -> zmq.Context:
    ctx = zmq.Context()
    # defaults for the Producer's sockets: a send never blocks for ever, a PUB queues generously
    ctx.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    ctx.setsockopt(zmq.SNDHWM, 100_000)
    return ctx


def send_push(endpoint: str, function: str, plan: Plan, run: str) -> Sent:
    """PUSH one invoke message per tick, each with a call id of ours; a send blocked for 5 s ends the phase."""
    out = Sent()
    ctx = _context()
    producer = Producer(endpoint, ctx=ctx)
    try:
        for i in plan.ticks():
            cid = call_id(run, i)
            now = time.time()
            out.sent += 1
            try:
                producer.invoke(function, payload(run, i), content_type="application/json", call_id=cid)
            except zmq.Again:
                out.note_rejected("send blocked 5 s (nobody reading the ingress)")
                out.stopped_by = "blocked"
                break
            if out.first_send is None:
                out.first_send = now
            out.last_send = time.time()
            out.accepted += 1
            out.ids.append(cid)
        else:
            out.stopped_by = plan.stopped_by(out.sent)
    finally:
        producer.close()  # queued messages get the Producer's linger (10 s) to leave
        ctx.term()
    return out


def send_pub(endpoint: str, topic: str, plan: Plan, run: str) -> Sent:
    """PUBlish one message per tick on the topic (best effort: nothing tells us whether it arrived)."""
    out = Sent()
    ctx = _context()
    producer = Producer(sub_endpoint=endpoint, ctx=ctx)
    try:
        time.sleep(PUB_SETTLE_S)
        for i in plan.ticks():
            now = time.time()
            out.sent += 1
            try:
                producer.publish(topic, payload(run, i), content_type="application/json")
            except zmq.Again:
                out.note_rejected("publish blocked")
                out.stopped_by = "blocked"
                break
            if out.first_send is None:
                out.first_send = now
            out.last_send = time.time()
            out.accepted += 1
        else:
            out.stopped_by = plan.stopped_by(out.sent)
    finally:
        producer.close()
        ctx.term()
    return out


async def _send_http(url: str, token: str | None, function: str, plan: Plan, run: str, concurrency: int) -> Sent:
    out = Sent()
    headers = {"X-Nuclide-Async": "true", "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"  # needed by private functions; never passed on to them
    path = f"/{quote(function, safe='')}"
    ids: dict[int, str] = {}
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    counter = iter(range(plan.count))
    stopped = ""
    failures_in_a_row = 0

    async def next_index() -> int | None:
        nonlocal stopped
        if failures_in_a_row >= GIVE_UP_AFTER_FAILURES:
            stopped = f"{GIVE_UP_AFTER_FAILURES} connection failures in a row"
            return None
        i = next(counter, None)
        if i is None:
            stopped = stopped or "count"
            return None
        if plan.rate > 0:
            due = t0 + i / plan.rate
            if due - t0 >= plan.duration_s:
                stopped = "duration"
                return None
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        if loop.time() - t0 >= plan.duration_s:
            stopped = "duration"
            return None
        return i

    async def worker() -> None:
        nonlocal failures_in_a_row
        conn = http1.Connection(url)
        try:
            while (i := await next_index()) is not None:
                if out.first_send is None:
                    out.first_send = time.time()
                out.sent += 1
                try:
                    status, _, body = await conn.request("POST", path, headers, payload(run, i), HTTP_TIMEOUT_S)
                except (http1.HTTPError, OSError) as exc:
                    failures_in_a_row += 1
                    out.note_rejected(str(exc).split(":")[0] if isinstance(exc, http1.HTTPError) else "connect failed")
                    continue
                finally:
                    out.last_send = time.time()
                failures_in_a_row = 0
                if status != 202:
                    out.note_rejected(f"HTTP {status}")
                    continue
                try:
                    ids[i] = str(json.loads(body)["call_id"])
                except (ValueError, KeyError, TypeError):
                    out.note_rejected("202 without a call id")
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, plan.count))))
    out.stopped_by = stopped or plan.stopped_by(out.sent)
    out.ids = [ids[k] for k in sorted(ids)]
    out.accepted = len(out.ids)
    return out


def send_http(url: str, token: str | None, function: str, plan: Plan, run: str, concurrency: int) -> Sent:
    """POST each message with X-Nuclide-Async (at most ``concurrency`` in flight); a 202 names its call id."""
    return asyncio.run(_send_http(url, token, function, plan, run, concurrency))
