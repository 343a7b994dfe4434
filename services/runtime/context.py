"""The nuclio-compatible Context, Response and structured Logger handlers receive."""

from __future__ import annotations

import json
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any, Mapping, Sequence, TextIO

from shared.tracecontext import TraceFields, format_traceparent, span_id
from services.runtime.event import event_uuid
from services.runtime.tracebacks import user_traceback

__all__ = ["Context", "Logger", "Platform", "Response", "LOG_LEVELS"]


class Response:
    """What a handler returns to control status, headers and content type (nuclio's Response).

    ``content_type=None`` means "derive it from the body's type", see responses.to_result.
    """

    __slots__ = ("body", "headers", "content_type", "status_code")

    def __init__(
        self,
        body: Any = None,
        headers: Mapping[str, Any] | Sequence[Sequence[Any]] | None = None,
        content_type: str | None = None,
        status_code: int = 200,
    ) -> None:
        self.body = body
        self.headers = headers if headers is not None else {}
        self.content_type = content_type
        self.status_code = status_code

    def __repr__(self) -> str:
        return (
            f"Response(status_code={self.status_code!r}, content_type={self.content_type!r}, "
            f"headers={self.headers!r}, body={self.body!r:.200})"
        )


LOG_LEVELS: dict[str, int] = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40}

_CORE_FIELDS = frozenset({"ts", "level", "msg", "function", "call_id"})

# Built once: json.dumps with non-default options builds a new encoder per call.
_log_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


def _utc_iso_now() -> str:
    now_ns = time.time_ns()
    secs, ns = divmod(now_ns, 1_000_000_000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(secs))}.{ns // 1_000_000:03d}Z"


class Logger:
    """Writes one JSON object per line: ts, level, msg, function, call_id, then the caller's fields.

    ``call_id`` is plain attribute the runtime sets before each invocation (Context._begin
    does it). Logging never raises into the handler: a broken stream or an
    unencodable field degrades the line instead.
    """

    __slots__ = ("function", "call_id", "_stream", "_min_level", "_lock")

    def __init__(self, function: str = "", stream: TextIO | None = None, level: str = "debug") -> None:
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
        self.function = function
        self.call_id: str | None = None
        # None means "sys.stderr at write time", so redirections made later are honoured.
        self._stream = stream
        self._min_level = LOG_LEVELS[level]
        # Handlers may log from their own threads; one line must not interleave with another.
        self._lock = threading.Lock()

    def set_call_id(self, call_id: str | None) -> None:
        """Attribute the following lines to ``call_id``."""
        self.call_id = call_id

    def set_level(self, level: str) -> None:
        """Drop lines below ``level`` (debug, info, warn, error)."""
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
        self._min_level = LOG_LEVELS[level]

    def is_enabled_for(self, level: str) -> bool:
        return LOG_LEVELS.get(level, 0) >= self._min_level

    def _emit(self, level: str, level_no: int, msg: Any, args: tuple, fields: dict, exc_text: str | None = None) -> None:
        if level_no < self._min_level:
            return
        if args:
            try:
                msg = str(msg) % args
            except Exception:  # a mismatched format must not lose the message
                msg = f"{msg} {args!r}"
        elif type(msg) is not str:
            msg = str(msg)
        record: dict[str, Any] = {
            "ts": _utc_iso_now(),
            "level": level,
            "msg": msg,
            "function": self.function,
            "call_id": self.call_id,
        }
        for key, value in fields.items():
            # The core fields stay trustworthy; a clashing user field keeps its value under _key.
            record[f"_{key}" if key in _CORE_FIELDS else key] = value
        if exc_text is not None:
            record["exc"] = exc_text
        try:
            line = _log_encoder.encode(record)
        except Exception:  # e.g. circular structures; keep the line, lose the structure
            for key, value in record.items():
                if key not in _CORE_FIELDS:
                    record[key] = repr(value)
            line = _log_encoder.encode(record)
        stream = self._stream or sys.stderr
        try:
            with self._lock:
                stream.write(line + "\n")
                stream.flush()
        except Exception:  # a closed or broken stream must not fail the invocation
            pass

    def debug(self, msg: Any, *args: Any, **fields: Any) -> None:
        self._emit("debug", 10, msg, args, fields)

    def info(self, msg: Any, *args: Any, **fields: Any) -> None:
        self._emit("info", 20, msg, args, fields)

    def warn(self, msg: Any, *args: Any, **fields: Any) -> None:
        self._emit("warn", 30, msg, args, fields)

    warning = warn

    def error(self, msg: Any, *args: Any, **fields: Any) -> None:
        self._emit("error", 40, msg, args, fields)

    def exception(self, msg: Any, *args: Any, **fields: Any) -> None:
        """An error line with the traceback of the exception being handled (nuclide's frames left out), in ``exc``."""
        exc = sys.exc_info()[1]
        exc_text = user_traceback(exc) if exc is not None else None
        self._emit("error", 40, msg, args, fields, exc_text)

    # nuclio spells structured logging as <level>_with(message, **fields).
    debug_with = debug
    info_with = info
    warn_with = warn
    warning_with = warn
    error_with = error
    exception_with = exception


_NO_CALLS = "task-to-task calls arrive with fusion"
# request headers a forwarded event does not carry on: they describe the request it came in, not this one
_NOT_FORWARDED = frozenset({"content-length", "content-type", "transfer-encoding", "connection", "host",
                            "fusionizer-server-address"})


class Platform:
    """nuclio's ``context.platform``: its kind and namespace, and ``call_function`` to call another function."""

    __slots__ = ("kind", "namespace", "_context")

    def __init__(self, kind: str, context: "Context") -> None:
        self.kind = kind
        self.namespace = "default"
        self._context = context

    def call_function(self, function_name: str, event: Any, node: Any = None, timeout: float | None = None,
                      service_name_override: Any = None) -> Response:
        """Call ``function_name`` with ``event``'s method, path, headers and body; its answer as a Response.

        As nuclio's SDK does it: a dict (or list) body goes as JSON, any other body as it is with the
        event's content type (text/plain without one); the answer's header names are lower-cased, a JSON
        body is decoded, and an error status is returned, not raised. The call is a task call (in-process
        when the callee is in this instance's fusion group), traced like ``context.call``; ``timeout``
        (seconds) shortens the caller's own deadline. ``node`` and ``service_name_override`` name nuclio
        hosts and are not needed here."""
        caller = self._context._caller
        if caller is None:
            raise NotImplementedError(_NO_CALLS)
        body = getattr(event, "body", b"")
        if isinstance(body, (dict, list)):
            raw, content_type = json.dumps(body).encode(), "application/json"
        else:
            raw = body.encode() if isinstance(body, str) else bytes(body or b"")
            content_type = getattr(event, "content_type", None) or "text/plain"
        headers = [[str(k), str(v)] for k, v in (getattr(event, "headers", None) or {}).items()
                   if str(k).lower() not in _NOT_FORWARDED]
        headers.append(["Content-Type", content_type])
        path, _, query = (getattr(event, "path", None) or "/").partition("?")
        status, rtype, out, rheaders = caller.request(function_name, str(getattr(event, "method", None) or "POST"),
                                                      raw, content_type, headers, path=path, query=query,
                                                      timeout_s=timeout)
        answer_headers = {str(k).lower(): str(v) for k, v in rheaders}
        answer_headers["content-type"] = rtype
        answer: Any = out
        if rtype.partition(";")[0].strip() == "application/json" and out:
            try:
                answer = json.loads(out)
            except ValueError:  # as nuclio's SDK: a body that does not parse stays as it is
                pass
        return Response(answer, answer_headers, rtype, status)


class Context:
    """Per-instance state a handler sees (nuclio's ``context``); the runtime re-aims it per call.

    ``user_data`` and any attribute a handler sets in ``init_context`` persist across calls.
    ``call``/``call_async`` delegate to ``_caller`` (an object with the same two methods)
    once the runtime installs one.
    """

    __slots__ = (
        "logger",
        "user_data",
        "function_name",
        "version",
        "platform",
        "worker_id",
        "trigger_name",
        "memory_limit_in_mb",
        "log_stream_name",
        "_call_id",
        "_deadline_ms",
        "_trace",
        "_parent_call",
        "_caller",
        "__dict__",  # nuclio handlers commonly stash clients on the context itself
    )

    Response = Response

    def __init__(
        self,
        function_name: str = "",
        version: int | str = 0,
        logger: Logger | None = None,
        platform_kind: str = "local",
        worker_id: int = 0,
        memory_limit_in_mb: int = 0,
        log_stream_name: str = "",
    ) -> None:
        self.function_name = function_name
        self.version = version
        self.logger = logger if logger is not None else Logger(function_name)
        self.user_data = SimpleNamespace()
        self.platform = Platform(platform_kind, self)
        self.worker_id = worker_id
        self.trigger_name = "default-http"
        self.memory_limit_in_mb = memory_limit_in_mb  # Lambda's name: the instance's memory limit
        self.log_stream_name = log_stream_name  # Lambda's name: the instance whose log has the lines
        self._call_id: str | None = None
        self._deadline_ms = 0
        self._trace: TraceFields | None = None
        self._parent_call: str | None = None
        self._caller: Any = None

    def _begin(self, call_id: str, deadline_ms: int, trace: TraceFields | None = None,
               parent_call: str | None = None) -> None:
        """Aim the context (and its logger) at a new invocation; called by the runtime loop.

        ``trace``: the call's W3C trace; ``parent_call``: the caller's call id for an in-process call (its span
        is this call's parent), None when the trace's ``parent_span`` names the parent."""
        self._call_id = call_id
        self._deadline_ms = deadline_ms
        self._trace = trace
        self._parent_call = parent_call
        self.logger.call_id = call_id

    @property
    def request_id(self) -> str | None:
        """The current call id."""
        return self._call_id

    @property
    def call_id(self) -> str | None:
        """The current call id (alias of request_id)."""
        return self._call_id

    # W3C Trace Context (shared/tracecontext.py): None outside a traced call

    @property
    def trace_id(self) -> str | None:
        """The current call's trace id (32 hex digits): the caller's, or a new one when it sent none."""
        trace = self._trace
        return trace.trace_id if trace is not None else None

    @property
    def span_id(self) -> str | None:
        """The current call's span id (16 hex digits, derived from its call id)."""
        return span_id(self._call_id) if self._trace is not None and self._call_id is not None else None

    @property
    def parent_span_id(self) -> str | None:
        """The caller's span id: the ``traceparent`` sent with the request, or the calling task's span; None for
        the root of a trace."""
        trace = self._trace
        if trace is None:
            return None
        return span_id(self._parent_call) if self._parent_call else trace.parent_span

    @property
    def trace_flags(self) -> int:
        """The trace's flags (bit 0: sampled); 0 outside a traced call."""
        trace = self._trace
        return trace.flags if trace is not None else 0

    @property
    def traceparent(self) -> str | None:
        """The ``traceparent`` header to send with a request this call makes: this call as the parent."""
        trace = self._trace
        if trace is None or self._call_id is None:
            return None
        return format_traceparent(trace.trace_id, span_id(self._call_id), trace.flags)

    @property
    def tracestate(self) -> str | None:
        """The ``tracestate`` the caller sent, as it was (None without one)."""
        trace = self._trace
        return trace.tracestate if trace is not None else None

    @property
    def deadline_ms(self) -> int:
        """The current call's absolute deadline, epoch milliseconds (0 outside a call)."""
        return self._deadline_ms

    # AWS Lambda's context, for handler(event, context)

    @property
    def aws_request_id(self) -> str | None:
        """The current call's UUID (the same as its event's id)."""
        call_id = self._call_id
        return event_uuid(call_id) if call_id is not None else None

    @property
    def function_version(self) -> str:
        return str(self.version)

    @property
    def invoked_function_arn(self) -> str:
        """An ARN-shaped name of the function (nuclide has no AWS account: the account is 0)."""
        return f"arn:aws:lambda:local:000000000000:function:{self.function_name}"

    @property
    def log_group_name(self) -> str:
        return f"/nuclide/{self.function_name}"

    identity = None  # Lambda: Cognito identity of mobile SDK calls; never set here
    client_context = None

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the current call's deadline; never negative."""
        remaining_ms = self._deadline_ms - time.time_ns() // 1_000_000
        return remaining_ms if remaining_ms > 0 else 0

    def call(self, name: str, payload: Any) -> Any:
        """Call another function and wait for its result."""
        caller = self._caller
        if caller is None:
            raise NotImplementedError(_NO_CALLS)
        return caller.call(name, payload)

    def call_async(self, name: str, payload: Any) -> Any:
        """Start another function without waiting for it."""
        caller = self._caller
        if caller is None:
            raise NotImplementedError(_NO_CALLS)
        return caller.call_async(name, payload)

    def __repr__(self) -> str:
        return f"Context(function_name={self.function_name!r}, version={self.version!r}, call_id={self._call_id!r})"
