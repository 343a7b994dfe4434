"""Task-to-task calls that reach the gateway: a CALL from an instance, routed like any invocation.

A sync CALL is submitted to the broker under the callee's timeout (or the caller's deadline,
when sooner) and answered with a RESULT on the caller's request id; an async one becomes a
durable call (services/gateway/async_calls.py) and the RESULT names it. A private callee takes calls
only from its own fusion group and the functions its ``spec.allowCallsFrom`` names, judged by
the instance the broker knows sent the CALL. Every call adds an edge to the call graph and is
recorded as a sync call of its own under its caller's, in its caller's W3C trace (the trace fields
of the CALL are checked, and a bad one starts a new trace, as on HTTP). Of the in-process calls an
instance reports, the failed ones are recorded, and in a sampled trace every one (``spans``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, Callable

from shared import tracecontext
from shared.auth import may_call_private
from shared.errors import Forbidden, NotFound, NuclideError
from shared.failures import bounded, result_error
from services.gateway.broker import Call

if TYPE_CHECKING:  # pragma: no cover
    from services.gateway.broker import Broker
    from services.gateway.async_calls import AsyncCalls
    from services.gateway.catalogue import Catalogue, FunctionInfo
    from services.gateway.traces import Traces


def task_call_record(call_id: str, function: str, parent_id: str | None, code: int, error: str | None,
                     queued_at: float, finished_at: float, trace_id: str | None = None, fused: bool = False) -> tuple:
    """A task call as a sync call record of its own under its caller's (source "call"), FAILED for a 5xx."""
    return (call_id, function, "FAILED" if code >= 500 else "DONE", queued_at, finished_at, code, error, False,
            parent_id, "call", trace_id, None, fused)


def reported_failures(rows: Any) -> list[tuple]:
    """The records of the in-process task calls an instance reports as failed: [call_id, parent_id, function,
    status, error, queued_at, finished_at(, trace_id)] each; a malformed row is dropped, like a malformed edge."""
    if not isinstance(rows, list):
        return []
    records = []
    for row in rows:
        try:
            call_id, parent_id, function, status, error, queued_at, finished_at, *rest = row
            trace_id = rest[0] if rest and tracecontext.valid_trace_id(rest[0]) else None
            if not (isinstance(call_id, str) and isinstance(function, str) and isinstance(status, int)
                    and isinstance(parent_id, (str, type(None))) and isinstance(error, str)):
                continue
            records.append(task_call_record(call_id, function, parent_id, status, bounded(error),
                                            float(queued_at), float(finished_at), trace_id, True))
        except (TypeError, ValueError):
            continue
    return records


def reported_spans(rows: Any) -> list[tuple]:
    """The records of the in-process task calls of sampled traces an instance reports: [call_id, parent_id,
    function, status, queued_at, finished_at, trace_id] each; a malformed row is dropped."""
    if not isinstance(rows, list):
        return []
    records = []
    for row in rows:
        try:
            call_id, parent_id, function, status, queued_at, finished_at, trace_id = row
            if not (isinstance(call_id, str) and isinstance(function, str) and isinstance(status, int)
                    and isinstance(parent_id, (str, type(None))) and tracecontext.valid_trace_id(trace_id)):
                continue
            records.append(task_call_record(call_id, function, parent_id, status, None, float(queued_at),
                                            float(finished_at), trace_id, True))
        except (TypeError, ValueError):
            continue
    return records


class TaskCalls:
    """``touch``: the scaler's (a cold start, and a wake for a group at zero); ``fusionizer_host``: what callees
    see as the ``fusionizer-server-address`` header."""

    def __init__(self, catalogue: Catalogue, broker: Broker, calls: AsyncCalls, traces: Traces,
                 touch: Callable[[FunctionInfo], bool], new_call_id: Callable[[], str], fusionizer_host: str) -> None:
        self.catalogue = catalogue
        self.broker = broker
        self.calls = calls
        self.traces = traces
        self.touch = touch
        self.new_call_id = new_call_id
        self.fusionizer_host = fusionizer_host

    def add_reports(self, header: dict[str, Any]) -> None:
        """What an instance reported of the task calls it served in-process: edges, and the calls that failed."""
        self.traces.add_edges(header.get("edges"))
        failed = header.get("failed_calls")
        if failed:
            for record in reported_failures(failed):
                self.calls.record_sync(record)
        spans = header.get("spans")
        if spans:
            for record in reported_spans(spans):
                self.calls.record_sync(record)

    async def call(self, ident: bytes, header: dict[str, Any], body: bytes) -> None:
        """Route one CALL from the instance ``ident`` and answer it with a RESULT."""
        # the caller's id only names the reply (its runtime matches replies by it); the call itself gets an
        # id of the gateway's, so an instance cannot make its call take the id of someone else's
        reply_id = str(header.get("call_id") or "")
        call_id = self.new_call_id()
        name = str(header.get("function", ""))
        sync = not header.get("async")
        started = time.perf_counter()
        error: str | None = None
        # the caller's trace, its span the callee's parent; fields that are not valid start a new trace
        trace = tracecontext.from_header_map(call_id, header)
        parent_id = header.get("parent_id")
        parent_id = parent_id if isinstance(parent_id, str) else None
        try:
            info = self.catalogue.functions.get(name)
            if info is None:
                raise NotFound(f"function '{name}' not found")
            if info.private:
                self.check_caller(info, header)
            deadline_ms = int(time.time() * 1000 + info.timeout_s * 1000)
            if sync and isinstance(header.get("deadline_ms"), int):
                deadline_ms = min(deadline_ms, header["deadline_ms"])
            # a CALL's header is an INVOKE's (shared/protocol.py invoke_header): forwarded as the callee's
            invoke_header = dict(header, call_id=call_id, deadline_ms=deadline_ms, trace_id=trace.trace_id,
                                 trace_flags=trace.flags)
            invoke_header.pop("parent_span", None)
            invoke_header.pop("tracestate", None)
            if trace.parent_span is not None:
                invoke_header["parent_span"] = trace.parent_span
            if trace.tracestate is not None:
                invoke_header["tracestate"] = trace.tracestate
            invoke_header["headers"] = list(header.get("headers") or []) + [
                ["fusionizer-server-address", self.fusionizer_host]]
            if not sync:
                new_id, _ = await self.calls.submit(name, body, content_type=str(header.get("content_type") or ""),
                                                    headers=list(header.get("headers") or []), source="call",
                                                    parent_id=parent_id, call_id=call_id, trace=trace)
                # the RESULT answers the caller's request id; the body names the durable call
                self.broker.reply(ident, {"call_id": reply_id, "status": 202, "content_type": "application/json"},
                                  json.dumps({"call_id": new_id}).encode())
                self.traces.add_edge(header.get("caller"), name, False, False, 0.0)
                return
            fut = asyncio.get_running_loop().create_future()
            timeout_s = max(0.001, deadline_ms / 1000 - time.time())
            self.touch(info)
            self.broker.submit(Call(call_id, name, invoke_header, body, fut, timeout_s))
            result, rbody = await fut
            out_header = {"call_id": reply_id, "status": int(result.get("status", 200)),
                          "content_type": result.get("content_type") or "", "headers": result.get("headers") or []}
            if out_header["status"] >= 500:
                error = result_error(result, rbody)
        except NuclideError as exc:
            out_header = {"call_id": reply_id, "status": exc.http_status, "content_type": "application/json"}
            rbody = exc.body()
            if not sync:
                self.broker.reply(ident, out_header, rbody)
                return
            error = exc.message if exc.http_status >= 500 else None
        took_ms = (time.perf_counter() - started) * 1000
        self.traces.add_edge(header.get("caller"), name, sync, False, took_ms)
        if sync:  # recorded as the in-process ones are (add_reports), in the caller's trace
            now = time.time()
            self.calls.record_sync(task_call_record(call_id, name, parent_id, out_header["status"], error,
                                                    now - took_ms / 1000, now, trace.trace_id))
        if sync:
            self.broker.reply(ident, out_header, rbody)

    def check_caller(self, callee: FunctionInfo, header: dict[str, Any]) -> None:
        """Raise Forbidden unless the instance behind a task call may call this private function.

        The caller is the instance the CALL came from (the broker puts its id in the header), as the broker
        knows it (its group and the functions it serves, from its registration), and the function it is
        running, when that is one of those."""
        inst_id = header.get("instance")
        inst = self.broker.by_name.get(inst_id) if isinstance(inst_id, str) else None
        caller = header.get("caller")
        group = inst.group if inst is not None else None
        caller_fn = caller if inst is not None and isinstance(caller, str) and caller in inst.functions else None
        # during a regroup the caller's function may already be in the callee's group while this instance of
        # it (the group it leaves) still serves calls: the function's group in force counts too
        current = self.catalogue.functions.get(caller_fn) if caller_fn is not None else None
        if not (may_call_private(callee.group_id, callee.allow_calls_from, group, caller_fn)
                or (current is not None and may_call_private(callee.group_id, (), current.group_id, caller_fn))):
            who = f"function '{caller_fn}'" if caller_fn else "a caller outside any function of this platform"
            raise Forbidden(f"function '{callee.name}' is private: {who} may not call it (only functions of its"
                            f" fusion group and those its spec.allowCallsFrom names may)")
