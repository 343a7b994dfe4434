"""Rendering the store's metrics.get answer (the store's, deployer's and optimizer's snapshots) as families."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from services.gateway.svcmetrics import MAX_ROWS, STALE_PERIODS, ServiceCollector
from services.store.metrics import MAX_METHODS, StoreMetrics, method_class
from shared.errors import InvalidRequest
from shared.svcmetrics import FAMILIES, Histogram, labelled, single


def render(answer: dict[str, Any] | None) -> tuple[str, dict[str, float]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(lambda: answer))
    text = generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return text, samples


def deployer_report(age_s: float, interval_s: float = 1.0) -> dict[str, Any]:
    hist = Histogram((0.1, 1.0))
    hist.observe(0.05)
    hist.observe(0.5)
    hist.observe(7.0)
    return {"age_s": age_s, "interval_s": interval_s, "metrics": {
        "nuclide_deployer_builds": labelled({"ok": 3}),
        "nuclide_deployer_build_seconds": labelled({"ok": hist}),
        "nuclide_deployer_instances": [["process", 2]],
        "nuclide_deployer_instances_started": single(5),
    }}


def test_a_store_snapshot_renders_with_help_and_types() -> None:
    store = StoreMetrics()
    store.served("function.get", "ok", 0.0003)
    store.served("function.put", "conflict", 0.02)
    store.events_published = 4
    text, m = render({"store": store.snapshot("postgresql", False, {"DONE": 2, "DEAD": 1}), "services": {}})
    assert m['nuclide_store_rpcs_total{method="function.get",outcome="ok"}'] == 1
    assert m['nuclide_store_rpcs_total{method="function.put",outcome="conflict"}'] == 1
    assert m['nuclide_store_rpc_seconds_count{class="read"}'] == 1
    assert m['nuclide_store_rpc_seconds_bucket{class="write",le="0.01"}'] == 0
    assert m['nuclide_store_rpc_seconds_bucket{class="write",le="0.025"}'] == 1
    assert m["nuclide_store_events_published_total"] == 4
    assert m['nuclide_store_database_info{database="postgresql"}'] == 1 and m["nuclide_store_leader"] == 0
    assert m['nuclide_store_calls{status="DEAD"}'] == 1
    assert m['nuclide_service_up{service="store"}'] == 1
    assert m['nuclide_service_up{service="deployer"}'] == 0 and m['nuclide_service_up{service="optimizer"}'] == 0
    for name, spec in FAMILIES.items():  # every family of a service that is up says what it counts
        if spec.service == "store":
            rendered = name + ("_total" if spec.kind == "counter" else "")
            assert f"# HELP {name} {spec.help}" in text or f"# HELP {rendered} {spec.help}" in text


def test_a_fresh_report_renders_and_a_stale_one_is_left_out() -> None:
    _, m = render({"store": {}, "services": {"deployer": deployer_report(age_s=0.5)}})
    assert m['nuclide_service_up{service="deployer"}'] == 1
    assert m['nuclide_deployer_builds_total{outcome="ok"}'] == 3
    # buckets cumulated; the +Inf bucket and the count hold every observation
    assert m['nuclide_deployer_build_seconds_bucket{le="0.1",outcome="ok"}'] == 1
    assert m['nuclide_deployer_build_seconds_bucket{le="1.0",outcome="ok"}'] == 2
    assert m['nuclide_deployer_build_seconds_bucket{le="+Inf",outcome="ok"}'] == 3
    assert m['nuclide_deployer_build_seconds_count{outcome="ok"}'] == 3
    assert m['nuclide_deployer_build_seconds_sum{outcome="ok"}'] == pytest.approx(7.55)
    assert m['nuclide_deployer_instances{backend="process"}'] == 2

    _, m = render({"store": {}, "services": {"deployer": deployer_report(age_s=STALE_PERIODS * 2.0 + 0.1,
                                                                          interval_s=2.0)}})
    assert m['nuclide_service_up{service="deployer"}'] == 0
    assert not [k for k in m if k.startswith("nuclide_deployer_")]
    # the store still answered: it is up even when a service it relays is not
    assert m['nuclide_service_up{service="store"}'] == 1


def test_no_answer_from_the_store_leaves_every_service_down() -> None:
    _, m = render(None)
    assert m == {'nuclide_service_up{service="store"}': 0, 'nuclide_service_up{service="deployer"}': 0,
                 'nuclide_service_up{service="optimizer"}': 0}


def test_malformed_rows_and_unknown_families_are_dropped_not_rendered() -> None:
    bad_hist = {"bounds": [1.0, 0.5], "counts": [1, 1, 1], "sum_s": 1.0}  # bounds out of order
    _, m = render({"store": {"nuclide_store_rpcs": [["only-method", 1],  # one label short
                                                     ["m", "ok", "x"],  # a value that is not a number
                                                     [1, "ok", 2],  # a label that is not a string
                                                     ["m", "ok", True],  # a bool is not a count
                                                     ["good", "ok", 7]],
                             "nuclide_store_rpc_seconds": [["read", bad_hist]],
                             "nuclide_made_up": single(1)},
                   "services": {"optimizer": {"age_s": "soon", "interval_s": 1.0, "metrics": {}},
                                "deployer": {"age_s": 0.1, "interval_s": 1.0, "metrics": "nope"}}})
    assert [k for k in m if k.startswith("nuclide_store_rpcs")] == ['nuclide_store_rpcs_total{method="good",outcome="ok"}']
    assert not [k for k in m if k.startswith(("nuclide_store_rpc_seconds", "nuclide_made_up"))]
    assert m['nuclide_service_up{service="optimizer"}'] == 0 and m['nuclide_service_up{service="deployer"}'] == 0
    # a report with more series than any service has is cut, not rendered whole
    _, m = render({"store": {"nuclide_store_calls": [[f"S{i}", i] for i in range(MAX_ROWS * 2)]}, "services": {}})
    assert len([k for k in m if k.startswith("nuclide_store_calls")]) == MAX_ROWS


def test_the_store_bounds_method_labels_and_refuses_bad_reports() -> None:
    store = StoreMetrics()
    for i in range(MAX_METHODS + 5):
        store.served(f"made.up{i}", "invalid_request", 0.0001)
    assert len({method for method, _ in store.rpcs}) == MAX_METHODS + 1 and store.rpcs[("other", "invalid_request")] == 5
    assert method_class("kv.get") == "read" and method_class("kv.put") == "write"
    with pytest.raises(InvalidRequest, match="service 'deployer' or 'optimizer'"):
        store.report("store", {}, 1.0)
    with pytest.raises(InvalidRequest, match="map of at most"):
        store.report("optimizer", ["x"], 1.0)
    with pytest.raises(InvalidRequest, match="interval_s"):
        store.report("optimizer", {}, 0)
    assert store.reports == {}
    store.report("optimizer", {"nuclide_optimizer_traced_calls": single(2)}, 1.0)
    assert store.services()["optimizer"]["metrics"] == {"nuclide_optimizer_traced_calls": [[2]]}


def test_the_readme_lists_every_service_family() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name, spec in {"nuclide_service_up": None, **FAMILIES}.items():
        rendered = name + ("_total" if spec is not None and spec.kind == "counter" else "")
        assert f"| `{rendered}` |" in readme, f"README's Metrics table has no row for {rendered}"
