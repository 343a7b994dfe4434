"""Scenario 3: density: the memory (PSS) of M deployed no-op functions with one warm instance each,
and what 1,000 functions scaled to zero cost the whole platform.

An instance forked by a zygote is one process (the runtime, PID 1 of its own
namespace); a cold one is a tree: bwrap, bwrap's PID-namespace init, and the
runtime's python inside. All of them are counted. PSS charges the pages an
instance shares with its zygote (the interpreter and the imported runtime) in
equal parts to the zygote and every instance, so the sum is what they cost
together; the zygote (its bwrap and python) is reported beside the instances,
and so are the platform's own services. The functions are deleted afterwards,
and their instances waited for.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tests.bench import memory
from tests.bench.apps import NOOP_SOURCE
from tests.bench.harness import Bench
from tests.bench.memory import MB
from tests.bench.model import Row, ScenarioResult, Target
from tests.bench.procs import descendants
from tests.bench.registry import scenario
from tests.stack import Stack, function_yaml, wait_for

NAME = "density"
IDLE_NAME = "scale_to_zero"
PSS_TARGET = Target("<= 25 MB", "<=", 25.0)
IDLE_TARGET = Target("< 100 MB", "<", 100.0)
DEPLOY_BUDGET_S = 300.0  # stop deploying (and report what was reached) past this
IDLE_FUNCTIONS = (1000, 20)  # functions scaled to zero: a full run, --quick
IDLE_DEPLOYERS = 4  # PUTs in flight at once (2 cores: more only queue up)


def _instance_trees(stack: Stack) -> dict[int, list[int]]:
    return {pid: [pid, *descendants(pid)] for pid in stack.instance_pids()}


def _network_pids(stack: Stack) -> list[int]:
    """The isolated instances' slirp4netns processes (one each, children of the deployer): part of their cost."""
    deployer = stack.procs["deployer"].pid
    return [p for p in descendants(deployer) if memory.comm(p) == "slirp4netns"]


def _zygote_pids(stack: Stack, instance_pids: set[int]) -> list[int]:
    """The zygotes' processes (bwrap and the python inside): what runs below the deployer but no instance."""
    deployer = stack.procs["deployer"].pid
    return [p for p in descendants(deployer) if p not in instance_pids]


def _delete_all(bench: Bench, stack: Stack, names: list[str]) -> None:
    def delete(name: str) -> None:
        try:
            stack.client.delete(f"/{name}")
        except Exception as exc:  # keep deleting the rest; the stack's stop cleans up anyway
            bench.log(f"density: could not delete {name}: {exc}")

    with ThreadPoolExecutor(IDLE_DEPLOYERS) as pool:
        list(pool.map(delete, names))
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
            network_pids = _network_pids(stack)
            other_pids = [p for tree in trees.values() for p in tree if p not in runtime_pids] + network_pids
            runtime = memory.total(runtime_pids)
            wrappers = memory.total(other_pids)
            network = memory.total(network_pids)
            zygotes = memory.total(_zygote_pids(stack, {p for tree in trees.values() for p in tree} | set(network_pids)))
            forked = sum(1 for meta in (stack.var_dir / "instances").glob("*/instance.json")
                         if '"forked": true' in meta.read_text())
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
        "zygotes_mb": {k: round(zygotes[k] / MB, 2) for k in memory.FIELDS},
        "network_total_mb": {k: round(network[k] / MB, 2) for k in memory.FIELDS},
        "zygote_processes": zygotes["processes"],
        "forked_instances": forked,
    })
    services_pss = sum(r.get("Pss", 0) for r in services.values()) / MB
    result.rows.append(Row(
        NAME, f"density: PSS per warm no-op instance ({n} functions)", "MB", per["Pss"], None, "", PSS_TARGET,
        f"{forked} of {n} forked by a zygote; runtime python {runtime['Pss'] / n / MB:.1f} MB + init and network"
        f" {wrappers['Pss'] / n / MB:.1f} MB (of which slirp4netns {network['Pss'] / n / MB:.2f} MB;"
        f" {raw['processes_per_instance']:g} processes per instance); all {n}:"
        f" {(runtime['Pss'] + wrappers['Pss']) / MB:.0f} MB; with the zygote's share"
        f" ({zygotes['processes']} processes, {zygotes['Pss'] / MB:.1f} MB) {per['Pss'] + zygotes['Pss'] / n / MB:.1f} MB"
        f" per instance; private {(per['Private_Clean'] + per['Private_Dirty']):.1f} MB, RSS {per['Rss']:.1f} MB"
        " per instance",
    ))
    result.rows.append(Row(
        NAME, f"density: platform services PSS ({n} functions deployed)", "MB", services_pss, None, "", None,
        ", ".join(f"{svc} {r.get('Pss', 0) / MB:.1f} MB" for svc, r in services.items()),
    ))


def _platform_pss(stack: Stack) -> dict[str, float]:
    """PSS (MB) of every process of the platform: the services, and what runs below the deployer."""
    out = {svc: (memory.rollup(proc.pid) or {}).get("Pss", 0) / MB for svc, proc in stack.procs.items()}
    below = memory.total(descendants(stack.procs["deployer"].pid))
    out["zygotes and instances"] = below["Pss"] / MB
    out["processes below the deployer"] = below["processes"]
    return out


def _all_idle(stack: Stack, names: set[str]) -> bool:
    listed = {f["name"]: f for f in stack.client.get("/functions").json()}
    return all(listed.get(n, {}).get("state") == "scaledToZero" for n in names) and not stack.instance_pids()


@scenario(IDLE_NAME, "Scale to zero: what idle functions cost the whole platform")
def run_idle(bench: Bench, result: ScenarioResult) -> None:
    m = IDLE_FUNCTIONS[1] if bench.options.quick else IDLE_FUNCTIONS[0]
    raw = result.raw
    with bench.stack("idle") as stack:
        empty = _platform_pss(stack)
        raw["empty_platform_mb"] = {k: round(v, 2) for k, v in empty.items()}
        bench.log(f"scale to zero: deploying {m} no-op functions (minReplicas 0), {IDLE_DEPLOYERS} at a time")
        spec = {"minReplicas": 0, "scaleToZero": {"idleTimeout": "1s"}}
        names = [f"idle{i:04d}" for i in range(m)]
        deployed: list[str] = []
        t0 = time.perf_counter()

        def deploy(name: str) -> None:
            if time.perf_counter() - t0 > DEPLOY_BUDGET_S:
                return
            stack.deploy(name, {"function.yaml": function_yaml(name, **spec), "main.py": NOOP_SOURCE})
            deployed.append(name)

        try:
            with ThreadPoolExecutor(IDLE_DEPLOYERS) as pool:
                list(pool.map(deploy, names))
            raw["deploy_s"] = round(time.perf_counter() - t0, 2)
            raw["functions"] = len(deployed)
            bench.track_instances(stack)
            wait_for(lambda: _all_idle(stack, set(deployed)), 60 + len(deployed) * 0.05, interval_s=0.5,
                     what="every function scaled to zero, no instance left")
            raw["all_scaled_to_zero_s"] = round(time.perf_counter() - t0, 2)
            idle = _platform_pss(stack)
            raw["idle_platform_mb"] = {k: round(v, 2) for k, v in idle.items()}
        finally:
            _delete_all(bench, stack, deployed)
    n = len(deployed)
    keys = [k for k in idle if k != "processes below the deployer"]
    total = sum(idle[k] for k in keys)
    before = sum(empty[k] for k in keys)
    result.rows.append(Row(
        IDLE_NAME, f"density: {n:,} functions scaled to zero, whole platform", "MB", total - before, None, "",
        IDLE_TARGET,
        f"what they add to the platform's PSS: {before:.0f} MB with no function, {total:.0f} MB with {n:,} scaled to"
        " zero (" + ", ".join(f"{k} {idle[k]:.1f}" for k in keys) + f" MB; {idle['processes below the deployer']:g}"
        f" processes below the deployer); deployed {raw['deploy_s']:g} s, {IDLE_DEPLOYERS} PUTs at a time;"
        f" all idle after {raw['all_scaled_to_zero_s']:g} s",
    ))
    result.rows.append(Row(
        IDLE_NAME, f"density: platform PSS with {n:,} functions scaled to zero", "MB", total, before,
        "the same platform with no function", None, "store, gateway, deployer, optimizer and the zygotes",
    ))
