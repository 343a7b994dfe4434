"""Running wrk (the load generator, Debian package ``wrk``) and parsing its ``--latency`` report.

wrk counts a response with a status above 399 as "Non-2xx or 3xx"; the targets
here answer 200 or an error, so that count is the non-2xx count. Socket errors
(connect, read, write, timeout) are failures too. Both are reported as errors
and flag the row they feed; they are never dropped.
"""

from __future__ import annotations

import re
import resource
import shutil
import signal
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MISSING_WRK = ("wrk is not installed: the throughput benchmarks use it as the load generator.\n"
               "  Debian/Ubuntu: apt-get install wrk\n"
               "  (or run only the scenarios that do not need it: python -m tests.bench --only cold_start density)")

_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class WrkError(RuntimeError):
    pass


@dataclass
class WrkResult:
    connections: int
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0  # wrk's own CPU time (user + system), as the kernel accounted it

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "errors": self.errors}


def _ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse(text: str, connections: int = 0) -> WrkResult:
    """Parse wrk's report (run with --latency); raises WrkError when a figure is missing."""
    percentiles: dict[int, float] = {}
    for pct, value, unit in re.findall(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
        percentiles[int(pct)] = _ms(value, unit)
    m_total = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", text, re.M)
    m_rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if m_total is None or m_rps is None or len(percentiles) < 4:
        raise WrkError(f"could not parse wrk's output (was it run with --latency?):\n{text[-1500:]}")
    socket_errors: dict[str, int] = {}
    m_sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m_sock:
        socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, m_sock.groups())))
    m_status = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    return WrkResult(
        connections=connections,
        requests=int(m_total.group(1)),
        duration_s=float(m_total.group(2)) * _DURATION_UNITS_S[m_total.group(3)],
        rps=float(m_rps.group(1)),
        p50_ms=percentiles[50], p75_ms=percentiles[75], p90_ms=percentiles[90], p99_ms=percentiles[99],
        non_2xx=int(m_status.group(1)) if m_status else 0,
        socket_errors=socket_errors,
    )


def available() -> bool:
    return shutil.which("wrk") is not None


def run(url: str, connections: int, duration_s: int, script: Path, threads: int = 1,
        timeout_s: float = 5.0, log: Path | None = None) -> WrkResult:
    """One wrk run against ``url`` for ``duration_s`` whole seconds (wrk ignores fractions)."""
    if not available():
        raise WrkError(MISSING_WRK)
    argv = ["wrk", "-t", str(max(1, min(threads, connections))), "-c", str(connections),
            "-d", f"{max(1, int(duration_s))}s", "--timeout", f"{timeout_s:g}s", "--latency", "-s", str(script), url]
    # wrk is the only child reaped while it runs, so the children's rusage delta is its CPU time
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=duration_s + timeout_s + 30)
    except subprocess.TimeoutExpired:
        raise WrkError(f"wrk did not finish: {' '.join(argv)}") from None
    finally:
        if proc.poll() is None:  # timed out, or we were interrupted: wrk must not outlive us
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
    if log is not None:
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(argv)}\n{out}\n")
    if proc.returncode != 0:
        raise WrkError(f"wrk exited with {proc.returncode}: {out[-1500:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = parse(out, connections)
    result.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result
