"""The instance side of the instance link (zguide's mdwrkapi): READY, INVOKE -> RESULT, HEARTBEAT, BYE.

Every kind of instance serves calls through :class:`InstanceLoop`: the Python runtime
(``services/runtime/loop.py``) and the Docker backend's runner of registered-runtime functions. The
instance gives it the calls' runner (``execute``: header and payload in, RESULT header and body out,
never raising) and, when calls run concurrently, a pool to run them on; the gateway sees the same
protocol from both (``shared/protocol.py`` draws the frames). One poll loop, on the calling thread:

- READY to every gateway at start (one DEALER per gateway, ``shared/instancelinks.py``), and again to
  a gateway that was silent for HEARTBEAT_LIVENESS intervals (it may have restarted and forgotten us);
- INVOKE, one call or a batch: without a pool each call runs inline on this thread (the fastest path for
  a concurrency of 1: no thread hand-off) and the results of a burst leave together in one RESULT, none
  waiting more than FLUSH_AFTER_S for the calls run after it; with a pool, threads run the calls and
  hand their results back through a wake-up pipe. A RESULT goes back on the link its call came in on;
- HEARTBEAT to a gateway this side sent nothing to for HEARTBEAT_INTERVAL_S; a gateway's HEARTBEAT names
  the live gateways, and a link opens to each new one;
- :meth:`InstanceLoop.stop` (SIGTERM, SIGINT): BYE to every gateway, then :meth:`InstanceLoop.run`
  returns 0 once every gateway acknowledged (a silent one acknowledges nothing) and no call is in
  flight, or after BYE_ACK_TIMEOUT_S with none in flight, or after DRAIN_TIMEOUT_S in any case.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import time
from typing import Any, Callable, Protocol

import zmq

from shared import protocol
from shared.errors import ProtocolError
from shared.instanceconfig import InstanceConfig
from shared.instancelinks import InstanceLinks, Link
from shared.liveness import BYE_ACK_TIMEOUT_S, DRAIN_TIMEOUT_S, HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS
from shared.wakepipe import finished_calls

# a finished call's result waits at most this long for the results of the calls run after it
# (inline calls only); sane range 0-0.005 s: longer delays results, shorter sends more messages
FLUSH_AFTER_S = 0.0005
STOPPING_POLL_MS = 100  # how often a stopping instance checks for acknowledgements and finished calls

_MORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_INVOKE = protocol.INVOKE
_result = protocol.result

Execute = Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]]


class Pool(Protocol):
    def submit(self, fn: Callable[[], None]) -> Any: ...


class Reports(Protocol):
    """What an instance reports besides results (the runtime's in-process task calls): sent with a
    RESULT, or with a HEARTBEAT to one gateway when no RESULT leaves in time."""

    def due(self) -> dict[str, Any] | None:
        """The fields to send now, if any (taken: they are not returned again)."""

    def due_in_s(self) -> float | None:
        """How soon reports fall due; None when none wait."""


def _print_log(message: str, **fields: Any) -> None:
    """A line on stderr (the instance log), for an instance that has no logger of its own."""
    details = " ".join(f"{key}={value}" for key, value in fields.items() if key != "level")
    print(f"nuclide instance: {message}: {details}", file=sys.stderr, flush=True)


def _send(sock: zmq.Socket, frames: list[bytes]) -> None:
    # send_multipart's type checks and slicing cost more than the frames' own sends on the hot path
    last = len(frames) - 1
    send = sock.send
    for i, frame in enumerate(frames):
        send(frame, _MORE if i < last else 0)


class InstanceLoop:
    """One instance's link to the gateways; :meth:`run` serves calls until :meth:`stop`."""

    def __init__(self, ctx: zmq.Context, config: InstanceConfig, ready: dict[str, Any], execute: Execute,
                 pool: Pool | None = None, reports: Reports | None = None,
                 log: Callable[..., None] = _print_log) -> None:
        """``ready``: what this instance's READY and HEARTBEATs say besides its identity (``functions``
        {name: version}, ``credit``, ``concurrency``, ``batch``: whether it takes batched INVOKEs)."""
        self.config = config
        self.ready = ready
        self.execute = execute
        self.pool = pool
        self.reports = reports
        self.log = log
        self.links = InstanceLinks(ctx, config.instance_id, config)
        self.poller = zmq.Poller()
        for link in self.links:
            self.poller.register(link.sock, zmq.POLLIN)
        self.last_call_at = time.monotonic()  # when a call last finished, whichever gateway sent it
        self.inflight = 0  # calls handed to the pool and not finished yet
        self.stopping = False
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)

    def ready_header(self) -> dict[str, Any]:
        return {
            "instance_id": self.config.instance_id,
            "group": self.config.group,
            "group_version": self.config.group_version,
            **self.ready,
            "pid": os.getpid(),
            # seconds since a call last finished here, through any gateway: a gateway that sent none lately
            # does not scale this instance's group to zero while another keeps it busy
            "idle_s": round(time.monotonic() - self.last_call_at, 3),
        }

    def stop(self) -> None:
        """Stop taking calls: BYE to every gateway, drain, and :meth:`run` returns (safe in a signal handler)."""
        self.stopping = True

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stop()

    # ----- sending -------------------------------------------------------------------

    def _say(self, link: Link, command: bytes, header: dict[str, Any]) -> None:
        link.sock.send_multipart(protocol.encode(command, header))
        link.last_sent = time.monotonic()

    def _send_results(self, link: Link, results: list[dict[str, Any]], bodies: list[bytes]) -> None:
        """Send finished calls, several in one batched RESULT (one ZeroMQ message instead of n); empties both lists."""
        extra = self.reports.due() if self.reports is not None else None
        if len(results) == 1:
            header = results[0]
            if extra:
                header.update(extra)
            _send(link.sock, _result(header, bodies[0]))
        else:
            _send(link.sock, protocol.result_batch(results, bodies, extra))
        link.last_sent = self.last_call_at = time.monotonic()
        results.clear()
        bodies.clear()

    def _submit(self, header: dict[str, Any], body: bytes, link: Link) -> None:
        assert self.pool is not None
        execute, done, wake_w = self.execute, self._done, self._wake_w

        def run() -> None:
            result, out = execute(header, body)
            done.put((result, (link, out)))
            os.write(wake_w, b"x")

        self.inflight += 1
        self.pool.submit(run)

    # ----- the loop ------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        links = self.links
        poller = self.poller
        for link in links:
            self._say(link, protocol.READY, self.ready_header())
        poller.register(self._wake_r, zmq.POLLIN)
        interval_ms = int(HEARTBEAT_INTERVAL_S * 1000)
        silent_s = HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
        bye_sent_at = 0.0
        inline = self.pool is None
        execute = self.execute
        reports = self.reports
        results: list[dict[str, Any]] = []
        bodies: list[bytes] = []
        by_socket = links.by_socket
        while True:
            if self.stopping and not bye_sent_at:
                for link in links:  # every gateway stops sending calls before this instance goes
                    self._say(link, protocol.BYE, {"instance_id": self.config.instance_id})
                bye_sent_at = time.monotonic()
            if bye_sent_at:
                waited = time.monotonic() - bye_sent_at
                quiet = time.monotonic() - silent_s
                acked = all(link.bye_acked or link.last_heard < quiet for link in links)  # a dead gateway acks nothing
                if (self.inflight == 0 and (acked or waited > BYE_ACK_TIMEOUT_S)) or waited > DRAIN_TIMEOUT_S:
                    return 0
            timeout_ms = STOPPING_POLL_MS if bye_sent_at else interval_ms
            if reports is not None:  # report them when due even if no call follows
                due_in_s = reports.due_in_s()
                if due_in_s is not None:
                    timeout_ms = max(0, min(timeout_ms, int(due_in_s * 1000) + 1))
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
                        self._send_results(link, rs, bs)
                for link, (rs, bs) in per_link.items():
                    if rs:
                        self._send_results(link, rs, bs)
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
                        calls = protocol.unbatch(msg) if msg.command == _INVOKE else ()
                    except ProtocolError as exc:
                        self.log("dropped a malformed message", level="warning", error=str(exc))
                        continue
                    if msg.command == _INVOKE:
                        for header, body in calls:
                            if inline:
                                result, out = execute(header, body)
                                results.append(result)
                                bodies.append(out)
                                done = time.perf_counter()
                                if not first_done:
                                    first_done = done
                                if done - first_done > FLUSH_AFTER_S or len(results) >= protocol.MAX_BATCH:
                                    self._send_results(link, results, bodies)
                                    first_done = 0.0
                            else:
                                self._submit(header, body, link)
                        link.last_sent = time.monotonic()  # calls are coming: no HEARTBEAT needed
                    elif msg.command == protocol.BYE:
                        link.bye_acked = True
                    elif msg.command == protocol.HEARTBEAT and "gateways" in msg.header:
                        learnt = msg.header["gateways"]
                if results:
                    self._send_results(link, results, bodies)
                if learnt is not None and not self.stopping:
                    self._follow(learnt)
            now = time.monotonic()
            due = reports.due() if reports is not None else None
            if due:  # no RESULT took them: a HEARTBEAT does (to one gateway: each is counted once)
                link = next(iter(links), None)
                if link is not None:
                    self._say(link, protocol.HEARTBEAT, {**self.ready_header(), **due})
            if self.stopping:
                continue
            for link in links:
                if now - link.last_sent < HEARTBEAT_INTERVAL_S:
                    continue
                if now - link.last_heard > silent_s:
                    # the gateway went quiet (restarted?): announce ourselves again
                    self._say(link, protocol.READY, self.ready_header())
                    link.last_heard = now
                else:
                    self._say(link, protocol.HEARTBEAT, self.ready_header())

    def _follow(self, gateways: Any) -> None:
        """Gateways named by a HEARTBEAT: poll and greet the new ones; stop polling the closed ones."""
        opened, closed = self.links.learn(gateways)
        for link in closed:
            try:
                self.poller.unregister(link.sock)
            except KeyError:
                pass
        for link in opened:
            self.poller.register(link.sock, zmq.POLLIN)
            self._say(link, protocol.READY, self.ready_header())

    def close(self, linger_ms: int = 1000) -> None:
        """Close the links (RESULTs and the BYE still queued get ``linger_ms`` to leave) and the wake-up pipe."""
        self.links.close(linger_ms=linger_ms)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
