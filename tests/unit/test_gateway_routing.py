"""Pure routing logic of the gateway: which requests are invocations (and the path below the function), and the broker's room rule."""

from __future__ import annotations

import time

import pytest

from services.gateway.broker import FAST_CALL_S, SLOW_INFLIGHT_S, Call, Instance
from services.gateway.invocation import function_headers
from shared.names import invoke_target


@pytest.mark.parametrize("method,path,expected", [
    ("POST", "/hello", ("hello", "http", "/")),
    ("POST", "/hello/", ("hello", "http", "/")),
    ("POST", "/hello/a/b", ("hello", "http", "/a/b")),
    ("POST", "/hello/a/b/", ("hello", "http", "/a/b/")),
    ("POST", "/functions/hello/invoke", ("hello", "http", "/")),
    ("GET", "/functions/hello/invoke", ("hello", "http", "/")),
    ("DELETE", "/functions/hello/invoke/x/y", ("hello", "http", "/x/y")),
    ("POST", "/functions/abc/execute", ("abc", "execute", "/")),
    ("POST", "/async-function/abc", ("abc", "async", "/")),
    ("GET", "/hello", None),
    ("GET", "/hello/a", None),
    ("PUT", "/hello", None),
    ("POST", "/functions", None),
    ("POST", "/functions/abc/logs", None),
    ("POST", "/functions/abc/execute/more", None),
    ("POST", "/healthz", None),
    ("POST", "/docs", None),
    ("POST", "/calls/abc/redrive", None),
    ("POST", "/", None),
    ("GET", "/functions/abc/execute", None),
])
def test_invoke_target(method: str, path: str, expected: tuple[str, str, str] | None) -> None:
    assert invoke_target(method, path) == expected


def test_function_headers_drop_credentials_in_any_case_and_keep_the_rest() -> None:
    raw = [(b"Authorization", b"Bearer t"), (b"x-a", b"1"), (b"AUTHORIZATION", b"Bearer u"), (b"x-a", b"2"),
           (b"x-nuclide-async", b"true")]
    assert function_headers(raw) == [["x-a", "1"], ["x-a", "2"], ["x-nuclide-async", "true"]]
    assert function_headers(raw, frozenset({b"authorization", b"x-nuclide-async"})) == [["x-a", "1"], ["x-a", "2"]]


def _inst(credit: int = 33, concurrency: int = 1) -> Instance:
    return Instance(b"i1", {"instance_id": "i1", "group": "g", "group_version": 1, "functions": {"f": 1}, "credit": credit,
                            "concurrency": concurrency})


def _call(cid: str, sent_at: float) -> Call:
    c = Call(cid, "f", {}, b"", None, 30.0)  # type: ignore[arg-type]
    c.sent_at = sent_at
    return c


def test_fast_instances_get_their_whole_credit() -> None:
    inst = _inst()
    now = time.monotonic()
    assert inst.room(now) == 33
    inst.inflight["a"] = _call("a", now)
    assert inst.room(now) == 32


def test_slow_average_limits_to_concurrency() -> None:
    inst = _inst(concurrency=2)
    inst.avg_s = FAST_CALL_S * 2
    assert inst.room(time.monotonic()) == 2


def test_a_long_running_call_stops_the_pipeline_before_its_result() -> None:
    inst = _inst()
    now = time.monotonic()
    inst.inflight["old"] = _call("old", now - SLOW_INFLIGHT_S * 2)
    assert inst.room(now) == 0


def test_ready_needs_functions() -> None:
    from shared.errors import ProtocolError

    with pytest.raises(ProtocolError):
        Instance(b"x", {"functions": {}})


def test_reported_edges_are_summed_and_malformed_ones_dropped() -> None:
    from services.gateway.traces import Traces

    traces = Traces()
    traces.add_edges([["a", "b", True, True, 2.0, 3], ["a", "b", True, True, 4.0], ["a", "c", True, False, 1.0, 1]])
    traces.add_edges([["a", "b", True, True, 1.0, 0], ["a", "b", True, True, 1.0, -2],
                      [["unhashable"], "b", True, True, 1.0], ["a"], "not an edge", ["a", "b", True, True, "slow", 1]])
    traces.add_edges("not a list")
    assert traces.edges == {("a", "b", True, True): [4, 10.0], ("a", "c", True, False): [1, 1.0]}


def test_reported_failed_task_calls_are_recorded_and_malformed_ones_dropped() -> None:
    from services.gateway.taskcalls import reported_failures

    good = ["c1.1", "c1", "callee", 500, "ValueError: " + "x" * 5000, 10.0, 10.5]
    rows = reported_failures([good, ["c1.2", 7, "callee", 500, "e", 1.0, 2.0], ["c1.3"], "no",
                              ["c1.4", None, "callee", "500", "e", 1.0, 2.0], ["c1.5", None, "f", 500, "e", "x", 2]])
    assert reported_failures("not a list") == []
    ((call_id, function, status, queued, finished, code, error, cold, parent, source, trace_id, parent_span,
      fused),) = rows
    assert (call_id, function, status, queued, finished, code, cold, parent, source, trace_id, parent_span, fused) == (
        "c1.1", "callee", "FAILED", 10.0, 10.5, 500, False, "c1", "call", None, None, True)
    assert error.startswith("ValueError: xxx") and len(error) <= 1024 and error.endswith("...")


def test_reported_failures_and_spans_keep_a_valid_trace_id_only() -> None:
    from services.gateway.taskcalls import reported_failures, reported_spans

    trace = "0193c0ffee0000000000000000000001"
    (failed,) = reported_failures([["c1.1", "c1", "callee", 500, "e", 1.0, 2.0, trace]])
    (bad_trace,) = reported_failures([["c1.2", "c1", "callee", 500, "e", 1.0, 2.0, "not-a-trace"]])
    assert failed[10] == trace and failed[12] is True and bad_trace[10] is None
    spans = reported_spans([["c1.3", "c1", "callee", 200, 1.0, 2.0, trace], ["c1.4", "c1", "callee", 200, 1.0, 2.0],
                            ["c1.5", "c1", "callee", 200, 1.0, 2.0, "0" * 32], ["c1.6", 5, "callee", 200, 1.0, 2.0, trace],
                            "not a row"])
    assert spans == [("c1.3", "callee", "DONE", 1.0, 2.0, 200, None, False, "c1", "call", trace, None, True)]
    assert reported_spans("not a list") == []
