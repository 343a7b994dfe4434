"""Follow the store's state: subscribe first, then snapshot, then apply newer events.

Events carry a sequence number; a gap (a lost event, a store restart) triggers a
fresh snapshot, so a follower never acts on a state it has only half seen.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import zmq

from shared import protocol
from shared.aiosock import AsyncSocket, RpcClient
from shared.errors import NuclideError, ProtocolError
from shared.logs import get_logger
from shared.storeclient import StoreClient

log = get_logger(__name__)

RESNAPSHOT_RETRY_S = 0.5
# how often a follower compares its sequence number with the store's: an event published
# while the SUB socket was reconnecting (a store restart) is otherwise only noticed at the
# next event, which may never come; sane range 0.2-10 s
SEQ_CHECK_INTERVAL_S = 1.0


class StateFeed:
    """Calls ``on_snapshot(snapshot)`` once per (re)sync and ``on_event(kind, data)`` for each newer event."""

    def __init__(
        self,
        ctx: zmq.Context,
        pub_endpoint: str,
        store: RpcClient,
        on_snapshot: Callable[[dict[str, Any]], None],
        on_event: Callable[[str, dict[str, Any]], None],
    ) -> None:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(pub_endpoint)
        self._store = StoreClient(store)
        self._on_snapshot = on_snapshot
        self._on_event = on_event
        self._seq: int | None = None  # None: not synced yet, events are buffered
        self._buffer: list[tuple[int, str, dict[str, Any]]] = []
        self._sync_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self.synced = asyncio.Event()
        self._asock = AsyncSocket(sock, self._on_message)

    def start(self) -> None:
        self._resync()
        self._watch_task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        behind_since: int | None = None
        while True:
            await asyncio.sleep(SEQ_CHECK_INTERVAL_S)
            if self._seq is None:
                continue
            try:
                store_seq = int((await self._store.ping(timeout_s=2.0))["seq"])
            except (NuclideError, KeyError, TypeError, ValueError):
                continue
            if store_seq <= self._seq:
                behind_since = None
            elif behind_since is not None and self._seq <= behind_since:
                # still behind a full interval later: the events in between were lost
                log.info("missed events, resyncing", have=self._seq, store=store_seq)
                self._resync()
                behind_since = None
            else:
                behind_since = self._seq

    def _resync(self) -> None:
        self._seq = None
        self.synced.clear()
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.ensure_future(self._sync())

    async def _sync(self) -> None:
        while True:
            try:
                snap = await self._store.snapshot(timeout_s=5.0)
                break
            except NuclideError as exc:
                log.info("waiting for the store", error=str(exc))
                await asyncio.sleep(RESNAPSHOT_RETRY_S)
        seq = int(snap["seq"])
        self._on_snapshot(snap)
        self._seq = seq
        buffered, self._buffer = self._buffer, []
        for ev_seq, kind, data in buffered:
            self._apply(ev_seq, kind, data)
        if self._seq is not None:
            self.synced.set()

    def _on_message(self, frames: list[bytes]) -> None:
        try:
            _topic, msg = protocol.decode_published(frames)
            seq = int(msg.header["seq"])
            kind = str(msg.header["kind"])
            data = msg.header.get("data") or {}
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            log.warning("dropped malformed event", error=str(exc))
            return
        if self._seq is None:
            self._buffer.append((seq, kind, data))
            return
        self._apply(seq, kind, data)

    def _apply(self, seq: int, kind: str, data: dict[str, Any]) -> None:
        assert self._seq is not None
        if seq <= self._seq:
            return  # already in the snapshot
        if seq != self._seq + 1:
            log.info("event gap, resyncing", expected=self._seq + 1, got=seq)
            self._resync()
            return
        self._seq = seq
        try:
            self._on_event(kind, data)
        except Exception:
            log.exception("event handler failed", kind=kind)

    def close(self) -> None:
        if self._sync_task:
            self._sync_task.cancel()
        if self._watch_task:
            self._watch_task.cancel()
        self._asock.close()
