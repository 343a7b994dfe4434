"""The optimizer's scaling loop: gateways' load reports in, a decision per group each tick, group.scale out.

The rules are in ``autoscale.py``; this module gathers their inputs (load reports from the
gateways' ``load`` topic, each group's members, bounds and replicas from the store's
``groups.list``), applies the result through the store, and keeps the evidence that
``GET /optimizer`` and the gateway's metrics show. A manual override (``PUT
/functions/{name}/replicas``) wins over the rules until it is given back.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from shared.config import Settings
from shared.errors import NuclideError
from shared.logs import get_logger
from shared.storeclient import StoreClient
from services.optimizer.autoscale import Bounds, GroupScaler, Windows

log = get_logger(__name__)

# a gateway's load report older than this no longer counts (it stopped, or its reports are lost): three
# missed reports at the gateway's 1 s rate; sane range 2-10 s
REPORT_STALE_S = 3.0
HISTORY_KEEP = 100  # replica changes kept for GET /optimizer


class Autoscaling:
    def __init__(self, settings: Settings, store: StoreClient) -> None:
        self.settings = settings
        self.store = store
        self.windows = Windows(stable_s=settings.autoscale_stable_window_s, panic_s=settings.autoscale_panic_window_s,
                               panic_threshold=settings.autoscale_panic_threshold)
        self.reports: dict[str, tuple[float, dict[str, float]]] = {}  # gateway -> (monotonic time, {function: mean})
        self.scalers: dict[str, GroupScaler] = {}
        self.groups: dict[str, dict[str, Any]] = {}  # group id -> its latest decision and evidence
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_KEEP)
        self.scaled = {"up": 0, "down": 0}  # replica changes applied, for GET /metrics

    def on_load(self, header: dict[str, Any]) -> None:
        """A gateway's report: {"gateway": id, "functions": {name: [mean, peak]}}; malformed entries are skipped."""
        gateway = header.get("gateway")
        functions = header.get("functions")
        if not isinstance(gateway, str) or not isinstance(functions, dict):
            log.warning("dropped malformed load report", gateway=str(gateway)[:40])
            return
        load: dict[str, float] = {}
        for name, value in functions.items():
            mean = value[0] if isinstance(value, list) and value else value
            if isinstance(name, str) and isinstance(mean, (int, float)) and not isinstance(mean, bool) and mean >= 0:
                load[name] = float(mean)
        self.reports[gateway] = (time.monotonic(), load)

    def concurrency(self, now: float, tasks: list[str]) -> float | None:
        """The combined load of a group's members over every gateway heard from lately; None: none was."""
        fresh = [load for at, load in self.reports.values() if now - at <= REPORT_STALE_S]
        if not fresh:
            return None
        return sum(load.get(name, 0.0) for load in fresh for name in tasks)

    def status(self) -> dict[str, Any]:
        return {"enabled": self.settings.autoscale,
                "stable_window_s": self.windows.stable_s, "panic_window_s": self.windows.panic_s,
                "panic_threshold": self.windows.panic_threshold, "tick_s": self.settings.autoscale_tick_s,
                "gateways_reporting": sum(1 for at, _ in self.reports.values()
                                          if time.monotonic() - at <= REPORT_STALE_S),
                "groups": self.groups, "changes": list(self.history)}

    async def run(self) -> None:
        while True:
            try:
                await self.tick(time.monotonic())
            except NuclideError as exc:  # the store may be restarting: decide again next tick
                log.warning("autoscaler tick skipped", error=exc.message)
            await asyncio.sleep(self.settings.autoscale_tick_s)

    async def tick(self, now: float) -> None:
        listing = await self.store.groups_list()
        seen = set()
        for group in listing["groups"]:
            gid = group["id"]
            seen.add(gid)
            try:
                await self._decide(now, group)
            except NuclideError as exc:
                log.warning("could not scale a group", group=gid, error=exc.message)
        for gid in set(self.scalers) - seen:
            del self.scalers[gid]
        for gid in set(self.groups) - seen:
            del self.groups[gid]

    async def _decide(self, now: float, group: dict[str, Any]) -> None:
        gid, tasks = group["id"], group["tasks"]
        scaling = group.get("scaling") or {}
        current = int(group["replicas"]["desired"])
        ready = int(group["replicas"]["ready"])
        low = int(scaling.get("min_replicas") or 1)
        bounds = Bounds(min_replicas=low, max_replicas=int(scaling.get("max_replicas") or low),
                        target=float(scaling.get("target_concurrency") or 1))
        override = scaling.get("override")
        entry: dict[str, Any] = {"tasks": tasks, "min_replicas": bounds.min_replicas,
                                 "max_replicas": bounds.max_replicas, "target_concurrency": bounds.target,
                                 "override": override, "current": current, "ready": ready}
        if current == 0:
            # scaled to zero: the gateway wakes it on a call; a woken group starts with fresh windows
            self.scalers.pop(gid, None)
            self.groups[gid] = {**entry, "desired": 0, "panic": False, "reason": "scaled to zero (idle timeout)"}
            return
        observed = self.concurrency(now, tasks)
        scaler = self.scalers.get(gid)
        if scaler is None:
            scaler = self.scalers[gid] = GroupScaler(self.windows, now)
        if observed is None:
            self.groups[gid] = {**entry, "desired": current, "panic": False,
                                "reason": "holding: no load report from a gateway"}
            return
        scaler.observe(now, observed)
        decision = scaler.decide(now, current, ready, bounds)
        entry.update(decision.evidence())
        if override is not None:
            entry.update(desired=bounds.clamp(int(override)), reason="manual override (PUT /functions/{name}/replicas)")
        elif not self.settings.autoscale:
            entry.update(desired=current, reason="autoscaling is off (autoscale: false)")
        self.groups[gid] = entry
        desired = int(entry["desired"])
        if desired == current:
            return
        reason = (f"{entry['reason']}; observed concurrency {entry['observed_concurrency']:g}, stable"
                  f" {entry['stable_concurrency']:g}, panic {entry['panic_concurrency']:g}, target"
                  f" {bounds.target:g} per instance")
        await self.store.group_scale(gid, desired, reason[:500])
        change = {"at": time.time(), "group": gid, "tasks": tasks, "from": current, "to": desired,
                  "panic": entry["panic"], "observed_concurrency": entry["observed_concurrency"],
                  "reason": entry["reason"]}
        self.history.append(change)
        self.scaled["up" if desired > current else "down"] += 1
        log.info("scaled", **change)
