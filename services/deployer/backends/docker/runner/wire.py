"""The runner as an instance: its calls, each run by a container command on a worker thread.

The link to the gateways (READY, INVOKE -> RESULT, HEARTBEAT, BYE) is ``shared/instanceloop.py``,
the Python runtime's too: what the gateway sees of a runner is what it sees of a warm Python
instance. The calls run on worker threads (one per concurrent call).
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shared.instanceconfig import InstanceConfig
from shared.oncewire import CHECK_ARG, decode_result, encode_invoke
from shared.tracecontext import format_traceparent, span_id
from services.deployer.backends.docker.runner.driver import API_TIMEOUT_S, CallContainers
from services.deployer.backends.docker.runner.results import (
    STDERR_TAIL_CHARS, error_result, input_json, parse_driver_output, python_result, stderr_tail, to_result,
)

PY_TIMEOUT_GRACE_S = 1.0  # a Python call's own timeout answers first; the runner kills the container this much later



def trace_env(header: dict[str, Any]) -> dict[str, str] | None:
    """A registered runtime's command learns its call's W3C trace from its environment: TRACEPARENT (naming the
    call's own span, as a request it makes should send it on) and TRACESTATE; None for a call without a trace."""
    trace_id = header.get("trace_id")
    if not isinstance(trace_id, str):
        return None
    env = {"TRACEPARENT": format_traceparent(trace_id, span_id(str(header.get("call_id", ""))),
                                             int(header.get("trace_flags") or 0))}
    if isinstance(header.get("tracestate"), str):
        env["TRACESTATE"] = header["tracestate"]
    return env

class Runner:
    """One function's instance: INVOKE -> a worker thread runs the call in a container -> RESULT."""

    def __init__(self, config: dict[str, Any], containers: CallContainers) -> None:
        import zmq

        from shared.instanceloop import InstanceLoop

        self.config = config  # the instance config and the runner's own settings (runners.py writes both)
        instance = InstanceConfig.from_dict(config)
        self.fn = instance.functions[0]
        self.containers = containers
        self.instance_id = instance.instance_id
        self.concurrency = max(1, int(config["max_concurrency"]))
        self.timeout_s = float(self.fn.get("timeout_s") or 30.0)
        self.policy = config["warm_start"]
        self.idle: queue.SimpleQueue[str] = queue.SimpleQueue()  # warm containers free for a call
        self.warm: set[str] = set()
        self._warm_lock = threading.Lock()
        self.ctx = zmq.Context()
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="call")
        self.instance_loop = InstanceLoop(self.ctx, instance, {
            "functions": {self.fn["name"]: int(self.fn["version"])},
            "credit": self.concurrency, "concurrency": self.concurrency,
        }, self.execute, self.pool, log=self.log)

    def log(self, message: str, **fields: Any) -> None:
        line = {"ts": round(time.time(), 3), "level": fields.pop("level", "info"), "function": self.fn["name"],
                "message": message, **fields}
        print(json.dumps(line), file=sys.stderr, flush=True)

    def prepare(self) -> None:
        """Warm policies start their first container before READY: a deploy waits for it, calls do not.
        The deployer may hand over one it made ready (``container``: started, the code in place)."""
        given = self.config.get("container")
        if given:
            self.containers.adopt(given)
            with self._warm_lock:
                self.warm.add(given)
            self.idle.put(given)
        elif self.policy != "none":
            self._add_warm()
        if self.containers.python:
            self._check_python()

    def _check_python(self) -> None:
        """Load the Python function once (``once --check``), so a deploy fails as a warm instance's would."""
        argv = (self.containers.fresh_argv if self.policy == "none" else self.containers.warm_argv) + [CHECK_ARG]
        out, err, timed_out = self._run(b"", API_TIMEOUT_S, argv)
        sys.stderr.buffer.write(err)
        sys.stderr.flush()
        result, body = python_result(self.fn["name"], out, err, timed_out, API_TIMEOUT_S, self.containers.memory)
        if result["status"] != 200:
            raise RuntimeError(json.loads(body)["error"]["message"])

    def _add_warm(self) -> None:
        cid = self.containers.start_warm()
        with self._warm_lock:
            self.warm.add(cid)
        self.idle.put(cid)

    def _take_warm(self) -> str:
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            pass
        with self._warm_lock:
            grow = len(self.warm) < self.concurrency
        if grow:
            self._add_warm()
        return self.idle.get(timeout=API_TIMEOUT_S)

    def _drop_warm(self, cid: str) -> None:
        with self._warm_lock:
            self.warm.discard(cid)
        self.containers.remove(cid)

    def _replace_warm(self, cid: str) -> None:
        self._drop_warm(cid)
        if not self.instance_loop.stopping:
            try:
                self._add_warm()
            except Exception as exc:
                self.log("could not start a replacement container", level="error", error=str(exc))

    def execute(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        """One call, on a worker thread; never raises."""
        started = time.perf_counter()
        call_id = header.get("call_id", "")
        deadline_ms = int(header.get("deadline_ms") or 0)
        timeout_s = self.timeout_s
        if deadline_ms:
            timeout_s = max(0.001, min(timeout_s, deadline_ms / 1000 - time.time()))
        if header.get("function") != self.fn["name"]:
            status, ctype, out = error_result(404, "not_found", f"function '{header.get('function')}' is not served here")
        elif self.containers.python:
            return self._execute_python(header, body, timeout_s, started)
        else:
            try:
                outcome = parse_driver_output(*self._run(input_json(body), timeout_s, env=trace_env(header)))
                status, ctype, out = to_result(self.fn["name"], self.containers.run[0], outcome, self.timeout_s,
                                               self.containers.memory)
                if outcome.stderr.strip():
                    self.log("stderr", call_id=call_id, stderr=stderr_tail(outcome.stderr))
            except Exception as exc:  # the engine refused or went away: this call fails, the instance lives
                status, ctype, out = self._engine_failed(exc)
        took_ms = round((time.perf_counter() - started) * 1000, 3)
        if status >= 400:
            self.log("call failed", level="error", call_id=call_id, status=status, error=out[:STDERR_TAIL_CHARS].decode(
                "utf-8", "replace"))
        return {"call_id": call_id, "status": status, "headers": [], "content_type": ctype, "took_ms": took_ms}, out

    def _engine_failed(self, exc: Exception) -> tuple[int, str, bytes]:
        return error_result(503, "unavailable", f"function '{self.fn['name']}': the Docker Engine could not run the call:"
                      f" {type(exc).__name__}: {exc}")

    def _execute_python(self, header: dict[str, Any], body: bytes, timeout_s: float,
                        started: float) -> tuple[dict[str, Any], bytes]:
        """A Python function's call: the once process answers as a warm instance would, its logs go to ours."""
        call_id = header.get("call_id", "")
        try:
            # the process's own alarm answers a timeout (the container lives on); ours is the backstop
            out, err, timed_out = self._run(encode_invoke(header, body), timeout_s + PY_TIMEOUT_GRACE_S)
            sys.stderr.buffer.write(err)
            sys.stderr.flush()
            result, out = python_result(self.fn["name"], out, err, timed_out, self.timeout_s, self.containers.memory)
        except Exception as exc:
            status, ctype, out = self._engine_failed(exc)
            result = {"status": status, "headers": [], "content_type": ctype}
        if "call_id" not in result:  # nothing from the process: the runner's error
            self.log("call failed", level="error", call_id=call_id, status=result["status"],
                     error=out[:STDERR_TAIL_CHARS].decode("utf-8", "replace"))
        return {**result, "call_id": call_id, "took_ms": round((time.perf_counter() - started) * 1000, 3)}, out

    def _answered(self, out: bytes) -> bool:
        """Whether the command reported (else it died or hangs, and a warm container is replaced)."""
        if self.containers.python:
            try:
                decode_result(out)
                return True
            except ValueError:
                return False
        return parse_driver_output(out, b"").exit_code is not None

    def _run(self, data: bytes, timeout_s: float, argv: list[str] | None = None,
             env: dict[str, str] | None = None) -> tuple[bytes, bytes, bool]:
        if self.policy == "none":
            return self.containers.fresh_call(data, timeout_s, argv, env)
        cid = self._take_warm()
        try:
            out, err, timed_out = self.containers.warm_call(cid, data, timeout_s, argv, env)
        except BaseException:
            self._drop_warm(cid)
            raise
        if timed_out or not self._answered(out):
            # the command may still run (docker has no exec kill): the container goes, a new one replaces it,
            # off this call's path so its 504 is not late
            threading.Thread(target=self._replace_warm, args=(cid,), daemon=True).start()
        else:
            self.idle.put(cid)
        return out, err, timed_out

    def run(self) -> int:
        return self.instance_loop.run()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._warm_lock:
            warm = list(self.warm)
            self.warm.clear()
        for cid in warm:
            self.containers.remove(cid)
        self.containers.close()
        self.instance_loop.close(linger_ms=1000)
        self.ctx.term()
