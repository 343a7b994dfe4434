"""Sync invoke through two gateways at once vs one: the same stack, the same instance, 64 connections in all.

A stack with two gateways (their own processes, one store, one instance of the no-op function)
is measured twice: 64 connections to the first gateway alone, then 32 to each gateway at the
same time (two wrk processes, one per gateway, started together). The figures are the sum of
both wrk runs; the CPU per request sums both gateways and the instance. On one 2-core machine a
second gateway cannot add cores, so the row shows what spreading the HTTP work costs or saves
here; on several machines each gateway brings its own.
"""

from __future__ import annotations

import threading
import time

from tests.bench import wrk
from tests.bench.apps import NOOP_SOURCE
from tests.bench.harness import Bench
from tests.bench.machine import cpu_busy_seconds
from tests.bench.model import Row, ScenarioResult
from tests.bench.procs import cpu_seconds
from tests.bench.registry import scenario
from tests.bench.sync_invoke import CORES, Point, _disturbed_note, _errors_note, _join, measure, runtime_pid
from tests.stack import function_yaml

NAME = "sync_invoke_gateways"
CONNECTIONS = 64
ONE = "one gateway"


def _both(bench: Bench, urls: list[str], pids: dict[str, int], raw: dict) -> tuple[list[wrk.WrkResult], Point]:
    """One wrk per URL with CONNECTIONS / len(urls) connections each, at the same time; their sum as one Point."""
    opts = bench.options
    script = bench.post_script()
    log = bench.work_dir / "wrk.log"
    share = CONNECTIONS // len(urls)
    results: list[wrk.WrkResult | BaseException | None] = [None] * len(urls)

    def one(i: int) -> None:
        try:
            results[i] = wrk.run(urls[i], share, opts.duration_s, script, opts.wrk_threads, log=log)
        except BaseException as exc:  # re-raised below, in the caller's thread
            results[i] = exc

    for url in urls:  # warm-up: each gateway has its connections to the instance open before the point
        wrk.run(url, share, max(1, int(opts.warmup_s)), script, opts.wrk_threads, log=log)
    busy0 = cpu_busy_seconds()
    before = {who: cpu_seconds(pid) or 0.0 for who, pid in pids.items()}
    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,), name=f"wrk-{i}") for i in range(len(urls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    after = {who: cpu_seconds(pid) or 0.0 for who, pid in pids.items()}
    busy1 = cpu_busy_seconds()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    runs = [r for r in results if isinstance(r, wrk.WrkResult)]
    total = wrk.WrkResult(
        connections=CONNECTIONS, requests=sum(r.requests for r in runs), duration_s=max(r.duration_s for r in runs),
        rps=sum(r.rps for r in runs), p50_ms=max(r.p50_ms for r in runs), p75_ms=max(r.p75_ms for r in runs),
        p90_ms=max(r.p90_ms for r in runs), p99_ms=max(r.p99_ms for r in runs),
        non_2xx=sum(r.non_2xx for r in runs),
        socket_errors={k: sum(r.socket_errors.get(k, 0) for r in runs) for r in runs for k in r.socket_errors},
        cpu_s=sum(r.cpu_s for r in runs))
    ours = sum(after[w] - before[w] for w in pids) + total.cpu_s
    other_share = max(0.0, (busy1 - busy0) - ours) / (wall * CORES)
    served = max(1, total.requests)
    point = Point(total, {who: (after[who] - before[who]) * 1e6 / served for who in pids}, other_share)
    raw["two"] = {"runs": [r.to_json() for r in runs], "total": point.to_json()}
    bench.log(f"two gateways c={share}+{share}: {total.rps:9.0f} req/s ({' + '.join(f'{r.rps:.0f}' for r in runs)})"
              f"  p50 {total.p50_ms:.3f} ms (the slower)  CPU/request "
              + " + ".join(f"{who} {v:.0f}" for who, v in point.cpu_us.items()) + " us")
    return runs, point


@scenario(NAME, f"Sync invoke of a no-op handler at {CONNECTIONS} connections: through two gateways vs one",
          needs=("wrk",))
def run(bench: Bench, result: ScenarioResult) -> None:
    with bench.stack("gateways", gateways=2) as stack:
        stack.deploy("noop", {"function.yaml": function_yaml("noop"), "main.py": NOOP_SOURCE})
        instances = bench.track_instances(stack)
        if len(instances) != 1:
            raise RuntimeError(f"expected one instance of the no-op function, found {len(instances)}")
        first, second = stack.gateways
        instance = {"instance": runtime_pid(instances[0])}
        one_pids = {"gateway": stack.procs[first.key].pid, **instance}
        alone = measure(bench, "one", first.url + "/noop", one_pids, result.raw, concurrency=(CONNECTIONS,))[CONNECTIONS]
        two_pids = {"gateway A": stack.procs[first.key].pid, "gateway B": stack.procs[second.key].pid, **instance}
        runs, both = _both(bench, [first.url + "/noop", second.url + "/noop"], two_pids, result.raw)
    secs = f"{bench.options.duration_s} s, 1 wrk thread per gateway"
    cpu_two = " + ".join(f"{who} {v:.0f}" for who, v in both.cpu_us.items())
    cpu_one = " + ".join(f"{who} {v:.0f}" for who, v in alone.cpu_us.items())
    result.rows += [
        Row(NAME, f"sync invoke, {CONNECTIONS} conn through 2 gateways: throughput", "req/s", both.res.rps,
            alone.res.rps, ONE, None,
            _join(f"{both.res.requests} vs {alone.res.requests} requests in {secs}"
                  f" ({' + '.join(str(r.requests) for r in runs)} per gateway)",
                  f"CPU per request: {cpu_two} = {both.cpu_total_us:.0f} us vs {cpu_one} = {alone.cpu_total_us:.0f} us",
                  _errors_note(two=both, one=alone), _disturbed_note(two=both, one=alone)),
            both.res.errors + alone.res.errors),
        Row(NAME, f"sync invoke, {CONNECTIONS} conn through 2 gateways: CPU per request", "us", both.cpu_total_us,
            alone.cpu_total_us, ONE, None, "gateways and the instance, wrk excluded",
            both.res.errors + alone.res.errors),
        Row(NAME, f"sync invoke, {CONNECTIONS} conn through 2 gateways: p50 latency", "ms", both.res.p50_ms,
            alone.res.p50_ms, ONE, None,
            _join(f"the slower gateway's p50; p99 {both.res.p99_ms:.3f} vs {alone.res.p99_ms:.3f} ms",
                  _disturbed_note(two=both, one=alone)),
            both.res.errors + alone.res.errors),
    ]
