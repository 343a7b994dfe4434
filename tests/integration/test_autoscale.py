"""Autoscaling on a real stack: load raises a group's replicas, they fall back to the minimum once it stops, no call
fails either way, a removed instance finishes its calls first, and replicas can be held by hand (the checks are in
tests/scaling.py; the swarm backend runs them in test_swarm.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.scaling import FAST_WINDOWS, drain_on_scale_down, scale_up_and_back_down
from tests.stack import Stack, function_yaml

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


def test_load_scales_a_function_up_and_back_to_its_minimum_without_a_failed_call(scaling_stack: Stack) -> None:
    scale_up_and_back_down(scaling_stack)


def test_a_removed_instance_finishes_its_calls_and_replicas_can_be_held_by_hand(scaling_stack: Stack) -> None:
    s = scaling_stack
    drain_on_scale_down(s, lambda: lambda: "more replicas than desired" in s.service_log("deployer"))


@pytest.mark.parametrize("body, status, needle", [
    ({"replicas": 0}, 400, "use 1-3"),
    ({"replicas": 4}, 400, "use 1-3"),
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
