"""W3C Trace Context on a real stack: traceparent on invoke, the handler's view, task calls, and the trace API."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.tracecontext import span_id
from tests.stack import Stack, function_yaml, wait_for

pytestmark = pytest.mark.integration

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def task(next_task: str | None) -> str:
    """A task that reports its trace as its context sees it, and calls ``next_task`` when there is one."""
    return (
        "def handler(context, event):\n"
        "    me = {'function': context.function_name, 'call_id': context.call_id, 'trace_id': context.trace_id,\n"
        "          'span_id': context.span_id, 'parent': context.parent_span_id,\n"
        "          'traceparent': context.traceparent, 'tracestate': context.tracestate}\n"
        f"    if {next_task!r}:\n"
        f"        me['child'] = context.call({next_task!r}, {{}})\n"
        "    return me\n")


def deploy_chain(s: Stack, names: list[str]) -> None:
    for i, name in reversed(list(enumerate(names))):
        nxt = names[i + 1] if i + 1 < len(names) else None
        s.deploy(name, {"function.yaml": function_yaml(name), "main.py": task(nxt)})


def trace_of(s: Stack, trace_id: str, calls: int) -> dict[str, Any]:
    """GET /traces/{id} once it holds ``calls`` calls (records reach the store in batches)."""
    def full() -> dict[str, Any] | None:
        r = s.client.get(f"/traces/{trace_id}")
        return r.json() if r.status_code == 200 and r.json()["calls"] >= calls else None

    return wait_for(full, 10, what=f"{calls} calls in trace {trace_id}")


def chain(node: dict[str, Any]) -> list[dict[str, Any]]:
    """The calls down a chain of single children."""
    out = [node]
    while node["children"]:
        assert len(node["children"]) == 1, node
        node = node["children"][0]
        out.append(node)
    return out


def test_a_sent_traceparent_reaches_the_handler_and_the_call_record(stack: Stack) -> None:
    deploy_chain(stack, ["tr-leaf"])
    r = stack.invoke("tr-leaf", {}, headers={"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "rojo=1,congo=2"})
    assert r.status_code == 200, r.text
    doc, call_id = r.json(), r.headers["x-call-id"]
    assert (doc["trace_id"], doc["parent"], doc["span_id"]) == (TRACE, PARENT, span_id(call_id))
    assert doc["traceparent"] == f"00-{TRACE}-{span_id(call_id)}-01" and doc["tracestate"] == "rojo=1,congo=2"
    record = wait_for(lambda: (c := stack.client.get(f"/calls/{call_id}")).status_code == 200 and c.json(), 10,
                      what="the call's record")
    assert record["trace_id"] == TRACE and record["fused"] is False


def test_a_chain_of_remote_task_calls_is_one_trace_tree(stack: Stack) -> None:
    deploy_chain(stack, ["tr-a", "tr-b", "tr-c"])
    r = stack.invoke("tr-a", {})  # no traceparent: the call starts a trace, and its task calls share it
    assert r.status_code == 200, r.text
    a, call_id = r.json(), r.headers["x-call-id"]
    b, c = a["child"], a["child"]["child"]
    assert a["trace_id"] == call_id and a["parent"] is None, "a new trace is named by its root call"
    assert b["trace_id"] == c["trace_id"] == call_id
    assert (b["parent"], c["parent"]) == (a["span_id"], b["span_id"])

    tree = trace_of(stack, call_id, 3)
    assert tree["trace_id"] == call_id and tree["calls"] == 3 and not tree["truncated"]
    (root,) = tree["roots"]
    nodes = chain(root)
    assert [n["function"] for n in nodes] == ["tr-a", "tr-b", "tr-c"]
    assert [n["id"] for n in nodes] == [call_id, b["call_id"], c["call_id"]]
    assert [n["span_id"] for n in nodes] == [a["span_id"], b["span_id"], c["span_id"]]
    assert [n["parent_span"] for n in nodes] == [None, a["span_id"], b["span_id"]]
    assert all(n["mode"] == "remote" and n["status"] == "DONE" and n["result_status"] == 200 for n in nodes)
    durations = [n["duration_ms"] for n in nodes]
    assert durations[0] >= durations[1] >= durations[2] > 0, durations
    assert nodes[0]["started_ts"] <= nodes[1]["started_ts"] <= nodes[2]["started_ts"]
    assert stack.client.get(f"/calls/{c['call_id']}/trace").json()["roots"] == tree["roots"], \
        "any call of the trace names the whole trace"


def test_an_invalid_traceparent_starts_a_new_trace(stack: Stack) -> None:
    deploy_chain(stack, ["tr-leaf"])
    for bad in (f"00-{TRACE.upper()}-{PARENT}-01", f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE}-{PARENT}", "junk"):
        r = stack.invoke("tr-leaf", {}, headers={"traceparent": bad, "tracestate": "rojo=1"})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["trace_id"] == r.headers["x-call-id"] != TRACE.upper(), bad
        assert doc["parent"] is None and doc["tracestate"] is None, bad


def test_an_async_call_keeps_its_trace(stack: Stack) -> None:
    deploy_chain(stack, ["tr-async", "tr-async-b"])
    trace = "0af7651916cd43dd8448eb211c80319c"
    r = stack.anon.post("/tr-async", json={}, headers={"X-Nuclide-Async": "true",
                                                       "traceparent": f"00-{trace}-{PARENT}-00", "tracestate": "k=v"})
    assert r.status_code == 202, r.text
    call_id = r.json()["call_id"]
    done = wait_for(lambda: (c := stack.client.get(f"/calls/{call_id}").json())["status"] == "DONE" and c, 15,
                    what="the async call")
    assert done["trace_id"] == trace
    result = done["result"]
    assert (result["trace_id"], result["parent"], result["tracestate"]) == (trace, PARENT, "k=v")
    assert result["child"]["trace_id"] == trace and result["child"]["parent"] == span_id(call_id)
    (root,) = trace_of(stack, trace, 2)["roots"]
    assert root["id"] == call_id and root["kind"] == "async" and root["parent_span"] == PARENT
    assert [n["function"] for n in chain(root)] == ["tr-async", "tr-async-b"]


def test_bad_and_unknown_traces(stack: Stack) -> None:
    r = stack.client.get("/traces/not-a-trace")
    assert r.status_code == 400 and "32 lowercase hex digits" in r.json()["error"]["message"]
    assert stack.client.get(f"/traces/{TRACE.upper()}").status_code == 400
    assert stack.client.get(f"/traces/{'0' * 32}").status_code == 400
    r = stack.client.get("/traces/ffffffffffffffffffffffffffffffff")
    assert r.status_code == 404 and "ffffffffffffffffffffffffffffffff" in r.json()["error"]["message"]
    assert stack.client.get("/calls/no-such-call/trace").status_code == 404
    assert stack.anon.get(f"/traces/{TRACE}").status_code == 401, "traces are behind the API token"
    assert stack.anon.get("/calls/x/trace").status_code == 401


def test_fused_task_calls_are_spans_of_sampled_traces_only(fresh_stack: Stack) -> None:
    s = fresh_stack
    deploy_chain(s, ["fu-a", "fu-b", "fu-c"])
    assert s.client.put("/groups", json=[["fu-a", "fu-b", "fu-c"]]).status_code == 200
    wait_for(lambda: s.client.get("/fu-a").json()["group"]["tasks"] == ["fu-a", "fu-b", "fu-c"]
             and s.invoke("fu-a", {}).status_code == 200, 60, what="the fused group")

    r = s.invoke("fu-a", {}, headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})  # sampled
    assert r.status_code == 200, r.text
    a, call_id = r.json(), r.headers["x-call-id"]
    b, c = a["child"], a["child"]["child"]
    assert (a["parent"], b["parent"], c["parent"]) == (PARENT, a["span_id"], b["span_id"])
    assert a["trace_id"] == b["trace_id"] == c["trace_id"] == TRACE
    (root,) = trace_of(s, TRACE, 3)["roots"]
    nodes = chain(root)
    assert [(n["function"], n["mode"]) for n in nodes] == [("fu-a", "remote"), ("fu-b", "fused"), ("fu-c", "fused")]
    assert [n["id"] for n in nodes] == [call_id, b["call_id"], c["call_id"]]
    assert [n["parent_span"] for n in nodes] == [PARENT, a["span_id"], b["span_id"]]
    assert nodes[0]["duration_ms"] >= nodes[1]["duration_ms"] >= nodes[2]["duration_ms"] >= 0

    unsampled = "5bf92f3577b34da6a3ce929d0e0e4736"
    r = s.invoke("fu-a", {}, headers={"traceparent": f"00-{unsampled}-{PARENT}-00"})
    assert r.status_code == 200 and r.json()["child"]["parent"] == r.json()["span_id"]
    trace_of(s, unsampled, 1)
    # an instance reports its in-process calls within 100 ms, so before a later call is recorded
    later = s.invoke("fu-a", {}).headers["x-call-id"]
    wait_for(lambda: s.client.get(f"/calls/{later}").status_code == 200, 10, what="a later call's record")
    tree = s.client.get(f"/traces/{unsampled}").json()
    assert tree["calls"] == 1 and tree["roots"][0]["children"] == [], "unsampled: fused calls are not recorded"
