"""Scale to zero: groups whose every task allows it (minReplicas 0) go to zero replicas once idle, and wake on a call.

Every call touches its function's group (:meth:`Scaler.touch`); a call for a group at zero
asks the store for one replica and waits in the broker's queue until that instance is READY.
The idle sweeper scales a group to zero after the longest idle timeout of its members,
counting calls through the other gateways too (instances report when they last ran one).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable

from shared.errors import NuclideError
from shared.logs import get_logger

if TYPE_CHECKING:  # pragma: no cover
    from shared.storeclient import StoreClient
    from services.gateway.broker import Broker
    from services.gateway.catalogue import Catalogue, FunctionInfo

log = get_logger(__name__)

IDLE_SWEEP_S = 1.0  # how often idle groups are looked for


class Scaler:
    """``counters``: the gateway's, where "woken" and "scaled_to_zero" are counted; ``spawn`` runs a coroutine in
    the background."""

    def __init__(self, catalogue: Catalogue, broker: Broker, store: StoreClient, counters: dict[str, int],
                 spawn: Callable[[Any], None]) -> None:
        self.catalogue = catalogue
        self.broker = broker
        self.store = store
        self.counters = counters
        self.spawn = spawn
        self.last_used: dict[str, float] = {}  # group id -> monotonic time of its last call
        self.waking: set[str] = set()
        self.started_mono = time.monotonic()

    def touch(self, info: FunctionInfo) -> bool:
        """Note a call for a function; wake its group if it is scaled to zero. True: a cold start."""
        gid = info.group_id
        if gid is None:
            return False
        self.last_used[gid] = time.monotonic()
        group = self.catalogue.groups.get(gid)
        if group is not None and group["replicas_desired"] == 0:
            self.wake(gid, "a call arrived")
        return not self.broker.routes.get(info.name)

    def wake(self, gid: str, reason: str) -> None:
        if gid in self.waking:
            return
        self.waking.add(gid)
        self.counters["woken"] += 1

        async def wake() -> None:
            try:
                await self.store.group_scale(gid, 1, reason)
            except NuclideError as exc:
                log.warning("could not wake a scaled-to-zero group", group=gid, error=exc.message)
            finally:
                self.waking.discard(gid)

        self.spawn(wake())

    def wake_if_waiting(self, group: dict[str, Any]) -> None:
        if any(self.broker.queues.get(name) for name in group["members"]):
            self.wake(group["id"], "calls are waiting")

    async def sweep_idle(self) -> None:
        """Scale groups whose every task allows it (minReplicas 0) to zero after their idle timeout."""
        while True:
            await asyncio.sleep(IDLE_SWEEP_S)
            now = time.monotonic()
            broker = self.broker
            for gid, group in list(self.catalogue.groups.items()):
                if group.get("regroup"):
                    continue  # proposed by a regroup under way: idle by nature until it takes over
                members = [self.catalogue.functions.get(name) for name in group["members"]]
                if group["replicas_desired"] == 0:
                    self.wake_if_waiting(group)
                    continue
                if group["state"] != "ready" or not members or any(m is None or m.min_replicas > 0 for m in members):
                    continue
                idle_s = max(m.idle_timeout_s for m in members if m is not None)
                # calls through the other gateways count too: the instances say when they last ran one
                used = max([self.last_used.get(gid, self.started_mono), *(
                    inst.last_call_at for inst in broker.instances.values() if inst.group == gid)])
                if now - used < idle_s:
                    continue
                busy = any(broker.queues.get(name) for name in group["members"]) or any(
                    inst.inflight for inst in broker.instances.values() if inst.group == gid)
                if busy:
                    continue
                try:
                    await self.store.group_scale(gid, 0, f"idle for {idle_s:g} s")
                    self.counters["scaled_to_zero"] += 1
                    log.info("scaled to zero", group=gid, idle_s=idle_s)
                except NuclideError as exc:
                    log.warning("could not scale to zero", group=gid, error=exc.message)
