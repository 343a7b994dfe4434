"""The instance's main loop: READY, then INVOKE -> handler -> RESULT, heartbeats, BYE.

A plain blocking ZeroMQ poll loop: with the default maxConcurrency of 1 the
handler runs inline on this thread, which is the fastest path (no thread hand-off
per call). With maxConcurrency > 1, sync handlers run in a thread pool and async
handlers on a loop thread; finished calls are queued and announced through a pipe
that the poll loop watches. Exit codes: 0 stopped, 3 the function failed to load
or initialise (the deployer does not retry that version), 1 anything else.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import threading
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from shared import protocol
from shared.errors import ProtocolError
from shared.liveness import BYE_ACK_TIMEOUT_S, DRAIN_TIMEOUT_S, HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS
from services.runtime import responses
from services.runtime.context import Context, Logger
from services.runtime.event import Event
from services.runtime.handlers import (
    HandlerForm, LoadedHandler, build_args, call_init_context, invoke, load_handler,
)
from services.runtime.calls import CallFailed, Frame, TaskCaller

_get_running_loop = asyncio._get_running_loop  # None outside a running loop, without raising

EXIT_INIT_FAILED = 3
PREFETCH = 32  # calls buffered beyond maxConcurrency, so the handler never waits for a round trip

_RESULT = protocol.RESULT
_MORE = int(zmq.SNDMORE)
_SIG = protocol.SIGNATURE
_packb = protocol.pack_header
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
# a finished call's result waits at most this long for the results of the calls run after it
FLUSH_AFTER_S = 0.0005
EDGES_EVERY_S = 0.1  # in-process task calls are reported (summed) at most this often


class CallTimeout(BaseException):
    """Raised in a handler at its timeout (BaseException: a handler's `except Exception` must not swallow it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise CallTimeout()


class Function:
    """One loaded handler with its context."""

    __slots__ = ("name", "version", "handler", "context", "logger", "needs_session")

    def __init__(self, name: str, version: int, handler: LoadedHandler, context: Context, logger: Logger) -> None:
        self.name = name
        self.version = version
        self.handler = handler
        self.context = context
        self.logger = logger
        self.needs_session = handler.form is HandlerForm.FUSIONIZER


def load_functions(config: dict[str, Any]) -> dict[str, Function]:
    functions: dict[str, Function] = {}
    for fc in config["functions"]:
        if len(config["functions"]) == 1:  # a fused group sets each task's env per call instead
            for key, value in (fc.get("env") or {}).items():
                os.environ[str(key)] = str(value)
        extra = [fc["deps_dir"]] if fc.get("deps_dir") else []
        handler = load_handler(fc["code_dir"], fc["handler"], extra)
        logger = Logger(function=fc["name"])
        context = Context(function_name=fc["name"], version=int(fc["version"]), logger=logger)
        call_init_context(handler, context)
        functions[fc["name"]] = Function(fc["name"], int(fc["version"]), handler, context, logger)
    return functions


def finished_calls(wake_r: int, done: queue.SimpleQueue) -> list[tuple[dict[str, Any], bytes]]:
    """What pool threads finished, once their wake-up pipe fired (the pipe is emptied too)."""
    try:
        os.read(wake_r, 4096)
    except BlockingIOError:
        pass
    finished = []
    while True:
        try:
            finished.append(done.get_nowait())
        except queue.Empty:
            return finished


class Executor:
    """Runs calls of loaded functions (events, timeouts, errors, task calls); no instance socket.

    :class:`Runtime` adds the instance loop; ``services.runtime.once`` runs one call with it alone.
    """

    def __init__(self, config: dict[str, Any], functions: dict[str, Function]) -> None:
        self.config = config
        self.functions = functions
        self.instance_id: str = config["instance_id"]
        self.max_concurrency = max(1, min(int(fc.get("max_concurrency", 1)) for fc in config["functions"]))
        self.ctx = zmq.Context()
        self.caller = TaskCaller(self, list(config["gateways"]))
        self._session: Any = None  # built on first use: importing requests costs ~45 ms of every cold start
        self.envs = {fc["name"]: dict(fc.get("env") or {}) for fc in config["functions"]}
        self.timeouts = {fc["name"]: float(fc.get("timeout_s") or 30.0) for fc in config["functions"]}
        self._fused = len(functions) > 1
        self._with_env = {name for name, env in self.envs.items() if env} if self._fused else set()
        for fn in functions.values():
            fn.context._caller = self.caller
        self.loop = asyncio.new_event_loop()
        self._pool: ThreadPoolExecutor | None = None
        if self.max_concurrency > 1:
            self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="handler")

    def session(self) -> Any:
        if self._session is None:
            from services.runtime.session import GatewaySession

            self._session = GatewaySession(self.config.get("fusionizer_host", "127.0.0.1"),
                                           self.config.get("gateway_url", ""), self.caller)
        return self._session

    # ----- calls ---------------------------------------------------------------------

    def execute(self, header: dict[str, Any], body: bytes,
                loop: asyncio.AbstractEventLoop | None = None) -> tuple[dict[str, Any], bytes]:
        """Run one call and build its RESULT header and body; never raises.

        ``loop`` runs async handlers; None gives each pool thread a loop of its own.
        """
        started = time.perf_counter()
        try:
            status, hdrs, ctype, out = self._run(header, body, loop)
        except CallTimeout:  # the alarm fired in the instant between the handler's return and its cancel
            signal.setitimer(signal.ITIMER_REAL, 0)
            status, hdrs, ctype, out = 504, [], "application/json", json.dumps(
                {"error": {"code": "deadline_exceeded", "message": "the call reached its timeout"}}).encode()
        return {
            "call_id": header.get("call_id", ""),
            "status": status,
            "headers": hdrs,
            "content_type": ctype,
            "took_ms": round((time.perf_counter() - started) * 1000, 3),
        }, out

    def execute_local(self, fn: Function, frame: Frame, event: Event) -> tuple[int, list, str, bytes]:
        """A task call served in-process; the callee's context is restored afterwards (it may be re-entered)."""
        ctx = fn.context
        saved = (ctx._call_id, ctx._deadline_ms, fn.logger.call_id)
        try:
            if _get_running_loop() is None:
                return self._call(fn, frame, event, None, b"", self.loop)
            if fn.handler.is_async:
                # a sync context.call from inside an async handler: the callee's coroutine
                # cannot run on the busy loop of this thread, so it gets a thread of its own
                box: list[Any] = []
                worker = threading.Thread(target=lambda: box.append(self._call(fn, frame, event, None, b"", None)))
                worker.start()
                worker.join()
                return box[0]
            return self._call(fn, frame, event, None, b"", None)
        finally:
            ctx._call_id, ctx._deadline_ms, fn.logger.call_id = saved

    def _run(self, header: dict[str, Any], body: bytes,
             loop: asyncio.AbstractEventLoop | None) -> tuple[int, list, str, bytes]:
        """One INVOKE's call: its function, its alarm, then :meth:`_call`."""
        fn = self.functions.get(header.get("function", ""))
        if fn is None:
            return 404, [], "application/json", json.dumps(
                {"error": {"code": "not_found", "message": f"function '{header.get('function')}' is not served here"}}
            ).encode()
        deadline_ms = int(header.get("deadline_ms") or 0)
        # the outermost call on the main thread gets an alarm at its timeout; pool threads and nested
        # calls rely on it or on the gateway's deadline (signals only reach the main thread)
        timer_s = 0.0
        if self._pool is None and self.caller.current() is None:
            limit_s = float(self.timeouts.get(fn.name, 30.0))
            remaining_s = deadline_ms / 1000 - time.time() if deadline_ms else limit_s
            timer_s = max(0.001, min(limit_s, remaining_s))
            signal.setitimer(signal.ITIMER_REAL, timer_s)
        frame = Frame(header.get("call_id", ""), fn.name, int(header.get("depth") or 0),
                      list(header.get("chain") or [fn.name]), deadline_ms)
        try:
            return self._call(fn, frame, None, header, body, loop)
        finally:
            if timer_s:
                signal.setitimer(signal.ITIMER_REAL, 0)

    def _call(self, fn: Function, frame: Frame, event: Event | None, header: dict[str, Any] | None, body: bytes,
              loop: asyncio.AbstractEventLoop | None) -> tuple[int, list, str, bytes]:
        """Run ``fn`` for one call (``event``, or the one ``header`` and ``body`` describe); never raises but CallTimeout."""
        stack = self.caller.stack()
        stack.append(frame)
        restore_env = self._apply_env(fn) if fn.name in self._with_env else None
        try:
            fn.context._begin(frame.call_id, frame.deadline_ms)
            if event is None:
                event = Event.from_invoke(header or {}, body)
            session = self.session() if fn.needs_session else None
            if event.mode == "execute":
                args = build_args(fn.handler, fn.context, event, session, event.raw_body.decode("utf-8", "replace"))
                return responses.execute_result(invoke(fn.handler, args, loop))
            args = build_args(fn.handler, fn.context, event, session, None)
            return responses.to_result(invoke(fn.handler, args, loop))
        except CallTimeout:
            if stack[0] is not frame:
                raise  # the outermost call answers the timeout
            limit = self.timeouts.get(fn.name, 30.0)
            message = f"function '{fn.name}' did not finish within its {limit:g} s timeout (spec.timeout)"
            fn.logger.error(message)
            return 504, [], "application/json", json.dumps(
                {"error": {"code": "deadline_exceeded", "message": message,
                           "details": {"function": fn.name, "timeout_s": limit}}}).encode()
        except MemoryError:
            limit_mib = int(self.config.get("memory_bytes") or 0) // (1024 * 1024)
            message = (f"function '{fn.name}' ran out of memory: it is limited to {limit_mib} MiB"
                       " (spec.resources.limits.memory)")
            fn.logger.error(message)
            return 500, [], "application/json", json.dumps({"error": {"code": "memory_limit", "message": message}}).encode()
        except CallFailed as exc:
            # a failed task call the handler did not catch: answer as the callee did
            fn.logger.error("task call failed", callee=exc.function, status=exc.status, error=exc.message)
            status = exc.status if exc.status in (404, 504, 508) else 500
            return status, [], "application/json", json.dumps(
                {"error": {"code": "task_call_failed", "message": f"call to '{exc.function}' failed: {exc.message}"}}
            ).encode()
        except Exception as exc:
            fn.logger.error("handler raised", error=f"{type(exc).__name__}: {exc}",
                            traceback=traceback.format_exc(limit=20))
            return responses.error_result(exc)
        finally:
            if restore_env is not None:
                restore_env()
            stack.pop()

    def _apply_env(self, fn: Function) -> Any:
        """In a fused group each task runs with its own env; returns the undo."""
        env = self.envs.get(fn.name) or {}
        if not env:
            return None
        previous = {k: os.environ.get(k) for k in env}
        os.environ.update(env)

        def restore() -> None:
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

        return restore

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.caller.close()
        self.ctx.term()


class Runtime(Executor):
    """An instance: READY, INVOKE -> :meth:`execute` -> RESULT, heartbeats, BYE."""

    def __init__(self, config: dict[str, Any], functions: dict[str, Function]) -> None:
        super().__init__(config, functions)
        # how many INVOKEs may wait here; the gateway only fills it while calls are fast
        self.credit = self.max_concurrency + PREFETCH
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.ROUTING_ID, self.instance_id.encode())
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        for endpoint in config["gateways"]:
            self.sock.connect(endpoint)
        self.stopping = False
        self.bye_acked = False
        self.inflight = 0
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._edges_sent = 0.0

    def ready_header(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "group": self.config["group"],
            "group_version": int(self.config["group_version"]),
            "functions": {f.name: f.version for f in self.functions.values()},
            "credit": self.credit,
            "concurrency": self.max_concurrency,
            "pid": os.getpid(),
            "batch": True,  # INVOKEs may come batched (see shared/protocol.py)
        }

    def _finish_later(self, header: dict[str, Any], body: bytes) -> None:
        assert self._pool is not None

        def run() -> None:
            self._done.put(self.execute(header, body, None))
            os.write(self._wake_w, b"x")

        self._pool.submit(run)

    def due_edges(self) -> list[list[Any]] | None:
        """The in-process calls to report now, if any are waiting and the last report is EDGES_EVERY_S old."""
        if not self.caller.edges_pending:
            return None
        now = time.monotonic()
        if now - self._edges_sent < EDGES_EVERY_S:
            return None
        self._edges_sent = now
        return self.caller.take_edges()

    def attach_edges(self, header: dict[str, Any]) -> bool:
        """Put the due in-process call edges (if any) into an outgoing header; whether there were some."""
        edges = self.due_edges() if self.caller.edges_pending else None
        if edges:
            header["edges"] = edges
            return True
        return False

    def send_result(self, result: dict[str, Any], body: bytes) -> None:
        self.attach_edges(result)
        send = self.sock.send
        send(_SIG, _MORE)
        send(_RESULT, _MORE)
        send(_packb(result), _MORE)
        send(body, 0)

    def send_results(self, results: list[dict[str, Any]], bodies: list[bytes]) -> None:
        """Send finished calls, several in one batched RESULT (one ZeroMQ message instead of n)."""
        if len(results) == 1:
            self.send_result(results[0], bodies[0])
        else:
            outer: dict[str, Any] = {"batch": results}
            self.attach_edges(outer)
            send = self.sock.send
            send(_SIG, _MORE)
            send(_RESULT, _MORE)
            send(_packb(outer), _MORE)
            last = len(bodies) - 1
            for i, body in enumerate(bodies):
                send(body, _MORE if i < last else 0)
        results.clear()
        bodies.clear()

    # ----- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGALRM, _on_alarm)
        sock = self.sock
        sock.send_multipart(protocol.encode(protocol.READY, self.ready_header()))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        interval_ms = int(HEARTBEAT_INTERVAL_S * 1000)
        last_heard = last_sent = time.monotonic()
        bye_sent_at = 0.0
        inline = self._pool is None
        results: list[dict[str, Any]] = []
        bodies: list[bytes] = []
        while True:
            if self.stopping and not bye_sent_at:
                sock.send_multipart(protocol.encode(protocol.BYE, {"instance_id": self.instance_id}))
                bye_sent_at = time.monotonic()
            if bye_sent_at:
                waited = time.monotonic() - bye_sent_at
                if self.inflight == 0 and (self.bye_acked or waited > BYE_ACK_TIMEOUT_S):
                    return 0
                if waited > DRAIN_TIMEOUT_S:
                    return 0
            timeout_ms = 100 if bye_sent_at else interval_ms
            if self.caller.edges_pending:  # report them within EDGES_EVERY_S even if no call follows
                due_ms = (self._edges_sent + EDGES_EVERY_S - time.monotonic()) * 1000
                timeout_ms = max(0, min(timeout_ms, int(due_ms) + 1))
            events = dict(poller.poll(timeout_ms))
            now = time.monotonic()
            if self._wake_r in events:
                for result, out in finished_calls(self._wake_r, self._done):
                    self.inflight -= 1
                    results.append(result)
                    bodies.append(out)
                    if len(results) >= protocol.MAX_BATCH:
                        self.send_results(results, bodies)
                if results:
                    self.send_results(results, bodies)
                    last_sent = now
            if sock in events:
                last_heard = now
                # drain what is queued; results of a burst of fast calls leave together in one
                # message, but none waits more than FLUSH_AFTER_S for the calls run after it
                first_done = 0.0
                while sock.getsockopt(_EVENTS) & _POLLIN:
                    try:
                        frames = sock.recv_multipart(_NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = protocol.decode(frames)
                        calls = protocol.unbatch(msg) if msg.command == protocol.INVOKE else ()
                    except ProtocolError as exc:
                        print(f"nuclide runtime: dropped malformed message: {exc}", file=sys.stderr)
                        continue
                    if msg.command == protocol.INVOKE:
                        for header, body in calls:
                            if inline:
                                result, out = self.execute(header, body, self.loop)
                                results.append(result)
                                bodies.append(out)
                                done = time.perf_counter()
                                if not first_done:
                                    first_done = done
                                if done - first_done > FLUSH_AFTER_S or len(results) >= protocol.MAX_BATCH:
                                    self.send_results(results, bodies)
                                    first_done = 0.0
                            else:
                                self.inflight += 1
                                self._finish_later(header, body)
                        last_sent = time.monotonic()
                    elif msg.command == protocol.BYE:
                        self.bye_acked = True
                    # HEARTBEAT from the gateway only refreshes last_heard
                if results:
                    self.send_results(results, bodies)
            now = time.monotonic()
            if self.caller.edges_pending:
                beat = self.ready_header()
                if self.attach_edges(beat):  # no RESULT took them: a HEARTBEAT does
                    sock.send_multipart(protocol.encode(protocol.HEARTBEAT, beat))
                    last_sent = now
            if now - last_sent >= HEARTBEAT_INTERVAL_S and not self.stopping:
                if now - last_heard > HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS:
                    # the gateway went quiet (restarted?): announce ourselves again
                    sock.send_multipart(protocol.encode(protocol.READY, self.ready_header()))
                    last_heard = now
                else:
                    sock.send_multipart(protocol.encode(protocol.HEARTBEAT, self.ready_header()))
                last_sent = now

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def close(self) -> None:
        self.sock.close(linger=1000)
        super().close()


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else os.environ.get("NUCLIDE_INSTANCE_CONFIG", "")
    if not path:
        print("usage: python -m services.runtime <instance-config.json>", file=sys.stderr)
        return 2
    with open(path) as fh:
        config = json.load(fh)
    return serve(config)


def load_or_report(config: dict[str, Any]) -> dict[str, Function] | None:
    """The loaded functions, or None once why not is on stderr (one line the deployer shows the user, then details)."""
    try:
        return load_functions(config)
    except Exception as exc:
        cause = exc.__cause__ or exc
        print(f"nuclide: function failed to load: {exc}", file=sys.stderr)
        traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        sys.stderr.flush()
        return None


def serve(config: dict[str, Any]) -> int:
    """Load the functions and run until stopped; a cold instance and a zygote-forked one both end here."""
    functions = load_or_report(config)
    if functions is None:
        return EXIT_INIT_FAILED
    runtime = Runtime(config, functions)
    try:
        return runtime.run()
    finally:
        runtime.close()
