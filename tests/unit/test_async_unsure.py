"""Async calls whose storing the gateway could not confirm: the store committed them, then its reply was lost.

This happens when the leading store is killed or PostgreSQL restarts between a commit and its reply. The gateway
retries the batch and the store answers "duplicate" (the call is already there, as this gateway's): nothing else
will ever run such a call (no gateway claims a live gateway's calls), so the gateway must run it itself. The
store here is the real one on a real database; only the wire between the two loses the first reply.
"""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any

import pytest

from services.gateway import async_calls
from services.gateway.async_calls import AsyncCalls
from services.store.durable_calls import CallStore
from shared.errors import Unavailable

BOOT = "gw-boot-1"


class LossyStore:
    """The store's call RPCs, answered by a real CallStore; ``lose`` replies to calls.submit are lost after the
    commit (``Unavailable``, as the store client raises when no reply comes)."""

    def __init__(self, calls: CallStore, lose: int) -> None:
        self.calls = calls
        self.lose = lose
        self.submits = 0

    async def calls_submit(self, metas: list[dict[str, Any]], payloads: list[bytes], *, timeout_s: float) -> Any:
        self.submits += 1
        out = self.calls.submit(metas, tuple(payloads))
        if self.lose > 0:
            self.lose -= 1
            raise Unavailable("the store did not answer calls.submit in time")
        return out

    async def calls_owned(self, owner: str, ids: list[str], *, timeout_s: float) -> list[str]:
        return self.calls.owned(owner, ids)

    async def calls_claim(self, owner: str, limit: int, *, timeout_s: float) -> Any:
        return self.calls.claim(owner, limit, gateway_ttl_s=60.0)


class Broker:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def submit(self, call: Any, bounded: bool = True) -> None:
        self.calls.append(call)


def _gateway(store: LossyStore, broker: Broker) -> AsyncCalls:
    settings = types.SimpleNamespace(async_batch_max=64, callback_allow="", advertised_host="127.0.0.1")
    info = types.SimpleNamespace(retry={"max_attempts": 3, "max_event_age_s": 3600.0}, timeout_s=30.0)
    catalogue = types.SimpleNamespace(functions={"fn": info})
    telemetry = types.SimpleNamespace(started=lambda *a: None)
    ids = iter(f"call-{i}" for i in range(1000))
    return AsyncCalls(settings, BOOT, catalogue, store, broker, telemetry, lambda info: False,  # type: ignore[arg-type]
                      asyncio.Event(), lambda: next(ids), time.monotonic)  # heard now: never stalled


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(async_calls, "STORE_RETRY_S", 0.01)
    monkeypatch.setattr(async_calls, "CLAIM_INTERVAL_S", 0.05)


async def _until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_call_stored_whose_reply_was_lost_still_runs_once(open_store_db) -> None:
    calls = CallStore(open_store_db())
    store, broker = LossyStore(calls, lose=1), Broker()
    gw = _gateway(store, broker)
    gw.start()
    try:
        call_id, duplicate = await gw.submit("fn", b"payload")
        assert (call_id, duplicate) == ("call-0", True)  # the retry found the first attempt's row
        assert store.submits == 2
        gw.synced.set()  # the claim loop runs once the functions are known
        await _until(lambda: broker.calls)
        await asyncio.sleep(0.3)  # a few more claim rounds: it must not run twice
        assert [c.call_id for c in broker.calls] == ["call-0"] and broker.calls[0].body == b"payload"
        assert calls.get("call-0")["status"] == "PENDING"  # RUNNING is written in the next batch of updates
        assert not gw.unsure
    finally:
        await gw.stop()


async def test_a_submission_given_up_on_runs_if_the_store_holds_it_and_is_forgotten_if_not(
        open_store_db, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(async_calls, "SUBMIT_TIMEOUT_S", 0.0)  # no retry: the client is told 503 at once
    monkeypatch.setattr(async_calls, "UNSURE_KEEP_S", 0.2)
    calls = CallStore(open_store_db())
    store, broker = LossyStore(calls, lose=1), Broker()
    gw = _gateway(store, broker)
    gw.start()
    try:
        with pytest.raises(Unavailable, match="could not be stored"):
            await gw.submit("fn", b"kept")  # stored, but the reply was lost and the gateway gave up on it
        # a submission that never reached the store at all: nothing to run, and it is not kept for ever
        gw._add_unsure([({"id": "never-stored", "function": "fn", "owner": BOOT}, b"x")])
        gw.synced.set()
        await _until(lambda: broker.calls)
        await _until(lambda: not gw.unsure)
        assert [c.call_id for c in broker.calls] == ["call-0"] and broker.calls[0].body == b"kept"
    finally:
        await gw.stop()


class SlowFailingUpdates(LossyStore):
    """The first two calls.update wait until their ``release`` event is set, then fail as a store that went
    away does; later ones go through."""

    def __init__(self, calls: CallStore) -> None:
        super().__init__(calls, lose=0)
        self.release = [asyncio.Event(), asyncio.Event()]
        self.updates = 0

    async def calls_update(self, updates: list[dict[str, Any]], bodies: list[bytes], *, timeout_s: float) -> Any:
        self.updates += 1
        if self.updates <= 2:
            await self.release[self.updates - 1].wait()
            raise Unavailable("the store did not answer calls.update in time")
        return self.calls.update(updates, tuple(bodies))


async def test_an_update_kept_after_a_failure_never_lands_after_a_newer_one(
        open_store_db, monkeypatch: pytest.MonkeyPatch) -> None:
    # RUNNING goes out and hangs (the store is restarting); DONE is flushed meanwhile and hangs too; RUNNING
    # fails first, then DONE: whatever the order, the call ends DONE, not RUNNING with DONE's result
    calls = CallStore(open_store_db())
    monkeypatch.setattr(async_calls, "STORE_RETRY_S", 0.3)  # a kept batch waits before it goes again
    calls.submit([{"id": "c1", "function": "fn", "owner": BOOT}], (b"p",))
    store = SlowFailingUpdates(calls)
    gw = _gateway(store, Broker())
    gw._update({"id": "c1", "status": "RUNNING", "attempts": 1})
    first = asyncio.ensure_future(gw._flush_updates_now())
    await _until(lambda: store.updates == 1)
    gw._update({"id": "c1", "status": "DONE", "result_status": 200, "finished_at": time.time(), "has_result": True},
               b"ok")
    second = asyncio.ensure_future(gw._flush_updates_now())
    await asyncio.sleep(0.05)
    store.release[0].set()  # the RUNNING batch fails first
    await asyncio.sleep(0.05)
    store.release[1].set()
    await asyncio.gather(first, second)
    await gw._flush_updates_now()
    got = calls.get("c1")
    assert (got["status"], got["result_status"]) == ("DONE", 200), got
