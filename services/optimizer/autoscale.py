"""Replica decisions from observed concurrency, after Knative's KPA; pure logic, no sockets, no clock of its own.

Rules, per group (a fusion group scales as one deployment from the combined load of its members):

- observed concurrency = calls in flight on its instances plus calls queued for them, as the
  gateways report it (each a mean of samples taken every 100 ms);
- wanted replicas over a window = ceil(mean concurrency over the window / target concurrency per
  instance), for a stable window (default 60 s) and a panic window (default 6 s);
- panic starts when the panic window wants at least ``panic_threshold`` (2) times the ready
  replicas, and lasts until a whole stable window passes without that; while panicking the
  count follows the panic window and never goes down;
- otherwise the count follows the stable window, but goes down only to the largest count the
  stable window wanted during the last stable window, and not before the scaler has seen a whole stable window
  (a restarted optimizer does not scale down on a few seconds of evidence);
- the result is clamped to [max(minReplicas, 1), maxReplicas]: going to zero stays the idle
  timeout's business (the gateway's), and a group at zero is woken by the gateway, not here;
- with no load report at all (no gateway heard from) nothing changes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Windows:
    stable_s: float = 60.0
    panic_s: float = 6.0
    panic_threshold: float = 2.0


@dataclass(frozen=True)
class Bounds:
    """A group's limits: replicas between min and max, and the concurrency one instance should carry."""

    min_replicas: int
    max_replicas: int
    target: float

    def clamp(self, replicas: int) -> int:
        return max(max(self.min_replicas, 1), min(self.max_replicas, replicas))


@dataclass(frozen=True)
class Decision:
    desired: int  # what the group should run
    current: int  # what it was set to run (replicas desired before this decision)
    ready: int
    observed: float  # the newest sample
    stable_concurrency: float
    panic_concurrency: float
    stable_wants: int
    panic_wants: int
    panic: bool
    reason: str

    def evidence(self) -> dict[str, Any]:
        return {"desired": self.desired, "current": self.current, "ready": self.ready,
                "observed_concurrency": round(self.observed, 3),
                "stable_concurrency": round(self.stable_concurrency, 3),
                "panic_concurrency": round(self.panic_concurrency, 3),
                "stable_wants": self.stable_wants, "panic_wants": self.panic_wants, "panic": self.panic,
                "reason": self.reason}


def _mean_since(samples: deque[tuple[float, float]], since: float) -> float:
    values = [c for t, c in samples if t > since]
    return sum(values) / len(values) if values else 0.0


class GroupScaler:
    """One group's windows; :meth:`observe` a sample per tick, then :meth:`decide`."""

    def __init__(self, windows: Windows, started_at: float) -> None:
        self.windows = windows
        self.started_at = started_at
        self.samples: deque[tuple[float, float]] = deque()
        self.wanted: deque[tuple[float, int]] = deque()  # (time, count wanted) for the scale-down delay
        self.panic_since: float | None = None  # the last time the panic threshold was crossed
        self.panic_peak = 0

    def observe(self, now: float, concurrency: float) -> None:
        self.samples.append((now, max(0.0, float(concurrency))))
        horizon = now - self.windows.stable_s
        while self.samples and self.samples[0][0] <= horizon:
            self.samples.popleft()

    def decide(self, now: float, current: int, ready: int, bounds: Bounds) -> Decision:
        w = self.windows
        target = max(bounds.target, 1e-9)
        observed = self.samples[-1][1] if self.samples else 0.0
        stable = _mean_since(self.samples, now - w.stable_s)
        panic_c = _mean_since(self.samples, now - w.panic_s)
        stable_wants = math.ceil(stable / target - 1e-9)
        panic_wants = math.ceil(panic_c / target - 1e-9)
        base = max(ready, 1)
        if panic_wants / base >= w.panic_threshold:
            if self.panic_since is None:
                self.panic_peak = current
            self.panic_since = now
        elif self.panic_since is not None and now - self.panic_since >= w.stable_s:
            self.panic_since = None
            self.panic_peak = 0
        panicking = self.panic_since is not None
        if panicking:
            self.panic_peak = max(self.panic_peak, panic_wants)
            wanted, reason = max(self.panic_peak, current), "panic: a burst over the panic window"
        else:
            wanted, reason = stable_wants, "stable window"
        wanted = bounds.clamp(wanted)
        # the delay remembers what the stable window wanted: a burst's panic peak does not hold replicas
        # for another window once the panic is over, the burst's share of the stable mean does
        self.wanted.append((now, bounds.clamp(stable_wants)))
        while self.wanted and self.wanted[0][0] <= now - w.stable_s:
            self.wanted.popleft()
        desired = wanted
        if wanted < current:
            if now - self.started_at < w.stable_s:
                desired, reason = current, "holding: less than one stable window observed"
            else:
                desired = max(wanted, max(n for _, n in self.wanted))
                if desired > wanted:
                    reason = "holding: more replicas were wanted within the stable window"
        desired = bounds.clamp(desired)
        return Decision(desired=desired, current=current, ready=ready, observed=observed, stable_concurrency=stable,
                        panic_concurrency=panic_c, stable_wants=stable_wants, panic_wants=panic_wants,
                        panic=panicking, reason=reason)
