"""The Fusionizer's text answers: who gets them (Accept and fusionizer_mode) and what they say."""

from __future__ import annotations

import json

import pytest

from services.gateway import fusionizer


@pytest.mark.parametrize("accept,mode,text", [
    (None, False, False), (None, True, True),
    ("*/*", False, False), ("*/*", True, True),  # curl's default: the Fusionizer's scripts
    ("text/plain", False, True), ("text/*", False, True),
    ("application/json", True, False),
    ("application/json, text/plain;q=0.5", False, False), ("application/json;q=0.4, text/plain", True, True),
    ("text/plain;q=0, */*", True, False), ("text/html", True, True), ("text/plain;q=x", False, False),
])
def test_who_gets_text(accept: str | None, mode: bool, text: bool) -> None:
    assert fusionizer.wants_text(accept, mode) is text


def test_failure_text() -> None:
    error = {"error": {"code": "build_failed", "message": "deploying 'x' failed", "details": {"log_tail": "line 1"}}}
    assert fusionizer.failure_text("application/json", json.dumps(error).encode()) == b"deploying 'x' failed\nline 1"
    assert fusionizer.failure_text("application/json", b'{"error": {"message": "m"}}') == b"m"
    assert fusionizer.failure_text("text/plain", b"some error") == b"some error"
    assert fusionizer.failure_text("application/json", b"[1]") == b"[1]"
    assert [fusionizer.is_task_failure(s) for s in (200, 404, 401, 429, 500)] == [False, True, False, False, True]


def test_describe_as_the_fusionizer_writes_it() -> None:
    desc = {"state": "ready", "group": {"tasks": ["taska", "taskb"]}}
    assert fusionizer.describe("taska", desc, 8000) == (
        "Task 'taska':\nCurrently deployed with other Tasks: ['taska', 'taskb']\nStatus: ready\nHTTP port: 8000")
    assert "with other Tasks: None" in fusionizer.describe("taska", {"group": {"tasks": ["taska"]}}, 8000)


def test_deploy_answers() -> None:
    assert fusionizer.deployed("taska") == "Successfully deployed Task 'taska'"
    assert fusionizer.deployed("taska", ready=False) == "Deploying Task 'taska'"
    assert fusionizer.deleted("taska") == "Successfully deleted Task 'taska'"
    assert fusionizer.not_found("x") == "No Task 'x' could be found"
