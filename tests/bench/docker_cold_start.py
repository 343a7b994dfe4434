"""Scenario: container cold start on the Docker backend and the three warm-start policies, next to ``docker run``.

- the floor, measured in the same run: ``docker run --rm --network host nuclide-runtime true``
  (the CLI, as a user would time it);
- deploy (PUT) -> first response of a new Python function, with the warm pool (the default:
  an idle pool container is specialised with the code, no image build, no interpreter start;
  measured with the pool full, as a deploy finds it unless deploys come faster than it refills)
  and without it (``docker_pool_size: 0``, a second stack: the function's image is built, then
  a container of it started);
- scale-from-zero -> first response (``minReplicas: 0``, 1 s idle timeout), the same two ways:
  a pool container specialised, or a container of the kept image started; READY, the held call runs;
- the idle memory of a pool container: PSS of its process, and the container's cgroup usage;
- the same two for a function on a registered runtime (``spec.warmStart: function``, no
  ``dependencies`` command): a container of the runtime pool (``docker_runtime_pool_size``, full at
  each PUT) gets the code through the Engine's archive API, a spare runner process (imports done)
  takes it, no image is built; READY, then the call's exec. And the deploy of one whose runtime has a
  ``dependencies`` command, which still builds the function's image;
- per-call latency of a registered runtime's function (``run: ["cat"]``, so the figure is the
  platform's, not an interpreter's start) under each policy: ``none`` (a fresh container per
  call, comparable to the floor), ``runtime`` and ``function`` (an exec in a warm container);
- the same three for a Python no-op function: ``none`` (a fresh container of its image per call,
  ``services.runtime.once`` loads the handler and runs the call), ``runtime`` (an exec of it in a
  warm container, into a fresh copy of the code) and ``function`` (a warm nuclide instance).

Skipped, with the reason, without a Docker Engine, the docker CLI or the runtime image.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import time
from typing import Any, Iterator

import yaml

from tests.bench.apps import NOOP_SOURCE
from tests.bench.harness import Bench, median
from tests.bench.model import SKIPPED, Row, ScenarioResult, Target
from tests.bench.registry import scenario
from tests.bench.memory import MB, rollup
from tests.docker_util import (
    RUNTIME_IMAGE, containers, docker_client, docker_problem, docker_stack_at, idle_pool, namespace, remove_namespace,
)
from tests.stack import Stack, function_yaml, make_zip, wait_for

NAME = "docker_cold_start"
FLOOR_LABEL = f"docker run --rm {RUNTIME_IMAGE} true"
TARGET = Target("<= 1.2x docker run --rm", "<=", 1.2, "ratio")
FIRST_RESPONSE_TIMEOUT_S = 120.0
SCALE_DOWN_TIMEOUT_S = 60.0
RUNTIME = {"image": RUNTIME_IMAGE, "path": "/ws", "run": ["cat"]}
RUNTIME_WITH_DEPS = {**RUNTIME, "dependencies": ["cp", "input.txt", "deps.txt"]}
RUNTIME_POOL_LABEL = "nuclide.runtime_pool=true"
POLICIES = ("none", "runtime", "function")
POOL_SIZE = 2  # the default docker_pool_size
POOL_FULL_TIMEOUT_S = 60.0
ROWS = (
    ("cold start: Docker, deploy (PUT) -> first response, Python function (warm pool)", "ms", TARGET),
    ("cold start: Docker, scale-from-zero -> first response, Python function (warm pool)", "ms", TARGET),
    ("cold start: Docker, deploy (PUT) -> first response, Python function (no pool: image build)", "ms", None),
    ("cold start: Docker, scale-from-zero -> first response, Python function (no pool)", "ms", None),
    ("idle memory: a warm pool container (PSS of its process)", "MB", None),
    ("cold start: Docker, deploy (PUT) -> first response, registered runtime", "ms", TARGET),
    ("cold start: Docker, scale-from-zero -> first response, registered runtime", "ms", TARGET),
    ("cold start: Docker, deploy (PUT) -> first response, registered runtime with dependencies (image build)",
     "ms", None),
    *((f"per call: registered runtime, warmStart {p}", "ms", TARGET if p == "none" else None) for p in POLICIES),
    *((f"per call: Python function, warmStart {p}", "ms", TARGET if p == "none" else None) for p in POLICIES),
)
HOW = {("registered runtime", "none"): "a fresh container per call",
       ("registered runtime", "runtime"): "exec in a warm container, fresh code copy",
       ("registered runtime", "function"): "exec in a warm container",
       ("Python function", "none"): "a fresh container of the function's image per call, the handler loaded in it",
       ("Python function", "runtime"): "exec of the once runner in a warm container, fresh code copy",
       ("Python function", "function"): "a warm nuclide instance"}


def _ms(values: list[float]) -> list[float]:
    return [round(v * 1000, 3) for v in values]


@contextlib.contextmanager
def docker_stack(bench: Bench, pool_size: int = POOL_SIZE) -> Iterator[Stack]:
    stack = docker_stack_at(bench.work_dir / f"docker-pool{pool_size}" / "var",
                            {"NUCLIDE_DOCKER_IMAGE_CACHE": "0", "NUCLIDE_DOCKER_POOL_SIZE": str(pool_size)})
    try:
        stack.start()
        for service, proc in stack.procs.items():
            bench.procs.record(proc.pid, f"nuclide {service} (docker)")
        yield stack
    finally:
        try:
            stack.stop()
        finally:
            if (stack.var_dir / "docker-namespace").exists():
                remove_namespace(namespace(stack))


def _first_200(stack: Stack, name: str, t0: float, body: bytes = b"") -> tuple[float, int]:
    """Seconds from ``t0`` to the first 200 of ``name``, and how many calls failed before it."""
    failed = 0
    while True:
        resp = stack.anon.post(f"/{name}", content=body)
        if resp.status_code == 200:
            return time.perf_counter() - t0, failed
        failed += 1
        if time.perf_counter() - t0 > FIRST_RESPONSE_TIMEOUT_S:
            raise RuntimeError(f"{name} never answered 200: last {resp.status_code} {resp.text[:300]}")
        time.sleep(0.005)


def _put(stack: Stack, name: str, files: dict[str, str]) -> None:
    resp = stack.client.put(f"/{name}", files={"zip_file": ("f.zip", make_zip(files), "application/zip")})
    if resp.status_code != 200:
        raise RuntimeError(f"deploy of {name} answered {resp.status_code}: {resp.text[:1500]}")


def _gone(stack: Stack, name: str) -> None:
    if stack.client.delete(f"/{name}").status_code != 204:
        raise RuntimeError(f"could not delete {name}")
    ns = namespace(stack)
    wait_for(lambda: not _instances(stack, ns, name), 30, what=f"{name}'s containers to go")


def _shell_files(name: str, runtime: str = "benchrt", **spec: Any) -> dict[str, str]:
    return {"function.yaml": yaml.safe_dump({"metadata": {"name": name}, "spec": {"runtime": runtime, **spec}}),
            "input.txt": "the code directory\n"}


def _runner_records(stack: Stack) -> list[dict[str, Any]]:
    found = []
    for path in (stack.var_dir / "docker" / "runners").glob("*.json"):
        if not path.name.endswith(".config.json"):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # replaced while read
    return found


def runtime_pool_full(stack: Stack, size: int = POOL_SIZE) -> None:
    """Wait until the runtime pool holds ``size`` idle containers (running, no runner's record names them)."""
    def idle() -> int:
        held = {c for rec in _runner_records(stack) for c in rec.get("containers") or ()}
        return len([c for c in containers(namespace(stack), RUNTIME_POOL_LABEL, all_states=False) if c.id not in held])

    wait_for(lambda: idle() >= size, POOL_FULL_TIMEOUT_S, what="a full runtime pool")


def pool_full(stack: Stack, size: int) -> None:
    """Wait until the warm pool holds ``size`` idle containers (nothing with size 0)."""
    if size:
        wait_for(lambda: len(idle_pool(stack)) >= size, POOL_FULL_TIMEOUT_S, what="a full warm pool")


def deploy_to_first(stack: Stack, files_for: Any, n: int, pool_size: int = 0,
                    full: Any = pool_full) -> tuple[list[float], int]:
    times, failures = [], 0
    for i in range(n):
        name = f"dcold{i}-{secrets.token_hex(2)}"
        full(stack, pool_size)
        t0 = time.perf_counter()
        _put(stack, name, files_for(name))
        took, failed = _first_200(stack, name, t0, b"{}")
        times.append(took)
        failures += failed
        _gone(stack, name)
    return times, failures


def _instances(stack: Stack, ns: str, name: str) -> list[Any]:
    """The function's containers: image-built, runner-driven, warm pool ones (by their instance name), or
    runtime pool ones (by the runner records that name them)."""
    pooled = [c for c in containers(ns, "nuclide.pool=true") if c.name.startswith(f"nuclide-{ns}-g-{name}-v")]
    held = {c for rec in _runner_records(stack) if name in rec.get("functions", ())
            for c in rec.get("containers") or ()}
    runtime_pooled = [c for c in containers(ns, RUNTIME_POOL_LABEL) if c.id in held]
    return (containers(ns, f"nuclide.function={name}", all_states=True) + pooled + runtime_pooled
            + containers(ns, f"nuclide.runner_function={name}"))


def scale_from_zero(stack: Stack, name: str, files: dict[str, str], n: int,
                    pool_size: int = 0, full: Any = pool_full) -> tuple[list[float], int]:
    _put(stack, name, files)
    times, failures = [], 0
    ns = namespace(stack)
    for _ in range(n):
        wait_for(lambda: stack.client.get(f"/{name}").json()["state"] == "scaledToZero", SCALE_DOWN_TIMEOUT_S,
                 what=f"{name} to scale to zero")
        wait_for(lambda: not _instances(stack, ns, name), SCALE_DOWN_TIMEOUT_S, what=f"{name}'s containers to go")
        full(stack, pool_size)
        took, failed = _first_200(stack, name, time.perf_counter(), b"{}")
        times.append(took)
        failures += failed
    _gone(stack, name)
    return times, failures


def idle_memory(stack: Stack) -> tuple[list[float], list[float]]:
    """PSS of each idle pool container's process and the container's cgroup memory usage, in MB."""
    client = docker_client()
    pss, usage = [], []
    try:
        for container_id in idle_pool(stack):
            info = client.api.inspect_container(container_id)
            figures = rollup(int(info["State"].get("Pid") or 0))
            if figures is not None:
                pss.append(figures["Pss"] / MB)
            stats = client.api.stats(container_id, stream=False).get("memory_stats") or {}
            if stats.get("usage"):
                # without the page cache (the image's files read at start), as `docker stats` shows it
                cache = (stats.get("stats") or {}).get("cache", 0)
                usage.append((stats["usage"] - cache) / MB)
    finally:
        client.close()
    return pss, usage


def per_call(stack: Stack, name: str, calls: int) -> list[float]:
    for _ in range(2):  # warm-up: the first calls open connections
        _first_200(stack, name, time.perf_counter(), b'{"n": 0}')
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        resp = stack.anon.post(f"/{name}", content=b'{"n": %d}' % i)
        if resp.status_code != 200:
            raise RuntimeError(f"{name} answered {resp.status_code}: {resp.text[:500]}")
        times.append(time.perf_counter() - t0)
    return times


@scenario(NAME, "Cold start and warm-start policies, Docker backend")
def run(bench: Bench, result: ScenarioResult) -> None:
    problem = docker_problem() or (None if shutil.which("docker") else "the docker CLI is not installed")
    if problem:
        bench.log(f"docker cold start: skipped: {problem}")
        result.status, result.error = "skipped", problem
        result.raw["skipped"] = problem
        result.rows += [Row(NAME, metric, unit, target=target, status=SKIPPED, notes=f"skipped: {problem}")
                        for metric, unit, target in ROWS]
        return
    n = bench.options.repeats
    nf = 2 * n + 1
    raw = result.raw
    floor_argv = ["docker", "run", "--rm", "--network", "host", RUNTIME_IMAGE, "true"]
    bench.log(f"docker cold start: the floor, {nf} runs of {' '.join(floor_argv)}")
    floors = [bench.time_command(floor_argv, "docker run floor") for _ in range(nf)]
    raw["docker_run_floor_ms"] = _ms(floors)
    floor_ms = median(floors) * 1000
    rows: dict[str, Row] = {}

    def add(metric: str, values: list[float], note: str, failed: int = 0) -> None:
        target = next(t for m, _, t in ROWS if m == metric)
        rows[metric] = Row(NAME, metric, "ms", median(values) * 1000, floor_ms, FLOOR_LABEL, target,
                           f"median of {len(values)}, max {max(values) * 1000:.1f} ms; {note}; floor: median of"
                           f" {nf}" + (f"; {failed} calls failed before the first 200" if failed else ""),
                           errors=failed)
        result.rows[:] = [rows[m] for m, _, _ in ROWS if m in rows]

    def python_cold_starts(stack: Stack, pool_size: int, first_row: int, suffix: str, notes: tuple[str, str]) -> None:
        how = "warm pool" if pool_size else "no pool"
        bench.log(f"docker cold start: deploy -> first response, {n} new Python functions, {how}")
        times, failed = deploy_to_first(stack, lambda name: {"function.yaml": function_yaml(name),
                                                             "main.py": NOOP_SOURCE}, n, pool_size)
        raw[f"python_deploy_to_first_response{suffix}_ms"] = _ms(times)
        add(ROWS[first_row][0], times, notes[0], failed)
        bench.log(f"docker cold start: scale-from-zero -> first response, Python, {n} times, {how}")
        files = {"function.yaml": function_yaml("dzero", minReplicas=0, scaleToZero={"idleTimeout": "1s"}),
                 "main.py": NOOP_SOURCE}
        times, failed = scale_from_zero(stack, "dzero", files, n, pool_size)
        raw[f"python_scale_from_zero{suffix}_ms"] = _ms(times)
        add(ROWS[first_row + 1][0], times, notes[1], failed)

    calls = 5 if bench.options.quick else max(10, 5 * n)
    with docker_stack(bench) as stack:
        python_cold_starts(stack, POOL_SIZE, 0, "", (
            f"docker_pool_size {POOL_SIZE}, the pool full at each PUT: a pool container gets the code over its"
            " stdin (no image build)",
            "a pool container is specialised, the runtime says READY, the held call runs"))
        pool_full(stack, POOL_SIZE)
        pss, usage = idle_memory(stack)
        raw["pool_idle_pss_mb"] = [round(v, 2) for v in pss]
        raw["pool_idle_cgroup_mb"] = [round(v, 2) for v in usage]
        if pss:
            metric = ROWS[4][0]
            rows[metric] = Row(NAME, metric, "MB", round(median(pss), 2), None, "", None,
                               f"median of {len(pss)} idle pool containers; container memory (cgroup usage without"
                               f" page cache): {median(usage) if usage else float('nan'):.1f} MB")
            result.rows[:] = [rows[m] for m, _, _ in ROWS if m in rows]

        for runtime, definition in (("benchrt", RUNTIME), ("benchdeps", RUNTIME_WITH_DEPS)):
            resp = stack.client.put(f"/runtimes/{runtime}", json=definition)
            if resp.status_code not in (200, 201):
                raise RuntimeError(f"registering the runtime answered {resp.status_code}: {resp.text[:500]}")
        # the runtime pool learns a runtime's shape (image, path, limits) from a start: one before measuring
        deploy_to_first(stack, lambda name: _shell_files(name), 1)
        bench.log(f"docker cold start: registered runtime (run: cat), deploy -> first response, {n} functions")
        times, failed = deploy_to_first(stack, lambda name: _shell_files(name), n, POOL_SIZE, runtime_pool_full)
        raw["runtime_deploy_to_first_response_ms"] = _ms(times)
        add(ROWS[5][0], times, f"warmStart function, no dependencies; docker_runtime_pool_size {POOL_SIZE}, the"
            " pool full at each PUT: a started container of the runtime's image gets the code (archive API, no"
            " image build), a spare runner takes it; READY, then the call's exec", failed)

        bench.log(f"docker cold start: registered runtime, scale-from-zero -> first response, {n} times")
        times, failed = scale_from_zero(stack, "rzero", _shell_files("rzero", minReplicas=0,
                                                                      scaleToZero={"idleTimeout": "1s"}), n,
                                        POOL_SIZE, runtime_pool_full)
        raw["runtime_scale_from_zero_ms"] = _ms(times)
        add(ROWS[6][0], times, "warmStart function, no dependencies: a runtime pool container gets the code, a"
            " spare runner takes it; READY, then the held call's exec", failed)

        bench.log(f"docker cold start: registered runtime with dependencies, deploy -> first response, {n} functions")
        times, failed = deploy_to_first(stack, lambda name: _shell_files(name, "benchdeps"), n)
        raw["runtime_deps_deploy_to_first_response_ms"] = _ms(times)
        add(ROWS[7][0], times, "warmStart function; the dependencies command runs in the function's image build,"
            " then the runner starts a warm container of it", failed)

        kinds = {"registered runtime": ("", lambda name, policy: _shell_files(name, warmStart=policy)),
                 "Python function": ("python_", lambda name, policy: {
                     "function.yaml": function_yaml(name, warmStart=policy), "main.py": NOOP_SOURCE})}
        for kind, (prefix, files_for) in kinds.items():
            for policy in POLICIES:
                name = f"{prefix[:2] or 'rt'}-pol-{policy}"
                bench.log(f"docker cold start: per-call latency, {kind}, warmStart {policy}, {calls} calls")
                _put(stack, name, files_for(name, policy))
                times = per_call(stack, name, calls)
                raw[f"{prefix}per_call_{policy}_ms"] = _ms(times)
                add(f"per call: {kind}, warmStart {policy}", times, f"sequential HTTP calls; {HOW[kind, policy]}")
                _gone(stack, name)

    with docker_stack(bench, 0) as stack:
        python_cold_starts(stack, 0, 2, "_no_pool", (
            "docker_pool_size 0: includes building the function's image",
            "the container of the kept image starts, the runtime says READY, the held call runs"))
