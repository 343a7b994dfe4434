"""The pools' backoff after failed creates: pure timing logic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.deployer.backends import refill
from services.deployer.backends.refill import Backoff


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The monotonic clock the backoff reads, set by the test: no sleeping, no timed asserts."""
    now = [1000.0]
    monkeypatch.setattr(refill, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_pauses_double_up_to_the_most_and_a_success_resets_them(clock: list[float]) -> None:
    b = Backoff(2.0, 5.0)
    assert not b.blocked and b.remaining_s() == 0.0
    assert [b.failed(), b.failed(), b.failed(), b.failed()] == [2.0, 4.0, 5.0, 5.0]
    assert b.blocked and b.remaining_s() == 5.0
    clock[0] += 1.5
    assert b.remaining_s() == 3.5
    b.succeeded()
    assert not b.blocked
    assert b.failed() == 2.0


def test_a_pause_ends(clock: list[float]) -> None:
    b = Backoff(0.01, 1.0)
    b.failed()
    assert b.blocked
    clock[0] += 0.01
    assert not b.blocked and b.remaining_s() == 0.0
