"""The load generator (python -m tests.load) keeps working: self-contained runs finish with nothing lost.

Timing is not asserted (the load generator reports speed, the tests do not judge it).
Each run gets TMPDIR below a short temporary directory of its own, so a process it left behind would be
found by its command line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.load import main as load_main
from tests.load.report import Sent, Tracked, percentile, render, summarise
from tests.load.send import Plan

pytestmark = pytest.mark.integration


@pytest.fixture
def tmp_path(short_tmp_path: Path) -> Path:
    """The stacks these runs start bind a unix socket below their state directory: keep the path short."""
    return short_tmp_path

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 60


def run_load(tmp_path: Path, *args: str) -> tuple[int, str, str, dict[str, Any]]:
    report = tmp_path / f"load-{len(list(tmp_path.glob('load-*.json')))}.json"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.load", *args, "--json", str(report)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the generator tears its stack down on SIGTERM
        try:
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        pytest.fail(f"python -m tests.load {' '.join(args)} took over {RUN_TIMEOUT_S} s:\n{out}\n{err[-3000:]}")
    doc = json.loads(report.read_text()) if report.exists() else {}
    return proc.returncode, out, err, doc


def reported(text: str, name: str) -> int:
    match = re.search(rf"^\s+{name}\s+(\d+)\b", text, re.MULTILINE)
    assert match, f"no '{name}' line in the report:\n{text}"
    return int(match.group(1))


def leftovers(tmp_path: Path) -> list[int]:
    stray = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if str(tmp_path).encode() in fh.read():
                        stray.append(int(entry))
            except OSError:
                pass
    return stray


@pytest.mark.timeout(RUN_TIMEOUT_S + 40)
def test_self_contained_push_run_loses_nothing(tmp_path: Path) -> None:
    rc, out, err, doc = run_load(tmp_path, "--self-contained", "--mode", "push", "--count", "300", "--rate", "0")
    assert rc == 0, f"exit {rc}:\n{out}\n{err[-3000:]}"
    accepted, completed, lost = (reported(out, n) for n in ("accepted", "completed", "lost"))
    assert accepted == completed == 300 and lost == 0, out
    assert reported(out, "failed") == 0
    assert (doc["accepted"], doc["completed"], doc["lost"]) == (300, 300, 0)
    assert doc["latency_ms"]["p50"] is not None and doc["latency_ms"]["p99"] >= doc["latency_ms"]["p50"]
    assert doc["throughput_per_s"] > 0 and doc["wait_ended_by"] == "all final"
    assert not leftovers(tmp_path), "processes left running after the load run"
    assert not list(tmp_path.glob("nuclide-load-*")), "the self-contained stack's temp dir was left behind"


@pytest.mark.timeout(RUN_TIMEOUT_S + 40)
def test_self_contained_http_run_loses_nothing(tmp_path: Path) -> None:
    rc, out, err, doc = run_load(tmp_path, "--self-contained", "--mode", "http", "--count", "200", "--rate", "400")
    assert rc == 0, f"exit {rc}:\n{out}\n{err[-3000:]}"
    assert reported(out, "accepted") == reported(out, "completed") == 200 and reported(out, "lost") == 0, out
    assert doc["rejected"] == 0 and doc["plan"]["rate"] == 400
    assert not leftovers(tmp_path)


def test_other_hosts_and_unbounded_pub_runs_are_refused(tmp_path: Path) -> None:
    for args, message in (
        (["--url", "http://192.0.2.1:8000", "--function", "f"], "targets this machine only"),
        (["--url", "http://127.0.0.1:1", "--pull", "tcp://example.com:5561", "--function", "f"],
         "refusing --pull tcp://example.com:5561"),
        (["--self-contained", "--mode", "pub", "--count", "5000"], "pub mode counts at most 1000"),
        (["--self-contained", "--function", "f"], "drop --function"),
        (["--count", "5"], "--self-contained"),
    ):
        proc = subprocess.run([sys.executable, "-m", "tests.load", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("error: ") and message in proc.stderr and proc.stderr.count("\n") == 1


# ----- the pieces, without a stack -----------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_plan_stops_at_the_count_or_the_duration_and_keeps_the_rate() -> None:
    clock = Clock()
    assert list(Plan(count=5, rate=0, duration_s=10).ticks(clock, clock.sleep)) == [0, 1, 2, 3, 4]
    clock = Clock()
    ticks = list(Plan(count=1000, rate=10, duration_s=2).ticks(clock, clock.sleep))
    assert ticks == list(range(20)) and clock.now == pytest.approx(1.9)


def test_summary_counts_lost_calls_and_latency_from_the_records() -> None:
    sent = Sent(sent=4, accepted=4, first_send=1_700_000_000.0, last_send=1_700_000_000.1, stopped_by="count",
                ids=["a", "b", "c", "d"])

    def rec(cid: str, status: str, finished: str, attempts: int = 1) -> dict[str, Any]:
        return {"id": cid, "status": status, "attempts": attempts, "error": "boom" if status != "DONE" else None,
                "timings": {"queued": "2023-11-14T22:13:20.000Z", "finished": f"2023-11-14T22:13:{finished}Z"}}

    tracked = Tracked(records={"a": rec("a", "DONE", "20.100"), "b": rec("b", "DONE", "20.300", attempts=2),
                               "c": rec("c", "DEAD", "21.000") | {"status": "DEAD"}},
                      missing=["d"], waited_s=1.0, ended_by="stall")
    plan = {"count": 4, "rate": 0, "duration_s": 60, "wait_s": 10}
    res = summarise("push", "f", "http://127.0.0.1:1", False, plan, sent, tracked)
    assert (res.accepted, res.completed, res.failed, res.lost, res.lost_not_found, res.retried) == (4, 2, 1, 1, 1, 1)
    assert res.latency_ms["p50"] == pytest.approx(100.0) and res.latency_ms["p99"] == pytest.approx(300.0)
    assert res.throughput_per_s == pytest.approx(2 / 0.3, rel=0.01) and res.lost_is_failure
    text = render(res)
    assert re.search(r"^\s+lost\s+1\b", text, re.MULTILINE) and "lost ids    d" in text
    assert not summarise("pub", "f", "u", False, plan, sent, tracked).lost_is_failure  # best effort


def test_loopback_checks() -> None:
    assert load_main.check_url("http://127.0.0.1:8000") and load_main.check_url("http://localhost:1")
    assert load_main.check_url("http://[::1]:8000")
    assert load_main.check_endpoint("tcp://127.0.0.1:5561", "--pull") and load_main.check_endpoint("ipc:///tmp/x", "--pull")
    for url in ("http://10.0.0.1:8000", "http://nuclide.example.com"):
        with pytest.raises(load_main.LoadError, match="targets this machine only"):
            load_main.check_url(url)
    with pytest.raises(load_main.LoadError):
        load_main.check_endpoint("tcp://0.0.0.0:5561", "--pull")
