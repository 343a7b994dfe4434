"""Per-function load as the autoscaler reads it: calls in flight on instances plus calls queued for one.

The gateway samples its broker every ``LOAD_SAMPLE_S`` and publishes the mean of each
function's samples every ``LOAD_PUBLISH_S`` (topic ``load`` on its PUB socket), always, even
with no load, so the optimizer can tell an idle function from a gateway it no longer hears.
Sampling costs one pass over the calls in flight, off the invoke path.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

LOAD_SAMPLE_S = 0.1  # Knative's activator and queue-proxy report concurrency at about this rate
LOAD_PUBLISH_S = 1.0  # one report per autoscaler tick (autoscale_tick_s defaults to 1 s); sane range 0.2-2


class LoadMeter:
    """Sums samples of concurrency per function until :meth:`take` turns them into means."""

    def __init__(self) -> None:
        self.sums: Counter[str] = Counter()
        self.peaks: dict[str, int] = {}
        self.samples = 0

    def sample(self, inflight: Iterable[str], queued: dict[str, Any]) -> None:
        """``inflight``: the function of each call in flight; ``queued``: function -> its queue."""
        now: Counter[str] = Counter(inflight)
        for name, queue in queued.items():
            if queue:
                now[name] += len(queue)
        for name, n in now.items():
            self.sums[name] += n
            if n > self.peaks.get(name, 0):
                self.peaks[name] = n
        self.samples += 1

    def take(self) -> dict[str, list[float]]:
        """{function: [mean concurrency, peak]} over the samples since the last take (idle functions left out)."""
        n = max(self.samples, 1)
        out = {name: [round(total / n, 3), self.peaks.get(name, 0)] for name, total in self.sums.items()}
        self.sums.clear()
        self.peaks.clear()
        self.samples = 0
        return out
