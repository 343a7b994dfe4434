"""Scenario 2: cold start on the process backend, next to the floors measured in the same run.

- deploy to first response: from the PUT of a function never deployed before (a
  new name each time; nothing is cached but the code-independent parts: the
  no-op has no dependency environment) to the first 200 of a POST to it;
- a fresh ``python -m services.runtime`` instance, started the way the deployer
  starts one, to its READY on a ZeroMQ ROUTER of ours: without and with the
  bubblewrap sandbox;
- the floor: a bare interpreter from the venv that imports the runtime
  (``python -c "import services.runtime.loop"``) and exits; and ``python -c pass``;
- an instance forked by a zygote (the deployer's own ``Zygotes``, under bwrap) to
  its READY on the same ROUTER, with the zygote's step times;
- scale-from-zero: a function with ``minReplicas: 0`` scaled to zero, then a
  POST to it, to its response; the hops come from the services' JSON log lines
  (wall-clock timestamps, same machine): request -> the deployer asks the
  zygote, the fork (until the instance is confined), confined -> READY at the
  gateway, READY -> the response.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import time
import types
from pathlib import Path
from typing import Any

import zmq

from shared.curve import INSTANCE_DOMAIN, ZapHandler, memory_keys
from shared.linkkeys import link_route
from tests.bench.apps import NOOP_SOURCE
from tests.bench.harness import PYTHON, Bench, median
from tests.bench.model import Row, ScenarioResult, Target
from tests.bench.procs import descendants
from tests.bench.registry import scenario
from tests.stack import Stack, function_yaml, make_zip, wait_for

NAME = "cold_start"
FLOOR_LABEL = "python -c 'import services.runtime.loop'"
NODOWN_LABEL = "the same import, then os._exit (no teardown)"
READY_TIMEOUT_S = 30.0
FIRST_RESPONSE_TIMEOUT_S = 60.0


def _ms(values: list[float]) -> list[float]:
    return [round(v * 1000, 3) for v in values]


# ----- a runtime instance straight to READY --------------------------------------------------


def _sandbox_wrap(var_dir: Path, argv: list[str], code_dir: Path, config: Path) -> list[str] | None:
    """The deployer's own bwrap command line for this instance, or None when bwrap is unavailable."""
    if not shutil.which("bwrap"):
        return None
    from services.deployer.sandbox import Mounts, hidden_paths, wrap

    settings = types.SimpleNamespace(sandbox="bwrap", var_dir=var_dir)
    return wrap(settings, argv, Mounts(writable=(code_dir,), readonly=(config,), hidden=hidden_paths()),  # type: ignore[arg-type]
                code_dir)


# the bench's stand-in gateway: a CURVE server, as a gateway's instance socket is (shared/curve.py)
BENCH_KEYS = memory_keys()


def _noop_instance(var_dir: Path, endpoint: str) -> tuple[str, Path, dict[str, Any]]:
    """A no-op function's code directory and an instance config for it, as the deployer writes them."""
    inst_id = f"bench-{secrets.token_hex(4)}"
    code_dir = var_dir / "functions" / "noop" / "1" / "code"
    code_dir.mkdir(parents=True, exist_ok=True)
    (code_dir / "main.py").write_text(NOOP_SOURCE)
    return inst_id, code_dir, {
        "instance_id": inst_id, "group": "g-noop", "group_version": 1, "gateways": [endpoint],
        "gateway_url": "http://127.0.0.1:9", "fusionizer_host": "127.0.0.1", "memory_bytes": 1 << 30,
        "functions": [{"name": "noop", "version": 1, "handler": "main:handler", "code_dir": str(code_dir),
                       "deps_dir": None, "env": {}, "max_concurrency": 1, "timeout_s": 30.0}],
        "curve": BENCH_KEYS.instance_config(inst_id, "g-noop", 1),  # as the deployer issues them
    }


def _route(cfg: dict[str, Any]) -> bytes:
    """The routing id the instance of ``cfg`` connects under (made from its key, shared/linkkeys.py)."""
    return link_route(cfg["curve"]["secret"].encode(), cfg["instance_id"])


def _await_ready(sock: zmq.Socket, route: bytes, t0: float, exited: Any) -> float:
    """Seconds from ``t0`` to the READY of the instance routed as ``route`` on ``sock``; raises if ``exited()``
    says it died."""
    deadline = t0 + READY_TIMEOUT_S
    while True:
        if sock.poll(50):
            frames = sock.recv_multipart()
            if frames[0] == route and len(frames) > 2 and frames[2] == b"READY":
                return time.perf_counter() - t0
        if exited():
            raise RuntimeError("the runtime exited before READY")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"no READY from the runtime within {READY_TIMEOUT_S:g} s")


def runtime_to_ready(bench: Bench, sock: zmq.Socket, endpoint: str, var_dir: Path, sandboxed: bool) -> float:
    """Seconds from spawning a runtime instance of the no-op to its READY on ``sock``."""
    from services.deployer.sandbox import base_env

    inst_id, code_dir, cfg = _noop_instance(var_dir, endpoint)
    config = var_dir / "instances" / inst_id / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(cfg))
    argv = [PYTHON, "-m", "services.runtime", str(config)]
    if sandboxed:
        wrapped = _sandbox_wrap(var_dir, argv, code_dir, config)
        if wrapped is None:
            raise RuntimeError("bwrap is not installed")
        argv = wrapped
    what = "runtime (bwrap)" if sandboxed else "runtime"
    t0 = time.perf_counter()
    proc = bench.procs.spawn(argv, what, bench.work_dir / "runtime.log", cwd=code_dir, env=base_env())
    try:
        return _await_ready(sock, _route(cfg), t0, lambda: proc.poll() is not None)
    finally:
        # the instance inside bwrap is in a session of its own: signal the whole tree
        tree = [proc.pid, *descendants(proc.pid)]
        for pid in tree:
            bench.procs.record(pid, what)
        for pid in reversed(tree):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)
        bench.procs.wait_gone(tree, 10)


async def zygote_to_ready(bench: Bench, sock: zmq.Socket, endpoint: str, var_dir: Path, n: int) -> dict[str, Any]:
    """Start a zygote the way the deployer does, then fork ``n`` no-op instances from it, each to READY."""
    from shared.config import Settings
    from services.deployer.sandbox import instance_uid
    from services.deployer.zygotes import Zygotes, ZygoteUnavailable, wait_child
    from shared.spec import DEFAULT_PIDS, DEFAULT_SCRATCH_BYTES

    zygotes = Zygotes(Settings(var_dir=var_dir))
    out: dict[str, Any] = {"fork_to_ready_ms": [], "fork_ms": [], "steps_ms": []}
    try:
        t0 = time.perf_counter()
        try:
            await zygotes.ensure("")
        except ZygoteUnavailable as exc:
            out["unavailable"] = str(exc)
            return out
        out["zygote_start_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        for pid in (zygotes.pids().get(""), ):
            if pid:
                bench.procs.record_tree(pid, "zygote (bench)")
        from shared.seccomp import compile_filter

        seccomp = compile_filter()  # as the process backend does: once, sent with every spawn
        for _ in range(n):
            inst_id, code_dir, cfg = _noop_instance(var_dir, endpoint)
            # the deployer's confinement, on the host's network (this ROUTER is on tcp loopback): the
            # network namespace's cost shows in scale-from-zero, through the whole stack
            request = {"op": "spawn", "id": inst_id, "config": cfg, "writable": [str(code_dir)], "readonly": [],
                       "cwd": str(code_dir), "memory_bytes": cfg["memory_bytes"], "uid": instance_uid(inst_id),
                       "pids": DEFAULT_PIDS, "scratch_bytes": DEFAULT_SCRATCH_BYTES, "network": "host",
                       "seccomp": seccomp}
            with open(bench.work_dir / "forked.log", "ab") as log_file:
                t0 = time.perf_counter()
                reply = await zygotes.spawn("", "g-noop", request, [log_file.fileno()])
            pid = int(reply["pid"])
            bench.procs.record(pid, "forked instance (bench)")
            waiter = asyncio.ensure_future(wait_child(pid))
            try:
                took = await asyncio.to_thread(_await_ready, sock, _route(cfg), t0, waiter.done)
            finally:
                os.kill(pid, signal.SIGKILL)
                await waiter
            out["fork_to_ready_ms"].append(round(took * 1000, 3))
            out["fork_ms"].append(reply["fork_ms"])
            out["steps_ms"].append(reply.get("steps_ms") or {})
    finally:
        zygotes.close()
    return out


# ----- scale from zero ------------------------------------------------------------------------------


def _log_events(stack: Stack, service: str, event: str, since: float) -> list[dict[str, Any]]:
    """The service's JSON log lines named ``event`` stamped after ``since`` (wall clock), oldest first."""
    from datetime import datetime

    found = []
    for line in stack.service_log(service).splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            rec = json.loads(line)
            at = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError):
            continue
        if rec.get("msg") == event and at >= since:
            rec["at"] = at
            found.append(rec)
    return found


def scale_from_zero(bench: Bench, stack: Stack, n: int) -> list[dict[str, Any]]:
    """``n`` wake-ups of one scaled-to-zero no-op: each from the POST to its response, with its hops."""
    name = f"wake-{secrets.token_hex(2)}"
    stack.deploy(name, {"function.yaml": function_yaml(name, minReplicas=0, scaleToZero={"idleTimeout": "1s"}),
                        "main.py": NOOP_SOURCE})
    runs = []
    try:
        for _ in range(n):
            wait_for(lambda: stack.client.get(f"/{name}").json()["state"] == "scaledToZero", 30,
                     what=f"{name} to scale to zero")
            wait_for(lambda: not _instance_dirs(stack, name), 20, what=f"{name}'s instance to stop")
            t0 = time.time()
            resp = stack.anon.post(f"/{name}", content=b"")
            t1 = time.time()
            if resp.status_code != 200 or resp.text != "ok":
                raise RuntimeError(f"{name} answered {resp.status_code} {resp.text[:300]!r} when woken")
            bench.track_instances(stack)
            run: dict[str, Any] = {"total_ms": round((t1 - t0) * 1000, 3),
                                   "cold_header": resp.headers.get("x-nuclide-cold-start") == "true"}
            try:  # the deployer logs the fork right after it, but in its own time
                forked = wait_for(lambda: _log_events(stack, "deployer", "instance forked", t0), 2,
                                  what="the deployer's fork log line")
            except AssertionError:
                forked = []  # started cold (no zygote here): the deployer says why in its log
            ready = _log_events(stack, "gateway", "instance ready", t0)
            if forked and ready:
                fork = forked[0]
                fork_start = fork["at"] - fork["fork_ms"] / 1000
                run["hops_ms"] = {
                    "request_to_fork": round((fork_start - t0) * 1000, 3),
                    "fork": fork["fork_ms"],
                    "confined_to_ready": round((ready[0]["at"] - fork["at"]) * 1000, 3),
                    "ready_to_response": round((t1 - ready[0]["at"]) * 1000, 3),
                }
                run["fork_steps_ms"] = fork.get("steps_ms")
            runs.append(run)
    finally:
        stack.client.delete(f"/{name}")
    return runs


# ----- deploy to first response ----------------------------------------------------------------


def _instance_dirs(stack: Stack, name: str) -> list[str]:
    d = stack.var_dir / "instances"
    return [p.name for p in d.iterdir() if p.name.startswith(f"g-{name}-")] if d.exists() else []


def deploy_to_first_response(bench: Bench, stack: Stack, name: str) -> dict[str, Any]:
    files = {"function.yaml": function_yaml(name), "main.py": NOOP_SOURCE}
    archive = make_zip(files)
    t0 = time.perf_counter()
    put = stack.client.put(f"/{name}", files={"zip_file": ("task.zip", archive, "application/zip")})
    t_put = time.perf_counter()
    if put.status_code != 200:
        raise RuntimeError(f"deploy of {name} answered {put.status_code}: {put.text[:1500]}")
    failed_posts = 0
    while True:
        resp = stack.anon.post(f"/{name}", content=b"")
        if resp.status_code == 200 and resp.text == "ok":
            break
        failed_posts += 1
        if time.perf_counter() - t0 > FIRST_RESPONSE_TIMEOUT_S:
            raise RuntimeError(f"{name} never answered 200 'ok': last {resp.status_code} {resp.text[:300]}")
        time.sleep(0.001)
    t_first = time.perf_counter()
    bench.track_instances(stack)
    if stack.client.delete(f"/{name}").status_code != 204:
        raise RuntimeError(f"could not delete {name}")
    # the next repetition must not share the 2 cores with this one's instance shutting down
    wait_for(lambda: not _instance_dirs(stack, name), 20, what=f"{name}'s instance to stop")
    return {"first_response_s": t_first - t0, "put_s": t_put - t0, "failed_posts": failed_posts}


@scenario(NAME, "Cold start, process backend")
def run(bench: Bench, result: ScenarioResult) -> None:
    from services.deployer.sandbox import base_env

    n = bench.options.repeats
    raw = result.raw
    boxed = shutil.which("bwrap") is not None
    sandbox = "bwrap" if boxed else "none (bwrap not installed)"
    raw["sandbox"] = sandbox

    # The floors and READY times are cheap and noisy (+-20 % on a shared machine), so they get
    # more runs than the deploys, interleaved so that a busy moment hits all of them alike.
    # The floors run with the environment and in the kind of directory the deployer gives
    # instances (both change import times: sys.path[0] is the working directory).
    nf = 2 * n + 1
    env = base_env()
    var_dir = bench.work_dir / "cold-runtime" / "var"
    floor_cwd = var_dir / "floor"
    floor_cwd.mkdir(parents=True, exist_ok=True)
    floors = {
        "python_pass_ms": [PYTHON, "-c", "pass"],
        "import_runtime_ms": [PYTHON, "-c", "import services.runtime.loop"],
        # without the interpreter's teardown (about 30 ms of module cleanup here): compare with READY
        "import_runtime_no_teardown_ms": [PYTHON, "-c", "import os, services.runtime.loop; os._exit(0)"],
    }
    samples: dict[str, list[float]] = {key: [] for key in (*floors, "runtime_ready_ms", "runtime_ready_bwrap_ms")}
    bench.log(f"cold start: floors and fresh runtimes to READY, {nf} runs each")
    ctx = zmq.Context()
    zap = ZapHandler(ctx, BENCH_KEYS)
    sock = BENCH_KEYS.server(ctx.socket(zmq.ROUTER), INSTANCE_DOMAIN)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        endpoint = f"tcp://127.0.0.1:{port}"
        for _ in range(nf):
            for key, argv in floors.items():
                samples[key].append(bench.time_command(argv, key, env=env, cwd=floor_cwd))
            samples["runtime_ready_ms"].append(runtime_to_ready(bench, sock, endpoint, var_dir, False))
            if boxed:
                samples["runtime_ready_bwrap_ms"].append(runtime_to_ready(bench, sock, endpoint, var_dir, True))
        zygote = asyncio.run(zygote_to_ready(bench, sock, endpoint, var_dir, nf))
    finally:
        sock.close(0)
        zap.close()
        ctx.term()
    raw["zygote"] = zygote
    for key, values in samples.items():
        if values:
            raw[key] = _ms(values)
    med = {key: median(values) * 1000 for key, values in samples.items() if values}
    floor_ms, nodown_ms = med["import_runtime_ms"], med["import_runtime_no_teardown_ms"]
    floor_note = (f"floors: median of {nf}; `python -c pass` {med['python_pass_ms']:.1f} ms;"
                  f" import runtime and exit {floor_ms:.1f} ms")
    result.rows.append(Row(NAME, "cold start: fresh runtime process -> READY (no sandbox)", "ms",
                           med["runtime_ready_ms"], nodown_ms, NODOWN_LABEL, None,
                           f"median of {nf}, max {max(raw['runtime_ready_ms']):.1f} ms; {floor_note}"))
    if boxed:
        result.rows.append(Row(NAME, "cold start: fresh runtime process under bwrap -> READY", "ms",
                               med["runtime_ready_bwrap_ms"], nodown_ms, NODOWN_LABEL, None,
                               f"median of {nf}, max {max(raw['runtime_ready_bwrap_ms']):.1f} ms; the deployer's"
                               " own bwrap command line"))

    if zygote.get("fork_to_ready_ms"):
        ready_ms = zygote["fork_to_ready_ms"]
        steps = {k: median([s[k] for s in zygote["steps_ms"] if k in s]) for k in zygote["steps_ms"][0]}
        result.rows.append(Row(
            NAME, "cold start: instance forked by a zygote -> READY", "ms", median(ready_ms),
            med.get("runtime_ready_bwrap_ms", med["runtime_ready_ms"]),
            "a fresh runtime under bwrap -> READY" if boxed else "a fresh runtime -> READY", None,
            f"median of {len(ready_ms)}, max {max(ready_ms):.1f} ms; the zygote's fork (until the instance is"
            f" confined) {median(zygote['fork_ms']):.1f} ms, its steps (ms after the request): "
            + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
            + f"; zygote start (interpreter, runtime import, self-test) {zygote['zygote_start_ms']:.0f} ms"))

    bench.log(f"cold start: deploy -> first response, {n} new functions; scale-from-zero, {nf} wake-ups")
    with bench.stack("cold") as stack:
        # the first deploy on a fresh stack pays one-time costs (directories, first connections)
        first = deploy_to_first_response(bench, stack, f"coldwarm-{secrets.token_hex(2)}")
        runs = [deploy_to_first_response(bench, stack, f"cold{i}-{secrets.token_hex(2)}") for i in range(n)]
        wakes = scale_from_zero(bench, stack, nf)
    raw["first_deploy_on_fresh_stack_ms"] = round(first["first_response_s"] * 1000, 3)
    raw["deploy_to_first_response_ms"] = _ms([r["first_response_s"] for r in runs])
    raw["put_ms"] = _ms([r["put_s"] for r in runs])
    raw["failed_posts"] = [r["failed_posts"] for r in runs]
    total = [r["first_response_s"] for r in runs]
    failed = sum(r["failed_posts"] for r in runs)
    result.rows.insert(0, Row(
        NAME, "cold start: deploy (PUT) -> first response", "ms", median(total) * 1000, floor_ms, FLOOR_LABEL, None,
        f"median of {n} new functions, max {max(total) * 1000:.1f} ms; PUT alone {median(raw['put_ms']):.1f} ms;"
        f" runtime -> READY under bwrap {med.get('runtime_ready_bwrap_ms', med['runtime_ready_ms']):.1f} ms;"
        f" floor: median of {nf}; first deploy on a fresh stack {raw['first_deploy_on_fresh_stack_ms']:.1f} ms;"
        f" sandbox: {sandbox}" + (f"; {failed} POSTs failed before the first 200" if failed else ""),
        errors=failed,
    ))
    raw["scale_from_zero"] = wakes
    totals = [w["total_ms"] for w in wakes]
    hops = [w["hops_ms"] for w in wakes if "hops_ms" in w]
    hop_note = ("; hops (median ms): " + ", ".join(
        f"{k.replace('_', ' ')} {median([h[k] for h in hops]):.1f}" for k in hops[0])) if hops else (
        "; started cold (no zygote: see the deployer log)")
    not_cold = sum(1 for w in wakes if not w["cold_header"])
    result.rows.insert(1, Row(
        NAME, "cold start: scale-from-zero -> first response", "ms", median(totals), floor_ms, FLOOR_LABEL,
        Target("< 20 ms", "<", 20.0),
        f"median of {len(totals)} wake-ups of one no-op (minReplicas 0), max {max(totals):.1f} ms{hop_note}"
        f"; {len(hops)} forked by the zygote" + (f"; {not_cold} not marked as cold starts" if not_cold else ""),
        errors=not_cold,
    ))
