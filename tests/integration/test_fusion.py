"""Fusion: task-to-task calls, fusion groups, zero-downtime regrouping and the optimizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.gateway.traces import TRACE_FLUSH_S
from tests.stack import ROOT, Stack, function_yaml, never, wait_for
from tests.tasks import TASK_A, TASK_B

pytestmark = pytest.mark.integration

def setup_of(stack: Stack) -> list[list[str]]:
    return sorted(sorted(g) for g in stack.client.get("/groups").json()["setup"])


def all_ready(stack: Stack) -> bool:
    groups = stack.client.get("/groups").json()["groups"]
    return all(g["state"] == "ready" and g["replicas"]["ready"] >= 1 for g in groups)


def test_fusionizer_scenario_with_the_static_optimizer(fresh_stack: Stack, tmp_path: Path) -> None:
    s = fresh_stack
    s.deploy("TaskB", {"function.yaml": function_yaml("TaskB"), "main.py": TASK_B})
    s.deploy("TaskA", {"function.yaml": function_yaml("TaskA"), "main.py": TASK_A})
    traces = s.traces(probe=lambda: s.invoke("TaskB", {"value1": 1, "value2": 1}))  # an entry call: no edge
    try:
        assert s.invoke("TaskA", {}).json() == 8
        wait_for(lambda: any(e[:2] == ["TaskA", "TaskB"] for e in traces.edges), 5, what="the remote edge trace")
        remote = [e for e in traces.edges if e[:2] == ["TaskA", "TaskB"]]
        assert remote[0][2] is True and remote[0][3] is False, "unfused: a synchronous remote call"

        schedule = tmp_path / "schedule.json"
        schedule.write_text(json.dumps({"1": [["TaskA", "TaskB"]]}))
        s.stop_service("optimizer")
        s.start_service("optimizer", {"NUCLIDE_OPTIMIZER_STRATEGY": "static",
                                      "NUCLIDE_OPTIMIZER_SCHEDULE": str(schedule)})
        wait_for(lambda: setup_of(s) == [["TaskA", "TaskB"]] and all_ready(s), 30, what="the fused group")
        wait_for(lambda: s.client.get("/optimizer").status_code == 200 and
                 s.client.get("/optimizer").json()["rounds"], 10, what="the optimizer's decision")
        decision = s.client.get("/optimizer").json()
        assert decision["strategy"] == "static" and decision["rounds"][0]["decision"] == "applied"
        desc = s.client.get("/TaskA").json()
        assert desc["group"]["tasks"] == ["TaskA", "TaskB"]

        traces.edges.clear()
        assert s.invoke("TaskA", {}).json() == 8
        wait_for(lambda: any(e[:2] == ["TaskA", "TaskB"] for e in traces.edges), 5, what="the local edge trace")
        local = [e for e in traces.edges if e[:2] == ["TaskA", "TaskB"]]
        assert local[-1][3] is True, "fused: served in-process"

        # the gateway sums an edge's calls over each 100 ms it publishes: [.., mean_ms, calls]
        traces.edges.clear()
        for _ in range(20):
            assert s.invoke("TaskA", {}).json() == 8

        def hop_calls() -> int:
            return sum(e[5] for e in traces.edges if e[:2] == ["TaskA", "TaskB"])

        wait_for(lambda: hop_calls() >= 20, 5, what="20 calls of the edge")
        # a later flush must not add calls that never happened
        never(lambda: hop_calls() > 20, 3 * TRACE_FLUSH_S, what="edge calls beyond the 20 made")
        local = [e for e in traces.edges if e[:2] == ["TaskA", "TaskB"]]
        assert len(local) < 20
        assert all(e[2] is True and e[3] is True and e[4] >= 0 for e in local)
    finally:
        traces.close()

    assert s.client.delete("/TaskA").status_code == 204
    wait_for(lambda: setup_of(s) == [["TaskB"]] and all_ready(s), 30, what="TaskB alone")
    r = s.invoke("TaskB", {"value1": 4, "value2": 8})
    assert r.status_code == 200 and r.json() == 12


NATIVE = {
    "caller.py": """
import os

def handler(context, event):
    what = event.body["what"] if isinstance(event.body, dict) else "sum"
    if what == "sum":
        return context.call("callee", {"a": 2, "b": 3})
    if what == "meta":
        return context.call("callee", {"meta": True, "mine": context.request_id})
    if what == "missing":
        try:
            context.call("no-such-task", {})
        except Exception as exc:
            return {"error": str(exc), "type": type(exc).__name__}
    if what == "raise":
        try:
            context.call("callee", {"raise": True})
        except Exception as exc:
            return {"error": str(exc)}
    if what == "uncaught":
        return context.call("callee", {"raise": True})
    if what == "cycle":
        return context.call("caller", {"what": "cycle"})
    if what == "async":
        return {"call_id": context.call_async("callee", {"a": 1, "b": 1})}
    if what == "env":
        return {"mine": os.environ.get("ROLE"), "theirs": context.call("callee", {"env": True})}
""",
    "callee.py": """
import os

def handler(context, event):
    body = event.body
    if body.get("raise"):
        raise ValueError("callee refused: bad numbers")
    if body.get("meta"):
        return {"id": event.call_id, "caller_id": body["mine"]}
    if body.get("env"):
        return os.environ.get("ROLE")
    return body["a"] + body["b"]
""",
}


def calls_under(s: Stack, function: str, parent_id: str) -> list[dict]:
    return [c for c in s.client.get("/calls", params={"function": function}).json() if c["parent_id"] == parent_id]


@pytest.mark.parametrize("fused", [False, True])
def test_native_calls_behave_the_same_fused_or_not(fresh_stack: Stack, fused: bool) -> None:
    s = fresh_stack
    s.deploy("callee", {"function.yaml": function_yaml("callee", "callee:handler", env=[{"name": "ROLE", "value": "callee"}]),
                        "callee.py": NATIVE["callee.py"]})
    s.deploy("caller", {"function.yaml": function_yaml("caller", "caller:handler", env=[{"name": "ROLE", "value": "caller"}]),
                        "caller.py": NATIVE["caller.py"]})
    if fused:
        r = s.client.put("/groups?wait=true", json=[["caller", "callee"]])
        assert r.status_code == 200, r.text
        assert setup_of(s) == [["callee", "caller"]]
    assert s.invoke("caller", {"what": "sum"}).json() == 5
    answer = s.invoke("caller", {"what": "meta"})
    meta = answer.json()
    # the callee runs under a call id of its own; the caller's is the one its client got (the parent link
    # is recorded with a failed task call: checked below)
    assert meta["caller_id"] == answer.headers["x-call-id"] and meta["id"] != meta["caller_id"], meta
    missing = s.invoke("caller", {"what": "missing"}).json()
    assert "function 'no-such-task' not found" in missing["error"] and missing["type"] == "CallFailed"
    caught = s.invoke("caller", {"what": "raise"})
    assert caught.json() == {"error": "callee refused: bad numbers"}
    # the callee's failure is a call record of its own, under its caller's, fused or not
    failed = wait_for(lambda: calls_under(s, "callee", caught.headers["x-call-id"]), 10, what="the callee's record")
    assert [(c["status"], c["kind"], c["source"], c["error"]) for c in failed] == [
        ("FAILED", "sync", "call", "ValueError: callee refused: bad numbers")]
    assert failed[0]["id"] != caught.headers["x-call-id"]  # its own id, under the caller's (calls_under)
    uncaught = s.invoke("caller", {"what": "uncaught"})
    assert uncaught.status_code == 500
    outer = wait_for(lambda: (r := s.client.get(f"/calls/{uncaught.headers['x-call-id']}")).status_code == 200
                     and r.json(), 10, what="the caller's record")
    assert (outer["status"], outer["error"]) == ("FAILED", "call to 'callee' failed: callee refused: bad numbers")
    assert wait_for(lambda: calls_under(s, "callee", uncaught.headers["x-call-id"]), 10, what="the callee's record")
    cycle = s.invoke("caller", {"what": "cycle"})
    assert cycle.status_code in (500, 508) and "depth limit" in cycle.text
    assert s.invoke("caller", {"what": "env"}).json() == {"mine": "caller", "theirs": "callee"}
    async_id = s.invoke("caller", {"what": "async"}).json()["call_id"]
    rec = wait_for(lambda: (c := s.client.get(f"/calls/{async_id}").json())["status"] in ("DONE", "FAILED", "DEAD")
                   and c, 30, what="the call_async call to finish")
    assert (rec["status"], rec["result"], rec["parent_id"] is not None) == ("DONE", 2, True), rec


def test_regroup_under_load_loses_no_call(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("TaskB", {"function.yaml": function_yaml("TaskB"), "main.py": TASK_B})
    s.deploy("TaskA", {"function.yaml": function_yaml("TaskA"), "main.py": TASK_A})
    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def hammer() -> None:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/TaskA", json={})
                results.append((r.status_code, r.text))

    workers = [threading.Thread(target=hammer) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: len(results) > 30, 10, what="calls before the regroup")
        assert s.client.put("/groups?wait=true", json=[["TaskA", "TaskB"]]).status_code == 200
        n = len(results)
        wait_for(lambda: len(results) > n + 30, 10, what="calls while fused")
        assert s.client.put("/groups?wait=true", json=[["TaskA"], ["TaskB"]]).status_code == 200
        n = len(results)
        wait_for(lambda: len(results) > n + 30, 10, what="calls after splitting again")
    finally:
        stop.set()
        for w in workers:
            w.join()
    bad = [r for r in results if r != (200, "8")]
    assert not bad, f"{len(bad)} of {len(results)} calls failed during regrouping, e.g. {bad[:3]}"


def test_bad_setups_are_refused_and_change_nothing(fresh_stack: Stack) -> None:
    s = fresh_stack
    for name in ("t1", "t2"):
        s.deploy(name, {"function.yaml": function_yaml(name), "main.py": "def handler(context, event):\n    return 1\n"})
    before = s.client.get("/groups").json()
    for setup, needle in [([["t1", "ghost"]], "ghost"), ([["t1"], ["t1", "t2"]], "more than one group: t1"),
                          ([["t1"], []], "empty"), ({"nope": 1}, "list")]:
        r = s.client.put("/groups", json=setup)
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]["message"]
    assert s.client.put("/groups", content=b"{not json").status_code == 400
    assert s.client.get("/groups").json() == before


ONE = "def handler(context, event):\n    return 'one'\n"
# a build that fails without the network: what pip prints for a package the index does not have
FAILING_BUILD = 'echo "ERROR: No matching distribution found for nuclide-missing" >&2; exit 1'


def instance_pids(s: Stack) -> dict[str, int]:
    """Group id -> pid of each running instance's registry entry."""
    found = {}
    for meta in (s.var_dir / "instances").glob("*/instance.json"):
        rec = json.loads(meta.read_text())
        found[rec["group_id"]] = rec["pid"]
    return found


def test_a_failed_regroup_keeps_the_setup_in_force_and_says_who_failed(fresh_stack: Stack) -> None:
    s = fresh_stack
    for name in ("hello", "other"):
        s.deploy(name, {"function.yaml": function_yaml(name), "main.py": ONE})
    s.deploy("badreq", {"function.yaml": function_yaml("badreq", build={"commands": [FAILING_BUILD]}), "main.py": ONE},
             expect=422)
    before = s.client.get("/groups").json()
    serving = instance_pids(s)

    r = s.client.put("/groups?wait=true", json=[["hello", "badreq"]])
    assert r.status_code == 422, r.text
    after = s.client.get("/groups").json()
    assert after["setup"] == before["setup"] and after["groups"] == before["groups"]
    hello = s.client.get("/hello").json()
    assert hello["group"]["tasks"] == ["hello"] and hello["replicas"] == {"desired": 1, "ready": 1}
    assert hello["state"] == "ready" and hello["last_error"] is None
    error = r.json()["error"]
    assert error["code"] == "build_failed"
    assert "task 'badreq' failed (fused with 'hello')" in error["message"], error["message"]
    assert "stays in force" in error["message"] and "exited with code 1" in error["message"]
    assert error["details"]["failed_tasks"] == ["badreq"] and "nuclide-missing" in error["details"]["log_tail"]
    assert after["regroup"]["state"] == "failed" and after["regroup"]["failed_tasks"] == ["badreq"]
    assert s.invoke("hello").text == "one"
    assert instance_pids(s) == serving, "the instances in force keep serving"

    # the failed regroup holds nothing up
    r = s.client.put("/groups?wait=true", json=[["hello", "other"]])
    assert r.status_code == 200, r.text
    assert setup_of(s) == [["badreq"], ["hello", "other"]] and r.json()["regroup"]["state"] == "done"
    assert s.invoke("hello").text == "one" and s.invoke("other").text == "one"


def test_a_regroup_whose_merged_build_fails_changes_nothing(fresh_stack: Stack) -> None:
    s = fresh_stack
    # each builds alone; together, left's step leaves what right's step refuses
    s.deploy("left", {"function.yaml": function_yaml("left", build={"commands": ["touch left-was-here"]}),
                      "main.py": ONE})
    refuse = 'test ! -e left-was-here || { echo "right cannot share an environment with left" >&2; exit 3; }'
    s.deploy("right", {"function.yaml": function_yaml("right", build={"commands": [refuse]}), "main.py": ONE})
    serving = instance_pids(s)

    r = s.client.put("/groups", json=[["left", "right"]])
    assert r.status_code == 200, r.text
    assert r.json()["setup"] == [["left"], ["right"]], "the setup in force is reported while the new one builds"
    assert r.json()["regroup"]["state"] == "deploying" and r.json()["regroup"]["setup"] == [["left", "right"]]
    groups = wait_for(lambda: (g := s.client.get("/groups").json())["regroup"]["state"] != "deploying" and g, 60,
                      what="the regroup to end")
    assert groups["regroup"]["state"] == "failed" and groups["regroup"]["failed_tasks"] == ["right"]
    assert "cannot share an environment" in groups["regroup"]["log_tail"]
    assert groups["setup"] == [["left"], ["right"]]
    for name in ("left", "right"):
        desc = s.client.get(f"/{name}").json()
        assert desc["replicas"] == {"desired": 1, "ready": 1} and desc["last_error"] is None
        assert s.invoke(name).text == "one"
    assert instance_pids(s) == serving


def test_conflicting_requirements_are_a_409(fresh_stack: Stack) -> None:
    s = fresh_stack
    code = "def handler(context, event):\n    return 1\n"
    # both requirement sets are valid on their own; only their union conflicts (no install needed to see it)
    s.deploy("r1", {"function.yaml": function_yaml("r1"), "main.py": code, "requirements.txt": "tabulate==0.9.0\n"})
    s.deploy("r2", {"function.yaml": function_yaml("r2"), "main.py": code, "requirements.txt": "tabulate==0.8.10\n"})
    r = s.client.put("/groups", json=[["r1", "r2"]])
    assert r.status_code == 409
    msg = r.json()["error"]["message"]
    assert "'r1'" in msg and "'r2'" in msg and "tabulate" in msg


def test_schedule_that_does_not_parse_stops_the_optimizer(tmp_path: Path) -> None:
    bad = tmp_path / "schedule.yaml"
    bad.write_text("40:\n  - [taska, taskb\n")
    env = dict(os.environ, NUCLIDE_OPTIMIZER_STRATEGY="static", NUCLIDE_OPTIMIZER_SCHEDULE=str(bad),
               NUCLIDE_VAR_DIR=str(tmp_path / "var"))
    out = subprocess.run([sys.executable, "-m", "services.optimizer"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2
    assert "schedule.yaml line" in out.stderr
    bad.write_text('{"forty": [["a"]]}')
    out = subprocess.run([sys.executable, "-m", "services.optimizer"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "'forty' is not a number" in out.stderr


TREE = {
    "A": 'def handler(context, event):\n    context.call_async("C", {})\n    return context.call("B", {})\n',
    "B": 'def handler(context, event):\n    return context.call("D", {})\n',
    "D": 'def handler(context, event):\n    return context.call("E", {})\n',
    "E": 'def handler(context, event):\n    return "leaf"\n',
    "C": 'def handler(context, event):\n    context.call_async("F", {})\n    context.call_async("G", {})\n    return "c"\n',
    "F": 'def handler(context, event):\n    return "f"\n',
    "G": 'def handler(context, event):\n    return "g"\n',
}


def test_feedback_optimizer_converges_on_the_fusionize_tree(fresh_stack: Stack) -> None:
    s = fresh_stack
    status, failures = _feedback_run(s, TREE, "A", "leaf", min_samples=20)
    assert setup_of(s) == [["A", "B", "D", "E"], ["C"], ["F"], ["G"]], status["rounds"]
    decisions = [r["decision"] for r in status["rounds"]]
    assert decisions.count("kept") == 3 and decisions[-1] == "converged"
    kept = [r for r in status["rounds"] if r["decision"] == "kept"]
    assert all("median_after_ms" in r and "median_before_ms" in r for r in kept), "each decision carries its evidence"
    assert not failures, f"calls failed while the optimizer regrouped: {failures[:3]}"


def _feedback_run(s: Stack, tasks: dict[str, str], entry: str, expect: str,
                  min_samples: int) -> tuple[dict[str, Any], list[str]]:
    """Deploy ``tasks``, restart the optimizer with the feedback strategy and call ``entry`` until it converges.

    A merge is kept unless the median grows past 4x (tolerance 3): fusing a chain never costs that, so what is
    kept does not hang on latency comparisons of a busy 2-core machine. Returns (status, failed calls)."""
    for name, code in tasks.items():
        s.deploy(name, {"function.yaml": function_yaml(name), "main.py": code})
    assert s.invoke(entry, {}).text == expect
    s.stop_service("optimizer")
    s.start_service("optimizer", {"NUCLIDE_OPTIMIZER_STRATEGY": "feedback", "NUCLIDE_OPTIMIZER_ROUND_S": "1.5",
                                  "NUCLIDE_OPTIMIZER_MIN_SAMPLES": str(min_samples), "NUCLIDE_OPTIMIZER_TOLERANCE": "3"})
    stop = threading.Event()
    failures: list[str] = []

    def load() -> None:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            while not stop.is_set():
                r = c.post(f"/{entry}", json={})
                if r.status_code != 200 or r.text != expect:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                stop.wait(0.01)

    t = threading.Thread(target=load)
    t.start()
    try:
        status = wait_for(lambda: (st := s.client.get("/optimizer").json()).get("state") == "converged" and st, 120,
                          interval_s=0.5, what="the feedback optimizer to converge")
    finally:
        stop.set()
        t.join()
    return status, failures


# Fused, "back" runs in the process that ran "front" and sleeps a second: the merge makes latency far worse.
SLOWER_FUSED = {
    "front": 'import builtins\n\ndef handler(context, event):\n    builtins.front_ran_here = True\n'
             '    return context.call("back", {})\n',
    "back": 'import builtins, time\n\ndef handler(context, event):\n'
            '    if getattr(builtins, "front_ran_here", False):\n        time.sleep(1.0)\n    return "back"\n',
}


def test_feedback_optimizer_reverts_a_merge_that_made_latency_worse(fresh_stack: Stack) -> None:
    s = fresh_stack
    status, failures = _feedback_run(s, SLOWER_FUSED, "front", "back", min_samples=3)
    assert not failures, failures[:5]
    reverted = [r for r in status["rounds"] if r["decision"] == "reverted"]
    assert reverted and reverted[0]["setup"] == [["back", "front"]], status["rounds"]
    assert reverted[0]["median_after_ms"] > 4 * reverted[0]["median_before_ms"]
    assert setup_of(s) == [["back"], ["front"]], "the optimizer went back to the setup before the merge"
    assert s.invoke("front", {}).text == "back"
