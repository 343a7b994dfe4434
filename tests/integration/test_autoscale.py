"""Autoscaling on a real stack: load raises a group's replicas, they fall back to the minimum once it stops, no call
fails either way, a removed instance finishes its calls first, and replicas can be held by hand (the checks are in
tests/scaling.py; the swarm backend runs them in test_swarm.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import json

import pytest

from tests.scaling import (BUSY, FAST_WINDOWS, Load, decision, drain_on_scale_down, instances_settle, replicas,
                           scale_up_and_back_down)
from tests.stack import Stack, function_yaml, never, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(params=["process", "docker"])
def scaling_stack(request: pytest.FixtureRequest, short_tmp_path: Path) -> Iterator[Stack]:
    """The same rules on each backend: the autoscaler sets replicas in the store, the backend's deployer follows."""
    if request.param == "docker":
        from tests.docker_util import docker_problem, need, own_docker_stack

        need(docker_problem())
        with own_docker_stack(short_tmp_path / "var", FAST_WINDOWS) as s:
            yield s
        return
    s = Stack(short_tmp_path / "var", FAST_WINDOWS)
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture
def fast_stack(short_tmp_path: Path) -> Iterator[Stack]:
    """A process-backend stack with the shortened windows, for the checks that need one of their own."""
    s = Stack(short_tmp_path / "var", FAST_WINDOWS)
    try:
        yield s.start()
    finally:
        s.stop()


# a stable window and a half of FAST_WINDOWS: long enough for the autoscaler to have acted on a whole one
PAST_A_STABLE_WINDOW_S = 1.5 * float(FAST_WINDOWS["NUCLIDE_AUTOSCALE_STABLE_WINDOW_S"])
# answers which instance ran the call, after as many seconds as the body says (0 for a body that is no number)
WHO = ("import os, time\n\nINSTANCE = os.urandom(8).hex()\n\n"
       "def handler(context, event):\n"
       "    try:\n        time.sleep(float(event.body or 0))\n    except ValueError:\n        time.sleep(0.05)\n"
       "    return INSTANCE\n")


def group_of(s: Stack, name: str) -> str:
    return s.client.get(f"/functions/{name}").json()["group"]["id"]


def test_load_scales_a_function_up_and_back_to_its_minimum_without_a_failed_call(scaling_stack: Stack) -> None:
    scale_up_and_back_down(scaling_stack)


def test_a_removed_instance_finishes_its_calls_and_replicas_can_be_held_by_hand(scaling_stack: Stack) -> None:
    s = scaling_stack
    drain_on_scale_down(s, lambda: lambda: "more replicas than desired" in s.service_log("deployer"))


@pytest.mark.parametrize("body, status, needle", [
    ({"replicas": 0}, 400, "use 1-3"),
    ({"replicas": 4}, 400, "use 1-3"),
    ({"replicas": -1}, 400, "use 1-3"),
    ({"replicas": 2.5}, 400, "not a whole number"),
    ({"replicas": "2"}, 400, "not a whole number"),
    ({"replicas": True}, 400, "not a whole number"),
    ({"count": 2}, 400, "'replicas'"),
    ([2], 400, "'replicas'"),
])
def test_bad_replica_overrides_are_refused_and_change_nothing(stack: Stack, body: object, status: int,
                                                                needle: str) -> None:
    s = stack
    if s.client.get("/functions/bounded").status_code == 404:
        s.deploy("bounded", {"function.yaml": function_yaml("bounded", minReplicas=1, maxReplicas=3),
                             "main.py": "def handler(context, event):\n    return 'ok'\n"})
    before = s.client.get("/functions/bounded").json()
    r = s.client.put("/functions/bounded/replicas", json=body)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    after = s.client.get("/functions/bounded").json()
    assert (after["replicas"], after["scaling"]) == (before["replicas"], before["scaling"])


def test_replica_override_of_an_unknown_function_is_404_and_needs_the_token(stack: Stack) -> None:
    r = stack.client.put("/functions/nosuchfn/replicas", json={"replicas": 1})
    assert r.status_code == 404 and "function 'nosuchfn' not found" in r.json()["error"]["message"]
    assert stack.anon.put("/functions/nosuchfn/replicas", json={"replicas": 1}).status_code == 401
    r = stack.client.put("/functions/nosuchfn/replicas", content=b"not json")
    assert r.status_code == 400 and '{"replicas": N}' in r.json()["error"]["message"]


def test_a_fusion_group_scales_as_one_from_its_members_load_up_to_their_smallest_maximum(fast_stack: Stack,
                                                                                        tmp_path: Path) -> None:
    s = fast_stack
    s.deploy("fa", {"function.yaml": function_yaml("fa", minReplicas=1, maxReplicas=4), "main.py": BUSY})
    s.deploy("fb", {"function.yaml": function_yaml("fb", minReplicas=1, maxReplicas=3), "main.py": BUSY})
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps({"0": [["fa", "fb"]]}))
    s.stop_service("optimizer")
    s.start_service("optimizer", {"NUCLIDE_OPTIMIZER_STRATEGY": "static", "NUCLIDE_OPTIMIZER_SCHEDULE": str(schedule)})
    wait_for(lambda: s.client.get("/functions/fa").json()["group"]["tasks"] == ["fa", "fb"]
             and replicas(s, "fa")["ready"] == 1, 30, what="fa and fb fused by the static schedule")
    gid = group_of(s, "fa")
    assert group_of(s, "fb") == gid
    # three clients on each member: one member alone never has more than 3 calls in flight or queued
    with Load(s.url, "fa", connections=3) as load_a, Load(s.url, "fb", connections=3) as load_b:
        seen = wait_for(lambda: (d := decision(s, gid)).get("observed_concurrency", 0) > 3 and d, 30, interval_s=0.2,
                        what="the group's observed concurrency to be the sum of its members' loads")
        assert seen["tasks"] == ["fa", "fb"] and seen["max_replicas"] == 3, seen
        wait_for(lambda: replicas(s, "fa") == {"desired": 3, "ready": 3}, 30, interval_s=0.2,
                 what="the group at fb's maxReplicas (3)")
        assert replicas(s, "fb") == {"desired": 3, "ready": 3}  # one deployment: both members report it
        # the load wants more than 3 (about 6 calls at a target of 1), fa would allow 4: fb's 3 holds
        wait_for(lambda: max(decision(s, gid).get("panic_wants", 0), decision(s, gid).get("stable_wants", 0)) > 3,
                 10, interval_s=0.2, what="a decision that wants more than 3")
        never(lambda: replicas(s, "fa")["desired"] > 3 and replicas(s, "fa"), PAST_A_STABLE_WINDOW_S, interval_s=0.2,
              what="more replicas than fb's maxReplicas")
    for load in (load_a, load_b):
        assert load.calls() > 0 and not load.failures(), load.failures()


def test_a_regroup_under_load_starts_the_new_groups_at_the_replicas_in_use_and_fails_no_call(
        fast_stack: Stack) -> None:
    s = fast_stack
    for name in ("fa", "fb"):
        s.deploy(name, {"function.yaml": function_yaml(name, minReplicas=1, maxReplicas=4), "main.py": WHO})
    with Load(s.url, "fa", connections=8) as load_a, Load(s.url, "fb", connections=8) as load_b:
        for name in ("fa", "fb"):
            wait_for(lambda: replicas(s, name) == {"desired": 4, "ready": 4}, 40, interval_s=0.2,
                     what=f"{name} at 4 ready replicas under load")
        # fused: the new group starts at what its members' groups run (4 + 4), within its maximum (4)
        fused = s.client.put("/groups", json=[["fa", "fb"]])
        assert fused.status_code == 200, fused.text
        proposed = fused.json()["regroup"]["groups"]
        assert [(g["tasks"], g["replicas"]["desired"]) for g in proposed] == [(["fa", "fb"], 4)], proposed
        wait_for(lambda: s.client.get("/groups").json()["regroup"]["state"] == "done", 40, interval_s=0.2,
                 what="the fusion to take over")
        wait_for(lambda: replicas(s, "fa") == {"desired": 4, "ready": 4}, 40, interval_s=0.2,
                 what="the fused group at 4 ready replicas")
        before = load_a.calls()
        wait_for(lambda: load_a.calls() > before + 50, 20, what="calls on the fused group")
        # split again: each new group starts at its share of the 4 the fused group runs (4 / 2 members)
        split = s.client.put("/groups", json=[["fa"], ["fb"]])
        assert split.status_code == 200, split.text
        proposed = split.json()["regroup"]["groups"]
        assert sorted((g["tasks"], g["replicas"]["desired"]) for g in proposed) == [(["fa"], 2), (["fb"], 2)], proposed
        wait_for(lambda: s.client.get("/groups").json()["regroup"]["state"] == "done", 40, interval_s=0.2,
                 what="the split to take over")
        wait_for(lambda: all(replicas(s, n)["ready"] >= 2 for n in ("fa", "fb")), 40, interval_s=0.2,
                 what="both new groups with at least their share ready")
        before = load_a.calls()
        wait_for(lambda: load_a.calls() > before + 50, 20, what="calls after the split")
    for load in (load_a, load_b):
        assert load.calls() > 0 and not load.failures(), load.failures()


def test_a_manual_override_holds_past_a_stable_window_idle_and_under_load_until_given_back(fast_stack: Stack) -> None:
    s = fast_stack
    s.deploy("held", {"function.yaml": function_yaml("held", minReplicas=1, maxReplicas=4), "main.py": BUSY})
    # idle: the autoscaler wants 1, the override holds 3
    r = s.client.put("/functions/held/replicas", json={"replicas": 3})
    assert r.status_code == 200 and r.json()["override"] == 3, r.text
    wait_for(lambda: replicas(s, "held") == {"desired": 3, "ready": 3}, 30, what="three ready replicas")
    wait_for(lambda: decision(s, "g-held").get("stable_wants") == 0, 10, interval_s=0.2,
             what="a decision made with no load")
    never(lambda: replicas(s, "held")["desired"] != 3 and replicas(s, "held"), PAST_A_STABLE_WINDOW_S,
          interval_s=0.2, what="the idle override to let go")
    assert decision(s, "g-held")["reason"].startswith("manual override")
    # under a load that wants 4, an override of 2 holds too
    with Load(s.url, "held", connections=12) as load:
        r = s.client.put("/functions/held/replicas", json={"replicas": 2})
        assert r.status_code == 200 and r.json()["replicas"] == 2, r.text
        wait_for(lambda: replicas(s, "held") == {"desired": 2, "ready": 2}, 30, what="two ready replicas")
        instances_settle(s, "held", 2)
        wait_for(lambda: decision(s, "g-held").get("panic_wants", 0) > 2, 10, interval_s=0.2,
                 what="a decision that wants more than 2")
        never(lambda: replicas(s, "held")["desired"] != 2 and replicas(s, "held"), PAST_A_STABLE_WINDOW_S,
              interval_s=0.2, what="the override under load to let go")
        # given back under load: the autoscaler takes it up to the maximum
        back = s.client.put("/functions/held/replicas", json={"replicas": None})
        assert back.status_code == 200 and back.json()["override"] is None, back.text
        wait_for(lambda: replicas(s, "held")["desired"] == 4, 30, interval_s=0.2, what="the autoscaler to take over")
    assert load.calls() > 0 and not load.failures(), load.failures()
    assert s.client.get("/functions/held").json()["scaling"]["override"] is None


def test_max_replicas_caps_a_load_that_wants_more(fast_stack: Stack) -> None:
    s = fast_stack
    s.deploy("capped", {"function.yaml": function_yaml("capped", minReplicas=1, maxReplicas=2), "main.py": BUSY})
    with Load(s.url, "capped", connections=12) as load:
        wait_for(lambda: replicas(s, "capped") == {"desired": 2, "ready": 2}, 30, interval_s=0.2,
                 what="maxReplicas (2) under load")
        wanted = wait_for(lambda: (d := decision(s, "g-capped")).get("panic_wants", 0) > 2 and d, 10, interval_s=0.2,
                          what="a decision that wants more than 2")
        assert wanted["desired"] == 2 and wanted["max_replicas"] == 2, wanted
        never(lambda: replicas(s, "capped")["desired"] > 2 and replicas(s, "capped"), PAST_A_STABLE_WINDOW_S,
              interval_s=0.2, what="more replicas than maxReplicas")
        instances_settle(s, "capped", 2)
    assert load.calls() > 0 and not load.failures(), load.failures()


def test_calls_in_flight_while_the_autoscaler_scales_down_all_answer(fast_stack: Stack) -> None:
    s = fast_stack
    s.deploy("shrink", {"function.yaml": function_yaml("shrink", minReplicas=1, maxReplicas=4), "main.py": WHO})
    with Load(s.url, "shrink", connections=16) as burst:
        wait_for(lambda: replicas(s, "shrink") == {"desired": 4, "ready": 4}, 40, interval_s=0.2,
                 what="4 ready replicas under a burst")
    assert not burst.failures(), burst.failures()
    # the burst stops; two clients keep 0.4 s calls in flight on the instances while the count drops
    with Load(s.url, "shrink", connections=2, body=b"0.4") as trickle:
        wait_for(lambda: replicas(s, "shrink")["desired"] <= 2, 40, interval_s=0.2, what="the scale-down")
        instances_settle(s, "shrink", replicas(s, "shrink")["desired"])
        before = trickle.calls()
        wait_for(lambda: trickle.calls() > before + 5, 20, what="calls after the scale-down")
    changes = [c for c in s.client.get("/optimizer").json()["scaling"]["changes"] if c["group"] == "g-shrink"]
    assert any(c["to"] < c["from"] for c in changes), changes
    assert trickle.calls() > 0 and not trickle.failures(), trickle.failures()
