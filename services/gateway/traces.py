"""What the gateway publishes on its PUB socket for the optimizer: the call graph (topic ``trace``) and load (``load``).

:class:`Traces` sums the edges of the call graph (caller, callee, sync, local) between
flushes: a chain's edges repeat on every call, so they are counted, not kept one by one.
:class:`Publisher` sends a batch every TRACE_FLUSH_S and a load report every
LOAD_PUBLISH_S (services/gateway/load.py), off the invoke path. Both are best effort: a
subscriber that misses one sees a gap in the sample, nothing else.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import zmq

from shared import protocol
from services.gateway.load import LOAD_PUBLISH_S, LOAD_SAMPLE_S, LoadMeter

if TYPE_CHECKING:  # pragma: no cover
    from services.gateway.broker import Broker
    from services.gateway.telemetry import Telemetry

TRACE_FLUSH_S = 0.1  # how often the call graph is published

EdgeKey = tuple[Any, Any, bool, bool]  # (caller, callee, sync, local)


class Traces:
    """The call graph seen since the last flush: edges summed, and the entry calls."""

    def __init__(self) -> None:
        # (caller, callee, sync, local) -> [calls, total ms] since the last flush
        self.edges: dict[EdgeKey, list[float]] = {}
        self.calls: list[list[Any]] = []  # [function, took_ms, status] of entry calls

    def add_call(self, function: str, took_ms: float, status: int) -> None:
        self.calls.append([function, took_ms, status])

    def add_edge(self, caller: Any, callee: Any, sync: bool, local: bool, took_ms: float, n: int = 1) -> None:
        key = (caller, callee, sync, local)
        slot = self.edges.get(key)
        if slot is None:
            self.edges[key] = [n, took_ms * n]
        else:
            slot[0] += n
            slot[1] += took_ms * n

    def add_edges(self, edges: Any) -> None:
        """Edges an instance reported with a RESULT or HEARTBEAT: [caller, callee, sync, local, mean ms, calls]."""
        if not isinstance(edges, list):
            return
        for e in edges:
            try:
                n = int(e[5]) if len(e) > 5 else 1
                if n >= 1:  # a count below one is malformed (and would divide by zero at the flush)
                    self.add_edge(e[0], e[1], e[2] is True, e[3] is True, float(e[4]), n)
            except (TypeError, ValueError, IndexError, KeyError):
                continue  # a malformed edge is dropped: traces are best effort

    def take(self) -> tuple[dict[EdgeKey, list[float]], list[list[Any]]]:
        """The summed edges and the entry calls since the last take; both start again empty."""
        edges, self.edges = self.edges, {}
        calls, self.calls = self.calls, []
        return edges, calls


class Publisher:
    """The gateway's PUB socket (``gateway_pub``) and the two loops that publish on it."""

    def __init__(self, ctx: zmq.Context, endpoint: str, traces: Traces, telemetry: Telemetry, broker: Broker,
                 gateway_id: str) -> None:
        self.traces = traces
        self.telemetry = telemetry
        self.broker = broker
        self.gateway_id = gateway_id
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 10_000)
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError:
            self.sock.close(linger=0)
            raise

    async def flush_traces(self) -> None:
        """Publish the call graph in batches (topic "trace"), off the invoke path."""
        while True:
            await asyncio.sleep(TRACE_FLUSH_S)
            if not self.traces.edges and not self.traces.calls:
                continue
            summed, calls = self.traces.take()
            self.telemetry.add_edges(summed.items())
            # [caller, callee, sync, local, mean ms, calls]
            edges = [[*key, round(total / n, 3), int(n)] for key, (n, total) in summed.items()]
            try:
                self.sock.send_multipart(protocol.encode_published(b"trace", {"edges": edges, "calls": calls}),
                                         zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # traces are best effort: subscribers see a gap in the sample, nothing else

    async def publish_load(self) -> None:
        """Publish each function's mean concurrency (in flight plus queued) for the autoscaler (topic "load")."""
        meter = LoadMeter()
        per_report = max(1, round(LOAD_PUBLISH_S / LOAD_SAMPLE_S))
        broker = self.broker
        while True:
            await asyncio.sleep(LOAD_SAMPLE_S)
            meter.sample((call.function for call in broker.pending.values()), broker.queues)
            if meter.samples < per_report:
                continue
            report = {"gateway": self.gateway_id, "interval_s": LOAD_PUBLISH_S, "functions": meter.take()}
            try:
                self.sock.send_multipart(protocol.encode_published(b"load", report), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # best effort, like traces: the optimizer holds its decisions through a gap

    def close(self) -> None:
        self.sock.close(linger=0)
