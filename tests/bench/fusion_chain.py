"""Scenario: a 5-task synchronous chain through the gateway, unfused and fused, next to one no-op task (issue 4).

Tasks t1..t5: each calls the next with ``context.call`` (synchronously, passing
its body on) and t5 returns "ok", so ``POST /t1`` answers "ok" after four task
calls. One stack, one run:

- unfused: every task its own group (its own instance), so each of the four
  calls goes instance -> gateway -> instance over ZeroMQ;
- fused: ``PUT /groups?wait=true`` with ``[["t1","t2","t3","t4","t5"]]``, so
  one instance runs the whole chain and the calls are in-process;
- a single no-op task (``noop``) invoked the same way: the floor a fused chain
  is held to (within 1.2x).

Each is measured with wrk at concurrency 1 (a warm-up, then one point; again
when other work disturbed it), like the sync invoke scenario. Before each
measurement the setup is checked: which instances serve which tasks (the
deployer's instance records) and whether the four calls were local or remote
(the call-graph edges the gateway publishes). Once the instances the regroup
superseded are gone (so their exit never shares the CPUs with a point), the
no-op task and the fused chain are measured alternately, nine times each in
points of half the usual length after one warm-up each, and the median p50s are
compared: a single point at one connection moves by up to a third between
otherwise equal runs (where the processes land on the two cores), so many short
points say more than a few long ones. How long the superseded instances took to
go, and how they ended, is in the raw figures (``superseded_gone_s``,
``superseded_exit_codes``: -9 means the deployer had to kill one).
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from tests.bench.apps import NOOP_SOURCE
from tests.bench.harness import Bench
from tests.bench.model import Row, ScenarioResult, Target
from tests.bench.registry import scenario
from tests.bench.sync_invoke import OTHER_LOAD_FLAG, Point, measure, runtime_pid
from tests.stack import Stack, function_yaml, wait_for

NAME = "fusion_chain"
TASKS = ("t1", "t2", "t3", "t4", "t5")
SINGLE = "noop"
FUSED_VS_SINGLE = Target("<= 1.2x one no-op task", "<=", 1.2, "ratio")
REGROUP_TIMEOUT_S = 60.0
TRACE_TIMEOUT_S = 10.0
ROUNDS = 9  # single / fused measured alternately this many times (3 with --quick); medians compared


def task_source(i: int) -> str:
    if i == len(TASKS) - 1:
        return NOOP_SOURCE  # t5: return "ok"
    return f"def handler(context, event):\n    return context.call({TASKS[i + 1]!r}, event.body)\n"


def instances(stack: Stack) -> dict[tuple[str, ...], list[int]]:
    """The running instances by the tasks they serve (the deployer's instance.json records)."""
    out: dict[tuple[str, ...], list[int]] = {}
    for meta in (stack.var_dir / "instances").glob("*/instance.json"):
        try:
            doc = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue  # being written or removed right now
        out.setdefault(tuple(sorted(doc["functions"])), []).append(int(doc["pid"]))
    return out


def wait_for_setup(stack: Stack, setup: list[tuple[str, ...]], what: str) -> dict[tuple[str, ...], int]:
    """Wait until exactly one instance serves each group of ``setup`` and nothing else runs; their pids."""
    want = {tuple(sorted(g)) for g in setup}

    def settled() -> dict[tuple[str, ...], int] | None:
        found = instances(stack)
        if set(found) == want and all(len(p) == 1 for p in found.values()):
            return {group: pids[0] for group, pids in found.items()}
        return None

    return wait_for(settled, REGROUP_TIMEOUT_S, what=what)


def _serving(stack: Stack, group: tuple[str, ...]) -> dict[tuple[str, ...], int] | None:
    """The instances once exactly one serves ``group`` (others may still be stopping)."""
    found = instances(stack)
    pids = found.get(tuple(sorted(group))) or []
    return {g: p[-1] for g, p in found.items()} if len(pids) == 1 else None


def superseded(stack: Stack, pids: set[int], since: float) -> tuple[list[int | None], float | None]:
    """How the given instances ended and when the last one did, in seconds after ``since`` (epoch), as the
    deployer reported it to the store (a read-only look at its database)."""
    if not pids:
        return [], None
    conn = sqlite3.connect(f"file:{stack.var_dir / 'state.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute(f"SELECT exit_code, updated_at FROM instances WHERE state = 'exited' AND pid IN"
                            f" ({','.join('?' * len(pids))})", tuple(pids)).fetchall()
    finally:
        conn.close()
    codes = sorted((code for code, _ in rows), key=lambda c: (c is None, c))
    last = max((at for _, at in rows), default=None)
    return codes, (round(last - since, 3) if last is not None else None)


def chain_edges(bench: Bench, stack: Stack) -> list[list[Any]]:
    """Invoke t1 once and collect the four call edges t1->t2 ... t4->t5 the gateway publishes."""
    traces = stack.traces()
    try:
        # the gateway publishes traces every 100 ms: what the last load left may still arrive
        # (a regroup with forked instances takes less than that); only what follows counts
        time.sleep(0.3)
        start = len(traces.edges)
        resp = stack.invoke(TASKS[0], b"")
        if resp.status_code != 200 or resp.text != "ok":
            raise RuntimeError(f"POST /{TASKS[0]} answered {resp.status_code} {resp.text[:300]!r}, not 200 'ok'")
        hops = {(TASKS[i], TASKS[i + 1]) for i in range(len(TASKS) - 1)}

        def seen() -> list[list[Any]] | None:
            edges = [e for e in traces.edges[start:] if tuple(e[:2]) in hops]
            return edges if {tuple(e[:2]) for e in edges} == hops else None

        return wait_for(seen, TRACE_TIMEOUT_S, what="the chain's call edges")
    finally:
        traces.close()


def check_edges(edges: list[list[Any]], local: bool) -> None:
    # an edge is [caller, callee, sync, local, duration_ms]
    wrong = [e for e in edges if e[2] is not True or bool(e[3]) != local]
    if wrong:
        raise RuntimeError(f"expected every chain call to be synchronous and {'local' if local else 'remote'}:"
                           f" {wrong}")


def pids_of(stack: Stack, serving: dict[tuple[str, ...], int], groups: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """Processes whose CPU is counted per request: the gateway, the given instances, the other services."""
    return {"gateway": stack.procs["gateway"].pid,
            **{who: runtime_pid(serving[group]) for who, group in groups.items()},
            **{svc: proc.pid for svc, proc in stack.procs.items() if svc != "gateway"}}


def _cpu(p: Point) -> str:
    instances_us = sum(v for who, v in p.cpu_us.items() if who in (*TASKS, "chain", SINGLE))
    return (f"CPU per request {p.cpu_total_us:.0f} us (gateway {p.cpu_us.get('gateway', 0):.0f}, instances"
            f" {instances_us:.0f})")


def _errors(**points: Point) -> str:
    parts = [f"{who} {p.res.errors}" for who, p in points.items() if p.res.errors]
    return ("ERRORS: " + ", ".join(parts)) if parts else ""


def _disturbed(**points: Point) -> str:
    parts = [f"{who} {p.other_share * 100:.0f} %" for who, p in points.items() if p.other_share > OTHER_LOAD_FLAG]
    return ("DISTURBED: other processes used " + ", ".join(parts) + " of the CPUs meanwhile") if parts else ""


def _median_point(points: list[Point]) -> Point:
    """The point with the median p50 (an odd number of rounds: a measured one, not an average)."""
    return sorted(points, key=lambda p: p.res.p50_ms)[len(points) // 2]


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


@scenario(NAME, "Fusion: 5-task synchronous chain", needs=("wrk",))
def run(bench: Bench, result: ScenarioResult) -> None:
    raw = result.raw
    rounds = 3 if bench.options.quick else ROUNDS
    round_s = max(1, bench.options.duration_s // 2)
    with bench.stack("fusion") as stack:
        stack.deploy(SINGLE, {"function.yaml": function_yaml(SINGLE), "main.py": NOOP_SOURCE})
        for i, task in reversed(list(enumerate(TASKS))):
            stack.deploy(task, {"function.yaml": function_yaml(task), "main.py": task_source(i)})

        # (a) unfused: each task its own group
        serving = wait_for_setup(stack, [(SINGLE,), *((t,) for t in TASKS)], "one instance per task")
        bench.track_instances(stack)
        check_edges(chain_edges(bench, stack), local=False)
        bench.log("fusion: unfused (every task its own instance; the four calls go through the gateway)")
        unfused = measure(bench, "unfused", f"{stack.url}/{TASKS[0]}",
                          pids_of(stack, serving, {t: (t,) for t in TASKS}), raw, (1,))[1]

        # (b) fused: one group, one instance, in-process calls
        old = {pid for group, pids in instances(stack).items() if group != (SINGLE,) for pid in pids}
        t0, wall0 = time.perf_counter(), time.time()
        resp = stack.client.put("/groups?wait=true", json=[list(TASKS)])
        if resp.status_code != 200:
            raise RuntimeError(f"PUT /groups answered {resp.status_code}: {resp.text[:1500]}")
        raw["regroup_put_s"] = round(time.perf_counter() - t0, 3)
        serving = wait_for(lambda: _serving(stack, TASKS), REGROUP_TIMEOUT_S, what="one instance of the fused group")
        bench.track_instances(stack)
        group = stack.client.get(f"/{TASKS[0]}").json().get("group") or {}
        if sorted(group.get("tasks") or ()) != sorted(TASKS):
            raise RuntimeError(f"GET /{TASKS[0]} names the group {group}, not the five tasks")
        check_edges(chain_edges(bench, stack), local=True)
        bench.log(f"fusion: fused (PUT /groups?wait=true answered in {raw['regroup_put_s']:.2f} s); once the"
                  f" superseded instances are gone, the single no-op task and the fused chain, {rounds} times each")

        # (c) the single no-op task and the fused chain, alternately, once the superseded instances
        # are gone: at one connection a point moves by up to a third between otherwise equal runs
        # (where the processes land on the two cores), so each is measured in many short rounds and
        # the medians are compared
        wait_for_setup(stack, [(SINGLE,), TASKS], "the superseded instances to exit")
        singles: list[Point] = []
        fuseds: list[Point] = []
        for i in range(rounds):
            # each warmed up once; then short points, so the rounds sample many placements
            singles.append(measure(bench, f"single_{i + 1}", f"{stack.url}/{SINGLE}",
                                   pids_of(stack, serving, {SINGLE: (SINGLE,)}), raw, (1,), round_s, i == 0)[1])
            fuseds.append(measure(bench, f"fused_{i + 1}", f"{stack.url}/{TASKS[0]}",
                                  pids_of(stack, serving, {"chain": TASKS}), raw, (1,), round_s, i == 0)[1])
        single, fused = _median_point(singles), _median_point(fuseds)
        raw["rounds_p50_ms"] = [[s.res.p50_ms, f.res.p50_ms] for s, f in zip(singles, fuseds)]
        # read now: the deployer reports an exit to the store a moment after the instance is gone
        raw["superseded_exit_codes"], raw["superseded_gone_s"] = superseded(stack, old, wall0)
        bench.log(f"fusion: the superseded instances had exited {raw['superseded_gone_s']} s after the regroup"
                  f" began (exit codes {raw['superseded_exit_codes']}; -9: killed by the deployer)")

    secs = f"{bench.options.duration_s} s at 1 connection"
    codes = raw["superseded_exit_codes"]
    regroup = (f"regroup: PUT /groups?wait=true {raw['regroup_put_s']:.2f} s, the {len(codes)} superseded"
               f" instances gone after {raw['superseded_gone_s'] or 0:.1f} s"
               + (f" ({codes.count(-9)} killed by the deployer)" if -9 in codes else ""))
    for pct in ("p50", "p99"):
        f_ms, s_ms = getattr(fused.res, f"{pct}_ms"), getattr(single.res, f"{pct}_ms")
        result.rows.append(Row(
            NAME, f"fusion: fused 5-task chain, {pct} latency", "ms", f_ms, s_ms, "one no-op task",
            FUSED_VS_SINGLE if pct == "p50" else None,
            _join(f"median of {rounds} alternating rounds of {round_s} s (p50 single/fused ms: "
                  + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in raw["rounds_p50_ms"]) + ");"
                  f" {fused.res.requests:,} vs {single.res.requests:,} requests in the median rounds of {round_s} s;"
                  f" fused {_cpu(fused)};"
                  f" no-op task {_cpu(single)}; {regroup}" if pct == "p50" else "",
                  _errors(fused=fused, single=single), _disturbed(fused=fused, single=single)),
            fused.res.errors + single.res.errors))
    for pct in ("p50", "p99"):
        u_ms, f_ms, s_ms = (getattr(p.res, f"{pct}_ms") for p in (unfused, fused, single))
        result.rows.append(Row(
            NAME, f"fusion: unfused 5-task chain, {pct} latency", "ms", u_ms, f_ms, "fused chain", None,
            _join(f"unfused / one no-op task {u_ms / s_ms:.2f}x" if s_ms else "",
                  f"{unfused.res.requests:,} requests in {secs}; unfused {_cpu(unfused)}" if pct == "p50" else "",
                  _errors(unfused=unfused), _disturbed(unfused=unfused, fused=fused)),
            unfused.res.errors + fused.res.errors))
