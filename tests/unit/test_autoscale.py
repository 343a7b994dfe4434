"""The autoscaler's rules (services/optimizer/autoscale.py), driven with a made-up clock and load."""

from __future__ import annotations

import pytest

from services.optimizer.autoscale import Bounds, GroupScaler, Windows

W = Windows(stable_s=60.0, panic_s=6.0, panic_threshold=2.0)


def run(loads: list[tuple[float, float]], bounds: Bounds, current: int = 1, ready: int | None = None,
        windows: Windows = W, follow: bool = True) -> list:
    """Feed (seconds, concurrency) steps one second apart; the group takes each decision at once (ready =
    desired) when ``follow``. Returns every decision."""
    scaler = GroupScaler(windows, started_at=0.0)
    out = []
    t = 0.0
    for seconds, concurrency in loads:
        for _ in range(int(seconds)):
            t += 1.0
            scaler.observe(t, concurrency)
            d = scaler.decide(t, current, current if ready is None else ready, bounds)
            out.append(d)
            if follow:
                current = d.desired
    return out


@pytest.mark.parametrize("load, target, expected", [
    (0.0, 1, 1),  # idle: the minimum
    (1.0, 1, 1),
    (3.2, 1, 4),  # ceil
    (8.0, 1, 4),  # clamped to maxReplicas
    (8.0, 4, 2),  # target concurrency per instance from the spec
    (4.0, 4, 1),
])
def test_steady_load_wants_ceil_of_concurrency_over_target(load: float, target: int, expected: int) -> None:
    decisions = run([(120, load)], Bounds(min_replicas=1, max_replicas=4, target=target))
    assert decisions[-1].desired == expected
    if decisions[-1].panic_wants <= 4:  # past maxReplicas the load stays twice what 4 carry: a panic, clamped
        assert not decisions[-1].panic


@pytest.mark.parametrize("minimum, maximum, load, expected", [
    (2, 5, 0.0, 2),  # never below minReplicas
    (0, 5, 0.0, 1),  # minReplicas 0: zero is the idle timeout's business, not the autoscaler's
    (1, 3, 50.0, 3),  # never above maxReplicas, panic or not
    (3, 3, 0.0, 3),
])
def test_clamps(minimum: int, maximum: int, load: float, expected: int) -> None:
    decisions = run([(90, load)], Bounds(minimum, maximum, 1))
    assert all(minimum <= d.desired <= maximum or d.desired == 1 for d in decisions)
    assert decisions[-1].desired == expected


def test_a_burst_panics_and_scales_up_within_the_panic_window() -> None:
    # 60 s idle at 1 replica, then 8 concurrent calls: the stable mean barely moves, the panic window does
    decisions = run([(60, 0.0), (6, 8.0)], Bounds(1, 10, 1))
    burst = decisions[60:]
    assert burst[0].panic and burst[0].desired == 2  # one sample of 8 in the 6 s window: mean 1.33, twice 1
    assert all(d.panic for d in burst)
    assert burst[-1].desired == 8  # a full panic window of 8
    assert burst[-1].stable_wants == 1  # what the stable window alone would still say


def test_no_panic_below_the_threshold() -> None:
    # 1.5x the ready replicas is wanted: the stable window's business, not a panic
    decisions = run([(60, 2.0), (6, 3.0)], Bounds(1, 10, 1))
    assert decisions[59].desired == 2
    assert not any(d.panic for d in decisions[60:])


def test_no_scale_down_while_panicking() -> None:
    # a burst, then a lull shorter than the stable window: the panic holds the peak
    decisions = run([(60, 0.0), (6, 8.0), (20, 0.5)], Bounds(1, 10, 1))
    assert max(d.desired for d in decisions) == 8
    after = decisions[66:]
    assert all(d.panic for d in after)
    assert all(d.desired == 8 for d in after)


def test_panic_ends_a_stable_window_after_the_last_crossing_then_scales_down_in_order() -> None:
    decisions = run([(60, 0.0), (6, 8.0), (200, 0.0)], Bounds(1, 10, 1))
    crossings = [i for i, d in enumerate(decisions) if d.panic_wants / max(d.ready, 1) >= 2]
    flags = [d.panic for d in decisions]
    assert flags[crossings[0]:crossings[-1] + 60] == [True] * (crossings[-1] + 60 - crossings[0])
    assert not flags[crossings[-1] + 60]
    assert decisions[-1].desired == 1 and not decisions[-1].panic
    downs = [d.desired for d in decisions[crossings[-1] + 60:]]
    assert downs == sorted(downs, reverse=True)  # never back up without load


def test_scale_down_only_after_the_stable_window() -> None:
    # steady 4 for long enough, then nothing: 4 replicas stay for a whole stable window
    decisions = run([(120, 4.0), (120, 0.0)], Bounds(1, 8, 1))
    assert decisions[119].desired == 4
    quiet = decisions[120:]
    held = [d for d in quiet[:59]]
    assert all(d.desired == 4 for d in held), [d.desired for d in held]
    assert quiet[-1].desired == 1


def test_a_young_scaler_does_not_scale_down() -> None:
    # an optimizer that just started finds 4 replicas and no load: it waits a stable window first
    decisions = run([(59, 0.0)], Bounds(1, 8, 1), current=4)
    assert all(d.desired == 4 for d in decisions)
    assert "less than one stable window" in decisions[0].reason
    later = run([(70, 0.0)], Bounds(1, 8, 1), current=4)
    assert later[-1].desired == 1


def test_scale_up_on_the_stable_window_is_not_delayed() -> None:
    decisions = run([(60, 1.0), (60, 2.0)], Bounds(1, 8, 1))
    ups = [i for i, d in enumerate(decisions) if d.desired == 2]
    assert ups and ups[0] < 120  # up as soon as the mean passes 1, not after a window


def test_the_panic_ratio_is_against_ready_replicas() -> None:
    # 4 replicas wanted and 4 set, but 1 ready (the others still starting): a panic, not a no-op
    scaler = GroupScaler(W, started_at=0.0)
    scaler.observe(1.0, 4.0)
    d = scaler.decide(1.0, 4, 1, Bounds(1, 8, 1))
    assert d.panic and d.desired == 4
    scaler = GroupScaler(W, started_at=0.0)
    scaler.observe(1.0, 4.0)
    assert not scaler.decide(1.0, 4, 4, Bounds(1, 8, 1)).panic


def test_shortened_windows_keep_the_same_rules() -> None:
    short = Windows(stable_s=4.0, panic_s=2.0, panic_threshold=2.0)
    decisions = run([(5, 0.0), (4, 6.0), (20, 0.0)], Bounds(1, 4, 1), windows=short)
    assert max(d.desired for d in decisions) == 4
    assert decisions[-1].desired == 1
    assert decisions[-1].evidence()["desired"] == 1
