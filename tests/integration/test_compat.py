"""Functions written for nuclio, AWS Lambda and the Fusionizer run unchanged: what their own tests expect."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta

import pytest

from tests.stack import Stack, function_yaml

pytestmark = pytest.mark.integration

# what nuclio's own "event returner" test function reports of its event
EVENT_RETURNER = """
import json

def handler(context, event):
    body = event.body if isinstance(event.body, dict) else event.body.decode()
    return json.dumps({
        "id": event.id, "call_id": event.call_id, "path": event.path, "url": event.url, "method": event.method,
        "headers": dict(event.headers), "lookup": event.headers.get("testheaderkey1"),
        "timestamp": event.timestamp.isoformat("T") + "Z", "trigger": event.trigger.kind, "body": body,
    })
"""

OUTPUTTER = """
def handler(context, event):
    what = event.body.decode()
    if what == "dict":
        return {"a": "dict", "b": "foo"}
    if what == "status_and_string":
        return 201, "a string after status"
    if what == "list":
        return [1, 2]
    if what == "raise":
        raise ValueError("some error")
    return "a string"
"""


@pytest.fixture(scope="module")
def nuclio_fns(stack: Stack) -> Stack:
    stack.deploy("evt", {"function.yaml": function_yaml("evt"), "main.py": EVENT_RETURNER})
    stack.deploy("outputter", {"function.yaml": function_yaml("outputter"), "main.py": OUTPUTTER})
    return stack


def test_event_as_nuclio_gives_it(nuclio_fns: Stack) -> None:
    s = nuclio_fns
    headers = {"Testheaderkey1": "testHeaderValue1", "X-Mixed-Case": "v"}
    before = datetime.utcnow()
    r = s.anon.post("/evt/path/to/nowhere?x=1&y=2", content=b"testBody", headers=headers)
    assert r.status_code == 200, r.text
    doc = json.loads(r.text)
    assert str(uuid.UUID(doc["id"])) == doc["id"], "event.id is a UUID string"
    assert doc["call_id"] == r.headers["x-call-id"] and doc["id"] != doc["call_id"]
    assert doc["path"] == "/path/to/nowhere" and doc["url"] == "/path/to/nowhere?x=1&y=2"
    assert doc["method"] == "POST" and doc["body"] == "testBody" and doc["trigger"] == "http"
    assert doc["headers"]["Testheaderkey1"] == "testHeaderValue1", "header names keep the caller's case"
    assert doc["headers"]["X-Mixed-Case"] == "v" and "x-mixed-case" not in doc["headers"]
    assert doc["lookup"] == "testHeaderValue1", "lookups ignore case"
    stamp = datetime.fromisoformat(doc["timestamp"].removesuffix("Z"))  # naive UTC, as nuclio's SDK makes it
    assert stamp.tzinfo is None and abs(stamp - before) < timedelta(minutes=1)
    # the function's own root, and the same below /functions/{name}/invoke with any method
    assert json.loads(s.anon.post("/evt", content=b"x").text)["path"] == "/"
    doc = json.loads(s.anon.get("/functions/evt/invoke/a/b", params={"q": "1"}).text)
    assert (doc["path"], doc["url"], doc["method"]) == ("/a/b", "/a/b?q=1", "GET")
    # retries of one call keep their event id; another call gets another
    assert json.loads(s.anon.post("/evt", content=b"x").text)["id"] != json.loads(
        s.anon.post("/evt", content=b"x").text)["id"]


def test_response_content_types_as_nuclio_sets_them(nuclio_fns: Stack) -> None:
    s = nuclio_fns
    r = s.invoke("outputter", b"string")
    assert (r.status_code, r.headers["content-type"], r.text) == (200, "text/plain", "a string")
    r = s.invoke("outputter", b"status_and_string")
    assert (r.status_code, r.headers["content-type"], r.text) == (201, "text/plain", "a string after status")
    r = s.invoke("outputter", b"dict")
    assert (r.headers["content-type"], r.json()) == ("application/json", {"a": "dict", "b": "foo"})
    assert s.invoke("outputter", b"list").headers["content-type"] == "application/json"
    r = s.invoke("outputter", b"raise")
    assert (r.status_code, r.headers["content-type"]) == (500, "text/plain") and "some error" in r.text
