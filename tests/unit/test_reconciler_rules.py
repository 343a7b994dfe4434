"""The deployer's rule for stopping an instance that is no longer current (services/deployer/reconciler.may_stop)."""

from __future__ import annotations

from services.deployer.reconciler import may_stop


def test_an_old_instance_waits_until_every_function_it_serves_has_its_new_groups_replicas_ready() -> None:
    # fused fa+fb split into two groups of 2 replicas each: one ready instance of each is not enough yet
    assert not may_stop(["fa", "fb"], {"fa": 1, "fb": 1}, {"fa": 2, "fb": 2})
    assert not may_stop(["fa", "fb"], {"fa": 2, "fb": 1}, {"fa": 2, "fb": 2})
    assert may_stop(["fa", "fb"], {"fa": 2, "fb": 2}, {"fa": 2, "fb": 2})
    assert may_stop(["fa", "fb"], {"fa": 3, "fb": 2}, {"fa": 2, "fb": 2})


def test_a_function_needs_at_least_one_ready_instance_elsewhere_even_at_zero_replicas() -> None:
    assert not may_stop(["f"], {}, {"f": 0})
    assert may_stop(["f"], {"f": 1}, {"f": 0})


def test_a_deleted_function_needs_nobody() -> None:
    assert may_stop(["gone"], {}, {})
    assert not may_stop(["gone", "f"], {}, {"f": 1})
    assert may_stop(["gone", "f"], {"f": 1}, {"f": 1})
