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
