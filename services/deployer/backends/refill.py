"""What the docker backend's pools share: background refills, paused by a doubling backoff after failures.

The warm pool of Python runtime containers (``docker/warm_pool.py``), the registered runtimes' pool of
containers and their spare runner processes (``docker/runtime_pool.py``) each keep some things made ahead
of need. A take schedules a refill (:meth:`Refilling.refill_soon`), which runs in the background
after a short delay, so a start never waits for it and its instance gets an uncontended CPU first;
only one refill is scheduled or running at a time. A failed create pauses the refills
(:class:`Backoff`: 2 s, doubling up to a minute by default); a success ends the doubling.
"""

from __future__ import annotations

import asyncio
import time

REFILL_DELAY_S = 0.5  # after a take: the new instance's first calls run on an uncontended CPU first


class Backoff:
    """Pauses after failures: ``first_s`` after the first, doubling up to ``most_s``; a success resets it."""

    def __init__(self, first_s: float, most_s: float) -> None:
        self.first_s = first_s
        self.most_s = most_s
        self.until = 0.0  # time.monotonic() before which nothing is tried
        self.next_s = first_s

    @property
    def blocked(self) -> bool:
        return time.monotonic() < self.until

    def remaining_s(self) -> float:
        return max(0.0, self.until - time.monotonic())

    def failed(self) -> float:
        """Start a pause; its length in seconds (the next one is twice as long, up to the most)."""
        pause_s = self.next_s
        self.until = time.monotonic() + pause_s
        self.next_s = min(self.most_s, pause_s * 2)
        return pause_s

    def succeeded(self) -> None:
        self.until = 0.0
        self.next_s = self.first_s


class PoolClosed(Exception):
    """The deployer is shutting down: a pool member created now is removed at once."""


class Refilling:
    """A pool of ``size`` things topped up in the background; subclasses make them in :meth:`_fill_missing`."""

    def __init__(self, size: int, first_backoff_s: float = 2.0, most_backoff_s: float = 60.0) -> None:
        self.size = size
        self.backoff = Backoff(first_backoff_s, most_backoff_s)
        self._closed = False
        self._refill: asyncio.TimerHandle | None = None
        self._refilling = False

    def refill_soon(self, delay_s: float = REFILL_DELAY_S) -> None:
        """Top the pool up in the background (never in a start's way)."""
        if self.size <= 0 or self._closed or self._refill is not None or self._refilling:
            return
        self._refill = asyncio.get_running_loop().call_later(delay_s, lambda: asyncio.ensure_future(self._top_up()))

    def cancel_refill(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None

    async def _top_up(self) -> None:
        self._refill = None
        self._refilling = True
        try:
            await self._fill_missing()
        finally:
            self._refilling = False
        if not self._closed and self.backoff.blocked:
            self.refill_soon(self.backoff.remaining_s() + 0.05)  # try again once the pause is over

    async def _fill_missing(self) -> None:
        """Make what is missing, stopping at a failure (after :meth:`Backoff.failed`) or at close."""
        raise NotImplementedError
