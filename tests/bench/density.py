"""Scenario 3: density: the memory (PSS) of M deployed no-op functions with one warm instance each.

An instance of the process backend is a process tree: bwrap, bwrap's PID-namespace
init, and the runtime's python inside. All of them are counted. The platform's
own services (store, deployer, gateway) are reported beside it. The functions
are deleted afterwards, and their instances waited for.
"""

from __future__ import annotations

import time

from tests.bench import memory
from tests.bench.apps import NOOP_SOURCE
from tests.bench.harness import Bench
from tests.bench.memory import MB
from tests.bench.model import Row, ScenarioResult, Target
from tests.bench.procs import descendants
from tests.bench.registry import scenario
from tests.stack import Stack, function_yaml, wait_for

NAME = "density"
PSS_TARGET = Target("<= 25 MB", "<=", 25.0)
DEPLOY_BUDGET_S = 300.0  # stop deploying (and report what was reached) past this


def _instance_trees(stack: Stack) -> dict[int, list[int]]:
    return {pid: [pid, *descendants(pid)] for pid in stack.instance_pids()}


def _delete_all(bench: Bench, stack: Stack, names: list[str]) -> None:
    for name in names:
        try:
            stack.client.delete(f"/{name}")
        except Exception as exc:  # keep deleting the rest; the stack's stop cleans up anyway
            bench.log(f"density: could not delete {name}: {exc}")
    try:
        wait_for(lambda: not stack.instance_pids(), 30 + len(names) * 0.2, what="the density instances to stop")
    except AssertionError as exc:
        bench.log(f"density: {exc}")


@scenario(NAME, "Density: warm no-op instances, proportional memory")
def run(bench: Bench, result: ScenarioResult) -> None:
    m = bench.options.functions
    raw = result.raw
    with bench.stack("density") as stack:
        deployed: list[str] = []
        try:
            bench.log(f"density: deploying {m} no-op functions, one warm instance each")
            t0 = time.perf_counter()
            for i in range(m):
                name = f"dens{i:04d}"
                stack.deploy(name, {"function.yaml": function_yaml(name), "main.py": NOOP_SOURCE})
                deployed.append(name)
                resp = stack.invoke(name, b"")
                if resp.status_code != 200 or resp.text != "ok":
                    raise RuntimeError(f"{name} answered {resp.status_code} {resp.text[:300]!r}")
                if time.perf_counter() - t0 > DEPLOY_BUDGET_S:
                    bench.log(f"density: stopping at {len(deployed)} functions, past {DEPLOY_BUDGET_S:g} s")
                    break
            raw["deploy_s"] = round(time.perf_counter() - t0, 2)
            raw["functions"] = len(deployed)
            bench.track_instances(stack)
            wait_for(lambda: len(stack.instance_pids()) >= len(deployed), 30, what="one instance per function")

            trees = _instance_trees(stack)
            runtime_pids = [p for tree in trees.values() for p in tree if memory.comm(p).startswith("python")]
            other_pids = [p for tree in trees.values() for p in tree if p not in runtime_pids]
            runtime = memory.total(runtime_pids)
            wrappers = memory.total(other_pids)
            services = {svc: memory.rollup(proc.pid) or {} for svc, proc in stack.procs.items()}
        finally:
            _delete_all(bench, stack, deployed)

    n = len(trees)
    if n == 0:
        raise RuntimeError("no instance processes found to measure")
    per = {k: (runtime.get(k, 0) + wrappers.get(k, 0)) / n / MB for k in memory.FIELDS}
    raw.update({
        "instances": n,
        "processes_per_instance": round((runtime["processes"] + wrappers["processes"]) / n, 2),
        "runtime_python_total_mb": {k: round(runtime[k] / MB, 2) for k in memory.FIELDS},
        "wrappers_total_mb": {k: round(wrappers[k] / MB, 2) for k in memory.FIELDS},
        "per_instance_mb": {k: round(v, 3) for k, v in per.items()},
        "services_mb": {svc: {k: round(v / MB, 2) for k, v in r.items()} for svc, r in services.items()},
    })
    services_pss = sum(r.get("Pss", 0) for r in services.values()) / MB
    result.rows.append(Row(
        NAME, f"density: PSS per warm no-op instance ({n} functions)", "MB", per["Pss"], None, "", PSS_TARGET,
        f"runtime python {runtime['Pss'] / n / MB:.1f} MB + bwrap/init {wrappers['Pss'] / n / MB:.1f} MB"
        f" ({raw['processes_per_instance']:g} processes per instance); all {n}: {(runtime['Pss'] + wrappers['Pss']) / MB:.0f} MB;"
        f" private {(per['Private_Clean'] + per['Private_Dirty']):.1f} MB, RSS {per['Rss']:.1f} MB per instance",
    ))
    result.rows.append(Row(
        NAME, f"density: platform services PSS ({n} functions deployed)", "MB", services_pss, None, "", None,
        ", ".join(f"{svc} {r.get('Pss', 0) / MB:.1f} MB" for svc, r in services.items()),
    ))
