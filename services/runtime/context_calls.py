"""Task-to-task calls: in-process when the callee is in this instance's group, else via the gateway.

``context.call("taskb", payload)`` and a Fusionizer task's
``requests_session.post("http://{host}:8000/taskb", json=...)`` both land here.
Either way the callee gets its own event and call id (parent = the caller's call),
runs with its own env, and the caller sees the same result: the callee's return
value goes through the same HTTP mapping as a remote call and is decoded back
(JSON -> objects, text -> str, else bytes); a status >= 400 raises
:class:`CallFailed` with the callee's message. Remote calls use a DEALER socket
per thread (CALL -> gateway -> RESULT), so a blocked handler never shares the
instance's own socket. In-process calls are summed per (caller, callee) and the
instance reports them with its RESULTs (or a HEARTBEAT) at most every 100 ms; the
gateway traces remote calls itself, as it routes them. An in-process call that
fails (5xx) is reported too, one row each, so the gateway records it as a call of
its own under its caller's, as it does for a failed remote one.

Every call carries its caller's W3C trace (shared/tracecontext.py): a remote call sends the trace
id, flags and tracestate with the caller's span as its parent, and an in-process one runs in the
caller's trace too. In-process calls of a sampled trace (flags bit 0) are reported one by one
(``spans``), so the trace shows them; those of an unsampled one are only summed, as recording each
costs about as much as the call itself.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

from shared import protocol
from shared.tracecontext import SAMPLED, TraceFields, span_id
from shared.errors import ProtocolError
from shared.failures import bounded, message_of
from services.runtime.event import Event
from services.runtime.responses import to_result

if TYPE_CHECKING:  # pragma: no cover
    import zmq

MAX_CALL_DEPTH = 16  # nested task calls; deeper is almost always a cycle
# failed in-process calls kept for the next report (every 100 ms at most): a storm of failures
# keeps the first ones, and the report stays well under protocol.MAX_HEADER_BYTES
MAX_FAILED_REPORTED = 256
MAX_SPANS_REPORTED = 1024  # in-process calls of sampled traces kept per report (100 ms); more are not recorded
_JSON = "application/json"


class CallFailed(Exception):
    """A task call answered with an error status; carries the callee's message."""

    def __init__(self, function: str, status: int, message: str) -> None:
        super().__init__(message)
        self.function = function
        self.status = status
        self.message = message


class Frame:
    """What is running on this thread: the call a nested call is made from.

    ``trace``: the W3C trace of the INVOKE this call runs under (None without one); its ``parent_span`` is
    the INVOKE's caller's. ``parent_call``: for an in-process call, its caller's call id (whose span is
    its parent span; derived only when asked)."""

    __slots__ = ("call_id", "function", "depth", "chain", "deadline_ms", "trace", "parent_call")

    def __init__(self, call_id: str, function: str, depth: int, chain: list[str], deadline_ms: int,
                 trace: TraceFields | None = None, parent_call: str | None = None) -> None:
        self.call_id = call_id
        self.function = function
        self.depth = depth
        self.chain = chain
        self.deadline_ms = deadline_ms
        self.trace = trace
        self.parent_call = parent_call


def encode_payload(payload: Any) -> tuple[bytes, str]:
    if type(payload) is bytes:
        return payload, "application/octet-stream"
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload), "application/octet-stream"
    if isinstance(payload, str):
        return payload.encode(), "text/plain; charset=utf-8"
    return json.dumps(payload, separators=(",", ":")).encode(), _JSON


def decode_result(function: str, status: int, content_type: str, body: bytes) -> Any:
    if status >= 400:
        raise CallFailed(function, status, message_of(content_type, body))
    if content_type.startswith(_JSON) or content_type.endswith("+json"):
        return json.loads(body) if body else None
    if content_type.startswith("text/"):
        return body.decode("utf-8", "replace")
    return body


_AS_IS = object()  # marks a local callee's value that reaches its caller unchanged


def _as_is_or_result(value: Any) -> Any:
    """What a local callee's value gives its ``context.call``: bytes, and str that are ASCII, are what
    the HTTP mapping and :func:`decode_result` would make of them anyway, so they skip both; any other
    value is mapped (and decoded by the caller) exactly as for a remote call."""
    kind = type(value)
    if kind is bytes or (kind is str and value.isascii()):
        return _AS_IS, value
    return to_result(value)


class LocalRunner(Protocol):
    """What task calls use of the executor: the group's functions, in-process calls, the ZeroMQ context,
    the instance's id (sent with each remote call)."""

    functions: dict[str, Any]
    ctx: zmq.Context
    instance_id: str

    def execute_local(self, fn: Any, frame: Frame, event: Event, mapper: Any) -> Any: ...


class TaskCaller:
    """One per instance; handlers reach it through ``context.call``."""

    def __init__(self, runtime: LocalRunner, gateways: list[str], curve: dict[str, str] | None = None) -> None:
        self.runtime = runtime
        self.gateways = gateways
        self.curve = curve  # the instance's CURVE keys (shared/linkkeys.py): call sockets use them too
        self._local = threading.local()
        self._ids = itertools.count(1)  # next() is atomic: call ids need no lock
        self._ids_lock = threading.Lock()
        self._sockets: list[zmq.Socket] = []  # every thread's call socket, closed at shutdown
        # in-process calls since the last report: (caller, callee) -> [calls, total ms]
        self._edges: dict[tuple[str | None, str], list[float]] = {}
        # and those that failed: [call_id, parent_id, function, status, error, queued_at, finished_at, trace_id]
        self._failed: list[list[Any]] = []
        # and those of sampled traces: [call_id, parent_id, function, status, queued_at, finished_at, trace_id]
        self._spans: list[list[Any]] = []
        self._edges_lock = threading.Lock()

    # ----- frames ------------------------------------------------------------------

    def stack(self) -> list[Frame]:
        """This thread's calls, outermost first."""
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def current(self) -> Frame | None:
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else None

    # ----- the calls -------------------------------------------------------------------

    def call(self, name: str, payload: Any = None) -> Any:
        body, ctype = encode_payload(payload)
        out = self.request(name, "POST", body, ctype, [], mapper=_as_is_or_result)
        if out[0] is _AS_IS:
            return out[1]
        return decode_result(name, *out[:3])

    def call_async(self, name: str, payload: Any = None) -> str:
        body, ctype = encode_payload(payload)
        status, rctype, rbody, _ = self.request(name, "POST", body, ctype, [], sync=False)
        result = decode_result(name, status, rctype, rbody)
        return result["call_id"] if isinstance(result, dict) else str(result)

    def request(self, name: str, method: str, body: bytes, content_type: str, headers: list[list[str]],
                path: str | None = None, query: str = "", sync: bool = True,
                mapper: Callable[[Any], Any] = to_result, timeout_s: float | None = None) -> tuple[Any, ...]:
        """Call a task; returns (status, content_type, body, headers) exactly as an HTTP caller would see them.

        A local callee's value goes through ``mapper``; :meth:`call`'s may answer ``(_AS_IS, value)``.
        ``timeout_s`` shortens the caller's own deadline (never lengthens it)."""
        stack = getattr(self._local, "stack", None)
        frame = stack[-1] if stack else None
        now_ms = int(time.time() * 1000)
        if frame is None:
            parent, depth, chain, caller, trace = "", 1, [name], None, None
            deadline_ms = now_ms + 30_000
        else:
            parent, depth, chain, caller = frame.call_id, frame.depth + 1, frame.chain + [name], frame.function
            trace = frame.trace
            deadline_ms = frame.deadline_ms or now_ms + 30_000
        if timeout_s is not None:
            deadline_ms = min(deadline_ms, now_ms + int(timeout_s * 1000))
        if depth > MAX_CALL_DEPTH:
            raise CallFailed(name, 508, f"call depth limit of {MAX_CALL_DEPTH} exceeded: {' -> '.join(chain[-6:])}"
                                        " ...; is there a cycle between these tasks?")
        call_id = f"{parent or 'call'}.{next(self._ids):x}"
        fn = self.runtime.functions.get(name) if sync else None
        if fn is not None:
            # in-process: no header dict, no INVOKE encoding; the callee's event is built directly
            started = time.perf_counter()
            event = Event.for_call(call_id, parent or None, name, method, path or "/", query, headers,
                                   content_type, body, deadline_ms)
            result = self.runtime.execute_local(fn, Frame(call_id, name, depth, chain, deadline_ms, trace,
                                                          parent or None), event, mapper)
            took_ms = (time.perf_counter() - started) * 1000
            if result[0] is not _AS_IS and result[0] >= 500:
                self._failed_locally(call_id, parent or None, name, result, took_ms, trace)
            elif trace is not None and trace.flags & SAMPLED:
                self._span(call_id, parent or None, name, 200 if result[0] is _AS_IS else result[0], took_ms, trace)
            with self._edges_lock:
                slot = self._edges.get((caller, name))
                if slot is None:
                    self._edges[(caller, name)] = [1, took_ms]
                else:
                    slot[0] += 1
                    slot[1] += took_ms
            if result[0] is _AS_IS:
                return result
            status, rheaders, rctype, out = result
        else:
            header = protocol.invoke_header(
                call_id, name, deadline_ms, parent_id=parent or None, method=method, path=path or "/", query=query,
                headers=headers, content_type=content_type, depth=depth, chain=chain, caller=caller,
                # the gateway ties the call to this instance's group: a private callee outside it refuses
                instance=self.runtime.instance_id)
            if trace is not None:  # the callee's parent span is this call's
                header.update(trace_id=trace.trace_id, trace_flags=trace.flags, parent_span=span_id(parent))
                if trace.tracestate is not None:
                    header["tracestate"] = trace.tracestate
            header["async"] = not sync
            result, out = self._remote(header, body)
            status, rctype = int(result.get("status", 200)), str(result.get("content_type") or "")
            rheaders = result.get("headers") or []
        return status, rctype, out, rheaders

    def _failed_locally(self, call_id: str, parent_id: str | None, name: str, result: Any, took_ms: float,
                        trace: TraceFields | None) -> None:
        """Keep a failed in-process call for the next report (before its edge: see :meth:`take_reports`)."""
        status, _, content_type, body = result
        error = getattr(result, "error", None) or bounded(message_of(content_type, body))  # a Failure says why
        finished_at = time.time()
        with self._edges_lock:
            if len(self._failed) < MAX_FAILED_REPORTED:
                self._failed.append([call_id, parent_id, name, status, error, finished_at - took_ms / 1000, finished_at,
                                     trace.trace_id if trace is not None else None])

    def _span(self, call_id: str, parent_id: str | None, name: str, status: int, took_ms: float,
              trace: TraceFields) -> None:
        """Keep an in-process call of a sampled trace for the next report (before its edge, as a failed one)."""
        finished_at = time.time()
        with self._edges_lock:
            if len(self._spans) < MAX_SPANS_REPORTED:
                self._spans.append([call_id, parent_id, name, status, finished_at - took_ms / 1000, finished_at,
                                    trace.trace_id])

    @property
    def edges_pending(self) -> bool:
        """Whether a report is due: an in-process call was made (a failed one too, as its edge is kept after it)."""
        return bool(self._edges)

    def take_reports(self) -> dict[str, list[list[Any]]]:
        """What the instance reports of its in-process calls since the last report; only the non-empty keys.

        ``edges``: [caller, callee, sync, local, mean ms, calls]; ``failed_calls``: [call_id, parent_id,
        function, status, error, queued_at, finished_at, trace_id]; ``spans`` (in-process calls of sampled traces):
        [call_id, parent_id, function, status, queued_at, finished_at, trace_id]. A failed call or a span is kept
        before its edge, so none waits without an edge pending: the reports that :attr:`edges_pending` triggers
        carry them all.
        """
        with self._edges_lock:
            summed, self._edges = self._edges, {}
            failed, self._failed = self._failed, []
            spans, self._spans = self._spans, []
        reports: dict[str, list[list[Any]]] = {}
        if summed:
            reports["edges"] = [[caller, callee, True, True, round(total / n, 3), int(n)]
                                for (caller, callee), (n, total) in summed.items()]
        if failed:
            reports["failed_calls"] = failed
        if spans:
            reports["spans"] = spans
        return reports

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            import zmq  # only a remote call needs it: a per-call process that makes none never imports it

            from shared.linkkeys import instance_socket

            sock = instance_socket(self.runtime.ctx.socket(zmq.DEALER), {"curve": self.curve})
            sock.setsockopt(zmq.LINGER, 0)
            for endpoint in self.gateways:
                sock.connect(endpoint)
            self._local.sock = sock
            with self._ids_lock:
                self._sockets.append(sock)
        return sock

    def close(self) -> None:
        """Close every call socket: an open one would block the context's termination at exit."""
        with self._ids_lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close(linger=0)

    def _remote(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        sock = self._socket()
        sock.send_multipart(protocol.encode(protocol.CALL, header, body))
        call_id = header["call_id"]
        while True:
            remaining_ms = header["deadline_ms"] - int(time.time() * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms):
                # the socket may still get the late answer: drop it so the next call starts clean
                sock.close(linger=0)
                self._local.sock = None
                raise CallFailed(header["function"], 504,
                                 f"call to '{header['function']}' did not finish before the caller's deadline")
            try:
                msg = protocol.decode(sock.recv_multipart())
            except ProtocolError:
                continue
            if msg.command == protocol.RESULT and msg.header.get("call_id") == call_id:
                return msg.header, msg.body
