"""Running calls of loaded functions: events, timeouts, errors, in-process task calls; no instance socket.

:class:`Executor` is what :class:`services.runtime.loop.Runtime` (a warm instance) and
``services.runtime.once`` (one call in a process of its own) share. Nothing here imports
ZeroMQ, asyncio or a thread pool until a call needs one (a remote task call, an async
handler, maxConcurrency above 1): a process that runs one sync call never pays for them,
about 70 ms of imports at every start of a per-call container.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from shared.instanceconfig import InstanceConfig
from shared.tracecontext import of_invoke as invoke_trace
from services.runtime import responses
from services.runtime.context_calls import CallFailed, Frame, TaskCaller
from services.runtime.context import Context, Logger
from services.runtime.event import Event
from services.runtime.handlers import (
    HandlerForm, LoadedHandler, build_args, call_init_context, close_thread_loop, invoke, load_handler, thread_loop,
)
from services.runtime.tracebacks import user_traceback

if TYPE_CHECKING:  # pragma: no cover
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import zmq


def _get_running_loop() -> Any:
    """The running asyncio loop of this thread, or None; without importing asyncio (none runs if it is not)."""
    asyncio = sys.modules.get("asyncio")
    return asyncio._get_running_loop() if asyncio is not None else None


class CallTimeout(BaseException):
    """Raised in a handler at its timeout (BaseException: a handler's `except Exception` must not swallow it)."""


def on_alarm(signum: int, frame: Any) -> None:
    raise CallTimeout()


class Function:
    """One loaded handler with its context."""

    __slots__ = ("name", "version", "handler", "context", "logger", "needs_session", "lambda_shape", "to_response")

    def __init__(self, name: str, version: int, handler: LoadedHandler, context: Context, logger: Logger,
                 lambda_shape: str = "auto") -> None:
        self.name = name
        self.version = version
        self.handler = handler
        self.context = context
        self.logger = logger
        self.needs_session = handler.form is HandlerForm.FUSIONIZER
        self.lambda_shape = lambda_shape  # the event a Lambda handler gets (spec.lambdaEvent)
        # what the handler's value means before the HTTP mapping: a Lambda result is API Gateway's
        self.to_response: Callable[[Any], Any] | None = None
        if handler.form is HandlerForm.LAMBDA:
            from services.runtime.lambda_shape import lambda_response  # only functions with a Lambda handler

            self.to_response = lambda_response


def load_functions(config: InstanceConfig) -> dict[str, Function]:
    functions: dict[str, Function] = {}
    for fc in config.functions:
        if len(config.functions) == 1:  # a fused group sets each task's env per call instead
            for key, value in (fc.get("env") or {}).items():
                os.environ[str(key)] = str(value)
        extra = [fc["deps_dir"]] if fc.get("deps_dir") else []
        handler = load_handler(fc["code_dir"], fc["handler"], extra)
        logger = Logger(function=fc["name"])
        context = Context(function_name=fc["name"], version=int(fc["version"]), logger=logger,
                          memory_limit_in_mb=config.memory_bytes // (1024 * 1024),
                          log_stream_name=config.instance_id)
        call_init_context(handler, context)
        if handler.is_async:
            thread_loop()  # asyncio imported and the loop made before READY, not in the first call
        functions[fc["name"]] = Function(fc["name"], int(fc["version"]), handler, context, logger,
                                         str(fc.get("lambda_event") or "auto"))
    return functions


class Executor:
    """Runs calls of loaded functions (events, timeouts, errors, task calls); no instance socket.

    :class:`services.runtime.loop.Runtime` adds the instance loop; ``services.runtime.once`` runs one
    call with it alone.
    """

    def __init__(self, config: InstanceConfig, functions: dict[str, Function]) -> None:
        self.config = config
        self.functions = functions
        self.instance_id = config.instance_id
        self.max_concurrency = max(1, min(int(fc.get("max_concurrency", 1)) for fc in config.functions))
        self._ctx: zmq.Context | None = None
        self._ctx_lock = threading.Lock()
        self.caller = TaskCaller(self, list(config.gateways), config.curve)
        self._session: Any = None  # built on first use: importing requests costs ~45 ms of every cold start
        self.envs = {fc["name"]: dict(fc.get("env") or {}) for fc in config.functions}
        self.timeouts = {fc["name"]: float(fc.get("timeout_s") or 30.0) for fc in config.functions}
        self._fused = len(functions) > 1
        self._with_env = {name for name, env in self.envs.items() if env} if self._fused else set()
        for fn in functions.values():
            fn.context._caller = self.caller
        self._pool: ThreadPoolExecutor | None = None
        if self.max_concurrency > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="handler")

    @property
    def ctx(self) -> zmq.Context:
        """The ZeroMQ context of the instance socket and of remote task calls, made on first use."""
        with self._ctx_lock:  # handler threads may make their first remote calls at once
            if self._ctx is None:
                import zmq

                self._ctx = zmq.Context()
        return self._ctx

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """This thread's loop for async handlers (the one ``init_context`` ran on), made on first use.

        Calls are run with ``loop=None``, which means the same loop, made only when a coroutine needs it."""
        return thread_loop()

    def session(self) -> Any:
        if self._session is None:
            from services.runtime.session import GatewaySession

            self._session = GatewaySession(self.config.fusionizer_host, self.config.gateway_url, self.caller)
        return self._session

    # ----- calls ---------------------------------------------------------------------

    def execute(self, header: dict[str, Any], body: bytes,
                loop: asyncio.AbstractEventLoop | None = None) -> tuple[dict[str, Any], bytes]:
        """Run one call and build its RESULT header and body; never raises.

        ``loop`` runs async handlers; None: the calling thread's own loop, made when first needed.
        """
        started = time.perf_counter()
        try:
            status, hdrs, ctype, out = outcome = self._run(header, body, loop)
        except CallTimeout:  # the alarm fired in the instant between the handler's return and its cancel
            signal.setitimer(signal.ITIMER_REAL, 0)
            status, hdrs, ctype, out = outcome = responses.json_error(504, "deadline_exceeded",
                                                                      "the call reached its timeout")
        result = {
            "call_id": header.get("call_id", ""),
            "status": status,
            "headers": hdrs,
            "content_type": ctype,
            "took_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if status >= 500 and type(outcome) is responses.Failure:  # why, for the call's record
            result["error"] = outcome.error
        return result, out

    def execute_local(self, fn: Function, frame: Frame, event: Event,
                      mapper: Callable[[Any], Any] = responses.to_result) -> Any:
        """A task call served in-process; the callee's context is restored afterwards (it may be re-entered).

        ``mapper`` turns the handler's value into what the caller gets (by default the RESULT tuple)."""
        ctx = fn.context
        saved = (ctx._call_id, ctx._deadline_ms, ctx._trace, ctx._parent_call, fn.logger.call_id)
        try:
            if _get_running_loop() is None:
                return self._call(fn, frame, event, None, b"", None, mapper)
            if fn.handler.is_async:
                # a sync context.call from inside an async handler: the callee's coroutine
                # cannot run on the busy loop of this thread, so it gets a thread of its own
                box: list[Any] = []
                worker = threading.Thread(target=lambda: box.append(self._call(fn, frame, event, None, b"", None, mapper)))
                worker.start()
                worker.join()
                return box[0]
            return self._call(fn, frame, event, None, b"", None, mapper)
        finally:
            ctx._call_id, ctx._deadline_ms, ctx._trace, ctx._parent_call, fn.logger.call_id = saved

    def _run(self, header: dict[str, Any], body: bytes,
             loop: asyncio.AbstractEventLoop | None) -> tuple[int, list, str, bytes]:
        """One INVOKE's call: its function, its alarm, then :meth:`_call`."""
        fn = self.functions.get(header.get("function", ""))
        if fn is None:
            return responses.json_error(404, "not_found", f"function '{header.get('function')}' is not served here")
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
                      list(header.get("chain") or [fn.name]), deadline_ms, invoke_trace(header))
        try:
            return self._call(fn, frame, None, header, body, loop)
        finally:
            if timer_s:
                signal.setitimer(signal.ITIMER_REAL, 0)

    def _call(self, fn: Function, frame: Frame, event: Event | None, header: dict[str, Any] | None, body: bytes,
              loop: asyncio.AbstractEventLoop | None, mapper: Callable[[Any], Any] = responses.to_result) -> Any:
        """Run ``fn`` for one call (``event``, or the one ``header`` and ``body`` describe); never raises but CallTimeout."""
        stack = self.caller.stack()
        stack.append(frame)
        restore_env = self._apply_env(fn) if fn.name in self._with_env else None
        try:
            fn.context._begin(frame.call_id, frame.deadline_ms, frame.trace, frame.parent_call)
            if event is None:
                event = Event.from_invoke(header or {}, body)
            session = self.session() if fn.needs_session else None
            if event.mode == "execute":
                args = build_args(fn.handler, fn.context, event, session, event.raw_body.decode("utf-8", "replace"))
                return responses.execute_result(invoke(fn.handler, args, loop))
            args = build_args(fn.handler, fn.context, event, session, None, fn.lambda_shape)
            value = invoke(fn.handler, args, loop)
            return mapper(value if fn.to_response is None else fn.to_response(value))
        except CallTimeout:
            if stack[0] is not frame:
                raise  # the outermost call answers the timeout
            limit = self.timeouts.get(fn.name, 30.0)
            message = f"function '{fn.name}' did not finish within its {limit:g} s timeout (spec.timeout)"
            fn.logger.error(message)
            return responses.json_error(504, "deadline_exceeded", message, {"function": fn.name, "timeout_s": limit})
        except MemoryError:
            limit_mib = self.config.memory_bytes // (1024 * 1024)
            message = (f"function '{fn.name}' ran out of memory: it is limited to {limit_mib} MiB"
                       " (spec.resources.limits.memory)")
            fn.logger.error(message)
            return responses.json_error(500, "memory_limit", message)
        except CallFailed as exc:
            # a failed task call the handler did not catch: answer as the callee did
            fn.logger.error("task call failed", callee=exc.function, status=exc.status, error=exc.message)
            status = exc.status if exc.status in (404, 504, 508) else 500
            return responses.json_error(status, "task_call_failed", f"call to '{exc.function}' failed: {exc.message}")
        except Exception as exc:
            failure = responses.error_result(exc)
            fn.logger.error("handler raised", error=failure.error, traceback=user_traceback(exc))
            return failure
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
        if self._ctx is not None:
            self._ctx.term()
        close_thread_loop()


def load_or_report(config: InstanceConfig) -> dict[str, Function] | None:
    """The loaded functions, or None once why not is on stderr (one line the deployer shows the user, then details)."""
    try:
        return load_functions(config)
    except Exception as exc:
        cause = exc.__cause__ or exc
        print(f"nuclide: function failed to load: {exc}", file=sys.stderr)
        print(user_traceback(cause), end="", file=sys.stderr)
        sys.stderr.flush()
        return None
