"""The Python instance: its functions loaded, calls served through the instance link until stopped.

The link (READY, INVOKE -> RESULT, HEARTBEAT, BYE) is ``shared/instanceloop.py``, which the Docker
backend's runner uses too. With the default maxConcurrency of 1 the handler runs inline on the loop's
thread, which is the fastest path (no thread hand-off per call). With maxConcurrency > 1, sync
handlers run in a thread pool and async handlers on a loop thread. Exit codes: 0 stopped, 3 the
function failed to load or initialise (the deployer does not retry that version), 1 anything else.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from shared.exits import EXIT_INIT_FAILED
from shared.instanceconfig import InstanceConfig, InvalidInstanceConfig
from shared.instanceloop import InstanceLoop
from services.runtime.executor import (  # noqa: F401 (CallTimeout, Executor, Function, load_functions: re-exported)
    CallTimeout, Executor, Function, load_functions, load_or_report, on_alarm,
)
from services.runtime.context_calls import TaskCaller

PREFETCH = 32  # calls buffered beyond maxConcurrency, so the handler never waits for a round trip
EDGES_EVERY_S = 0.1  # in-process task calls are reported (summed, and the failed ones) at most this often


class TaskCallReports:
    """The in-process task calls an instance reports (summed edges, failed calls), at most every EDGES_EVERY_S."""

    def __init__(self, caller: TaskCaller) -> None:
        self.caller = caller
        self._sent_at = 0.0

    def due(self) -> dict[str, Any] | None:
        if not self.caller.edges_pending:
            return None
        now = time.monotonic()
        if now - self._sent_at < EDGES_EVERY_S:
            return None
        self._sent_at = now
        return self.caller.take_reports()

    def due_in_s(self) -> float | None:
        if not self.caller.edges_pending:
            return None
        return self._sent_at + EDGES_EVERY_S - time.monotonic()


class Runtime(Executor):
    """An instance: its functions, run by :meth:`execute` for the calls :class:`InstanceLoop` takes in."""

    def __init__(self, config: InstanceConfig, functions: dict[str, Function]) -> None:
        super().__init__(config, functions)
        self.instance_loop = InstanceLoop(self.ctx, config, {
            "functions": {f.name: f.version for f in functions.values()},
            # how many INVOKEs may wait here; the gateway only fills it while calls are fast
            "credit": self.max_concurrency + PREFETCH,
            "concurrency": self.max_concurrency,
            "batch": True,  # INVOKEs may come batched (see shared/protocol.py)
        }, self.execute, self._pool, TaskCallReports(self.caller))

    def run(self) -> int:
        signal.signal(signal.SIGALRM, on_alarm)
        return self.instance_loop.run()

    def close(self) -> None:
        self.instance_loop.close(linger_ms=1000)
        super().close()


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else os.environ.get("NUCLIDE_INSTANCE_CONFIG", "")
    if not path:
        print("usage: python -m services.runtime <instance-config.json>", file=sys.stderr)
        return 2
    with open(path) as fh:
        return serve(fh.read())


def serve(config: dict[str, Any] | str) -> int:
    """Load the functions and run until stopped; a cold instance and a zygote-forked one both end here.
    ``config``: the instance config as a map, or as JSON."""
    try:
        instance = InstanceConfig.from_json(config) if isinstance(config, str) else InstanceConfig.from_dict(config)
    except InvalidInstanceConfig as exc:
        print(f"nuclide: {exc}", file=sys.stderr, flush=True)
        return 1
    functions = load_or_report(instance)
    if functions is None:
        return EXIT_INIT_FAILED
    runtime = Runtime(instance, functions)
    try:
        return runtime.run()
    finally:
        runtime.close()
