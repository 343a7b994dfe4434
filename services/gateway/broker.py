"""The invoke broker: instances register on a ROUTER, calls go to the least loaded one.

Instances connect a DEALER (its routing id made from its key, below) and say READY with the
functions they serve, their concurrency and their credit (how many INVOKEs they
accept at once, concurrency plus a prefetch buffer). While an instance's calls are
fast the broker fills the whole credit, so the next call is already waiting when
one finishes (a 2.5x throughput gain for short handlers); once its calls are slow
it gets no more than its concurrency, so no call waits behind a slow one while
another instance could take it. A call for a function goes to the instance of
that function's newest version with the most room (in whatever group: during a regroup the new group's
instances take its calls first, and the old group's what the new one has no room for); when none has room it waits
in that function's bounded queue until a RESULT frees one, or until its deadline. Older-version instances
keep serving their in-flight calls while a redeploy or regroup drains them.

A READY registers an instance only when the CURVE key that sent it (the socket tells it, see
shared/curve.py) is the one the deployer issued for that instance id, group and group version,
and the routing id it came on is the one that key makes for that id (shared/linkkeys.link_route).
Nobody without the instance's secret key can connect under that routing id, not even once the
instance's own connection is gone, and a connection cannot change its key: so every later message
on it is the instance's, and every INVOKE sent to it reaches nobody else. A RESULT settles a call
only when it comes from the instance the call was sent to. A CALL (a task call, sent on a socket of
its own) is taken only with a registered instance's key, as that instance whatever its header
claims. Anything else is dropped unanswered and counted in ``refused``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import zmq

from shared import protocol
from shared.aiosock import AsyncSocket
from shared.curve import INSTANCE_DOMAIN, Keys
from shared.errors import DeadlineExceeded, InstanceFailed, NotFound, ProtocolError, TooManyRequests
from shared.liveness import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS
from shared.logs import get_logger

log = get_logger(__name__)

_invoke = protocol.invoke

FAST_CALL_S = 0.002  # calls shorter than this on average are pipelined; sane range 0.0005-0.02
# an in-flight call older than this marks the instance slow before its result is in (it
# includes the time queued behind pipelined calls, hence larger); sane range 0.005-0.1
SLOW_INFLIGHT_S = 0.010
EWMA_WEIGHT = 0.2  # weight of the newest call's duration in the moving average
# the runtime answers a timed-out call itself at its deadline; the broker gives up this
# much later and then treats the instance as stuck; sane range 0.5-10 s
STUCK_GRACE_S = 1.0


class Instance:
    __slots__ = ("id", "group", "group_version", "functions", "credit", "concurrency", "inflight", "last_seen",
                 "pid", "draining", "avg_s", "batch", "outbox", "last_call_at", "name")

    def __init__(self, ident: bytes, header: dict[str, Any]) -> None:
        self.id = ident  # its routing id (made from its key: shared/linkkeys.link_route)
        self.group = str(header.get("group", ""))
        self.group_version = int(header.get("group_version", 0))
        functions = header.get("functions") or {}
        if not isinstance(functions, dict) or not functions:
            raise ProtocolError("READY needs a non-empty map of functions to versions")
        self.functions: dict[str, int] = {str(k): int(v) for k, v in functions.items()}
        name = header.get("instance_id")
        if not isinstance(name, str) or not name:
            raise ProtocolError("READY needs the instance's id (instance_id)")
        self.name = name  # its instance id, as the deployer and the store know it
        self.credit = max(1, int(header.get("credit", 1)))
        self.concurrency = max(1, min(self.credit, int(header.get("concurrency", self.credit))))
        self.avg_s = 0.0
        self.pid = header.get("pid")
        self.batch = header.get("batch") is True  # takes batched INVOKEs
        self.outbox: list[Call] = []  # dispatched this loop iteration, sent together by Broker._flush
        self.inflight: dict[str, Call] = {}
        self.last_seen = time.monotonic()
        self.draining = False
        self.last_call_at = 0.0
        self.note_idle(header)

    def note_idle(self, header: dict[str, Any]) -> None:
        """When the instance last finished a call, through any gateway (its READY's and HEARTBEAT's idle_s)."""
        idle_s = header.get("idle_s")
        if isinstance(idle_s, (int, float)) and not isinstance(idle_s, bool) and idle_s >= 0:
            self.last_call_at = max(self.last_call_at, time.monotonic() - idle_s)

    def room(self, now: float) -> int:
        """How many more calls to send now: the full credit while calls are fast, else the concurrency."""
        inflight = self.inflight
        if self.avg_s > FAST_CALL_S:
            return self.concurrency - len(inflight)
        if inflight and now - next(iter(inflight.values())).sent_at > SLOW_INFLIGHT_S:
            return self.concurrency - len(inflight)
        return self.credit - len(inflight)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name, "group": self.group, "group_version": self.group_version,
            "functions": self.functions, "credit": self.credit, "concurrency": self.concurrency,
            "inflight": len(self.inflight),
            "draining": self.draining, "pid": self.pid,
        }


class Call:
    __slots__ = ("call_id", "function", "header", "body", "future", "instance", "timer", "timeout_s", "queued_at",
                 "sent_at", "wall", "cold")

    def __init__(self, call_id: str, function: str, header: dict[str, Any], body: bytes,
                 future: Any, timeout_s: float) -> None:
        self.call_id = call_id
        self.function = function
        self.header = header
        self.body = body
        self.future = future
        self.instance: Instance | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timeout_s = timeout_s
        self.queued_at = 0.0
        self.sent_at = 0.0
        self.wall = 0.0  # time.time() when the gateway took the call (its call record's queued_at)
        self.cold = False  # it had to wait for an instance to start


def sender_key(frame: zmq.Frame | None) -> str | None:
    """The CURVE public key (z85) of the peer a message came from: the User-Id the ZAP handler gave it."""
    if frame is None:
        return None
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, UnicodeDecodeError):
        return None


def bind_link(sock: zmq.Socket, link: str) -> None:
    """Bind an ``ipc://`` endpoint any local uid may connect to (instances each run as a uid of their own)."""
    path = Path(link[len("ipc://"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o755)
    sock.bind(link)
    path.chmod(0o666)


class Broker:
    def __init__(self, ctx: zmq.Context, endpoint: str, queue_limit: int,
                 on_ready: Callable[[Instance], None], on_gone: Callable[[Instance, str], None],
                 on_call: Callable[[bytes, protocol.Message], None] | None = None,
                 on_stuck: Callable[[Instance, Call], None] | None = None,
                 on_reports: Callable[[dict[str, Any]], None] | None = None, link: str = "",
                 peers: Callable[[], list[dict[str, Any]]] | None = None, *,
                 keys: Keys, admits: Callable[[Instance], str | None] | None = None) -> None:
        """``link``: a second, ``ipc://`` endpoint of the same ROUTER, for sandboxed instances, which have no
        route to the host's loopback; its socket file is made connectable by their uids. ``peers``: the live
        gateways (shared/gateways.py), told to every instance in HEARTBEATs so it connects to each of them.
        ``keys``: the gateway's keys; instance keys are checked against the ones ``keys.instance`` derives.
        ``admits``: why a READY whose key is right still may not register (its functions are not its
        group's), or None."""
        sock = keys.server(ctx.socket(zmq.ROUTER), INSTANCE_DOMAIN)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished instance raises, so we notice
        # no handover: a second connection under a routing id in use (only its instance can make it) stays
        # unheard until the first one is gone (a dead connection on loopback or ipc is noticed at once)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        # results are not capped by the upload limits the service's other sockets use; a bigger frame
        # than the protocol allows disconnects the instance (its calls then fail at their deadline)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        sock.bind(endpoint)
        if link:
            bind_link(sock, link)
        self.endpoint = endpoint
        self.queue_limit = queue_limit
        self._keys = keys
        self._admits = admits
        self.refused = 0  # messages dropped unanswered (see the module docstring)
        self.instances: dict[bytes, Instance] = {}
        self.by_name: dict[str, Instance] = {}  # instance id -> instance
        self.by_key: dict[str, Instance] = {}  # CURVE public key (z85) -> the instance registered with it
        self.routes: dict[str, list[Instance]] = {}  # function -> instances of its newest version
        self.queues: dict[str, deque[Call]] = {}
        self.pending: dict[str, Call] = {}
        self.ready_waiters: list[tuple[Callable[[Instance], bool], asyncio.Future]] = []
        self._dirty: list[Instance] = []  # instances with calls in their outbox
        self._flush_scheduled = False
        self._on_ready = on_ready
        self._on_gone = on_gone
        self._on_call = on_call
        # the task calls an instance served in-process: a RESULT's or HEARTBEAT's "edges" and "failed_calls"
        self._on_reports = on_reports
        self._on_stuck = on_stuck
        self._peers = peers
        self._loop = asyncio.get_running_loop()
        self._asock = AsyncSocket(sock, self._on_message, keyed=True)  # a READY's key is read from its frame
        self._send = self._asock.send
        self._sweeper = asyncio.ensure_future(self._sweep())

    # ----- calls --------------------------------------------------------------

    def submit(self, call: Call, bounded: bool = True) -> None:
        """Dispatch now, or queue; raises TooManyRequests when a bounded call finds the queue full.

        Async calls are unbounded here: they already wait in the durable queue, and
        the gateway limits how many it holds in memory.
        """
        insts = self.routes.get(call.function)
        if insts:
            best = None
            best_free = 0
            best_group = -1
            now = time.monotonic()
            for inst in insts:
                # the newest group's instance with the most room; during a regroup the group it leaves takes
                # only what the new one has no room for
                free = inst.room(now)
                if free > 0 and (inst.group_version > best_group
                                 or (inst.group_version == best_group and free > best_free)):
                    best, best_free, best_group = inst, free, inst.group_version
            if best is not None:
                if len(insts) > 1:
                    # rotate so equally loaded instances take turns (and all stay warm)
                    insts.remove(best)
                    insts.append(best)
                call.timer = self._loop.call_later(call.timeout_s + STUCK_GRACE_S, self._expire, call)
                self._dispatch(best, call)
                return
        queue = self.queues.get(call.function)
        if queue is None:
            queue = self.queues[call.function] = deque()
        if bounded and len(queue) >= self.queue_limit:
            raise TooManyRequests(
                f"function '{call.function}' has {len(queue)} calls waiting, its queue limit; retry shortly",
                {"retry_after_s": 1},
            )
        call.queued_at = time.monotonic()
        call.timer = self._loop.call_later(call.timeout_s + STUCK_GRACE_S, self._expire, call)
        queue.append(call)

    def _dispatch(self, inst: Instance, call: Call) -> None:
        call.instance = inst
        call.sent_at = time.monotonic()
        inst.inflight[call.call_id] = call
        self.pending[call.call_id] = call
        if not inst.batch:
            self._send_calls(inst, [call])
            return
        # calls dispatched in the same loop iteration leave in one batched INVOKE
        if not inst.outbox:
            self._dirty.append(inst)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        inst.outbox.append(call)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for inst in dirty:
            self._send_outbox(inst, self.instances.get(inst.id))  # a re-READY replaces the object, not the peer

    def _send_outbox(self, inst: Instance, to: Instance | None) -> None:
        """Send the calls dispatched to ``inst`` in this turn of the loop (to ``to``, the peer's object now)."""
        calls, inst.outbox = inst.outbox, []
        calls = [c for c in calls if not c.future.done()]  # expired or failed meanwhile
        if calls and to is not None:
            for start in range(0, len(calls), protocol.MAX_BATCH):
                self._send_calls(to, calls[start:start + protocol.MAX_BATCH])

    def _send_calls(self, inst: Instance, calls: list[Call]) -> None:
        sent = 0
        try:
            if len(calls) > 1 and inst.batch:
                self._send([inst.id, *protocol.encode_batch(protocol.INVOKE, [c.header for c in calls],
                                                            [c.body for c in calls])])
            else:
                for call in calls:
                    self._send([inst.id, *_invoke(call.header, call.body)])
                    sent += 1
        except zmq.ZMQError as exc:
            # the peer was gone before these left (ROUTER_MANDATORY): they never ran, so they wait
            # for another instance like any queued call instead of failing with the vanished one
            undelivered = calls[sent:]
            for call in undelivered:
                inst.inflight.pop(call.call_id, None)
                self.pending.pop(call.call_id, None)
                if call.timer:
                    call.timer.cancel()
            self.drop(inst, f"instance unreachable: {exc}")
            for call in undelivered:
                if not call.future.done():
                    call.instance = None
                    self.submit(call, bounded=False)

    def _expire(self, call: Call) -> None:
        if call.future.done():
            return
        if call.instance is None:
            queue = self.queues.get(call.function)
            if queue is not None:
                try:
                    queue.remove(call)
                except ValueError:
                    pass
            waited = call.timeout_s
            call.future.set_exception(DeadlineExceeded(
                f"no instance of function '{call.function}' became free within its {waited:g} s timeout",
                {"function": call.function, "timeout_s": waited},
            ))
            return
        self.pending.pop(call.call_id, None)
        inst = call.instance
        inst.inflight.pop(call.call_id, None)
        call.future.set_exception(DeadlineExceeded(
            f"function '{call.function}' did not finish within its {call.timeout_s:g} s timeout (spec.timeout)",
            {"function": call.function, "timeout_s": call.timeout_s},
        ))
        # the runtime stops a call at its timeout itself; one that did not answer is stuck
        if self._on_stuck is not None:
            self._on_stuck(inst, call)

    def _pump(self, inst: Instance) -> None:
        """Give queued calls to an instance that has free credit."""
        if inst.draining:
            return
        for fn in inst.functions:
            queue = self.queues.get(fn)
            if not queue:
                continue
            routes = self.routes.get(fn)
            if not routes or inst not in routes:
                continue
            room = inst.room(time.monotonic())
            while queue and room > 0:
                self._dispatch(inst, queue.popleft())
                room -= 1
            if room <= 0:
                return

    def fail_function(self, name: str, exc: Exception) -> None:
        """A function was deleted: fail every queued call of it, and no instance serves it any more (one that
        had it, fused with others, still runs them; a function deployed again under the name restarts at
        version 1, which that instance's old code must not answer for)."""
        for inst in self.instances.values():
            inst.functions.pop(name, None)
        self.routes.pop(name, None)
        queue = self.queues.pop(name, None)
        while queue:
            call = queue.popleft()
            if call.timer:
                call.timer.cancel()
            if not call.future.done():
                call.future.set_exception(exc)

    # ----- messages from instances -------------------------------------------

    def _refuse(self, why: str, ident: bytes, key: str | None = None, **extra: Any) -> None:
        self.refused += 1
        log.warning(why, peer=ident[:40], key=key, refused=self.refused, **extra)

    def _on_message(self, frames: list[bytes], first: zmq.Frame | None = None) -> None:
        """``first``: the message's first frame, whose User-Id (the sender's CURVE key) a READY is judged by."""
        try:
            ident, msg = protocol.decode_from_peer(frames)
        except ProtocolError as exc:
            log.warning("dropped malformed message", peer=frames[0][:40] if frames else b"", error=str(exc))
            return
        cmd = msg.command
        inst = self.instances.get(ident)
        if inst is not None:
            inst.last_seen = time.monotonic()
        elif cmd == protocol.CALL:
            # a task call comes on a socket of its own: the caller is the instance whose key it carries
            inst = self.by_key.get(sender_key(first) or "")
            if inst is None:
                self._refuse("dropped a CALL from a key no registered instance holds", ident, sender_key(first))
                return
        elif cmd != protocol.READY and cmd != protocol.HEARTBEAT:
            self._refuse("dropped a message from an unregistered peer", ident, command=cmd)
            return
        # failed calls come with edges (services/runtime/context_calls.py take_reports): one lookup per message
        if "edges" in msg.header and self._on_reports is not None:
            self._on_reports(msg.header)
        if cmd == protocol.RESULT:
            try:
                results = protocol.unbatch(msg)
            except ProtocolError as exc:
                log.warning("dropped malformed RESULT", peer=ident[:40], error=str(exc))
                return
            owners = set()
            for header, body in results:
                owner = self._on_result(header, body, ident)
                if owner is not None:
                    owners.add(owner)
            for owner in owners:
                if owner.id in self.instances:
                    self._pump(owner)
        elif cmd == protocol.HEARTBEAT or cmd == protocol.READY:
            if inst is None or cmd == protocol.READY:
                self._register(ident, msg.header, inst, sender_key(first))
            else:
                inst.note_idle(msg.header)
        elif cmd == protocol.BYE:
            self._on_bye(ident, inst)
        elif cmd == protocol.CALL and self._on_call is not None:
            # the calling instance is the one its routing id or its key belongs to, whatever the header claims
            msg.header["instance"] = inst.name  # type: ignore[union-attr]
            self._on_call(ident, msg)
        else:
            log.warning("unexpected command from instance", command=cmd, peer=ident[:40])

    def _on_result(self, header: dict[str, Any], body: bytes, ident: bytes) -> Instance | None:
        """Settle one call; returns the instance that ran it (to be given more work)."""
        call_id = header.get("call_id")
        call = self.pending.get(call_id)  # type: ignore[arg-type]
        if call is None:
            return None  # late result of a call that timed out
        if call.instance is None or call.instance.id != ident:
            # only the instance the call was sent to answers it: a result from any other is dropped
            # and the call waits for its own
            self._refuse("dropped a RESULT for a call sent to another instance", ident, function=call.function)
            return None
        del self.pending[call_id]
        if call.timer:
            call.timer.cancel()
        owner = call.instance
        if owner is not None:
            owner.inflight.pop(call.call_id, None)
            took_ms = header.get("took_ms")
            took_s = took_ms / 1000.0 if isinstance(took_ms, (int, float)) else time.monotonic() - call.sent_at
            owner.avg_s += EWMA_WEIGHT * (took_s - owner.avg_s)
        if not call.future.done():
            call.future.set_result((header, body))
        return owner

    def _register(self, ident: bytes, header: dict[str, Any], old: Instance | None, key: str | None) -> None:
        try:
            inst = Instance(ident, header)
            issued = self._keys.issued(key, ident, inst.name, inst.group, inst.group_version)
        except (ProtocolError, TypeError, ValueError, UnicodeDecodeError) as exc:
            log.warning("dropped bad READY", peer=ident[:40], error=str(exc))
            return
        if not issued:
            # the deployer issued this instance's key for one group and version: a READY for any other
            # (or for another instance's id, or on a routing id this key does not make) is not this key's to send
            self._refuse("refused a READY whose key or routing id was not issued for that instance, group and"
                         " version", ident,
                         key, group=inst.group, group_version=inst.group_version)
            return
        problem = self._admits(inst) if self._admits is not None else None
        if problem is not None:
            self._refuse("refused a READY for functions that are not its group's", ident, key, problem=problem)
            return
        if old is not None:
            inst.inflight = old.inflight
            for call in inst.inflight.values():
                call.instance = inst
            self._unroute(old)
        self.instances[ident] = inst
        self.by_name[inst.name] = inst
        self.by_key[key] = inst  # type: ignore[index]
        for fn in inst.functions:
            self._reroute(fn)
        log.info("instance ready", **inst.describe())
        if old is None:
            self._on_ready(inst)
            try:  # the other gateways at once, not a heartbeat later: it registers with them too
                self._send([ident, *self._beat()])
            except zmq.ZMQError:
                pass
        for waiter in list(self.ready_waiters):
            match, fut = waiter
            if not fut.done() and match(inst):
                fut.set_result(inst)
        self._pump(inst)

    def _on_bye(self, ident: bytes, inst: Instance | None) -> None:
        if inst is not None and inst.outbox:
            # calls given to it in this turn of the loop leave before the acknowledgement: an instance that
            # has its BYE acknowledged and no call in flight exits, and one sent after would be lost with it
            self._send_outbox(inst, inst)
        try:
            self._send([ident, *protocol.encode(protocol.BYE, {})])
        except zmq.ZMQError:
            pass
        if inst is None:
            return
        inst.draining = True
        self._unroute(inst)
        if not inst.inflight:
            self._forget(inst, "said BYE")

    # ----- routing table ---------------------------------------------------------

    def _reroute(self, fn: str) -> None:
        """routes[fn] = live, non-draining instances of the newest version of fn, whatever their group.

        A regroup runs the same version of fn in the group it leaves and in the group it joins: both
        serve it until the old instances say BYE (the new group's first, see submit), so the new group's
        first READY instance does not take the whole load while the others start (the deployer stops the old ones only once the new group
        has its replicas ready)."""
        best_version = -1
        chosen: list[Instance] = []
        for inst in self.instances.values():
            if inst.draining:
                continue
            version = inst.functions.get(fn)
            if version is None:
                continue
            if version > best_version:
                best_version, chosen = version, [inst]
            elif version == best_version:
                chosen.append(inst)
        if chosen:
            self.routes[fn] = chosen
            for inst in chosen:
                self._pump(inst)
        else:
            self.routes.pop(fn, None)

    def _unroute(self, inst: Instance) -> None:
        for fn in inst.functions:
            routes = self.routes.get(fn)
            if routes and inst in routes:
                routes.remove(inst)
            if not routes:
                self._reroute(fn)

    def _forget(self, inst: Instance, reason: str) -> None:
        inst.outbox.clear()
        if self.instances.get(inst.id) is inst:
            del self.instances[inst.id]
        if self.by_name.get(inst.name) is inst:
            del self.by_name[inst.name]
        for key, holder in list(self.by_key.items()):
            if holder is inst:
                del self.by_key[key]
        self._unroute(inst)
        log.info("instance gone", instance=inst.name, reason=reason)
        self._on_gone(inst, reason)

    def drop(self, inst: Instance, reason: str) -> None:
        """An instance died, vanished or is stuck: fail what it was running, stop routing to it."""
        self._forget(inst, reason)
        calls = list(inst.inflight.values())
        inst.inflight.clear()
        for call in calls:
            self.pending.pop(call.call_id, None)
            if call.timer:
                call.timer.cancel()
            if not call.future.done():
                call.future.set_exception(InstanceFailed(
                    f"the instance running function '{call.function}' failed during the call: {reason}",
                    {"function": call.function},
                ))

    def instance_exited(self, instance_id: str, detail: str) -> None:
        inst = self.by_name.get(instance_id)
        if inst is not None:
            self.drop(inst, detail)

    def reply(self, ident: bytes, header: dict[str, Any], body: bytes) -> None:
        """Answer a peer's CALL with a RESULT."""
        try:
            self._send([ident, *protocol.result(header, body)])
        except zmq.ZMQError as exc:
            log.warning("task call result not delivered", peer=ident[:40], error=str(exc))

    def serving(self, fn: str) -> list[Instance]:
        return [i for i in self.instances.values() if fn in i.functions]

    async def wait_ready(self, match: Callable[[Instance], bool], timeout_s: float) -> Instance:
        for inst in self.instances.values():
            if match(inst):
                return inst
        fut = self._loop.create_future()
        waiter = (match, fut)
        self.ready_waiters.append(waiter)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self.ready_waiters.remove(waiter)

    # ----- liveness ----------------------------------------------------------------

    def _beat(self) -> list[bytes]:
        """A HEARTBEAT to an instance, naming the live gateways (what an instance needs to connect to each)."""
        peers = self._peers() if self._peers is not None else []
        return protocol.encode(protocol.HEARTBEAT, {"gateways": [
            {k: p.get(k, "") for k in ("id", "host", "router", "link")} for p in peers]})

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            beat = self._beat()
            now = time.monotonic()
            limit = HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
            for inst in list(self.instances.values()):
                if now - inst.last_seen > limit and not inst.inflight:
                    self.drop(inst, f"no heartbeat for {now - inst.last_seen:.1f} s")
                    continue
                try:
                    self._send([inst.id, *beat])
                except zmq.ZMQError as exc:
                    self.drop(inst, f"unreachable: {exc}")

    def close(self) -> None:
        self._sweeper.cancel()
        for call in list(self.pending.values()):
            if not call.future.done():
                call.future.set_exception(NotFound("the gateway is shutting down"))
        self._asock.close()
