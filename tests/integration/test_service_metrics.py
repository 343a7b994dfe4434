"""The store's, the deployer's and the optimizer's families on the gateway's GET /metrics, against a real stack."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

from tests.stack import Stack, function_yaml, make_zip, wait_for

if TYPE_CHECKING:
    from tests.pg_util import PgCluster

pytestmark = pytest.mark.integration

HELLO = "def handler(context, event):\n    return 'hello'\n"
CRASH = "import os\n\ndef handler(context, event):\n    os._exit(1)\n"
# a requirement pip itself cannot read: the build fails before asking any package index
BAD_REQUIREMENTS = "nuclide-missing ==== 1\n"
REPORTED_S = 30.0  # generous: reports come every second, but the machine is shared


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("svcmetrics") / "var")
    try:
        yield s.start()
    finally:
        s.stop()


def up(stack: Stack, service: str) -> float | None:
    return stack.metrics().get(f'nuclide_service_up{{service="{service}"}}')


def all_up(stack: Stack) -> dict[str, float]:
    """A scrape in which the store answered and the deployer and optimizer reported lately."""
    def scraped() -> dict[str, float] | None:
        m = stack.metrics()
        ok = all(m.get(f'nuclide_service_up{{service="{s}"}}') == 1 for s in ("store", "deployer", "optimizer"))
        return m if ok else None
    return wait_for(scraped, REPORTED_S, interval_s=0.2, what="every service reporting metrics")


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_deploy_calls_and_a_failed_build_move_each_service_s_families(stack: Stack) -> None:
    before = all_up(stack)
    assert before['nuclide_store_database_info{database="sqlite"}'] == 1
    assert before["nuclide_store_leader"] == 1
    assert delta(before, {}, "nuclide_deployer_builds_total") == 0  # nothing deployed yet (no sample either)

    stack.deploy("sm-fn", {"function.yaml": function_yaml("sm-fn"), "main.py": HELLO})
    for _ in range(3):
        assert stack.invoke("sm-fn").text == "hello"
    resp = stack.client.put("/sm-bad", files={"zip_file": ("task.zip", make_zip({
        "function.yaml": function_yaml("sm-bad"), "main.py": HELLO, "requirements.txt": BAD_REQUIREMENTS}),
        "application/zip")})
    assert resp.status_code == 422, resp.text

    def moved() -> dict[str, float] | None:
        m = all_up(stack)
        wanted = (delta(m, before, 'nuclide_deployer_builds_total{outcome="failed"}') == 1
                  and delta(m, before, 'nuclide_optimizer_traced_calls_total') >= 3
                  and delta(m, before, 'nuclide_store_calls{status="DONE"}') >= 3)
        return m if wanted else None

    after = wait_for(moved, REPORTED_S, interval_s=0.2, what="the deploys and calls in the services' families")
    # the deployer: one group version built and started, one refused by its build
    assert delta(after, before, 'nuclide_deployer_builds_total{outcome="ok"}') == 1
    assert delta(after, before, 'nuclide_deployer_build_seconds_count{outcome="ok"}') == 1
    assert delta(after, before, 'nuclide_deployer_build_seconds_count{outcome="failed"}') == 1
    assert after['nuclide_deployer_build_seconds_bucket{le="+Inf",outcome="failed"}'] == 1
    assert delta(after, before, "nuclide_deployer_instances_started_total") == 1
    assert after['nuclide_deployer_instances{backend="process"}'] == 1
    assert delta(after, before, 'nuclide_deployer_instances_exited_total{reason="crash"}') == 0
    # the store: both versions kept, the failed build reported, the sync calls recorded
    assert delta(after, before, 'nuclide_store_rpcs_total{method="function.put",outcome="ok"}') == 2
    assert delta(after, before, 'nuclide_store_rpcs_total{method="deploy.failed",outcome="ok"}') == 1
    assert delta(after, before, 'nuclide_store_calls{status="DONE"}') == 3
    assert delta(after, before, "nuclide_store_events_published_total") >= 3
    assert delta(after, before, 'nuclide_store_rpc_seconds_count{class="write"}') >= 4
    assert after["nuclide_store_storage_errors_total"] == 0
    # the one instance was forked from a zygote, or started cold when no zygote could run here
    assert delta(after, before, "nuclide_deployer_zygote_forks_total") in (0, 1)
    assert after["nuclide_deployer_zygote_warm_hits_total"] <= after["nuclide_deployer_zygote_forks_total"]
    # the optimizer: the three entry calls heard in the gateway's traces
    assert delta(after, before, "nuclide_optimizer_traced_calls_total") == 3


def test_an_instance_that_dies_counts_as_a_crash_and_a_deleted_one_as_stopped(stack: Stack) -> None:
    stack.deploy("sm-crash", {"function.yaml": function_yaml("sm-crash"), "main.py": CRASH})
    before = all_up(stack)
    for crashes in (1, 2, 3):  # each call ends its instance's process; the deployer starts another
        assert stack.invoke("sm-crash").status_code != 200
        wait_for(lambda: delta(all_up(stack), before, 'nuclide_deployer_instances_exited_total{reason="crash"}')
                 == crashes, REPORTED_S, interval_s=0.2, what=f"crash {crashes} counted")
    # the third crash within a minute delays the next restart
    wait_for(lambda: delta(all_up(stack), before, "nuclide_deployer_restart_backoffs_total") >= 1,
             REPORTED_S, interval_s=0.2, what="the restart backoff counted")
    before = all_up(stack)
    assert stack.client.delete("/sm-crash").status_code in (200, 204)
    wait_for(lambda: delta(all_up(stack), before, 'nuclide_deployer_instances_exited_total{reason="stopped"}') >= 1,
             REPORTED_S, interval_s=0.2, what="the deleted function's instance counted as stopped")
    assert delta(all_up(stack), before, 'nuclide_deployer_instances_exited_total{reason="crash"}') == 0


def test_a_killed_optimizer_is_reported_down_then_up_after_a_restart(stack: Stack) -> None:
    stack.deploy("sm-two", {"function.yaml": function_yaml("sm-two"), "main.py": HELLO})
    all_up(stack)
    stack.stop_service("optimizer", signal.SIGKILL)
    # down within the staleness window (three report periods), and its families left out
    wait_for(lambda: up(stack, "optimizer") == 0, REPORTED_S, interval_s=0.2, what="the optimizer reported down")
    m = stack.metrics()
    assert not [k for k in m if k.startswith("nuclide_optimizer_")], m
    assert m['nuclide_service_up{service="deployer"}'] == 1 and "nuclide_deployer_restart_backoffs_total" in m
    # back with a schedule that fuses the two functions at once: its round and its regroup are counted
    schedule = stack.var_dir.parent / "schedule.json"
    schedule.write_text(json.dumps({"0": [["sm-fn", "sm-two"]]}))
    stack.start_service("optimizer", {"NUCLIDE_OPTIMIZER_STRATEGY": "static",
                                      "NUCLIDE_OPTIMIZER_SCHEDULE": str(schedule)})
    wait_for(lambda: up(stack, "optimizer") == 1, REPORTED_S, interval_s=0.2, what="the optimizer reported up")
    m = wait_for(lambda: (m := stack.metrics()).get('nuclide_optimizer_regroups_total{result="applied"}') == 1 and m,
                 120, interval_s=0.2, what="the scheduled regroup counted")
    assert m['nuclide_optimizer_rounds_total{decision="applied"}'] == 1
    assert m["nuclide_optimizer_traced_edges_total"] == 0  # a new process: its counters start at zero
    assert stack.invoke("sm-two").text == "hello"


def test_a_scrape_works_with_the_store_down(stack: Stack) -> None:
    all_up(stack)
    stack.stop_service("store", signal.SIGKILL)
    try:
        m = stack.metrics()
        # the gateway's own families, the store (and what it relays) marked down and left out
        assert m['nuclide_service_up{service="store"}'] == 0
        assert m['nuclide_service_up{service="deployer"}'] == 0
        assert m['nuclide_service_up{service="optimizer"}'] == 0
        assert not [k for k in m if k.startswith(("nuclide_store_", "nuclide_deployer_", "nuclide_optimizer_"))]
        assert m['gateway_service_count{function_name="sm-fn"}'] >= 1
        assert "nuclide_invocations_total" in m
    finally:
        stack.start_service("store")
    all_up(stack)  # the store back: its families, and the others' reports through it, return


def test_a_store_on_postgresql_names_its_database_and_leads(tmp_path: Path, postgres_cluster: "PgCluster") -> None:
    s = Stack(tmp_path / "var", {"NUCLIDE_DATABASE_URL": postgres_cluster.new_database()})
    try:
        m = all_up(s.start())
        assert m['nuclide_store_database_info{database="postgresql"}'] == 1
        assert 'nuclide_store_database_info{database="sqlite"}' not in m
        assert m["nuclide_store_leader"] == 1
    finally:
        s.stop()


def test_the_autoscaler_s_moves_are_counted_by_direction(tmp_path: Path) -> None:
    from tests.scaling import BUSY, FAST_WINDOWS, Load, replicas

    s = Stack(tmp_path / "var", FAST_WINDOWS)
    try:
        s.start()
        before = all_up(s)
        s.deploy("sm-busy", {"function.yaml": function_yaml("sm-busy", minReplicas=1, maxReplicas=2), "main.py": BUSY})
        with Load(s.url, "sm-busy", connections=6, limit_s=60):
            wait_for(lambda: replicas(s, "sm-busy")["desired"] == 2, 40, interval_s=0.2, what="2 replicas under load")
        wait_for(lambda: replicas(s, "sm-busy")["desired"] == 1, 60, interval_s=0.2, what="1 replica after the load")
        m = wait_for(lambda: (m := all_up(s)).get('nuclide_optimizer_scaler_decisions_total{direction="down"}') == 1
                     and m, REPORTED_S, interval_s=0.2, what="the scale-down counted")
        assert m['nuclide_optimizer_scaler_decisions_total{direction="up"}'] == 1
        # the deploy's replica and the second one; the second stopped when the load was gone
        assert delta(m, before, "nuclide_deployer_instances_started_total") == 2
        wait_for(lambda: delta(all_up(s), before, 'nuclide_deployer_instances_exited_total{reason="stopped"}') == 1,
                 REPORTED_S, interval_s=0.2, what="the removed replica counted as stopped")
    finally:
        s.stop()
