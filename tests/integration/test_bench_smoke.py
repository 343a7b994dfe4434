"""The benchmark harness keeps working: a --quick run covers every scenario, reports figures, leaves nothing running.

No timing is asserted here (speed is reported by ``make bench``, not tested). The
Celery + Redis baseline of the async scenario may be missing (the ``bench`` extra,
``redis-server``): its row is then reported as skipped with what to install, unless
``NUCLIDE_REQUIRE_BENCH=1`` (CI), where a missing wrk, Celery or redis-server fails. The
run goes through a small wrapper that makes itself a child subreaper, so any
process the benchmark leaves behind (even one orphaned by a service that died) is
reparented to the wrapper and found, instead of vanishing under init.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import async_throughput, wrk
from tests.bench.registry import load_all

pytestmark = pytest.mark.integration


@pytest.fixture
def tmp_path(short_tmp_path: Path) -> Path:
    """The stacks these runs start bind a unix socket below their state directory: keep the path short."""
    return short_tmp_path

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240  # docker_cold_start adds about 25 s where a Docker Engine runs, autoscale_step about 30 s,
# sync_invoke_gateways about 10 s
REQUIRED = os.environ.get("NUCLIDE_REQUIRE_BENCH") == "1"  # CI: a missing tool or baseline fails, never skips
# the scenarios whose rows must carry figures (or, for a baseline missing here, say why they were skipped)
NEW_ROWS = {
    "async_throughput": ["async: calls durable and done per second",
                         "async on PostgreSQL: calls durable and done per second"],
    "sync_invoke_gateways": [f"sync invoke, 64 conn through 2 gateways: {what}"
                             for what in ("throughput", "CPU per request", "p50 latency")],
    "fusion_chain": [f"fusion: {kind} 5-task chain, {pct} latency" for kind in ("fused", "unfused")
                     for pct in ("p50", "p99")],
}

# argv: <report path> <command...>; runs the command, then reports its exit code and every
# descendant still alive afterwards (killing them, so the test itself leaks nothing)
WRAPPER = r"""
import ctypes, json, os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, lambda *a: None)  # a handler, not SIG_IGN: the child must stay killable
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("cannot become a child subreaper")
rc = subprocess.call(sys.argv[2:])
def reap():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return
def children():
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                stat = open(f"/proc/{e}/stat").read().rsplit(")", 1)[1].split()
                cmd = open(f"/proc/{e}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if int(stat[1]) == os.getpid() and stat[0] != "Z":
                out.append({"pid": int(e), "cmd": cmd[:300]})
    return out
deadline = time.monotonic() + 5  # something may be finishing its exit
while True:
    reap()
    left = children()
    if not left or time.monotonic() > deadline:
        break
    time.sleep(0.1)
for p in left:
    try:
        os.killpg(p["pid"], signal.SIGKILL) if os.getpgid(p["pid"]) == p["pid"] else os.kill(p["pid"], signal.SIGKILL)
    except OSError:
        pass
deadline = time.monotonic() + 5  # the killed ones become zombies at once; reap each before reporting
while True:
    reap()
    if not children() or time.monotonic() > deadline:
        break
    time.sleep(0.01)
json.dump({"rc": rc, "leftovers": left}, open(sys.argv[1], "w"))
"""

WRK_REPORT = """\
Running 1s test @ http://127.0.0.1:40000/noop
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     7.51ms    5.14ms  67.53ms   97.90%
    Req/Sec     9.10k     1.31k   12.18k    76.67%
  Latency Distribution
     50%  344.00us
     75%    7.79ms
     90%    1.02s
     99%    2.00m
  27169 requests in 3.00s, 2.90MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 12
Requests/sec:   9045.29
Transfer/sec:      0.97MB
"""


def test_wrk_report_parses_with_its_errors() -> None:
    r = wrk.parse(WRK_REPORT, 64)
    assert (r.requests, r.duration_s, r.rps) == (27169, 3.0, 9045.29)
    assert (r.p50_ms, r.p75_ms, r.p90_ms, r.p99_ms) == pytest.approx((0.344, 7.79, 1020.0, 120_000.0))
    assert r.non_2xx == 12 and r.socket_errors == {"connect": 1, "read": 2, "write": 0, "timeout": 3}
    assert r.errors == 18
    with pytest.raises(wrk.WrkError, match="--latency"):
        wrk.parse("Requests/sec: 1.0\n")


def _numeric(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_quick_bench_reports_every_scenario_and_leaves_nothing_running(tmp_path: Path) -> None:
    if not wrk.available():
        if REQUIRED:
            pytest.fail("wrk is required here (NUCLIDE_REQUIRE_BENCH=1) but missing: apt-get install wrk")
        pytest.skip("wrk (the benchmarks' load generator) is not installed: apt-get install wrk;"
                    " set NUCLIDE_REQUIRE_BENCH=1 to make this a failure")
    missing_baseline = async_throughput.baseline_missing()
    if missing_baseline and REQUIRED:
        pytest.fail(f"NUCLIDE_REQUIRE_BENCH=1, but {missing_baseline}")
    out = tmp_path / "out"
    wrapper_report = tmp_path / "wrapper.json"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # every temp dir of the run is below tmp_path
    cmd = [sys.executable, "-c", WRAPPER, str(wrapper_report),
           sys.executable, "-m", "tests.bench", "--quick", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the benchmark stops what it started on SIGTERM
        try:
            output, _ = proc.communicate(timeout=40)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        pytest.fail(f"the quick benchmark took over {RUN_TIMEOUT_S} s:\n{output[-4000:]}")

    wrapped = json.loads(wrapper_report.read_text())
    assert wrapped["leftovers"] == [], f"processes left running after the benchmark: {wrapped['leftovers']}"
    assert wrapped["rc"] == 0, f"python -m tests.bench --quick exited {wrapped['rc']}:\n{output[-6000:]}"

    docs = list(out.glob("bench-*.json"))
    assert len(docs) == 1, f"expected one JSON result in {out}: {docs}"
    doc = json.loads(docs[0].read_text())
    assert doc["cleanup"]["leftovers"] == []
    scenarios = load_all()
    assert set(doc["scenarios"]) == set(scenarios)
    for name, sc in scenarios.items():
        res = doc["scenarios"][name]
        assert res["rows"], f"{name} reported no rows"
        if sc.is_pending:
            assert res["status"] == "pending"
            assert all(row["status"] == "pending" and row["nuclide"] is None and row["pending_on"]
                       for row in res["rows"]), res["rows"]
            continue
        if res["status"] == "skipped" and name == "docker_cold_start":
            # no Docker Engine here (CI requires one): every row skipped with the reason, no figure invented
            assert os.environ.get("NUCLIDE_REQUIRE_DOCKER") != "1", f"{name} skipped: {res['error']}"
            assert all(row["status"] == "skipped" and row["nuclide"] is None for row in res["rows"]), res["rows"]
            continue
        if res["status"] == "skipped":
            # only a baseline this machine lacks may skip (nuclide's side is still measured), and it says why
            assert name == "async_throughput" and missing_baseline, f"{name} skipped: {res['error']}"
            assert res["error"] == missing_baseline and "not installed" in res["error"], res["error"]
            skipped = [row for row in res["rows"] if row["status"] == "skipped"]
            assert skipped and all(row["notes"].startswith("skipped: ") and row["baseline"] is None
                                   and _numeric(row["nuclide"]) and row["nuclide"] > 0 for row in skipped), skipped
        else:
            assert res["status"] == "ok", f"{name} failed: {res['error']}"
        measured = [row for row in res["rows"] if row["status"] in ("measured", "skipped")]
        assert measured, f"{name} measured nothing"
        for row in measured:
            # a count of failed calls is measured too, and its best figure is 0
            assert _numeric(row["nuclide"]) and (row["nuclide"] > 0 or "failed" in row["metric"]), row
            if row["baseline_label"] and row["status"] == "measured":
                assert _numeric(row["baseline"]) and row["baseline"] > 0 and _numeric(row["ratio"]), row
        for row in res["rows"]:
            if row["status"] not in ("measured", "skipped"):
                assert row["nuclide"] is None, f"{name}: a figure for something not built yet: {row}"
        if name in NEW_ROWS:
            rows = {row["metric"]: row for row in res["rows"]}
            assert sorted(rows) == sorted(NEW_ROWS[name]), rows
            for row in rows.values():
                if row["status"] == "skipped":
                    continue  # checked above: the baseline is missing here, and the row says so
                assert row["status"] == "measured" and row["errors"] == 0, row
                assert _numeric(row["baseline"]) and row["baseline"] > 0 and _numeric(row["ratio"]), row

    text = (out / "BENCHMARKS.md").read_text()
    for row in doc["rows"]:
        assert row["metric"] in text
    assert "## Machine" in text and "## What we tried" in text
    # the report can be written again from the JSON alone, with the same table
    rendered = tmp_path / "rendered"
    subprocess.run([sys.executable, "-m", "tests.bench", "--render", str(docs[0]), "--out", str(rendered)],
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    table = text[text.index("## Results"):text.index("## How these were measured")]
    assert table in (rendered / "BENCHMARKS.md").read_text()

    # belt and braces: nothing anywhere still runs from this run's temporary directories
    stray = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if str(tmp_path).encode() in fh.read():
                        stray.append(int(entry))
            except OSError:
                pass
    assert not stray, f"processes still running from {tmp_path}: {stray}"


def test_missing_wrk_gives_a_clear_message(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no wrk on this PATH
    proc = subprocess.run([sys.executable, "-m", "tests.bench", "--quick", "--only", "sync_invoke", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "apt-get install wrk" in proc.stderr
    assert not list(tmp_path.glob("bench-*.json"))


def test_scenarios_are_registered_once_with_pending_ones_naming_their_issue() -> None:
    scenarios = load_all()
    assert {"sync_invoke", "cold_start", "density", "async_throughput", "fusion_chain"} <= set(scenarios)
    for name in ("async_throughput", "fusion_chain", "scale_to_zero"):
        assert not scenarios[name].is_pending
    assert scenarios["fusion_chain"].needs == ("wrk",)
    for sc in scenarios.values():
        assert not sc.is_pending or sc.pending_on.startswith("issue ")


def test_missing_celery_or_redis_server_names_what_to_install(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    installed = async_throughput.baseline_missing()
    if REQUIRED:
        assert installed == "", f"NUCLIDE_REQUIRE_BENCH=1, but {installed}"
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on this PATH
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "celery" else real_find_spec(name, *a))
    reason = async_throughput.baseline_missing()
    assert reason.startswith("the Celery + Redis baseline is not installed here: ")
    assert "pip install -e '.[bench]'" in reason and "apt-get install redis-server" in reason
