"""What every scenario uses: the options, and the servers and stacks it starts (and always stops).

Baseline servers and nuclide stacks are context managers: whatever happens in
the ``with`` block, the processes are stopped on the way out (see ``procs.py``
for how, and for the final sweep that reports anything left running).
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

from tests.bench.procs import Processes, wait_exit
from tests.stack import Stack, free_port

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # the venv's interpreter: the services and their instances run on it too

SERVER_START_TIMEOUT_S = 30.0
INSTANCE_EXIT_TIMEOUT_S = 20.0  # how long stopped instances may take to drain and exit


@dataclass
class Options:
    quick: bool = False
    duration_s: int = 5  # per measured point (wrk only takes whole seconds)
    warmup_s: int = 2
    concurrency: tuple[int, ...] = (1, 64)
    functions: int = 100  # density: functions deployed, one warm instance each
    repeats: int = 5  # cold start: repetitions of each measurement
    calls: int = 5000  # async throughput: calls per measured run (nuclide and Celery alike)
    wrk_threads: int = 1  # a second wrk thread would take the second of the 2 cores from the server
    retries: int = 2  # measurements of a throughput point that other work disturbed, again
    only: tuple[str, ...] = ()
    out: Path | None = None
    keep: bool = False
    render: Path | None = None  # re-render this JSON's markdown instead of measuring

    @classmethod
    def quick_defaults(cls) -> "Options":
        return cls(quick=True, duration_s=1, warmup_s=1, functions=5, repeats=2, calls=300, retries=0)

    def to_json(self) -> dict[str, Any]:
        return {"quick": self.quick, "duration_s": self.duration_s, "warmup_s": self.warmup_s,
                "concurrency": list(self.concurrency), "functions": self.functions, "repeats": self.repeats,
                "calls": self.calls,
                "wrk_threads": self.wrk_threads, "retries": self.retries, "only": list(self.only)}


# ----- the run ---------------------------------------------------------------------------


@dataclass
class Bench:
    options: Options
    work_dir: Path
    procs: Processes = field(default_factory=Processes)
    started_at: float = field(default_factory=time.monotonic)
    _wrk_script: Path | None = None

    def log(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self.started_at:6.1f}s] {message}", file=sys.stderr, flush=True)

    def post_script(self) -> Path:
        """wrk sends GET unless a Lua script says otherwise; an empty POST body (Content-Length: 0)."""
        if self._wrk_script is None:
            self._wrk_script = self.work_dir / "post.lua"
            self._wrk_script.write_text('wrk.method = "POST"\nwrk.body = ""\n'
                                        'wrk.headers["Content-Type"] = "text/plain"\n')
        return self._wrk_script

    # ----- baseline servers ---------------------------------------------------------------

    @contextlib.contextmanager
    def uvicorn(self, name: str, app: str, probe_path: str = "/noop") -> Iterator[tuple[str, int]]:
        """Serve ``app`` (module:attribute) under uvicorn, configured as nuclide's gateway configures it.

        Yields the base URL and the server's pid.
        """
        port = free_port()
        argv = [PYTHON, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
                "--loop", "uvloop", "--http", "httptools", "--lifespan", "off", "--no-access-log",
                "--log-level", "warning", "--no-server-header", "--no-date-header", "--backlog", "4096"]
        log_path = self.work_dir / f"{name}.log"
        proc = self.procs.spawn(argv, name, log_path, ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} before serving:\n"
                                       f"{log_path.read_text(errors='replace')[-2000:]}")
                try:
                    if httpx.post(url + probe_path, content=b"", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not answer within {SERVER_START_TIMEOUT_S:g} s")
                time.sleep(0.05)
            yield url, proc.pid
        finally:
            self.procs.stop(proc)

    # ----- nuclide -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def stack(self, name: str, env: dict[str, str] | None = None, gateways: int = 1) -> Iterator[Stack]:
        """A real nuclide stack (the services tests/stack.py starts; process backend) on free ports, in a temp var dir."""
        stack = Stack(self.work_dir / name / "var", env, gateways=gateways)
        try:
            stack.start()
            for service, proc in stack.procs.items():
                self.procs.record(proc.pid, f"nuclide {service}")
            yield stack
        except BaseException as exc:
            for service in stack.procs:
                exc.add_note(f"--- {service} log (tail) ---\n{stack.service_log(service)[-1500:]}")
            raise
        finally:
            self.track_instances(stack)
            instances = [p["pid"] for p in self.procs.started if p["what"].startswith(f"instance {name}")]
            try:
                stack.stop()
            except Exception as exc:
                self.log(f"stopping the {name} stack failed: {exc}")
            for proc in stack.procs.values():  # the deployer stops its instances on exit; make sure
                if proc.poll() is None:
                    self.procs.stop(proc)
            left = self.procs.wait_gone(instances, INSTANCE_EXIT_TIMEOUT_S)
            if left:
                self.log(f"{len(left)} instance process(es) outlived the {name} stack, killing them: {left}")
                self.procs.kill(left)

    def track_instances(self, stack: Stack) -> list[int]:
        """Record the instance processes of ``stack`` (the bwrap parents and the runtime inside)."""
        name = stack.var_dir.parent.name
        try:
            pids = stack.instance_pids()
        except (OSError, ValueError, KeyError):
            return []
        for pid in pids:
            self.procs.record_tree(pid, f"instance {name}")
        return pids

    # ----- timing helpers -----------------------------------------------------------------------

    def time_command(self, argv: list[str], what: str, timeout_s: float = 60.0,
                     env: dict[str, str] | None = None, cwd: Path = ROOT) -> float:
        """Wall time in seconds from spawn to exit of a command that must succeed."""
        log_path = self.work_dir / "commands.log"
        t0 = time.perf_counter()
        proc = self.procs.spawn(argv, what, log_path, env=env, cwd=cwd)
        try:
            code = wait_exit(proc, timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{what} did not finish within {timeout_s:g} s") from None
        finally:
            if proc.poll() is None:
                self.procs.stop(proc, 1)
        took = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"{what} exited with {code}: {log_path.read_text(errors='replace')[-1500:]}")
        return took


def median(values: list[float]) -> float:
    return statistics.median(values)



