"""The call graph the optimizer reports: traced edges summed per (caller, callee) over a window, bounded."""

from __future__ import annotations

from collections import deque

from services.optimizer.callgraph import GRAPH_MAX_EDGES, EdgeBuckets, aggregate


def edge(at: float, caller: str | None, callee: str, *, sync: bool = True, local: bool = False, ms: float = 1.0,
         calls: int = 1) -> tuple:
    return (at, caller, callee, sync, local, ms, calls)


def test_edges_are_summed_per_pair_with_fused_and_remote_apart() -> None:
    traced = deque([
        edge(10.0, "a", "b", local=False, ms=4.0, calls=3),  # 3 remote calls of 4 ms
        edge(11.0, "a", "b", local=True, ms=1.0, calls=1),  # then fused: 1 in-process call of 1 ms
        edge(11.5, "b", "c", sync=False, ms=0.0, calls=2),  # asynchronous: no duration to average
    ])
    graph = aggregate(traced, since=0.0)
    assert graph == [
        {"caller": "a", "callee": "b", "calls": 4, "fused": 1, "remote": 3, "sync": 4, "mean_ms": 3.25},
        {"caller": "b", "callee": "c", "calls": 2, "fused": 0, "remote": 2, "sync": 0, "mean_ms": None},
    ]


def test_only_the_window_counts() -> None:
    traced = [edge(5.0, "a", "b", calls=7), edge(20.0, "a", "b", calls=2), edge(21.0, "x", "y")]
    graph = aggregate(traced, since=20.0)
    assert [(e["caller"], e["callee"], e["calls"]) for e in graph] == [("a", "b", 2), ("x", "y", 1)]
    assert aggregate(traced, since=30.0) == []


def test_edges_without_a_caller_or_a_count_are_left_out() -> None:
    traced = [edge(1.0, None, "b"), edge(1.0, "", "b"), edge(1.0, "a", "b", calls=0)]
    assert aggregate(traced, since=0.0) == []


def test_the_busiest_edges_are_kept_when_there_are_too_many() -> None:
    traced = [edge(1.0, f"f{i:03d}", "sink", calls=i + 1) for i in range(GRAPH_MAX_EDGES + 50)]
    graph = aggregate(traced, since=0.0)
    assert len(graph) == GRAPH_MAX_EDGES
    assert graph[0]["caller"] == f"f{GRAPH_MAX_EDGES + 49:03d}"  # busiest first
    assert min(e["calls"] for e in graph) == 51  # the 50 quietest went
    assert aggregate(traced, since=0.0, limit=3) == graph[:3]


def test_self_calls_and_both_directions_are_separate_edges() -> None:
    traced = [edge(1.0, "a", "a"), edge(1.0, "a", "b"), edge(2.0, "b", "a", local=True, calls=2)]
    graph = {(e["caller"], e["callee"]): (e["calls"], e["fused"]) for e in aggregate(traced, since=0.0)}
    assert graph == {("a", "a"): (1, 0), ("a", "b"): (1, 0), ("b", "a"): (2, 2)}


def test_buckets_sum_as_they_come_and_forget_past_the_window() -> None:
    buckets = EdgeBuckets(window_s=60.0, bucket_s=10.0)
    buckets.add(1.0, "a", "b", True, False, 4.0, 3)
    buckets.add(9.0, "a", "b", True, True, 1.0, 1)  # same bucket, fused
    buckets.add(15.0, "a", "b", True, True, 1.0, 2)
    assert aggregate(buckets.edges(), since=0.0) == [
        {"caller": "a", "callee": "b", "calls": 6, "fused": 3, "remote": 3, "sync": 6, "mean_ms": 2.5}]
    assert len(buckets.buckets) == 2
    buckets.add(200.0, "x", "y", False, False, 0.0, 1)  # long after: the old buckets go
    assert [b[0] for b in buckets.buckets] == [200.0]
    assert aggregate(buckets.edges(), since=200.0 - 60.0) == [
        {"caller": "x", "callee": "y", "calls": 1, "fused": 0, "remote": 1, "sync": 0, "mean_ms": None}]


def test_buckets_leave_out_what_an_instance_should_not_have_sent() -> None:
    buckets = EdgeBuckets(max_keys=2)
    buckets.add(1.0, None, "b", True, False, 1.0, 1)  # no caller
    buckets.add(1.0, "a", "b", True, False, 1.0, 0)  # no call
    buckets.add(1.0, "a", "b", True, False, float("nan"), 1)  # no duration
    buckets.add(1.0, ["not", "a", "name"], "b", True, False, 1.0, 1)  # kept under its text, not a crash
    buckets.add(1.0, "a", "b", True, False, 1.0, 1)
    buckets.add(1.0, "c", "d", True, False, 1.0, 1)  # a third key in a bucket of two: dropped and counted
    assert {(e["caller"], e["callee"]) for e in aggregate(buckets.edges(), since=0.0)} == {
        ("['not', 'a', 'name']", "b"), ("a", "b")}
    assert buckets.dropped == 1
