"""Scenario: async throughput, nuclide's ZeroMQ ingress vs Celery with a real redis-server (issue 6 item 2).

nuclide: a stack (tests/stack.py) with the no-op function deployed; N invoke
messages are PUSHed to the gateway's PULL ingress (``tests/load/send.py``, each
with a call id of ours) as fast as ZeroMQ takes them, and the clock stops when
the store holds all N as DONE with their result: a read-only query of the
store's SQLite database (WAL mode, so reading never blocks the store), polled
every few milliseconds, cheaply while calls are still open. A sample is then
checked through the API (``GET /calls/{id}``: DONE, result "ok").

Celery: a ``redis-server`` of our own on a free loopback port (no persistence:
``--save '' --appendonly no``) as broker and result backend, a worker with 2
prefork processes running the same handler (``tests/bench/celery_app.py``),
and a client process that calls ``delay()`` N times and then ``get()`` on every
result (``tests/bench/celery_client.py``); the clock runs from the first
``delay()`` to the last ``get()``.

Both sides are warmed up first (a tenth of N, at least 50 calls, made and
awaited), and a run that other work on the machine disturbed (over 10 % of the
CPUs) is measured again, like the sync points. CPU time of every process on
each side is read over the measured run, divided by the calls.

nuclide on PostgreSQL: the same, with the store on a throw-away PostgreSQL server of our own
(``tests/pg_util.py``: initdb + pg_ctl, fsync on, so a call is on disk when acknowledged, as on
SQLite), watched by the same queries through psycopg. It has its own row, against Celery and
against nuclide on SQLite measured in the same run; PostgreSQL missing marks that row skipped.

Celery, its Redis client or redis-server missing is not an error: nuclide is
still measured and the comparison row is marked skipped, with what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import secrets
import select
import shutil
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from tests.bench.apps import NOOP_SOURCE
from tests.bench.harness import PYTHON, ROOT, SERVER_START_TIMEOUT_S, Bench
from tests.bench.machine import cpu_busy_seconds
from tests.bench.model import SKIPPED, Row, ScenarioResult, Target
from tests.bench.procs import cpu_seconds, descendants
from tests.bench.registry import scenario
from tests.bench.sync_invoke import CORES, OTHER_LOAD_FLAG, runtime_pid
from tests.load import send
from tests.stack import Stack, free_port, function_yaml

NAME = "async_throughput"
METRIC = "async: calls durable and done per second"
CELERY_WORKERS = 2  # prefork processes running the handler
CELERY = f"Celery + Redis ({CELERY_WORKERS} prefork workers)"
TARGET = Target(">= 5x Celery+Redis", ">=", 5.0, "ratio")
FUNCTION = "async-noop"
POLL_S = 0.005  # between looks at the store while calls are open
MIN_WINDOW_S = 0.5  # others' CPU share over a shorter run is clock-tick noise (/proc/stat counts 10 ms ticks)
INSTALL_HINT = {
    "celery": "the Python packages celery and redis: .venv/bin/pip install -e '.[bench]'",
    "redis-server": "redis-server: apt-get install redis-server",
}


def baseline_missing() -> str:
    """Why the Celery baseline cannot run here ('' when it can): what is missing and how to install it."""
    missing = []
    if importlib.util.find_spec("celery") is None or importlib.util.find_spec("redis") is None:
        missing.append(INSTALL_HINT["celery"])
    if shutil.which("redis-server") is None:
        missing.append(INSTALL_HINT["redis-server"])
    if not missing:
        return ""
    return "the Celery + Redis baseline is not installed here: " + "; ".join(missing)


def warmup_count(n: int) -> int:
    return min(n, max(50, n // 10))


def deadline_s(n: int) -> float:
    """How long one run of n calls may take, either side, before it counts as failed."""
    return 30.0 + n / 50.0


# ----- a measured run --------------------------------------------------------------------------


class Run:
    """One measured run: calls, wall time, CPU seconds per process, others' share of the machine."""

    def __init__(self, count: int, total_s: float, send_s: float, cpu_s: dict[str, float],
                 other_share: float | None, extra: dict[str, Any] | None = None) -> None:
        self.count = count
        self.total_s = total_s
        self.send_s = send_s
        self.cpu_s = cpu_s
        self.other_share = other_share  # None: the run was too short to tell
        self.extra = extra or {}

    @property
    def disturbed(self) -> bool:
        return self.other_share is not None and self.other_share > OTHER_LOAD_FLAG

    @property
    def rate(self) -> float:
        return self.count / self.total_s

    def cpu_us(self) -> dict[str, float]:
        return {who: s * 1e6 / self.count for who, s in self.cpu_s.items()}

    def to_json(self) -> dict[str, Any]:
        return {"calls": self.count, "calls_per_s": round(self.rate, 1), "total_s": round(self.total_s, 4),
                "send_s": round(self.send_s, 4),
                "cpu_us_per_call": {k: round(v, 1) for k, v in self.cpu_us().items()},
                "other_cpu_share": None if self.other_share is None else round(self.other_share, 3), **self.extra}


class Meter:
    """CPU of the given processes, of a client, and of the whole machine, between start() and stop()."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids

    def _cpu(self) -> dict[str, float]:
        return {who: sum(cpu_seconds(p) or 0.0 for p in pids) for who, pids in self.pids.items()}

    def start(self) -> None:
        self.cpu0 = self._cpu()
        self.busy0 = cpu_busy_seconds()
        self.t0 = time.monotonic()

    def stop(self, client_cpu_s: float) -> tuple[dict[str, float], float | None]:
        cpu1 = self._cpu()
        wall = time.monotonic() - self.t0
        busy = cpu_busy_seconds() - self.busy0
        cpu = {who: cpu1[who] - self.cpu0[who] for who in self.pids}
        cpu["client"] = client_cpu_s
        if wall < MIN_WINDOW_S:
            return cpu, None
        return cpu, max(0.0, busy - sum(cpu.values())) / (wall * CORES)


def measured(bench: Bench, label: str, once: Any) -> tuple[Run, list[Run]]:
    """Run ``once()`` until it was not disturbed (at most 1 + retries times); the least disturbed run and all."""
    attempts: list[Run] = []
    while True:
        run = once()
        attempts.append(run)
        bench.log(f"async {label:>8}: {run.count} calls in {run.total_s:.3f} s = {run.rate:,.0f} calls/s (sent in"
                  f" {run.send_s:.3f} s); CPU/call "
                  + " + ".join(f"{who} {v:.0f}" for who, v in run.cpu_us().items() if v >= 0.5)
                  + (f" us; others used {run.other_share * 100:.0f} % of the CPUs" if run.other_share is not None
                     else " us (too short to tell how busy the machine was)"))
        if not run.disturbed or len(attempts) > bench.options.retries:
            break
        bench.log(f"async {label:>8}: disturbed, measuring again")
    return min(attempts, key=lambda r: r.other_share or 0.0), attempts


# ----- nuclide -------------------------------------------------------------------------------------


class StoreWatch:
    """Read-only looks at the store's database: SQLite (WAL: readers never block the store's writes) or PostgreSQL."""

    def __init__(self, path: Path, database_url: str = "") -> None:
        if database_url:
            import psycopg

            from services.store.pg import pg_sql

            self.conn = _PgReader(psycopg.connect(database_url, autocommit=True), pg_sql)
            return
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout=1000")

    def open_calls(self) -> int:
        """Calls not final yet, any (an index-only count: cheap while few are open)."""
        return self.conn.execute("SELECT COUNT(*) FROM calls WHERE status IN ('PENDING', 'RUNNING')").fetchone()[0]

    def statuses(self, run: str) -> dict[str, int]:
        """This run's calls (ids ``{run}-NNNNNNN``) by status."""
        rows = self.conn.execute("SELECT status, COUNT(*) FROM calls WHERE id >= ? AND id < ? GROUP BY status",
                                 (f"{run}-", f"{run}.")).fetchall()
        return {status: n for status, n in rows}

    def done_with_result(self, run: str, result: bytes) -> tuple[int, float | None]:
        """DONE calls of the run whose stored result is ``result``, and the last finished_at among them."""
        return self.conn.execute(
            "SELECT COUNT(*), MAX(finished_at) FROM calls WHERE id >= ? AND id < ? AND status = 'DONE' AND result = ?",
            (f"{run}-", f"{run}.", result)).fetchone()

    def close(self) -> None:
        self.conn.close()


class _PgReader:
    """The sqlite3 calls StoreWatch makes, on a psycopg connection (queries in the store's dialect, translated)."""

    def __init__(self, conn: Any, translate: Any) -> None:
        self.conn, self.translate = conn, translate

    def execute(self, sql: str, params: tuple = ()) -> Any:
        return self.conn.execute(self.translate(sql), params)

    def close(self) -> None:
        self.conn.close()


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def nuclide_batch(bench: Bench, stack: Stack, watch: StoreWatch, count: int, meter: Meter | None) -> Run:
    """PUSH ``count`` invoke messages, wait until the store holds them all DONE with their result."""
    run_id = f"bench-{secrets.token_hex(4)}"
    plan = send.Plan(count=count, rate=0.0, duration_s=deadline_s(count))
    if meter is not None:
        meter.start()
    cpu0 = _self_cpu()
    t0 = time.perf_counter()
    wall0 = time.time()
    sent = send.send_push(stack.endpoints["gateway_pull"], FUNCTION, plan, run_id)
    t_sent = time.perf_counter()
    if sent.accepted != count:
        raise RuntimeError(f"only {sent.accepted} of {count} invoke messages were taken by the gateway's ingress"
                           f" ({sent.stopped_by}: {sent.rejected})")
    deadline = t0 + deadline_s(count)
    while True:
        t_look = time.perf_counter()
        if watch.open_calls() == 0:
            by_status = watch.statuses(run_id)
            # all final: a call PUSHed but stored only after the look above is still open here
            if sum(n for status, n in by_status.items() if status in ("DONE", "FAILED", "DEAD")) >= count:
                break
        if t_look > deadline:
            raise RuntimeError(f"after {deadline_s(count):g} s the store holds {watch.statuses(run_id)} of the"
                               f" {count} calls sent")
        time.sleep(POLL_S)
    total = t_look - t0
    client_cpu = _self_cpu() - cpu0
    cpu, other = meter.stop(client_cpu) if meter is not None else ({}, None)
    done, last_finished = watch.done_with_result(run_id, b"ok")
    if done != count:
        raise RuntimeError(f"{count} calls final, but only {done} DONE with the result 'ok': {by_status}")
    # the same seen through the API, for a sample of the ids
    for i in sorted({0, count // 2, count - 1}):
        cid = send.call_id(run_id, i)
        rec = stack.client.get(f"/calls/{cid}").json()
        if rec.get("status") != "DONE" or rec.get("result") != "ok":
            raise RuntimeError(f"GET /calls/{cid} shows {rec}")
    extra = {"records_last_finished_s": round(last_finished - wall0, 4) if last_finished else None}
    return Run(count, total, t_sent - t0, cpu, other, extra)


def measure_nuclide(bench: Bench, raw: dict[str, Any], database_url: str = "", key: str = "nuclide",
                    server_pids: Any = None) -> Run:
    n = bench.options.calls
    with bench.stack("async" if key == "nuclide" else f"async-{key}", {"NUCLIDE_DATABASE_URL": database_url}) as stack:
        stack.deploy(FUNCTION, {"function.yaml": function_yaml(FUNCTION), "main.py": NOOP_SOURCE})
        instances = bench.track_instances(stack)
        if len(instances) != 1:
            raise RuntimeError(f"expected one instance of the no-op function, found {len(instances)}")
        pids = {"gateway": [stack.procs["gateway"].pid], "store": [stack.procs["store"].pid],
                "instance": [runtime_pid(instances[0])],
                **{svc: [proc.pid] for svc, proc in stack.procs.items() if svc not in ("gateway", "store")}}
        if server_pids is not None:  # the database server's processes, once the store is connected
            pids["postgres"] = server_pids()
        watch = StoreWatch(stack.var_dir / "state.db", database_url)
        try:
            w = warmup_count(n)
            warm = nuclide_batch(bench, stack, watch, w, None)
            bench.log(f"async {key:>8}: warm-up of {w} calls took {warm.total_s:.3f} s")
            best, attempts = measured(bench, key, lambda: nuclide_batch(bench, stack, watch, n, Meter(pids)))
        finally:
            watch.close()
    raw[key] = best.to_json()
    raw[f"{key}_warmup_calls"] = w
    if len(attempts) > 1:
        raw[f"{key}_discarded"] = [r.to_json() for r in attempts if r is not best]
    return best


PG_METRIC = "async on PostgreSQL: calls durable and done per second"


def measure_postgres(bench: Bench, raw: dict[str, Any]) -> Run | str:
    """nuclide with its store on a PostgreSQL server of its own (fsync on); the reason instead when none can run."""
    from tests.pg_util import PgCluster, missing_reason

    reason = missing_reason()
    if reason:
        return reason
    cluster = PgCluster(fsync=True).start()
    try:
        return measure_nuclide(bench, raw, cluster.new_database("bench"), key="postgres", server_pids=cluster.pids)
    finally:
        cluster.stop()


# ----- Celery -------------------------------------------------------------------------------------------


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(bench: Bench) -> Iterator[tuple[str, int]]:
    """A redis-server of our own, loopback only, no persistence; yields its URL and pid, always stops it."""
    port = free_port()
    data_dir = bench.work_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = ["redis-server", "--save", "", "--appendonly", "no", "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(data_dir), "--daemonize", "no", "--loglevel", "warning"]
    log_path = bench.work_dir / "redis-server.log"
    proc = bench.procs.spawn(argv, "redis-server", log_path, ROOT)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _redis_ping(port):
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}:"
                                   f" {log_path.read_text(errors='replace')[-1500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING within {SERVER_START_TIMEOUT_S:g} s")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        bench.procs.stop(proc)


@contextlib.contextmanager
def celery_worker(bench: Bench, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    argv = [PYTHON, "-m", "celery", "-A", "tests.bench.celery_app", "worker", "--pool", "prefork",
            "--concurrency", str(CELERY_WORKERS), "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "--hostname", f"bench-{os.getpid()}@127.0.0.1"]
    proc = bench.procs.spawn(argv, "celery worker", bench.work_dir / "celery-worker.log", ROOT, env=env)
    try:
        yield proc
    finally:
        bench.procs.stop(proc)  # SIGTERM to its process group: a warm shutdown of the pool too


class CeleryClient:
    """tests/bench/celery_client.py in a subprocess of its own, driven line by line."""

    def __init__(self, bench: Bench, env: dict[str, str], warmup: int, timeout_s: float) -> None:
        self.log_path = bench.work_dir / "celery-client.log"
        self.timeout_s = timeout_s
        with open(self.log_path, "ab") as err:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "tests.bench.celery_client", "--warmup", str(warmup), "--timeout", str(timeout_s)],
                cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, bufsize=0,
                start_new_session=True)
        bench.procs.record(self.proc.pid, "celery client")
        self.bench = bench

    def read(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            code = self.proc.poll()
            why = f"exited with {code}" if code is not None else f"said nothing within {timeout_s:g} s"
            raise RuntimeError(f"the Celery client {why}: {self.log_path.read_text(errors='replace')[-1500:]}")
        return json.loads(line)

    def run(self, count: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {count}\n".encode())
        return self.read(self.timeout_s + 30)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
        self.bench.procs.stop(self.proc, 5)


def measure_celery(bench: Bench, raw: dict[str, Any]) -> Run:
    n = bench.options.calls
    with redis_server(bench) as (url, redis_pid):
        env = {**os.environ, "NUCLIDE_BENCH_REDIS_URL": url}
        with celery_worker(bench, env) as worker:
            client = CeleryClient(bench, env, warmup_count(n), deadline_s(n))
            try:
                try:
                    hello = client.read(SERVER_START_TIMEOUT_S + deadline_s(warmup_count(n)))
                except RuntimeError as exc:
                    log = (bench.work_dir / "celery-worker.log").read_text(errors="replace")[-1500:]
                    exc.add_note(f"--- celery worker (exit code {worker.poll()}) log, tail ---\n{log}")
                    raise
                bench.log(f"async   celery: worker up and warm-up of {warmup_count(n)} tasks done"
                          f" {hello['warmup_s']:.2f} s after the client started")
                workers = descendants(worker.pid)
                bench.procs.record_tree(worker.pid, "celery worker")
                if len(workers) < CELERY_WORKERS:
                    raise RuntimeError(f"expected {CELERY_WORKERS} prefork processes, found {workers}")
                pids = {"redis-server": [redis_pid], "worker main": [worker.pid], "workers": workers}

                def once() -> Run:
                    meter = Meter(pids)
                    meter.start()
                    out = client.run(n)
                    cpu, other = meter.stop(out["cpu_s"])
                    if out["ok"] != n:
                        raise RuntimeError(f"only {out['ok']} of {n} Celery tasks answered 'ok'")
                    return Run(n, out["total_s"], out["send_s"], cpu, other)

                best, attempts = measured(bench, "celery", once)
            finally:
                client.close()
    raw["celery"] = best.to_json()
    raw["celery_warmup_calls"] = warmup_count(n)
    raw["celery_worker_processes"] = {"prefork": len(workers), "main": 1}
    if len(attempts) > 1:
        raw["celery_discarded"] = [r.to_json() for r in attempts if r is not best]
    return best


# ----- the scenario ----------------------------------------------------------------------------------


def _cpu_note(run: Run) -> str:
    parts = " + ".join(f"{who} {v:.0f}" for who, v in run.cpu_us().items() if v >= 0.5)
    return f"{parts} = {sum(run.cpu_us().values()):.0f} us"


@scenario(NAME, "Async invoke throughput vs Celery + Redis")
def run(bench: Bench, result: ScenarioResult) -> None:
    n = bench.options.calls
    missing = baseline_missing()
    if missing:
        bench.log(f"async: {missing}; measuring nuclide alone, the comparison row is marked skipped")
    nuc = measure_nuclide(bench, result.raw)
    nuc_note = (f"{n:,} calls PUSHed in {nuc.send_s:.2f} s, all DONE with their result in the store after"
                f" {nuc.total_s:.2f} s; CPU per call: nuclide {_cpu_note(nuc)}")
    budget = (f"processes: nuclide runs the handler in 1 instance process (+ gateway and store on the path),"
              f" Celery in {CELERY_WORKERS} prefork processes (+ the worker's main process and redis-server)")
    if missing:
        result.status, result.error = "skipped", missing
        result.raw["skipped"] = missing
        result.rows.append(Row(NAME, METRIC, "calls/s", nuc.rate, None, CELERY, TARGET,
                               _join(f"skipped: {missing}", nuc_note, _disturbed(nuclide=nuc)), status=SKIPPED))
        return
    pg = measure_postgres(bench, result.raw)
    cel = measure_celery(bench, result.raw)
    if isinstance(pg, str):
        result.rows.append(Row(NAME, PG_METRIC, "calls/s", None, cel.rate, CELERY, TARGET, f"skipped: {pg}",
                               status=SKIPPED))
    else:
        result.rows.append(Row(NAME, PG_METRIC, "calls/s", pg.rate, cel.rate, CELERY, TARGET, _join(
            f"{n:,} calls, all DONE with their result in PostgreSQL after {pg.total_s:.2f} s; CPU per call:"
            f" {_cpu_note(pg)}",
            f"nuclide on SQLite in the same run: {nuc.rate:,.0f} calls/s (PostgreSQL / SQLite = {pg.rate / nuc.rate:.2f})",
            "the PostgreSQL server's processes are counted as 'postgres', like redis-server for Celery",
            _disturbed(postgres=pg))))
    result.rows.append(Row(NAME, METRIC, "calls/s", nuc.rate, cel.rate, CELERY, TARGET, _join(
        nuc_note,
        f"Celery: {n:,} delay() in {cel.send_s:.2f} s, last get() after {cel.total_s:.2f} s; CPU per call"
        f" {_cpu_note(cel)}",
        budget,
        "nuclide's calls and results are in SQLite (WAL) on disk, Celery's in a redis-server without persistence",
        _disturbed(nuclide=nuc, celery=cel))))


def _disturbed(**runs: Run) -> str:
    parts = [f"{who} {(r.other_share or 0) * 100:.0f} %" for who, r in runs.items() if r.disturbed]
    return ("DISTURBED: other processes used " + ", ".join(parts) + " of the CPUs meanwhile") if parts else ""


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)
