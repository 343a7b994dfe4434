"""The pools' backoff after failed creates: pure timing logic."""

from __future__ import annotations

import time

from services.deployer.backends.refill import Backoff


def test_pauses_double_up_to_the_most_and_a_success_resets_them() -> None:
    b = Backoff(2.0, 5.0)
    assert not b.blocked and b.remaining_s() == 0.0
    assert [b.failed(), b.failed(), b.failed(), b.failed()] == [2.0, 4.0, 5.0, 5.0]
    assert b.blocked and 4.0 < b.remaining_s() <= 5.0
    b.succeeded()
    assert not b.blocked
    assert b.failed() == 2.0


def test_a_pause_ends() -> None:
    b = Backoff(0.01, 1.0)
    b.failed()
    assert b.blocked
    time.sleep(0.02)
    assert not b.blocked and b.remaining_s() == 0.0
