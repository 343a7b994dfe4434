"""Autoscaling under a step of load: 1 -> 32 connections on a 20 ms handler, then back to none.

In one stack (process backend), two functions with the same handler: ``step``
(``minReplicas: 1``, ``maxReplicas: 8``, autoscaled) and ``fixed`` (one replica,
the baseline). Each takes 32 wrk connections for the same time; for ``step`` the
replica count is polled meanwhile, and the time until it last changed is the
time to settle (``fixed`` is measured first, so the step down follows the step
up at once). Then the load stops, one client keeps calling ``step`` once at a
time, and the time until it is back at one ready replica (the step down), and
that client's failed calls, are reported. The autoscaler's windows are shortened
(stable 10 s, panic 2 s; 4 s and 1 s with --quick) so the step down fits in the
run: the rules are those of the 60 s / 6 s defaults, scaled in time.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from tests.bench import wrk
from tests.bench.harness import Bench
from tests.bench.model import Row, ScenarioResult
from tests.bench.registry import scenario
from tests.stack import function_yaml, wait_for

NAME = "autoscale_step"
HANDLER = "import time\n\ndef handler(context, event):\n    time.sleep(0.02)\n    return 'ok'\n"
CONNECTIONS = 32
MAX_REPLICAS = 8
POLL_S = 0.1


def _replicas(client: httpx.Client, name: str) -> dict[str, int]:
    return client.get(f"/functions/{name}").json()["replicas"]


@scenario(NAME, "Autoscaling: a step from 1 to 32 connections on a 20 ms handler, and back")
def run(bench: Bench, result: ScenarioResult) -> None:
    quick = bench.options.quick
    stable_s, panic_s = (4, 1) if quick else (10, 2)
    step_s = 4 if quick else 15
    raw: dict[str, Any] = result.raw
    raw.update(stable_window_s=stable_s, panic_window_s=panic_s, step_s=step_s, connections=CONNECTIONS)
    env = {"NUCLIDE_AUTOSCALE_STABLE_WINDOW_S": str(stable_s), "NUCLIDE_AUTOSCALE_PANIC_WINDOW_S": str(panic_s),
           "NUCLIDE_AUTOSCALE_TICK_S": "0.5"}
    with bench.stack("autoscale", env) as stack:
        stack.deploy("step", {"function.yaml": function_yaml("step", minReplicas=1, maxReplicas=MAX_REPLICAS),
                              "main.py": HANDLER})
        stack.deploy("fixed", {"function.yaml": function_yaml("fixed", minReplicas=1, maxReplicas=1),
                               "main.py": HANDLER})
        for name in ("step", "fixed"):
            wrk.run(f"{stack.url}/{name}", 1, 1, bench.post_script())  # one warm-up second at 1 connection

        # the baseline first, so the step down follows the step up at once
        bench.log(f"autoscale: 'fixed' (one replica) under the same load for {step_s} s")
        single = wrk.run(f"{stack.url}/fixed", CONNECTIONS, step_s, bench.post_script(),
                         log=bench.work_dir / "wrk.log")
        raw["fixed"] = single.to_json()

        # the step up, with the replica count polled meanwhile
        timeline: list[tuple[float, int, int]] = []
        done = threading.Event()

        def poll() -> None:
            with httpx.Client(base_url=stack.url, headers=stack.client.headers, timeout=10) as c:
                while not done.is_set():
                    r = _replicas(c, "step")
                    timeline.append((time.monotonic(), r["desired"], r["ready"]))
                    time.sleep(POLL_S)

        bench.log(f"autoscale: {CONNECTIONS} connections on 'step' for {step_s} s")
        poller = threading.Thread(target=poll, daemon=True)
        t0 = time.monotonic()
        poller.start()
        try:
            scaled = wrk.run(f"{stack.url}/step", CONNECTIONS, step_s, bench.post_script(),
                             log=bench.work_dir / "wrk.log")
        finally:
            done.set()
            poller.join(15)
        final = timeline[-1] if timeline else (t0, 1, 1)
        changed = [t for (t, d, r), (_, d0, r0) in zip(timeline[1:], timeline) if (d, r) != (d0, r0)]
        settle_s = round((changed[-1] if changed else t0) - t0, 2)
        raw["step_up"] = {"wrk": scaled.to_json(), "final_desired": final[1], "final_ready": final[2],
                          "timeline": [(round(t - t0, 2), d, r) for t, d, r in timeline]}

        # the step down: one client keeps calling while the replicas are released
        statuses: dict[int, int] = {}
        stop = threading.Event()

        def trickle() -> None:
            with httpx.Client(base_url=stack.url, timeout=30) as c:
                while not stop.is_set():
                    try:
                        code = c.post("/step", content=b"").status_code
                    except httpx.HTTPError:
                        code = 0
                    statuses[code] = statuses.get(code, 0) + 1

        client = threading.Thread(target=trickle, daemon=True)
        t1 = time.monotonic()
        client.start()
        try:
            wait_for(lambda: _replicas(stack.client, "step") == {"desired": 1, "ready": 1}, 6 * stable_s + 30,
                     interval_s=POLL_S, what="the step down to one replica")
            release_s = round(time.monotonic() - t1, 2)
        finally:
            stop.set()
            client.join(35)
        failed_down = sum(n for code, n in statuses.items() if code != 200)
        raw["step_down"] = {"release_s": release_s, "statuses": statuses}

    notes = f"windows stable {stable_s} s, panic {panic_s} s (shortened); maxReplicas {MAX_REPLICAS}"
    base = "the same handler, one fixed replica, same run"
    result.rows += [
        Row(NAME, "autoscale: step 1->32 connections, time until the replica count settles", "s", settle_s,
            notes=f"{final[2]} ready of {final[1]} at the end; {notes}"),
        Row(NAME, "autoscale: during the step, p50 latency", "ms", scaled.p50_ms, single.p50_ms, base,
            errors=scaled.errors),
        Row(NAME, "autoscale: during the step, p99 latency", "ms", scaled.p99_ms, single.p99_ms, base,
            errors=scaled.errors),
        Row(NAME, "autoscale: during the step, throughput", "req/s", scaled.rps, single.rps, base,
            errors=scaled.errors + single.errors),
        Row(NAME, "autoscale: step down, time to release to one replica", "s", release_s,
            notes=f"from the end of the load, one client calling meanwhile; {notes}"),
        Row(NAME, "autoscale: step down, calls failed", "calls", failed_down, errors=failed_down,
            notes=f"{sum(statuses.values())} calls during the step down"),
    ]
