"""W3C Trace Context: parsing and formatting traceparent and tracestate, span ids, and a handler's view of its trace."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from shared import protocol
from shared.tracecontext import (
    MAX_TRACESTATE, SAMPLED, TraceFields, TraceParent, clean_tracestate, format_traceparent, from_header_map,
    from_headers, new_trace_id, parse_traceparent, span_id, valid_span_id, valid_trace_id,
)
from tests.unit.test_runtime_task_calls import executor

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
GOOD = f"00-{TRACE}-{PARENT}-01"


def test_a_valid_traceparent_is_parsed() -> None:
    assert parse_traceparent(GOOD) == TraceParent(TRACE, PARENT, 1)
    assert parse_traceparent(GOOD.encode()) == TraceParent(TRACE, PARENT, 1)
    assert parse_traceparent(f" {GOOD}\t") == TraceParent(TRACE, PARENT, 1), "optional whitespace is allowed"
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00").sampled is False
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-03").flags == 3 and parse_traceparent(GOOD).sampled


@pytest.mark.parametrize("header", [
    "",
    "garbage",
    f"01-{TRACE}-{PARENT}-01",  # another version
    f"ff-{TRACE}-{PARENT}-01",  # the forbidden version
    f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
    f"00-{TRACE[:-1]}-{PARENT}-01",  # a short trace id
    f"00-{TRACE}0-{PARENT}-01",  # a long trace id
    f"00-{TRACE}-{PARENT[:-1]}-01",  # a short parent id
    f"00-{TRACE}-{PARENT}0-01",  # a long parent id
    f"00-{TRACE}-{PARENT}-1",  # a short flags field
    f"00-{TRACE}-{PARENT}-001",
    f"00-{TRACE.upper()}-{PARENT}-01",  # uppercase is not allowed
    f"00-{TRACE}-{PARENT.upper()}-01",
    f"00-{TRACE}-{PARENT}-0A",
    f"00-{'0' * 32}-{PARENT}-01",  # an all-zero trace id
    f"00-{TRACE}-{'0' * 16}-01",  # an all-zero parent id
    f"00-{TRACE[:-1]}g-{PARENT}-01",  # not hex
    f"00_{TRACE}_{PARENT}_01",  # other separators
    f"00-{TRACE}-{PARENT}-01\n",
    "00-" + "é" * 32 + f"-{PARENT}-01",
])
def test_a_malformed_traceparent_is_treated_as_absent(header: str) -> None:
    assert parse_traceparent(header) is None
    fields = from_headers("0193c0ffee000000000000000000abcd", header, "vendor=x")
    assert fields == TraceFields("0193c0ffee000000000000000000abcd", 0, None, None), \
        "a new trace, unsampled, and the tracestate of a bad traceparent dropped"


def test_no_traceparent_starts_a_trace_named_by_the_call() -> None:
    call_id = "0193c0ffee000000000000000000abcd"
    assert parse_traceparent(None) is None
    assert from_headers(call_id, None, None) == TraceFields(call_id, 0, None, None)
    other = new_trace_id("not-a-hex-call-id.1")
    assert valid_trace_id(other) and other != new_trace_id("not-a-hex-call-id.2")


def test_format_round_trips() -> None:
    assert format_traceparent(TRACE, PARENT, 1) == GOOD
    assert format_traceparent(TRACE, PARENT, 0x1FF).endswith("-ff")
    assert parse_traceparent(format_traceparent(TRACE, span_id("c1"), 0)) == TraceParent(TRACE, span_id("c1"), 0)


def test_span_ids_are_derived_from_call_ids() -> None:
    assert span_id("c1") == span_id("c1") != span_id("c2")
    assert valid_span_id(span_id("c1")) and len(span_id("c1")) == 16


def test_tracestate_is_kept_as_given_within_bounds() -> None:
    assert clean_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE") == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert clean_tracestate(b" a=1 ") == "a=1"
    assert clean_tracestate("x" * MAX_TRACESTATE) == "x" * MAX_TRACESTATE
    for bad in ("", "   ", "x" * (MAX_TRACESTATE + 1), "a=1\nb=2", "a=\u00e9", None):
        assert clean_tracestate(bad) is None, bad
    assert from_headers("c", GOOD, "a=1") == TraceFields(TRACE, 1, PARENT, "a=1")


def test_trace_fields_from_a_peer_are_checked() -> None:
    header = {"trace_id": TRACE, "trace_flags": 1, "parent_span": PARENT, "tracestate": "a=1"}
    assert from_header_map("c", header) == TraceFields(TRACE, 1, PARENT, "a=1")
    assert from_header_map("c", dict(header, parent_span="nope", tracestate="x" * 600, trace_flags="1")) == \
        TraceFields(TRACE, 0, None, None)
    assert from_header_map("c", dict(header, trace_id=TRACE.upper())) == TraceFields(new_trace_id("c"), 0, None, None)
    assert from_header_map("c", {}) == TraceFields(new_trace_id("c"), 0, None, None)


def test_the_invoke_header_carries_the_trace_only_when_given() -> None:
    plain = protocol.invoke_header("c1", "f", 0)
    assert not {"trace_id", "trace_flags", "parent_span", "tracestate"} & set(plain)
    root = protocol.invoke_header("c1", "f", 0, trace_id=TRACE, trace_flags=0)
    assert (root["trace_id"], root["trace_flags"]) == (TRACE, 0) and "parent_span" not in root and "tracestate" not in root
    child = protocol.invoke_header("c1", "f", 0, trace_id=TRACE, trace_flags=1, parent_span=PARENT, tracestate="a=1")
    assert (child["parent_span"], child["tracestate"]) == (PARENT, "a=1")


# ----- the handler's view, and in-process calls -------------------------------------------------

TRACED = {
    "a": ("import json\n"
          "def handler(context, event):\n"
          "    inner = json.loads(context.call('b', b''))\n"
          "    return {'trace_id': context.trace_id, 'span_id': context.span_id, 'parent': context.parent_span_id,\n"
          "            'traceparent': context.traceparent, 'tracestate': context.tracestate,\n"
          "            'flags': context.trace_flags, 'inner': inner,\n"
          "            'after': context.span_id}\n"),
    "b": ("import json\n"
          "def handler(context, event):\n"
          "    return json.dumps({'trace_id': context.trace_id, 'span_id': context.span_id,\n"
          "                       'parent': context.parent_span_id, 'call_id': context.call_id})\n"),
}


def traced_invoke(ex: Any, name: str, **trace: Any) -> tuple[dict[str, Any], bytes]:
    header = protocol.invoke_header("c1", name, int((time.time() + 30) * 1000), **trace)
    return ex.execute(header, b"", ex.loop)


def test_a_handler_sees_its_trace_and_an_in_process_callee_is_its_child(tmp_path: Path) -> None:
    ex = executor(tmp_path, TRACED)
    try:
        result, out = traced_invoke(ex, "a", trace_id=TRACE, trace_flags=0, parent_span=PARENT, tracestate="k=v")
        assert result["status"] == 200, out
        doc = json.loads(out)
        assert (doc["trace_id"], doc["span_id"], doc["parent"]) == (TRACE, span_id("c1"), PARENT)
        assert doc["traceparent"] == f"00-{TRACE}-{span_id('c1')}-00" and doc["tracestate"] == "k=v"
        inner = doc["inner"]
        assert inner["trace_id"] == TRACE and inner["parent"] == span_id("c1")
        assert inner["span_id"] == span_id(inner["call_id"]) != span_id("c1")
        assert doc["after"] == span_id("c1"), "the caller's context is itself again after the in-process call"
        assert "spans" not in ex.caller.take_reports(), "an unsampled trace reports no in-process spans"
    finally:
        ex.close()


def test_a_sampled_trace_reports_its_in_process_calls(tmp_path: Path) -> None:
    ex = executor(tmp_path, TRACED)
    try:
        result, out = traced_invoke(ex, "a", trace_id=TRACE, trace_flags=SAMPLED, parent_span=PARENT)
        assert result["status"] == 200, out
        (span,) = ex.caller.take_reports()["spans"]
        call_id, parent_id, function, status, queued_at, finished_at, trace_id = span
        assert (parent_id, function, status, trace_id) == ("c1", "b", 200, TRACE)
        assert call_id == json.loads(out)["inner"]["call_id"] and 0 < queued_at <= finished_at
    finally:
        ex.close()


def test_without_a_trace_the_handler_sees_none(tmp_path: Path) -> None:
    ex = executor(tmp_path, TRACED)
    try:
        result, out = traced_invoke(ex, "a")
        doc = json.loads(out)
        assert (doc["trace_id"], doc["span_id"], doc["parent"], doc["traceparent"], doc["flags"]) == (
            None, None, None, None, 0)
    finally:
        ex.close()


# ----- the trace as a tree, and as the CLI prints it ---------------------------------------------


def row(call_id: str, parent_id: str | None, function: str, fused: bool = False, started: float = 1.0) -> dict[str, Any]:
    return {"id": call_id, "function": function, "span_id": span_id(call_id), "parent_id": parent_id,
            "parent_span": span_id(parent_id) if parent_id else PARENT, "status": "DONE", "kind": "sync",
            "source": "call" if parent_id else "http", "fused": fused, "started_ts": started,
            "started": "2026-12-06T20:00:00.000Z", "duration_ms": 1.5, "result_status": 200, "error": None}


def test_a_trace_becomes_a_tree_and_unrecorded_fused_callers_are_skipped() -> None:
    from services.cli.commands import trace_lines
    from services.gateway.tracetree import build

    # r calls f (fused, sampled: recorded) and, through the unrecorded fused r.2, the remote x
    rows = [row("r", None, "a"), row("r.1", "r", "b", fused=True), row("x", "r.2", "c"), row("y", "x", "d")]
    tree = build({"trace_id": TRACE, "calls": rows, "truncated": False})
    (root,) = tree["roots"]
    assert tree["calls"] == 4 and root["id"] == "r" and root["parent_span"] == PARENT
    assert [c["id"] for c in root["children"]] == ["r.1", "x"], "x hangs under r, the nearest recorded caller"
    x = root["children"][1]
    assert x["parent_span"] == span_id("r.2"), "its parent span still names the real caller"
    assert [c["id"] for c in x["children"]] == ["y"] and root["children"][0]["mode"] == "fused"
    orphan = build({"trace_id": TRACE, "calls": [row("z", "elsewhere", "e")]})
    assert [r["id"] for r in orphan["roots"]] == ["z"], "a call whose caller is not in the trace is a root"
    lines = trace_lines(tree)
    assert lines[0] == f"trace {TRACE}: 4 calls"
    assert lines[1].startswith("  a  DONE 200  1.500 ms  remote") and lines[2].startswith("    b  DONE 200")
    assert lines[4].startswith("      d  ") and lines[4].endswith("  y")
