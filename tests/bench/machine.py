"""What the report says about the machine: CPU, memory, versions, and how busy it was."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PYTHON = sys.executable  # the venv's interpreter, which runs the services and instances too


def _first(pattern: str, text: str, default: str = "unknown") -> str:
    m = re.search(pattern, text, re.M)
    return m.group(1).strip() if m else default


def _version_of(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else "unknown"


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_busy_seconds() -> float:
    """CPU seconds all cores have spent running processes (user, nice, system) since boot.

    Interrupt and softirq time is left out: loopback traffic is processed there and
    belongs to no process, so it would count the benchmark's own work as someone else's.
    """
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    return (fields[0] + fields[1] + fields[2]) / _CLK_TCK


def cpu_busy(sample_s: float = 1.0) -> float:
    """The share of all cores busy over ``sample_s`` (anything running: other sessions' tests too)."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = read()
        time.sleep(sample_s)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def load_snapshot() -> dict[str, Any]:
    return {"loadavg": [round(v, 2) for v in os.getloadavg()], "cpu_busy": round(cpu_busy(), 3)}


def machine_info() -> dict[str, Any]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        mem_kib = int(_first(r"^MemTotal:\s+(\d+)", meminfo, "0"))
    except (OSError, ValueError):
        mem_kib = 0
    versions: dict[str, str] = {}
    for module in ("uvicorn", "uvloop", "httptools", "fastapi", "starlette", "zmq", "msgpack", "celery", "kombu",
                   "redis"):
        try:
            mod = __import__(module)
            versions[module] = str(getattr(mod, "__version__", "?"))
        except ImportError:
            versions[module] = "not installed"
    try:
        import zmq

        versions["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    return {
        "cpu_model": _first(r"^model name\s*:\s*(.+)$", cpuinfo),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "python_executable": PYTHON,
        "kernel": platform.release(),
        "os": _first(r'^PRETTY_NAME="?([^"\n]+)"?', Path("/etc/os-release").read_text()
                     if Path("/etc/os-release").exists() else ""),
        "wrk": _version_of(["wrk", "--version"]).split(" Copyright")[0] if shutil.which("wrk") else "not installed",
        "bwrap": _version_of(["bwrap", "--version"]) if shutil.which("bwrap") else "not installed",
        "redis_server": (_version_of(["redis-server", "--version"]).split(" sha=")[0]
                         if shutil.which("redis-server") else "not installed"),
        "packages": versions,
    }
