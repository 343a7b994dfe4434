"""The instance's main loop: READY, then INVOKE -> handler -> RESULT, heartbeats, BYE.

A plain blocking ZeroMQ poll loop: with the default maxConcurrency of 1 the
handler runs inline on this thread, which is the fastest path (no thread hand-off
per call). With maxConcurrency > 1, sync handlers run in a thread pool and async
handlers on a loop thread; finished calls are queued and announced through a pipe
that the poll loop watches. Exit codes: 0 stopped, 3 the function failed to load
or initialise (the deployer does not retry that version), 1 anything else.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import time
from typing import Any

import zmq

from shared import protocol
from shared.errors import ProtocolError
from shared.exits import EXIT_INIT_FAILED
from shared.instancelinks import InstanceLinks, Link
from shared.liveness import BYE_ACK_TIMEOUT_S, DRAIN_TIMEOUT_S, HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS
from shared.wakepipe import finished_calls
from services.runtime.executor import (  # noqa: F401 (CallTimeout, Executor, Function, load_functions: re-exported)
    CallTimeout, Executor, Function, load_functions, load_or_report, on_alarm,
)

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
EDGES_EVERY_S = 0.1  # in-process task calls are reported (summed, and the failed ones) at most this often


class Runtime(Executor):
    """An instance: READY, INVOKE -> :meth:`execute` -> RESULT, heartbeats, BYE."""

    def __init__(self, config: dict[str, Any], functions: dict[str, Function]) -> None:
        super().__init__(config, functions)
        # how many INVOKEs may wait here; the gateway only fills it while calls are fast
        self.credit = self.max_concurrency + PREFETCH
        # one DEALER per gateway (shared/instancelinks.py); a call's RESULT goes back on the link it came in on
        self.links = InstanceLinks(self.ctx, self.instance_id, config)
        self.poller = zmq.Poller()
        for link in self.links:
            self.poller.register(link.sock, zmq.POLLIN)
        self.last_call_at = time.monotonic()  # when a call last finished, whichever gateway sent it
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
            # seconds since a call last finished here, through any gateway: a gateway that sent none lately
            # does not scale this instance's group to zero while another keeps it busy
            "idle_s": round(time.monotonic() - self.last_call_at, 3),
        }

    def _finish_later(self, header: dict[str, Any], body: bytes, link: Link) -> None:
        assert self._pool is not None

        def run() -> None:
            result, out = self.execute(header, body, None)
            self._done.put((result, (link, out)))
            os.write(self._wake_w, b"x")

        self._pool.submit(run)

    def due_reports(self) -> dict[str, list[list[Any]]] | None:
        """The in-process calls to report now (edges, failed calls), if any wait and the last report is EDGES_EVERY_S old."""
        if not self.caller.edges_pending:
            return None
        now = time.monotonic()
        if now - self._edges_sent < EDGES_EVERY_S:
            return None
        self._edges_sent = now
        return self.caller.take_reports()

    def attach_reports(self, header: dict[str, Any]) -> None:
        """Put the due reports of in-process calls (if any) into an outgoing header."""
        reports = self.due_reports() if self.caller.edges_pending else None
        if reports:
            header.update(reports)

    def send_result(self, sock: zmq.Socket, result: dict[str, Any], body: bytes) -> None:
        self.attach_reports(result)
        send = sock.send
        send(_SIG, _MORE)
        send(_RESULT, _MORE)
        send(_packb(result), _MORE)
        send(body, 0)

    def send_results(self, sock: zmq.Socket, results: list[dict[str, Any]], bodies: list[bytes]) -> None:
        """Send finished calls, several in one batched RESULT (one ZeroMQ message instead of n)."""
        self.last_call_at = time.monotonic()
        if len(results) == 1:
            self.send_result(sock, results[0], bodies[0])
        else:
            outer: dict[str, Any] = {"batch": results}
            self.attach_reports(outer)
            send = sock.send
            send(_SIG, _MORE)
            send(_RESULT, _MORE)
            send(_packb(outer), _MORE)
            last = len(bodies) - 1
            for i, body in enumerate(bodies):
                send(body, _MORE if i < last else 0)
        results.clear()
        bodies.clear()

    # ----- the loop ----------------------------------------------------------------------

    def _add_link_sockets(self, opened: list[Link], closed: list[Link]) -> None:
        """Gateways learnt from a HEARTBEAT: poll and greet the new ones; stop polling the closed ones."""
        for link in closed:
            try:
                self.poller.unregister(link.sock)
            except KeyError:
                pass
        for link in opened:
            self.poller.register(link.sock, zmq.POLLIN)
            link.sock.send_multipart(protocol.encode(protocol.READY, self.ready_header()))

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGALRM, on_alarm)
        links = self.links
        for link in links:
            link.sock.send_multipart(protocol.encode(protocol.READY, self.ready_header()))
        poller = self.poller
        poller.register(self._wake_r, zmq.POLLIN)
        interval_ms = int(HEARTBEAT_INTERVAL_S * 1000)
        bye_sent_at = 0.0
        inline = self._pool is None
        results: list[dict[str, Any]] = []
        bodies: list[bytes] = []
        by_socket = links.by_socket
        while True:
            if self.stopping and not bye_sent_at:
                for link in links:  # every gateway stops sending calls before this instance goes
                    link.sock.send_multipart(protocol.encode(protocol.BYE, {"instance_id": self.instance_id}))
                bye_sent_at = time.monotonic()
            if bye_sent_at:
                waited = time.monotonic() - bye_sent_at
                quiet = time.monotonic() - HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
                acked = all(link.bye_acked or link.last_heard < quiet for link in links)  # a dead gateway acks nothing
                if self.inflight == 0 and (acked or waited > BYE_ACK_TIMEOUT_S):
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
                # results go back to the gateway that sent each call, batched per gateway
                per_link: dict[Link, tuple[list[dict[str, Any]], list[bytes]]] = {}
                for result, (link, out) in finished_calls(self._wake_r, self._done):
                    self.inflight -= 1
                    if link.endpoint not in links.links:
                        continue  # its gateway is gone; that gateway's caller saw the call fail already
                    rs, bs = per_link.setdefault(link, ([], []))
                    rs.append(result)
                    bs.append(out)
                    if len(rs) >= protocol.MAX_BATCH:
                        self.send_results(link.sock, rs, bs)
                        link.last_sent = now
                for link, (rs, bs) in per_link.items():
                    if rs:
                        self.send_results(link.sock, rs, bs)
                        link.last_sent = now
            for sock in events:
                link = by_socket.get(sock)  # type: ignore[call-overload]
                if link is None:
                    continue
                link.last_heard = now
                learnt: Any = None
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
                                result, out = self.execute(header, body, None)
                                results.append(result)
                                bodies.append(out)
                                done = time.perf_counter()
                                if not first_done:
                                    first_done = done
                                if done - first_done > FLUSH_AFTER_S or len(results) >= protocol.MAX_BATCH:
                                    self.send_results(sock, results, bodies)
                                    first_done = 0.0
                            else:
                                self.inflight += 1
                                self._finish_later(header, body, link)
                        link.last_sent = time.monotonic()
                    elif msg.command == protocol.BYE:
                        link.bye_acked = True
                    elif msg.command == protocol.HEARTBEAT and "gateways" in msg.header:
                        learnt = msg.header["gateways"]
                if results:
                    self.send_results(sock, results, bodies)
                if learnt is not None and not self.stopping:
                    self._add_link_sockets(*links.learn(learnt))
            now = time.monotonic()
            reports = self.due_reports() if self.caller.edges_pending else None
            if reports:  # no RESULT took them: a HEARTBEAT does (to one gateway: each edge is counted once)
                link = next(iter(links), None)
                if link is not None:
                    link.sock.send_multipart(protocol.encode(protocol.HEARTBEAT, {**self.ready_header(), **reports}))
                    link.last_sent = now
            if self.stopping:
                continue
            for link in links:
                if now - link.last_sent < HEARTBEAT_INTERVAL_S:
                    continue
                if now - link.last_heard > HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS:
                    # the gateway went quiet (restarted?): announce ourselves again
                    link.sock.send_multipart(protocol.encode(protocol.READY, self.ready_header()))
                    link.last_heard = now
                else:
                    link.sock.send_multipart(protocol.encode(protocol.HEARTBEAT, self.ready_header()))
                link.last_sent = now

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def close(self) -> None:
        self.links.close(linger_ms=1000)
        super().close()


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else os.environ.get("NUCLIDE_INSTANCE_CONFIG", "")
    if not path:
        print("usage: python -m services.runtime <instance-config.json>", file=sys.stderr)
        return 2
    with open(path) as fh:
        config = json.load(fh)
    return serve(config)


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
