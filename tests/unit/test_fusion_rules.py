"""Merging members' specs into one group spec."""

from __future__ import annotations

import pytest

from shared.errors import Conflict
from shared.fusion import merge_requirements, merge_specs


def test_requirements_merge_and_dedupe() -> None:
    out = merge_requirements({"a": "requests==2.31.0\nsix\n", "b": "Requests==2.31.0\nsix>=1.0  # comment\nPyYAML\n"})
    lines = out.splitlines()
    assert lines[0] == "requests==2.31.0"
    assert "six>=1.0" in lines and "PyYAML" in lines and len(lines) == 3


def test_conflict_names_both_tasks_and_the_package() -> None:
    with pytest.raises(Conflict) as info:
        merge_requirements({"taska": "numpy==1.26.0", "taskb": "numpy==2.0.0"})
    assert "taska" in info.value.message and "taskb" in info.value.message and "numpy" in info.value.message


def test_resources_combine() -> None:
    spec = merge_specs({
        "a": {"memory_bytes": 100, "timeout_s": 5, "max_concurrency": 4, "min_replicas": 1, "build_commands": ["x"]},
        "b": {"memory_bytes": 50, "timeout_s": 30, "max_concurrency": 2, "min_replicas": 2, "build_commands": ["x", "y"]},
    })
    assert spec["memory_bytes"] == 150 and spec["timeout_s"] == 30 and spec["max_concurrency"] == 2
    assert spec["min_replicas"] == 2 and spec["build_commands"] == ["x", "y"]
    assert merge_specs({"a": {}})["memory_bytes"] is None


def test_sandbox_limits_of_a_fused_group_add_up_and_host_network_is_shared() -> None:
    from shared.spec import DEFAULT_PIDS, DEFAULT_SCRATCH_BYTES

    alone = merge_specs({"a": {}})
    assert (alone["pids"], alone["scratch_bytes"], alone["network"]) == (DEFAULT_PIDS, DEFAULT_SCRATCH_BYTES, "isolated")
    fused = merge_specs({"a": {"pids": 64, "scratch_bytes": 100}, "b": {"network": "host"}})
    assert fused["pids"] == 64 + DEFAULT_PIDS and fused["scratch_bytes"] == 100 + DEFAULT_SCRATCH_BYTES
    assert fused["network"] == "host", "one process runs both: host networking if any member asked for it"


def test_a_failed_build_step_of_a_fused_group_is_put_down_to_the_tasks_it_came_from() -> None:
    from services.deployer.builder import REQUIREMENTS_STEP, members_of_step

    specs = {"hello": {"handler": "main:handler"},
             "badreq": {"requirements": "nuclide-missing\n", "build_commands": ["make assets"]},
             "pinned": {"requirements": "requests==2.31.0\n", "build_commands": ["make assets", "echo hi"]}}
    assert members_of_step(specs, REQUIREMENTS_STEP) == ["badreq", "pinned"]
    assert members_of_step(specs, "echo hi") == ["pinned"]
    assert members_of_step(specs, "make assets") == ["badreq", "pinned"]
    assert members_of_step(specs, "not a step of theirs") == ["badreq", "hello", "pinned"]
    assert members_of_step({"hello": {}}, REQUIREMENTS_STEP) == ["hello"]


def test_a_group_scales_within_what_every_member_allows() -> None:
    from shared.fusion import scale_bounds
    alone = scale_bounds({"a": {"min_replicas": 1, "max_replicas": 4, "max_concurrency": 8}})
    assert alone == {"max_replicas": 4, "target_concurrency": 8}  # the target defaults to maxConcurrency
    fused = scale_bounds({
        "a": {"min_replicas": 1, "max_replicas": 4, "max_concurrency": 8, "target_concurrency": 6},
        "b": {"min_replicas": 2, "max_replicas": 10, "max_concurrency": 2},
    })
    # no more instances than a member allows, no less than one needs; the least target per instance
    assert fused == {"max_replicas": 4, "target_concurrency": 2}
    # a member whose minimum exceeds another's maximum: the minimum wins (it is what a redeploy starts)
    assert scale_bounds({"a": {"min_replicas": 3, "max_replicas": 3}, "b": {"max_replicas": 1}})["max_replicas"] == 3
    assert scale_bounds({"a": {}})["max_replicas"] == 1  # bare spec: min 1, max min
