"""Waiting for completion: find each accepted call's record and wait until it is final, within bounds.

Push and http runs know their call ids and look each one up (``GET /calls/{id}``),
oldest first: while the oldest pending call is not final the tracker only probes
it (and sweeps a window now and then), so polling does not compete much with the
calls being measured. Pub runs do not know the ids the gateway chose; they list
the function's calls (``GET /calls?function=F&limit=1000``) and keep those from
the topic queued since the run started.

Latency and throughput come from the records' own timings, so how often the
tracker polls changes how long the run waits, never the numbers.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import quote

import httpx

from tests.load import http1
from tests.load.report import FINAL, Tracked, parse_iso

WINDOW = 256  # ids looked up per sweep
CONCURRENCY = 16  # lookups in flight
PROBE_INTERVAL_S = 0.2  # between probes of the oldest pending call
SWEEP_INTERVAL_S = 1.0  # a window is swept at least this often, even while the oldest call is not final
LIST_LIMIT = 1000  # the most GET /calls returns (the store's cap)
CLOCK_SLACK_S = 1.0  # pub: calls queued this long before the first publish still count as ours


class TrackError(Exception):
    """The stack refused to show its calls (a bad token, say): the run cannot be measured."""


class Pool:
    """CONCURRENCY keep-alive connections (tests/load/http1.py: httpx's async pool is slower than the gateway)."""

    def __init__(self, url: str, token: str | None) -> None:
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._idle: asyncio.Queue[http1.Connection] = asyncio.Queue()
        self._all = [http1.Connection(url) for _ in range(CONCURRENCY)]
        for conn in self._all:
            self._idle.put_nowait(conn)

    async def get(self, path: str) -> tuple[int, bytes] | None:
        """(status, body), or None when the request failed (transient: asked again later)."""
        conn = await self._idle.get()
        try:
            status, _, body = await conn.request("GET", path, self.headers, b"", 10.0)
            return status, body
        except (http1.HTTPError, OSError):
            return None
        finally:
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()


def _refused(status: int, path: str, body: bytes) -> TrackError:
    if status == 401:
        return TrackError("the stack rejected the token when asked for call records; pass --token")
    return TrackError(f"GET {path} answered HTTP {status}: {body[:200].decode(errors='replace')}")


async def _fetch(pool: Pool, cid: str) -> tuple[str, dict[str, Any] | None]:
    path = f"/calls/{quote(cid, safe='')}"
    answer = await pool.get(path)
    if answer is None:
        return cid, None  # transient: looked up again later
    status, body = answer
    if status == 200:
        try:
            return cid, json.loads(body)
        except ValueError:
            return cid, None
    if status in (401, 403):
        raise _refused(status, path, body)
    return cid, None  # 404: not stored (yet, or ever)


async def _track_ids(url: str, token: str | None, ids: list[str], wait_s: float, stall_s: float) -> Tracked:
    out = Tracked()
    started = time.monotonic()
    deadline = started + wait_s
    last_progress = last_sweep = started
    pool = Pool(url, token)
    final: set[str] = set()
    pending = list(ids)
    out.ended_by = "all final"
    try:

        async def lookup(batch: list[str]) -> bool:
            progressed = False
            for cid, rec in await asyncio.gather(*(_fetch(pool, c) for c in batch)):
                if rec is not None:
                    out.records[cid] = rec
                    if rec.get("status") in FINAL and cid not in final:
                        final.add(cid)
                        progressed = True
            return progressed

        while pending:
            now = time.monotonic()
            if now >= deadline:
                out.ended_by = "wait"
                break
            if now - last_progress >= stall_s:
                out.ended_by = "stall"
                break
            head_done = await lookup(pending[:1])
            if head_done or now - last_sweep >= SWEEP_INTERVAL_S:
                last_sweep = time.monotonic()
                if await lookup(pending[1:WINDOW]) or head_done:
                    last_progress = time.monotonic()
                pending = [c for c in pending if c not in final]
            else:
                await asyncio.sleep(PROBE_INTERVAL_S)
        if pending:  # one last look at everything still open, for the report
            for start in range(0, len(pending), WINDOW * 4):
                await lookup(pending[start:start + WINDOW * 4])
    finally:
        await pool.close()
    out.missing = [c for c in ids if c not in out.records]
    out.waited_s = time.monotonic() - started
    return out


def track_ids(url: str, token: str | None, ids: list[str], wait_s: float, stall_s: float) -> Tracked:
    """Wait until every id's record is final, ``wait_s`` passes, or no call finished for ``stall_s``."""
    return asyncio.run(_track_ids(url, token, ids, wait_s, stall_s))


def topic_calls(calls: list[dict[str, Any]], since: float) -> dict[str, dict[str, Any]]:
    """The listed calls a pub run made: from a topic, queued since it started sending."""
    ours = {}
    for rec in calls:
        queued = parse_iso((rec.get("timings") or {}).get("queued"))
        if rec.get("source") == "topic" and queued is not None and queued >= since - CLOCK_SLACK_S:
            ours[rec["id"]] = rec
    return ours


def track_listing(url: str, token: str | None, function: str, since: float | None, expected: int, wait_s: float,
                  stall_s: float, poll_s: float = 0.25) -> Tracked:
    """Pub: list the function's calls until ``expected`` of ours are final, ``wait_s`` passes or progress stalls."""
    out = Tracked()
    started = time.monotonic()
    deadline = started + wait_s
    last_progress = started
    best = 0
    out.ended_by = "all final"
    if since is None or expected == 0:
        return out
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, headers=headers, timeout=10.0, trust_env=False) as client:
        while True:
            try:
                resp = client.get("/calls", params={"function": function, "limit": LIST_LIMIT})
            except httpx.HTTPError:
                resp = None
            if resp is not None:
                if resp.status_code in (401, 403):
                    raise _refused(resp.status_code, "/calls", resp.content)
                if resp.status_code == 200:
                    out.records = topic_calls(resp.json(), since)
            finals = sum(1 for r in out.records.values() if r.get("status") in FINAL)
            now = time.monotonic()
            if finals > best:
                best, last_progress = finals, now
            if finals >= expected:
                break
            if now >= deadline:
                out.ended_by = "wait"
                break
            if now - last_progress >= stall_s:
                out.ended_by = "stall"
                break
            time.sleep(poll_s)
    out.extra = max(0, len(out.records) - expected)
    out.waited_s = time.monotonic() - started
    return out
