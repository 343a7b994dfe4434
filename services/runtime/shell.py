"""The shell runner: an instance of a function on a registered runtime, one container command per call.

It speaks the instance protocol to the gateway (READY, INVOKE -> RESULT, HEARTBEAT, BYE) like
``services.runtime.loop``, so routing, async calls, retries and metrics work unchanged, but it
runs on the deployer's host (the runtime image is the user's and may have no Python or ZeroMQ)
and drives the Docker Engine API. Per call, by the function's warm-start policy:

- ``none``: a fresh container of the function's image per call (created, attached, started,
  removed by the engine when it exits);
- ``runtime``: one warm container per concurrent call; each call gets a fresh copy of the code
  (and of what the ``dependencies`` command left next to it), so nothing a call writes is seen by
  the next one, then its ``run`` command is exec'ed;
- ``function``: one warm container per concurrent call with the code already in place (copied
  once at start, like a warm Lambda: files a call writes stay for the next), ``run`` exec'ed.
  Without a ``dependencies`` command no image is built for it (``code_volume``): its containers
  run the runtime's own image and the code is unpacked into their code volume from the version's
  code directory on this host (see ``shell_box``); the deployer may hand over the first one,
  taken from its runtime pool and filled already (``container``).

A Python function (``kind: python``; its image is the docker backend's group image, dependencies and
code) runs the same way with ``services.runtime.once`` as the command: ``none`` starts it as the fresh
container's main process in the image's code directory; ``runtime`` copies the code directory into a
fresh tmpfs directory of a warm container and execs it there (:data:`PY_DRIVER`). It gets the INVOKE
header and body on stdin and answers with the RESULT header and body (see that module), so callers see
what a warm Python instance answers; its stderr (the handler's logs and prints) goes to this log as is.

For registered runtimes a fixed POSIX sh script (:data:`DRIVER`, never built from user input: the run
command arrives as its positional arguments) writes the call's input to ``./input.json``, runs
the command with it on stdin, and prints one status line (exit code, and whether the result is
``output.json``) before the result. The containers get the backend's lockdown (``shell_box``):
read-only root, tmpfs ``/tmp`` and code directory (a tmpfs volume without an image), no
capabilities, no-new-privileges, user 65534, memory, CPU and pids limits, no host mounts. A call
past its timeout fails with 504 and its container is killed (a warm one is replaced). Exit codes:
0 stopped, 3 the warm container could not start.

``python -m services.runtime.shell --spare`` is a runner started ahead of need by the deployer: its
imports done, it reads the path of its config from stdin when a start takes it (:func:`spare_main`).

Longer than most modules because it is one instance program: the pure result mapping (unit
tested), the engine driver and the wire loop, which only make sense together.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from services.runtime import shell_box
from services.runtime.loop import finished_calls
from services.runtime.once import ARGV as ONCE_ARGV, CHECK_ARG, CONFIG_ENV, decode_result, encode_invoke
from services.runtime.shell_box import USER, WARM_MAIN

EXIT_INIT_FAILED = 3
SPARE_ARG = "--spare"  # wait for the config's path on stdin, imports done (see spare_main)
SPARE_MAX_CONCURRENCY = 28  # the connection pool a spare's client is made with (more calls: a client of their own)
RENAME_DELAY_S = 1.0  # a container handed over by the deployer gets the instance's name this much later
SRC_DIR = "/nuclide/src"  # the built code, from which each container's code directory is filled
STDERR_TAIL_CHARS = 2000
MAX_OUTPUT_BYTES = 64 * 1024 * 1024
API_TIMEOUT_S = 60.0
PY_TIMEOUT_GRACE_S = 1.0  # a Python call's own timeout answers first; the runner kills the container this much later

# $1: fresh (empty the code directory and /tmp, copy the code in) or keep; $2: the code directory; then
# the command's argv
PREPARE = r'''
mode=$1; dir=$2; shift 2
if [ "$mode" = fresh ]; then
  rm -rf "$dir"/* "$dir"/.[!.]* "$dir"/..?* /tmp/* /tmp/.[!.]* /tmp/..?* 2>/dev/null
  cp -R "$SRC"/. "$dir"/ || { echo "nuclide: could not copy the code from $SRC into $dir (the image needs sh and cp)" >&2; exit 125; }
fi
cd "$dir" || exit 125
'''
# a Python function's call: the command (services.runtime.once) speaks for itself on stdin and stdout
PY_DRIVER = PREPARE + 'exec "$@"\n'
# a registered runtime's call: prints "<exit code> J|S" and then output.json (J) or the command's stdout (S)
DRIVER = PREPARE + r'''
rm -f output.json
cat > input.json || { echo "nuclide: could not write input.json in $dir" >&2; exit 125; }
"$@" < input.json > /tmp/.nuclide-stdout
code=$?
if [ -f output.json ]; then
  echo "$code J"; cat output.json; cat /tmp/.nuclide-stdout >&2
else
  echo "$code S"; cat /tmp/.nuclide-stdout
fi
rm -f /tmp/.nuclide-stdout
'''
# run once in a new warm container before it takes calls: the function policy's code goes in here
WARM_SETUP = r'''
if [ "$1" = copy ]; then
  cp -R "$SRC"/. "$2"/ || { echo "nuclide: could not copy the code from $SRC into $2 (the image needs sh and cp)" >&2; exit 125; }
fi
'''


# ----- pure: input and result mapping ------------------------------------------------------------


def input_json(body: bytes) -> bytes:
    """The call's input as JSON: the body when it is JSON, else the body as a JSON string (empty: null)."""
    if not body.strip():
        return b"null"
    try:
        json.loads(body)
        return body
    except ValueError:
        return json.dumps(body.decode("utf-8", "replace")).encode()


@dataclass(frozen=True)
class Outcome:
    """What one call's command did, as the driver reported it."""

    exit_code: int | None  # None: no status line (the container died or the driver could not run)
    source: str  # "J": output.json, "S": stdout, "": none
    out: bytes
    stderr: bytes
    timed_out: bool = False


def parse_driver_output(stdout: bytes, stderr: bytes, timed_out: bool = False) -> Outcome:
    line, sep, rest = stdout.partition(b"\n")
    parts = line.split()
    if sep and len(parts) == 2 and parts[0].lstrip(b"-").isdigit() and parts[1] in (b"J", b"S"):
        return Outcome(int(parts[0]), parts[1].decode(), rest, stderr, timed_out)
    return Outcome(None, "", stdout, stderr, timed_out)


def _error(status: int, code: str, message: str, **details: Any) -> tuple[int, str, bytes]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return status, "application/json", json.dumps({"error": body}).encode()


def _tail(data: bytes) -> str:
    return data.decode("utf-8", "replace").strip()[-STDERR_TAIL_CHARS:]


def to_result(function: str, program: str, outcome: Outcome, timeout_s: float,
              memory_bytes: int) -> tuple[int, str, bytes]:
    """(status, content type, body) for an outcome, the way the Python runtime maps handler results."""
    if outcome.timed_out:
        return timed_out_result(function, timeout_s)
    stderr = _tail(outcome.stderr)
    if outcome.exit_code is None:
        return _error(500, "command_failed", f"function '{function}': the container ended before `{program}` reported"
                      f" a result (killed, perhaps for going over its memory limit of {memory_bytes // (1 << 20)} MiB)"
                      + (f": {stderr}" if stderr else ""), stderr=stderr)
    if outcome.exit_code == 125 and not outcome.source:
        return _error(500, "runtime_failed", f"function '{function}': {stderr or 'the call could not be prepared'}")
    if outcome.exit_code != 0:
        killed = (f" (killed: it went over its memory limit of {memory_bytes // (1 << 20)} MiB?)"
                  if outcome.exit_code == 137 else "")
        return _error(500, "command_failed", f"function '{function}': `{program}` exited with code"
                      f" {outcome.exit_code}{killed}" + (f": {stderr}" if stderr else ""),
                      exit_code=outcome.exit_code, stderr=stderr)
    if outcome.source == "J":
        try:
            doc = json.loads(outcome.out)
        except ValueError as exc:
            return _error(500, "bad_output", f"function '{function}': output.json is not JSON ({exc}); write"
                          ' {"output": ...}')
        if not isinstance(doc, dict) or "output" not in doc:
            return _error(500, "bad_output", f"function '{function}': output.json must be an object with an"
                          ' "output" field, e.g. {"output": 42}')
        value = doc["output"]
        if isinstance(value, str):
            return 200, "text/plain; charset=utf-8", value.encode()
        return 200, "application/json", json.dumps(value).encode()
    try:
        json.loads(outcome.out)
        return 200, "application/json", outcome.out
    except ValueError:
        return 200, "text/plain; charset=utf-8", outcome.out


def timed_out_result(function: str, timeout_s: float) -> tuple[int, str, bytes]:
    """The 504 a warm Python instance answers at a call's timeout, word for word."""
    return _error(504, "deadline_exceeded", f"function '{function}' did not finish within its {timeout_s:g} s timeout"
                  " (spec.timeout)", function=function, timeout_s=timeout_s)


def python_result(function: str, stdout: bytes, stderr: bytes, timed_out: bool, timeout_s: float,
                  memory_bytes: int) -> tuple[dict[str, Any], bytes]:
    """The RESULT header and body of a Python function's call from what ``services.runtime.once`` wrote."""
    if not timed_out:
        try:
            result, body = decode_result(stdout)
            if isinstance(result.get("status"), int):
                return result, body
        except ValueError:
            pass
    if timed_out:
        status, ctype, out = timed_out_result(function, timeout_s)
    else:
        lines = stderr.decode("utf-8", "replace").splitlines()
        prefix = "nuclide: function failed to load: "
        loading = next((line[len(prefix):] for line in lines if line.startswith(prefix)), "")
        if loading:
            status, ctype, out = _error(500, "load_failed", f"function '{function}' failed to load: {loading}")
        else:
            status, ctype, out = _error(
                500, "runtime_failed", f"function '{function}': its Python process ended before it returned a result"
                f" (killed, perhaps for going over its memory limit of {memory_bytes // (1 << 20)} MiB)"
                + (f": {_tail(stderr)}" if stderr.strip() else ""))
    return {"status": status, "headers": [], "content_type": ctype}, out


# ----- the Docker Engine side ---------------------------------------------------------------------


def _raw(sock: Any) -> socket.socket:
    return getattr(sock, "_sock", sock)


def exchange(sock: Any, data: bytes, deadline: float) -> tuple[bytes, bytes, bool]:
    """Send ``data`` as stdin, then read the engine's multiplexed stdout/stderr until EOF or the deadline."""
    raw = _raw(sock)
    out, err = bytearray(), bytearray()
    buf = bytearray()
    try:
        raw.settimeout(max(0.001, deadline - time.monotonic()))
        raw.sendall(data)
        raw.shutdown(socket.SHUT_WR)
        while True:
            raw.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = raw.recv(65536)
            if not chunk:
                return bytes(out), bytes(err), False
            buf += chunk
            while len(buf) >= 8:
                stream, size = buf[0], struct.unpack(">I", bytes(buf[4:8]))[0]
                if len(buf) < 8 + size:
                    break
                (err if stream == 2 else out).extend(buf[8:8 + size])
                del buf[:8 + size]
            if len(out) + len(err) > MAX_OUTPUT_BYTES:
                err += b"\nnuclide: output cut at 64 MiB"
                return bytes(out), bytes(err), False
    except (socket.timeout, TimeoutError):
        return bytes(out), bytes(err), True
    finally:
        try:
            raw.close()
        except OSError:
            pass


def engine_client(docker_host: str, max_concurrency: int) -> Any:
    """The runner's Engine API client: a connection per concurrent call, a few for the rest."""
    import docker

    return docker.APIClient(base_url=docker_host, version="auto", timeout=API_TIMEOUT_S,
                            max_pool_size=max_concurrency + 4)


class Containers:
    """Creates and drives the function's containers; every method blocks (run them on worker threads)."""

    def __init__(self, config: dict[str, Any], api: Any = None) -> None:
        self.config = config
        self.api = api if api is not None else engine_client(config["docker_host"], int(config["max_concurrency"]))
        self.image = config["image"]
        self.path = config["path"]
        self.memory = int(config["memory_bytes"])
        self.labels = {"nuclide.namespace": config["namespace"], "nuclide.runner": config["instance_id"],
                       "nuclide.runner_function": config["function"]["name"]}
        self.env = {"HOME": "/tmp", "LANG": "C.UTF-8", "SRC": SRC_DIR, **(config["function"].get("env") or {})}
        self.python = config.get("kind") == "python"
        # no image of the function's: the code goes into each warm container's code volume from here
        self.code_volume = bool(config.get("code_volume"))
        self._code: bytes | None = None
        self.workdir = "/"
        if self.python:
            # the image's code directory is the source; each call runs in a fresh, writable copy at path
            # (the code directory is scratch on every backend)
            python = config["python"]
            src = python["functions"][0]["code_dir"]
            instance = dict(python, functions=[dict(python["functions"][0], code_dir=self.path, max_concurrency=1)])
            self.env.update({"SRC": src, CONFIG_ENV: json.dumps(instance), "PYTHONUNBUFFERED": "1",
                             "PYTHONDONTWRITEBYTECODE": "1", "MALLOC_ARENA_MAX": "2"})
            self.run, self.workdir = list(ONCE_ARGV), src
            self.fresh_argv = self.warm_argv = ["/bin/sh", "-c", PY_DRIVER, "nuclide-driver", "fresh", self.path,
                                                *ONCE_ARGV]
        else:
            self.run = list(config["run"])
            self.fresh_argv = ["/bin/sh", "-c", DRIVER, "nuclide-driver", "fresh", self.path, *self.run]
            self.warm_argv = ["/bin/sh", "-c", DRIVER, "nuclide-driver",
                              "fresh" if config["warm_start"] == "runtime" else "keep", self.path, *self.run]

    def _create(self, argv: list[str], auto_remove: bool, stdin_once: bool) -> str:
        """A container running one of our sh scripts or the once runner (the image's own entrypoint is replaced)."""
        host = shell_box.host_config(self.api, self.path, self.memory, self.config.get("cpu"), auto_remove,
                                     self.code_volume)
        return shell_box.create(self.api, self.image, argv, self.labels, self.env, self.workdir, host, stdin_once)

    def fresh_call(self, data: bytes, timeout_s: float, argv: list[str] | None = None) -> tuple[bytes, bytes, bool]:
        """Policy none: a container of its own for one call; its (stdout, stderr, timed out)."""
        deadline = time.monotonic() + timeout_s
        cid = self._create(argv or self.fresh_argv, auto_remove=True, stdin_once=True)
        timed_out = True
        try:
            sock = self.api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            self.api.start(cid)
            out, err, timed_out = exchange(sock, data, deadline)
        finally:
            if timed_out:  # it may still run, or never started: the engine removes the others itself
                self.remove(cid)
        return out, err, timed_out

    def start_warm(self) -> str:
        """A warm container, running and idle; raises RuntimeError with its output when it does not stay up."""
        mode = "copy" if self.config["warm_start"] == "function" else "none"
        cid = self._create(["/bin/sh", "-c", WARM_MAIN], auto_remove=False, stdin_once=False)
        try:
            self.api.start(cid)
            output = b""
            code: int | None = None
            if self.code_volume:
                if self._code is None:
                    self._code = shell_box.code_tar(self.config["code_dir"])
                shell_box.put_code(self.api, cid, self.path, self._code)
                code = 0
            elif self.api.inspect_container(cid)["State"].get("Running"):
                ex = self.api.exec_create(cid, ["/bin/sh", "-c", WARM_SETUP, "nuclide-setup", mode, self.path],
                                          user=USER, environment=self.env)
                output = self.api.exec_start(ex["Id"]) or b""
                code = self.api.exec_inspect(ex["Id"]).get("ExitCode")
            state = self.api.inspect_container(cid)["State"]
            if not state.get("Running") or code != 0:
                logs = (self.api.logs(cid) + output).decode("utf-8", "replace").strip()
                why = (f"exited at start (exit code {state.get('ExitCode')})" if not state.get("Running")
                       else f"could not be set up (exit code {code})")
                raise RuntimeError(f"the warm container of image {self.image} {why}:"
                                   f" {logs[-STDERR_TAIL_CHARS:] or 'no output'}")
        except BaseException:
            self.remove(cid)
            raise
        return cid

    def warm_call(self, cid: str, data: bytes, timeout_s: float,
                  argv: list[str] | None = None) -> tuple[bytes, bytes, bool]:
        """One call as an exec in a warm container; its (stdout, stderr, timed out)."""
        deadline = time.monotonic() + timeout_s
        ex = self.api.exec_create(cid, argv or self.warm_argv, stdin=True, user=USER, environment=self.env)
        sock = self.api.exec_start(ex["Id"], socket=True)
        return exchange(sock, data, deadline)

    def adopt(self, cid: str) -> None:
        """A warm container the deployer made ready (code in place) becomes one of ours; renamed for ``docker
        ps`` (its labels are the pool's: the deployer's record says whose it is), later: not in a first call's way."""
        import docker.errors

        def rename() -> None:
            try:
                self.api.rename(cid, f"nuclide-{self.config['namespace']}-{self.config['instance_id']}")
            except docker.errors.NotFound:
                pass  # the instance stopped first
            except Exception as exc:  # cosmetic: the container serves either way
                print(f"nuclide: could not rename container {cid[:12]}: {exc}", file=sys.stderr, flush=True)

        timer = threading.Timer(RENAME_DELAY_S, rename)
        timer.daemon = True
        timer.start()

    def remove(self, cid: str) -> None:
        import docker.errors

        try:
            self.api.remove_container(cid, force=True, v=True)  # v: its anonymous code volume goes with it
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: its removal is in progress already
                print(f"nuclide: could not remove container {cid[:12]}: {exc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.api.close()


# ----- the instance --------------------------------------------------------------------------------


class ShellRunner:
    """The instance loop: READY, INVOKE -> a worker thread runs the call -> RESULT; HEARTBEAT; BYE."""

    def __init__(self, config: dict[str, Any], containers: Containers) -> None:
        import zmq

        from shared import protocol

        self.zmq, self.protocol = zmq, protocol
        self.config = config
        self.fn = config["function"]
        self.containers = containers
        self.instance_id = config["instance_id"]
        self.concurrency = max(1, int(config["max_concurrency"]))
        self.timeout_s = float(self.fn.get("timeout_s") or 30.0)
        self.policy = config["warm_start"]
        self.idle: queue.SimpleQueue[str] = queue.SimpleQueue()  # warm containers free for a call
        self.warm: set[str] = set()
        self._warm_lock = threading.Lock()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.ROUTING_ID, self.instance_id.encode())
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        for endpoint in config["gateways"]:
            self.sock.connect(endpoint)
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="call")
        self.done: queue.SimpleQueue[tuple[dict[str, Any], bytes]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.inflight = 0
        self.stopping = False

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
        if not self.stopping:
            try:
                self._add_warm()
            except Exception as exc:
                self.log("could not start a replacement container", level="error", error=str(exc))

    def ready_header(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "group": self.config["group"],
                "group_version": int(self.config["group_version"]),
                "functions": {self.fn["name"]: int(self.fn["version"])},
                "credit": self.concurrency, "concurrency": self.concurrency, "pid": os.getpid()}

    def execute(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        """One call, on a worker thread; never raises."""
        started = time.perf_counter()
        call_id = header.get("call_id", "")
        deadline_ms = int(header.get("deadline_ms") or 0)
        timeout_s = self.timeout_s
        if deadline_ms:
            timeout_s = max(0.001, min(timeout_s, deadline_ms / 1000 - time.time()))
        if header.get("function") != self.fn["name"]:
            status, ctype, out = _error(404, "not_found", f"function '{header.get('function')}' is not served here")
        elif self.containers.python:
            return self._execute_python(header, body, timeout_s, started)
        else:
            try:
                outcome = parse_driver_output(*self._run(input_json(body), timeout_s))
                status, ctype, out = to_result(self.fn["name"], self.containers.run[0], outcome, self.timeout_s,
                                               self.containers.memory)
                if outcome.stderr.strip():
                    self.log("stderr", call_id=call_id, stderr=_tail(outcome.stderr))
            except Exception as exc:  # the engine refused or went away: this call fails, the instance lives
                status, ctype, out = self._engine_failed(exc)
        took_ms = round((time.perf_counter() - started) * 1000, 3)
        if status >= 400:
            self.log("call failed", level="error", call_id=call_id, status=status, error=out[:STDERR_TAIL_CHARS].decode(
                "utf-8", "replace"))
        return {"call_id": call_id, "status": status, "headers": [], "content_type": ctype, "took_ms": took_ms}, out

    def _engine_failed(self, exc: Exception) -> tuple[int, str, bytes]:
        return _error(503, "unavailable", f"function '{self.fn['name']}': the Docker Engine could not run the call:"
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

    def _run(self, data: bytes, timeout_s: float, argv: list[str] | None = None) -> tuple[bytes, bytes, bool]:
        if self.policy == "none":
            return self.containers.fresh_call(data, timeout_s, argv)
        cid = self._take_warm()
        try:
            out, err, timed_out = self.containers.warm_call(cid, data, timeout_s, argv)
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

    def _submit(self, header: dict[str, Any], body: bytes) -> None:
        def run() -> None:
            self.done.put(self.execute(header, body))
            os.write(self._wake_w, b"x")

        self.inflight += 1
        self.pool.submit(run)

    def _send(self, command: bytes, header: dict[str, Any], body: bytes | None = None) -> None:
        frames = self.protocol.encode(command, header) + ([body] if body is not None else [])
        self.sock.send_multipart(frames)

    def run(self) -> int:
        from shared.liveness import BYE_ACK_TIMEOUT_S, DRAIN_TIMEOUT_S, HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS

        zmq, protocol = self.zmq, self.protocol
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        self._send(protocol.READY, self.ready_header())
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        last_heard = last_sent = time.monotonic()
        bye_sent_at = 0.0
        bye_acked = False
        while True:
            if self.stopping and not bye_sent_at:
                self._send(protocol.BYE, {"instance_id": self.instance_id})
                bye_sent_at = time.monotonic()
            if bye_sent_at:
                waited = time.monotonic() - bye_sent_at
                if (self.inflight == 0 and (bye_acked or waited > BYE_ACK_TIMEOUT_S)) or waited > DRAIN_TIMEOUT_S:
                    return 0
            events = dict(poller.poll(100 if bye_sent_at else int(HEARTBEAT_INTERVAL_S * 1000)))
            now = time.monotonic()
            if self._wake_r in events:
                for result, out in finished_calls(self._wake_r, self.done):
                    self.inflight -= 1
                    self._send(protocol.RESULT, result, out)
                    last_sent = now
            if self.sock in events:
                last_heard = now
                while True:
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = protocol.decode(frames)
                    except Exception as exc:
                        self.log("dropped a malformed message", level="warning", error=str(exc))
                        continue
                    if msg.command == protocol.INVOKE:
                        self._submit(msg.header, msg.body)
                    elif msg.command == protocol.BYE:
                        bye_acked = True
            if now - last_sent >= HEARTBEAT_INTERVAL_S and not self.stopping:
                if now - last_heard > HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS:
                    self._send(protocol.READY, self.ready_header())  # the gateway went quiet: announce again
                    last_heard = now
                else:
                    self._send(protocol.HEARTBEAT, self.ready_header())
                last_sent = now

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._warm_lock:
            warm = list(self.warm)
            self.warm.clear()
        for cid in warm:
            self.containers.remove(cid)
        self.containers.close()
        self.sock.close(linger=1000)
        self.ctx.term()


def serve(config: dict[str, Any], api: Any = None) -> int:
    containers = Containers(config, api)
    runner = ShellRunner(config, containers)
    try:
        try:
            runner.prepare()
        except Exception as exc:
            print(f"nuclide: function failed to load: {exc}", file=sys.stderr, flush=True)
            return EXIT_INIT_FAILED
        return runner.run()
    finally:
        runner.close()


def spare_main(docker_host: str) -> int:
    """A spare runner: a runner's imports done, it waits for the path of its config on stdin (the deployer's
    pipe), so a start pays neither the interpreter's start nor the imports. Its output goes to the config's
    ``log_path`` from then on. EOF before a path: the deployer stopped or died; nothing to serve.
    ``docker_host``: its Engine API client is made (and the API version agreed) ahead too."""
    import docker.errors  # noqa: F401 (what Containers and ShellRunner import: loaded before a start needs them)
    import zmq  # noqa: F401

    from shared import liveness, protocol  # noqa: F401

    api = None
    try:
        api = engine_client(docker_host, SPARE_MAX_CONCURRENCY) if docker_host else None
    except Exception as exc:  # the engine is away now: the runner makes its client once it has a config
        print(f"nuclide: spare runner: no Engine API client yet: {exc}", file=sys.stderr, flush=True)
    line = sys.stdin.buffer.readline().strip()
    if not line:
        return 0
    with open(line.decode()) as fh:
        config = json.load(fh)
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = os.open(config["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((null_fd, 0), (log_fd, 1), (log_fd, 2)):
        os.dup2(fd, target)
    os.close(log_fd)
    os.close(null_fd)
    fits = config["docker_host"] == docker_host and int(config["max_concurrency"]) <= SPARE_MAX_CONCURRENCY
    if api is not None and not fits:
        api.close()
        api = None
    return serve(config, api)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[1] == SPARE_ARG:
        return spare_main(argv[2] if len(argv) > 2 else "")
    if len(argv) != 2:
        print(f"usage: python -m services.runtime.shell <runner-config.json> | {SPARE_ARG} [docker-host]",
              file=sys.stderr)
        return 2
    with open(argv[1]) as fh:
        config = json.load(fh)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
