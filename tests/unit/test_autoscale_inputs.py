"""What the autoscaler is fed: the gateway's load samples (services/gateway/load.py) and the optimizer's reading
of the gateways' reports (services/optimizer/scaling.py), called directly."""

from __future__ import annotations

from collections import deque

from services.gateway.load import LoadMeter
from services.optimizer.scaling import REPORT_STALE_S, Autoscaling
from shared.config import load_settings


def test_the_meter_counts_calls_in_flight_and_queued_and_averages_its_samples() -> None:
    meter = LoadMeter()
    meter.sample(["a", "a", "b"], {"a": deque([1, 2]), "c": deque()})  # a: 2 in flight + 2 queued
    meter.sample(["a"], {})
    assert meter.take() == {"a": [2.5, 4], "b": [0.5, 1]}  # idle c is left out
    assert meter.take() == {}  # each report covers the samples since the last one


def scaler() -> Autoscaling:
    return Autoscaling(load_settings("optimizer", environ={}), store=None)  # type: ignore[arg-type]


def test_reports_from_several_gateways_add_up_and_stale_ones_stop_counting(monkeypatch) -> None:
    a = scaler()
    clock = [100.0]
    monkeypatch.setattr("services.optimizer.scaling.time.monotonic", lambda: clock[0])
    assert a.concurrency(clock[0], ["f"]) is None  # no gateway heard from: no evidence at all
    a.on_load({"gateway": "gw1", "functions": {"f": [3.0, 4], "g": [1.0, 1]}})
    a.on_load({"gateway": "gw2", "functions": {"f": [2.0, 2]}})
    assert a.concurrency(clock[0], ["f"]) == 5.0
    assert a.concurrency(clock[0], ["f", "g"]) == 6.0  # a fusion group: its members' load together
    assert a.concurrency(clock[0], ["idle"]) == 0.0  # heard from, and nothing in flight
    clock[0] += REPORT_STALE_S + 0.5
    a.on_load({"gateway": "gw2", "functions": {}})
    assert a.concurrency(clock[0], ["f"]) == 0.0  # gw1 went quiet: its old load no longer counts
    clock[0] += REPORT_STALE_S + 0.5
    assert a.concurrency(clock[0], ["f"]) is None


def test_malformed_reports_are_dropped_or_trimmed() -> None:
    a = scaler()
    a.on_load({"functions": {"f": [1.0, 1]}})  # no gateway id
    a.on_load({"gateway": "gw", "functions": ["f"]})  # not a map
    assert a.reports == {}
    a.on_load({"gateway": "gw", "functions": {"f": [-1.0, 0], "g": ["x"], "h": [True], "k": [2.5, 3], "m": 1.5,
                                              "n": []}})
    assert a.reports["gw"][1] == {"k": 2.5, "m": 1.5}
