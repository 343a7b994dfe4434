"""The invoke broker over real ZeroMQ sockets: instances are DEALERs speaking the protocol, calls are real futures."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from typing import Any

import pytest
import zmq
from structlog.testing import capture_logs

from services.gateway import broker as broker_module
from services.gateway.broker import EWMA_WEIGHT, FAST_CALL_S, SLOW_INFLIGHT_S, STUCK_GRACE_S, Broker, Call, Instance
from shared import protocol
from shared.curve import INSTANCE_DOMAIN, Keys, ZapHandler, memory_keys
from shared.errors import DeadlineExceeded, InstanceFailed, NotFound, TooManyRequests
from tests.stack import free_port, until as wait_until

# generous (the machine is shared); `make mutate` shortens it, since every mutant that breaks a reply waits it out
WAIT_S = float(os.environ.get("NUCLIDE_TEST_WAIT_S", "10"))


async def until(predicate, timeout_s: float = WAIT_S, what: str = "condition") -> Any:
    return await wait_until(predicate, timeout_s, what)


class Peer:
    """An instance: a DEALER with its own identity, connected to the broker's ROUTER."""

    def __init__(self, ctx: zmq.Context, endpoint: str, ident: bytes, keys: Keys, group: str = "g",
                 group_version: int = 1, route: bytes | None = None) -> None:
        """Keyed as the deployer keys that instance of ``group`` at ``group_version`` (shared/curve.py), on the
        routing id that key makes, or on ``route``."""
        self.ident = ident
        self.sock = keys.client_of_instance(ctx.socket(zmq.DEALER), ident.decode(errors="replace"), group,
                                            group_version)
        if route is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, route)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, command: bytes, header: dict[str, Any], *bodies: bytes) -> None:
        self.sock.send_multipart(protocol.encode(command, header, *bodies))

    def ready(self, functions: dict[str, int] | None = None, command: bytes = protocol.READY, **fields: Any) -> None:
        header = {"instance_id": self.ident.decode(errors="replace"), "group": "g", "group_version": 1,
                  "functions": functions or {"f": 1}, "credit": 1, "concurrency": 1, "pid": 7, **fields}
        self.send(command, header)

    async def recv(self, timeout_s: float = WAIT_S,
                   skip: tuple[bytes, ...] = (protocol.HEARTBEAT,)) -> protocol.Message:
        """The next message that is not one of ``skip`` (heartbeats come whenever the broker beats)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                await asyncio.sleep(0.005)
                continue
            msg = protocol.decode(frames)
            if msg.command not in skip:
                return msg
        raise AssertionError(f"{self.ident!r} got no message within {timeout_s} s")

    async def silent(self, window_s: float) -> None:
        """Nothing but heartbeats arrives for ``window_s``: a bounded look for a message that must not come."""
        deadline = time.monotonic() + window_s
        while time.monotonic() < deadline:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                await asyncio.sleep(0.005)
                continue
            msg = protocol.decode(frames)
            assert msg.command == protocol.HEARTBEAT, f"{self.ident!r} got {msg.command!r} {msg.header}"


class Harness:
    def __init__(self, queue_limit: int = 2, link: str = "", peers: list[dict[str, Any]] | None = None) -> None:
        self._capture = capture_logs()
        self.logs: list[dict[str, Any]] = self._capture.__enter__()
        self.ctx = zmq.Context()
        self.keys = memory_keys()
        self.zap = ZapHandler(self.ctx, self.keys)  # the broker's ROUTER is a CURVE server, as a gateway's is
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.ready: list[Instance] = []
        self.gone: list[tuple[Instance, str]] = []
        self.calls: list[tuple[bytes, protocol.Message]] = []
        self.stuck: list[tuple[Instance, Call]] = []
        self.reports: list[dict[str, Any]] = []
        self.peers_list = peers or []
        self.open: list[Peer] = []
        self.made: list[Call] = []
        try:
            self.broker = self._broker(queue_limit, link)
        except BaseException:
            self.zap.close()
            self.ctx.destroy(linger=0)
            self._capture.__exit__(None, None, None)
            raise

    def _broker(self, queue_limit: int, link: str) -> Broker:
        return Broker(self.ctx, self.endpoint, queue_limit, on_ready=self.ready.append,
                      on_gone=lambda inst, why: self.gone.append((inst, why)),
                      on_call=lambda ident, msg: self.calls.append((ident, msg)),
                      on_stuck=lambda inst, call: self.stuck.append((inst, call)),
                      on_reports=self.reports.append, link=link, peers=lambda: self.peers_list, keys=self.keys)

    def peer(self, ident: bytes, endpoint: str = "", group: str = "g", group_version: int = 1,
             route: bytes | None = None) -> Peer:
        p = Peer(self.ctx, endpoint or self.endpoint, ident, self.keys, group, group_version, route)
        self.open.append(p)
        return p

    async def instance(self, ident: bytes, functions: dict[str, int] | None = None, **fields: Any) -> Peer:
        """A peer that said READY and is registered (its welcome HEARTBEAT consumed)."""
        p = self.peer(ident, group=fields.get("group", "g"), group_version=int(fields.get("group_version", 1)))
        count = len(self.ready)
        p.ready(functions, **fields)
        await until(lambda: len(self.ready) > count, what=f"{ident!r} to register")
        beat = await p.recv(skip=())
        assert beat.command == protocol.HEARTBEAT
        return p

    def call(self, call_id: str, function: str = "f", timeout_s: float = 30.0, body: bytes = b"") -> Call:
        future = asyncio.get_running_loop().create_future()
        call = Call(call_id, function, {"call_id": call_id, "function": function}, body or call_id.encode(),
                    future, timeout_s)
        self.made.append(call)
        return call

    def close(self) -> None:
        self.broker.close()
        for p in self.open:
            p.sock.close()
        self.zap.close()
        self.ctx.destroy(linger=0)  # never waits on a socket a failed test left open
        for call in self.made:  # calls a test left in flight fail at close; their errors are expected
            if call.future.done() and not call.future.cancelled():
                call.future.exception()
        self._capture.__exit__(None, None, None)
        # a message the broker could not handle raised out of its handler (the socket loop logs and goes on)
        assert not self.logged("message handler failed"), self.logged("message handler failed")

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k not in ("event", "log_level")}
                for e in self.logs if e["event"] == event]


@pytest.fixture
async def h():
    harness = Harness()
    yield harness
    harness.close()


async def invoked(peer: Peer) -> list[tuple[dict[str, Any], bytes]]:
    msg = await peer.recv()
    assert msg.command == protocol.INVOKE
    return protocol.unbatch(msg)


# ----- Instance: what a READY header means ----------------------------------------------------------

def test_ready_fields_are_read_with_their_defaults_and_clamps() -> None:
    inst = Instance(b"i1", {"instance_id": "i1", "functions": {"f": "3"}})
    assert inst.describe() == {"id": "i1", "group": "", "group_version": 0, "functions": {"f": 3}, "credit": 1,
                               "concurrency": 1, "inflight": 0, "draining": False, "pid": None}
    assert inst.batch is False and inst.last_call_at == 0.0 and inst.avg_s == 0.0
    inst = Instance(b"i2", {"instance_id": "i2", "functions": {"f": 1}, "group": "g", "group_version": "4", "credit": 8, "pid": 12,
                            "batch": True})
    assert (inst.group, inst.group_version, inst.credit, inst.concurrency, inst.pid, inst.batch) == (
        "g", 4, 8, 8, 12, True), "concurrency defaults to the credit"
    assert Instance(b"i3", {"instance_id": "i3", "functions": {"f": 1}, "credit": 0, "concurrency": 0}).describe()["credit"] == 1
    assert Instance(b"i3", {"instance_id": "i3", "functions": {"f": 1}, "credit": 0, "concurrency": 0}).concurrency == 1
    assert Instance(b"i4", {"instance_id": "i4", "functions": {"f": 1}, "credit": 4, "concurrency": 9}).concurrency == 4
    assert Instance(b"i5", {"instance_id": "i5", "functions": {"f": 1}, "credit": 4, "concurrency": 2}).concurrency == 2
    assert Instance(b"i6", {"instance_id": "i6", "functions": {"f": 1}, "batch": 1}).batch is False, "only a true batch flag counts"
    with pytest.raises(broker_module.ProtocolError) as refused:
        Instance(b"i7", {"instance_id": "i7", "functions": ["f"]})
    assert str(refused.value) == "READY needs a non-empty map of functions to versions"
    for name in (None, "", 7):
        with pytest.raises(broker_module.ProtocolError) as refused:
            Instance(b"i8", {"instance_id": name, "functions": {"f": 1}})
        assert str(refused.value) == "READY needs the instance's id (instance_id)"


def test_room_boundaries_count_as_fast() -> None:
    inst = Instance(b"i1", {"instance_id": "i1", "functions": {"f": 1}, "credit": 5, "concurrency": 2})
    inst.avg_s = FAST_CALL_S  # an average of exactly the limit is still fast
    assert inst.room(0.0) == 5
    call = Call("c", "f", {}, b"", None, 30.0)  # type: ignore[arg-type]
    call.sent_at = 0.0
    inst.inflight["c"] = call
    assert 0.01 - 0.0 == SLOW_INFLIGHT_S and inst.room(SLOW_INFLIGHT_S) == 4, "in flight exactly the limit: still fast"
    assert inst.room(SLOW_INFLIGHT_S * 2) == 1


def test_a_new_call_is_unsent_unqueued_and_not_cold() -> None:
    call = Call("c1", "f", {"call_id": "c1"}, b"x", None, 2.5)  # type: ignore[arg-type]
    assert (call.instance, call.timer, call.queued_at, call.sent_at, call.wall, call.cold, call.timeout_s) == (
        None, None, 0.0, 0.0, 0.0, False, 2.5)


def test_idle_time_reported_by_an_instance_dates_its_last_call() -> None:
    before = time.monotonic()
    inst = Instance(b"i1", {"instance_id": "i1", "functions": {"f": 1}, "idle_s": 5})
    after = time.monotonic()
    assert before - 5 <= inst.last_call_at <= after - 5
    inst.note_idle({"idle_s": 0.0})
    assert inst.last_call_at >= after, "zero idle seconds: a call just finished"
    latest = inst.last_call_at
    inst.note_idle({"idle_s": 100})
    assert inst.last_call_at == latest, "an older report never moves the last call back"
    for bad in (True, -1, "5", None, [1]):
        inst = Instance(b"i2", {"instance_id": "i2", "functions": {"f": 1}, "idle_s": bad})
        assert inst.last_call_at == 0.0, bad


# ----- dispatch and results ---------------------------------------------------------------------------

async def test_ready_is_welcomed_with_a_heartbeat_naming_the_live_gateways(h: Harness) -> None:
    h.peers_list = [{"id": "gw1", "host": "h1", "router": "tcp://127.0.0.1:1", "link": "ipc:///l", "extra": "x"},
                    {"id": "gw2"}]
    p = h.peer(b"i1", group="grp", group_version=3)
    p.ready(group="grp", group_version=3, credit=4, concurrency=2)
    beat = await p.recv(skip=())
    assert beat.command == protocol.HEARTBEAT
    assert beat.header == {"gateways": [{"id": "gw1", "host": "h1", "router": "tcp://127.0.0.1:1", "link": "ipc:///l"},
                                        {"id": "gw2", "host": "", "router": "", "link": ""}]}
    [inst] = h.ready
    assert inst.describe() == {"id": "i1", "group": "grp", "group_version": 3, "functions": {"f": 1}, "credit": 4,
                               "concurrency": 2, "inflight": 0, "draining": False, "pid": 7}
    assert h.broker.routes["f"] == [inst] and h.broker.serving("f") == [inst] and h.broker.serving("other") == []
    # a READY again (the instance reconnected) replaces the entry, is not a new instance, and keeps its calls
    call = h.call("c1")
    h.broker.submit(call)
    [(header, body)] = await invoked(p)
    p.ready(group="grp", group_version=3, credit=2, concurrency=2)
    await until(lambda: h.broker.by_name["i1"] is not inst, what="the second READY")
    assert len(h.ready) == 1
    assert h.broker.by_name["i1"].inflight == {"c1": call} and call.instance is h.broker.by_name["i1"]
    assert h.broker.routes["f"] == [h.broker.by_name["i1"]]
    p.send(protocol.RESULT, {"call_id": "c1", "status": 200}, b"ok")
    assert await asyncio.wait_for(call.future, WAIT_S) == ({"call_id": "c1", "status": 200}, b"ok")


async def test_a_call_goes_to_the_instance_with_most_room_and_its_result_settles_it(h: Harness) -> None:
    small = await h.instance(b"small", credit=1)
    big = await h.instance(b"big", credit=3, concurrency=3)
    call = h.call("c1", body=b"payload")
    h.broker.submit(call)
    [(header, body)] = await invoked(big)
    assert (header, body) == ({"call_id": "c1", "function": "f"}, b"payload")
    assert call.instance is h.broker.by_name["big"] and call.sent_at > 0 and h.broker.pending == {"c1": call}
    big.send(protocol.RESULT, {"call_id": "c1", "status": 200, "took_ms": 1.0}, b"done")
    header, body = await asyncio.wait_for(call.future, WAIT_S)
    assert (header["status"], body) == (200, b"done")
    assert h.broker.pending == {} and h.broker.by_name["big"].inflight == {}
    await small.silent(0.05)  # a negative check: the smaller instance was never asked


async def test_equally_free_instances_take_turns(h: Harness) -> None:
    peers = {b"a": await h.instance(b"a", credit=4, concurrency=4),
             b"b": await h.instance(b"b", credit=4, concurrency=4)}
    order = []
    for n in range(4):
        call = h.call(f"c{n}")
        h.broker.submit(call)
        await until(lambda: call.instance is not None, what="dispatch")
        order.append(call.instance.name.encode())
        [(header, _)] = await invoked(peers[call.instance.name.encode()])
        # took_ms 0: both stay fast, so both have the same room (a busy machine's clock would make one slow)
        peers[call.instance.name.encode()].send(protocol.RESULT, {"call_id": header["call_id"], "status": 200, "took_ms": 0}, b"")
        await asyncio.wait_for(call.future, WAIT_S)
    assert order in ([b"a", b"b", b"a", b"b"], [b"b", b"a", b"b", b"a"])


async def test_a_slow_instance_gets_only_its_concurrency_and_queued_calls_follow_each_result(h: Harness) -> None:
    p = await h.instance(b"i1", credit=3, concurrency=1)
    first = h.call("c0")
    h.broker.submit(first)
    await invoked(p)
    p.send(protocol.RESULT, {"call_id": "c0", "status": 200, "took_ms": 50}, b"")
    await asyncio.wait_for(first.future, WAIT_S)
    inst = h.broker.by_name["i1"]
    assert inst.avg_s == pytest.approx(EWMA_WEIGHT * 0.050)
    probe = h.call("probe")
    h.broker.submit(probe)
    await invoked(p)
    p.send(protocol.RESULT, {"call_id": "probe", "status": 200, "took_ms": 0}, b"")
    await asyncio.wait_for(probe.future, WAIT_S)
    assert inst.avg_s == pytest.approx(EWMA_WEIGHT * 0.050 * (1 - EWMA_WEIGHT)), "a fast call pulls the average down"
    p.send(protocol.RESULT, {"call_id": "c0", "status": 200, "took_ms": 5000}, b"")  # late: no call, no change
    inst.avg_s = EWMA_WEIGHT * 0.050
    calls = [h.call(f"c{n}") for n in (1, 2, 3)]
    for call in calls:
        h.broker.submit(call, bounded=False)
    assert [c.call_id for c in inst.inflight.values()] == ["c1"] and [c.call_id for c in h.broker.queues["f"]] == [
        "c2", "c3"]
    assert all(c.queued_at > 0 for c in calls[1:])
    for n in (1, 2, 3):
        [(header, _)] = await invoked(p)
        assert header["call_id"] == f"c{n}"
        p.send(protocol.RESULT, {"call_id": f"c{n}", "status": 200}, b"")  # no took_ms: the broker's own clock
        await asyncio.wait_for(calls[n - 1].future, WAIT_S)
    assert not h.broker.queues["f"] and h.broker.pending == {}
    # without took_ms the broker's own clock counts (seconds since the call left, well under one here)
    assert 0 < inst.avg_s < 1 and inst.avg_s != pytest.approx(EWMA_WEIGHT * 0.050)


async def test_a_full_queue_refuses_bounded_calls_and_takes_unbounded_ones(h: Harness) -> None:
    h.broker.submit(h.call("c1"))
    h.broker.submit(h.call("c2"))
    with pytest.raises(TooManyRequests) as refused:
        h.broker.submit(h.call("c3"))
    assert refused.value.message == "function 'f' has 2 calls waiting, its queue limit; retry shortly"
    assert refused.value.details == {"retry_after_s": 1}
    h.broker.submit(h.call("c4"), bounded=False)  # an async call, already durable
    assert [c.call_id for c in h.broker.queues["f"]] == ["c1", "c2", "c4"]
    p = h.peer(b"i1")
    p.ready(credit=3, concurrency=3)  # the queued calls leave at once, before the welcome HEARTBEAT
    assert [header["call_id"] for header, _ in await invoked(p)] == ["c1"]
    assert [header["call_id"] for header, _ in await invoked(p)] == ["c2"]
    assert [header["call_id"] for header, _ in await invoked(p)] == ["c4"]


async def test_a_queued_call_fails_at_its_deadline_and_leaves_the_queue(h: Harness) -> None:
    call = h.call("c1", timeout_s=0.05)
    h.broker.submit(call)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as late:
        await asyncio.wait_for(call.future, WAIT_S)
    assert time.monotonic() - started >= STUCK_GRACE_S, "the deadline includes the grace"
    assert late.value.message == "no instance of function 'f' became free within its 0.05 s timeout"
    assert late.value.details == {"function": "f", "timeout_s": 0.05}
    assert not h.broker.queues["f"] and h.stuck == []


async def test_an_unanswered_call_fails_at_its_deadline_and_marks_its_instance_stuck(h: Harness) -> None:
    p = await h.instance(b"i1", credit=2, concurrency=2)
    call = h.call("c1", timeout_s=0.05)
    started = time.monotonic()
    h.broker.submit(call)
    await invoked(p)
    with pytest.raises(DeadlineExceeded) as late:
        await asyncio.wait_for(call.future, WAIT_S)
    assert time.monotonic() - started >= STUCK_GRACE_S, "the runtime is given a grace past the timeout to answer"
    assert late.value.message == "function 'f' did not finish within its 0.05 s timeout (spec.timeout)"
    assert late.value.details == {"function": "f", "timeout_s": 0.05}
    inst = h.broker.by_name["i1"]
    assert h.stuck == [(inst, call)] and inst.inflight == {} and h.broker.pending == {}
    p.send(protocol.RESULT, {"call_id": "c1", "status": 200}, b"late")  # ignored: the call is over
    after = h.call("c2")
    h.broker.submit(after)
    [(header, _)] = await invoked(p)
    assert header["call_id"] == "c2"
    p.send(protocol.RESULT, {"call_id": "c2", "status": 200}, b"ok")
    assert (await asyncio.wait_for(after.future, WAIT_S))[1] == b"ok"


async def test_calls_submitted_together_leave_in_one_batched_invoke(h: Harness) -> None:
    p = await h.instance(b"i1", credit=300, concurrency=300, batch=True)
    calls = [h.call(f"c{n}") for n in range(300)]
    for call in calls:
        h.broker.submit(call)
    calls[1].future.cancel()  # settled before the flush: not sent
    first, second = await invoked(p), await invoked(p)
    assert [hd["call_id"] for hd, _ in first + second] == [c.call_id for c in calls if c.call_id != "c1"]
    assert (len(first), len(second)) == (protocol.MAX_BATCH, 299 - protocol.MAX_BATCH)
    assert first[0] == ({"call_id": "c0", "function": "f"}, b"c0")
    p.sock.send_multipart(protocol.encode_batch(protocol.RESULT, [{"call_id": "c0", "status": 200},
                                                                  {"call_id": "c2", "status": 201}], [b"r0", b"r2"]))
    assert (await asyncio.wait_for(calls[0].future, WAIT_S))[1] == b"r0"
    assert (await asyncio.wait_for(calls[2].future, WAIT_S))[0]["status"] == 201
    later = [h.call("d1"), h.call("d2")]  # a later burst, here of two: flushed again, in one INVOKE
    for call in later:
        h.broker.submit(call)
    assert [hd["call_id"] for hd, _ in await invoked(p)] == ["d1", "d2"]
    # one call alone goes as a plain INVOKE
    single = Harness()
    try:
        q = await single.instance(b"i2", credit=4, concurrency=4, batch=True)
        single.broker.submit(single.call("solo"))
        msg = await q.recv()
        assert msg.command == protocol.INVOKE and msg.header == {"call_id": "solo", "function": "f"}
    finally:
        single.close()


async def test_an_instance_without_batching_gets_one_invoke_per_call(h: Harness) -> None:
    p = await h.instance(b"i1", credit=3, concurrency=3)
    for n in range(3):
        h.broker.submit(h.call(f"c{n}"))
    for n in range(3):
        msg = await p.recv()
        assert msg.command == protocol.INVOKE and msg.header == {"call_id": f"c{n}", "function": "f"}


# ----- versions, draining, instances that go ------------------------------------------------------

async def test_new_calls_go_to_the_newest_version_and_old_instances_drain_after_bye(h: Harness) -> None:
    old = await h.instance(b"old", {"f": 1, "g": 1}, credit=5, concurrency=5)
    new = await h.instance(b"new", {"f": 2}, credit=1, group_version=1)
    newer_group = await h.instance(b"newer", {"f": 2}, credit=1, group_version=2)
    # the newest version of f, in whichever group: a newer group version of it does not take its calls alone
    assert sorted(i.name for i in h.broker.routes["f"]) == ["new", "newer"]
    assert h.broker.routes["g"] == [h.broker.by_name["old"]]
    assert {i.name.encode() for i in h.broker.serving("f")} == {b"old", b"new", b"newer"}
    g_call = h.call("g1", "g")
    h.broker.submit(g_call)
    await invoked(old)
    newer_group.send(protocol.BYE, {})
    assert (await newer_group.recv()).command == protocol.BYE, "a BYE is acknowledged"
    await until(lambda: h.gone, what="the idle instance that said BYE to be forgotten")
    assert [(i.name, why) for i, why in h.gone] == [("newer", "said BYE")] and "newer" not in h.broker.by_name
    assert h.broker.routes["f"] == [h.broker.by_name["new"]]
    call = h.call("f1")
    h.broker.submit(call)
    await invoked(new)
    # an instance with a call in flight that says BYE keeps it, takes nothing new, and is not forgotten yet
    old.send(protocol.BYE, {})
    assert (await old.recv()).command == protocol.BYE
    await until(lambda: h.broker.by_name["old"].draining, what="old to drain")
    assert "g" not in h.broker.routes and len(h.gone) == 1
    queued = h.call("g2", "g")
    h.broker.submit(queued)
    old.send(protocol.RESULT, {"call_id": "g1", "status": 200}, b"last")
    assert (await asyncio.wait_for(g_call.future, WAIT_S))[1] == b"last"
    await old.silent(0.05)  # a negative check: a draining instance is given no queued call
    assert list(h.broker.queues["g"]) == [queued]
    h.broker.instance_exited("old", "exit code 0")  # a drained instance that exits is forgotten quietly
    assert [(i.name.encode(), why) for i, why in h.gone] == [(b"newer", "said BYE"), (b"old", "exit code 0")]
    assert "g" not in h.broker.routes and list(h.broker.queues["g"]) == [queued]
    await h.instance(b"zero", {"z": 0}, group_version=0)  # the lowest version there is still routes
    assert [i.name.encode() for i in h.broker.routes["z"]] == [b"zero"]


async def test_a_draining_instance_leaves_the_others_of_its_version_routed(h: Harness) -> None:
    first = await h.instance(b"a", credit=1)
    await h.instance(b"b", credit=1)
    call = h.call("c1")
    h.broker.submit(call)
    await invoked(first)
    first.send(protocol.BYE, {})
    assert (await first.recv()).command == protocol.BYE
    await until(lambda: h.broker.by_name["a"].draining, what="a to drain")
    await h.instance(b"c", credit=1)  # the routes of f are made again, past the draining instance
    assert sorted(i.name.encode() for i in h.broker.routes["f"]) == [b"b", b"c"]


async def test_a_heartbeat_from_an_unknown_instance_registers_it(h: Harness) -> None:
    p = h.peer(b"i1")  # the gateway restarted; the instance only beats
    p.ready(command=protocol.HEARTBEAT, idle_s=3)
    await until(lambda: h.ready, what="registration from a HEARTBEAT")
    inst = h.broker.by_name["i1"]
    assert h.broker.routes["f"] == [inst]
    before = inst.last_call_at
    p.send(protocol.HEARTBEAT, {"idle_s": 0})
    await until(lambda: inst.last_call_at > before, what="the idle time of a known instance's HEARTBEAT")
    assert h.broker.by_name["i1"] is inst and len(h.ready) == 1, "a known instance's HEARTBEAT does not re-register"


async def test_an_exited_instance_fails_its_calls_and_is_forgotten(h: Harness) -> None:
    p = await h.instance(b"i1", credit=2, concurrency=2)
    call = h.call("c1")
    h.broker.submit(call)
    await invoked(p)
    h.broker.instance_exited("nobody", "exit 1")  # unknown: nothing happens
    h.broker.instance_exited("i1", "exit code 137")
    with pytest.raises(InstanceFailed) as failed:
        await asyncio.wait_for(call.future, WAIT_S)
    assert failed.value.message == "the instance running function 'f' failed during the call: exit code 137"
    assert failed.value.details == {"function": "f"}
    assert [(i.name.encode(), why) for i, why in h.gone] == [(b"i1", "exit code 137")]
    assert h.logged("instance gone") == [{"instance": "i1", "reason": "exit code 137"}]
    assert h.broker.instances == {} and "f" not in h.broker.routes and h.broker.pending == {}
    queued = h.call("c2", timeout_s=0.05)
    h.broker.submit(queued)
    assert list(h.broker.queues["f"]) == [queued], "with no instance left the call waits"


async def test_a_silent_instance_is_dropped_and_a_busy_one_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_module, "HEARTBEAT_INTERVAL_S", 0.05)
    h = Harness()
    try:
        call = h.call("c1", "b")
        h.broker.submit(call)  # queued first, so "busy" is never idle, however slow this machine is
        idle = await h.instance(b"idle")
        busy = h.peer(b"busy")
        busy.ready({"b": 1})
        await invoked(busy)
        await until(lambda: h.gone, what="the silent instance to be dropped")
        [(inst, why)] = h.gone
        assert inst.name.encode() == b"idle" and why.startswith("no heartbeat for ") and why.endswith(" s")
        silent_s = float(why.split()[3])
        # at least the liveness limit; the upper bound only catches a nonsense figure (a sum of clock readings)
        assert 0.05 * broker_module.HEARTBEAT_LIVENESS <= silent_s < 3600, why
        beats = 0
        while beats < 3:  # the broker keeps beating to the instance it kept
            beats += (await busy.recv(skip=())).command == protocol.HEARTBEAT
        assert "busy" in h.broker.by_name and not call.future.done()
        busy.send(protocol.RESULT, {"call_id": "c1", "status": 200}, b"")
        await asyncio.wait_for(call.future, WAIT_S)
        await until(lambda: len(h.gone) == 2, what="the now idle and silent instance to be dropped")
        idle.sock.close()
        h.open.remove(idle)
    finally:
        h.close()


async def test_a_busy_instance_that_vanished_is_dropped_at_the_next_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_module, "HEARTBEAT_INTERVAL_S", 0.05)
    h = Harness()
    try:
        p = await h.instance(b"i1")
        call = h.call("c1")
        h.broker.submit(call)
        await invoked(p)
        p.sock.close()  # gone without a BYE while running a call: only the failed heartbeat can tell
        h.open.remove(p)
        with pytest.raises(InstanceFailed) as failed:
            await asyncio.wait_for(call.future, WAIT_S)
        [(inst, why)] = h.gone
        assert inst.name.encode() == b"i1" and why.startswith("unreachable: "), why
        assert failed.value.message == f"the instance running function 'f' failed during the call: {why}"
        assert h.broker.instances == {} and "f" not in h.broker.routes
    finally:
        h.close()


async def test_a_live_instance_that_keeps_beating_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_module, "HEARTBEAT_INTERVAL_S", 0.05)
    monkeypatch.setattr(broker_module, "HEARTBEAT_LIVENESS", 20)  # a 1 s window, far above this loop's delays
    h = Harness()
    try:
        p = await h.instance(b"i1")
        deadline = time.monotonic() + 3.0  # three windows: a broker that ignored the beats would drop it
        while time.monotonic() < deadline:
            p.send(protocol.HEARTBEAT, {})
            await asyncio.sleep(0.05)  # the instance's own beat interval, not a wait
        assert h.gone == [] and "i1" in h.broker.by_name
    finally:
        h.close()


# ----- other messages ------------------------------------------------------------------------------

async def test_calls_reports_and_replies_reach_their_handlers(h: Harness) -> None:
    p = await h.instance(b"i1")
    p.send(protocol.CALL, {"call_id": "t1", "function": "other"}, b"arg")
    await until(lambda: h.calls, what="the CALL")
    [(ident, msg)] = h.calls
    # the broker names the calling instance by the routing id the CALL came on (its key made it)
    assert ident == h.broker.by_name["i1"].id and msg.header == {"call_id": "t1", "function": "other",
                                                                 "instance": "i1"}
    assert msg.body == b"arg"
    h.broker.reply(ident, {"call_id": "t1", "status": 200}, b"answer")
    answer = await p.recv()
    assert (answer.command, answer.header, answer.body) == (
        protocol.RESULT, {"call_id": "t1", "status": 200}, b"answer")
    h.broker.reply(b"nobody" * 10, {"call_id": "t2"}, b"")  # a vanished caller: logged, not raised
    [undelivered] = h.logged("task call result not delivered")
    assert undelivered["peer"] == (b"nobody" * 10)[:40] and "unreachable" in undelivered["error"].lower()
    p.send(protocol.HEARTBEAT, {"edges": [["a", "b", True, True, 1.0, 1]]})
    p.send(protocol.HEARTBEAT, {"failed_calls": []})  # no edges: not a report
    call = h.call("c1")
    h.broker.submit(call)
    await invoked(p)
    p.send(protocol.RESULT, {"call_id": "c1", "status": 200, "edges": []}, b"")
    await asyncio.wait_for(call.future, WAIT_S)
    assert h.reports == [{"edges": [["a", "b", True, True, 1.0, 1]]}, {"call_id": "c1", "status": 200, "edges": []}]


async def test_malformed_messages_are_dropped_and_the_broker_keeps_serving(h: Harness) -> None:
    ok, nasty = b"i" * 50, b"b" * 60  # long ids: a log names a peer by its first 40 bytes
    p = await h.instance(ok, credit=2, concurrency=2)
    bad = h.peer(nasty, route=nasty)  # a routing id of its own choosing: its READYs are refused too
    bad.sock.send_multipart([protocol.SIGNATURE, protocol.READY])  # too short
    bad.sock.send_multipart([b"NUC0", protocol.READY, protocol.pack_header({"functions": {"f": 1}})])
    bad.sock.send_multipart([protocol.SIGNATURE, b"NOPE", protocol.pack_header({})])
    bad.send(protocol.READY, {"functions": {}})  # a READY with nothing to serve
    bad.send(protocol.READY, {"functions": {"f": "one"}})
    bad.send(protocol.REQ, {})  # a command instances do not send
    call = h.call("c1")
    h.broker.submit(call)
    await invoked(p)
    p.sock.send_multipart([protocol.SIGNATURE, protocol.RESULT, protocol.pack_header({"batch": [{"call_id": "c1"}]})])
    p.sock.send_multipart(protocol.encode_batch(protocol.RESULT, [{"call_id": "unknown", "status": 200},
                                                                  {"call_id": "c1", "status": 200}], [b"", b"fine"]))
    assert (await asyncio.wait_for(call.future, WAIT_S))[1] == b"fine", "a late result does not hide the next one"
    assert list(h.broker.by_name) == [ok.decode()] and len(h.ready) == 1
    [short, signature, command] = h.logged("dropped malformed message")
    assert short["peer"] == signature["peer"] == command["peer"] == nasty[:40]
    assert "NUC0" in signature["error"] and "NOPE" in command["error"]
    [no_functions, not_a_number] = h.logged("dropped bad READY")
    assert no_functions == {"peer": nasty[:40], "error": "READY needs a non-empty map of functions to versions"}
    assert not_a_number["peer"] == nasty[:40] and "one" in not_a_number["error"]
    # an unregistered peer's other commands are refused for its key (services/gateway/broker.py)
    refused = h.logged("dropped a message from an unregistered peer")
    assert [(e["command"], e["peer"]) for e in refused] == [(protocol.REQ, nasty[:40])]
    [bad_batch] = h.logged("dropped malformed RESULT")
    assert bad_batch["peer"] == h.broker.by_name[ok.decode()].id[:40] and "batch header" in bad_batch["error"]


async def test_a_deleted_function_fails_its_queued_calls(h: Harness) -> None:
    calls = [h.call("c1"), h.call("c2")]
    for call in calls:
        h.broker.submit(call)
    gone = NotFound("function 'f' was deleted")
    h.broker.fail_function("f", gone)
    h.broker.fail_function("never-seen", gone)
    for call in calls:
        with pytest.raises(NotFound):
            await call.future
        assert call.timer is not None and call.timer.cancelled()
    assert "f" not in h.broker.queues


async def test_wait_ready_returns_a_registered_instance_or_the_next_match(h: Harness) -> None:
    first = await h.instance(b"i1")
    assert (await h.broker.wait_ready(lambda i: i.name.encode() == b"i1", 1.0)).name.encode() == b"i1"
    waiting = asyncio.ensure_future(h.broker.wait_ready(lambda i: i.functions.get("g") == 2, WAIT_S))
    await until(lambda: h.broker.ready_waiters, what="the waiter")
    other = h.peer(b"i2")
    other.ready({"g": 1})
    await until(lambda: len(h.ready) == 2, what="i2")
    assert not waiting.done(), "a READY that does not match does not wake the waiter"
    third = h.peer(b"i3")
    third.ready({"g": 2})
    assert (await asyncio.wait_for(waiting, WAIT_S)).name.encode() == b"i3"
    assert h.broker.ready_waiters == []
    with pytest.raises(asyncio.TimeoutError):
        await h.broker.wait_ready(lambda i: False, 0.01)
    assert h.broker.ready_waiters == [] and first


async def test_closing_fails_calls_in_flight() -> None:
    h = Harness()
    p = await h.instance(b"i1")
    call = h.call("c1")
    h.broker.submit(call)
    await invoked(p)
    h.close()
    with pytest.raises(NotFound) as closing:
        await call.future
    assert str(closing.value) == "the gateway is shutting down"


async def test_sandboxed_instances_connect_through_the_link_file(tmp_path) -> None:
    link_dir = tmp_path / "a" / "l"  # two folders to make
    link = f"ipc://{link_dir}/gateway.sock"
    h = Harness(link=link)
    try:
        assert stat.S_IMODE(link_dir.stat().st_mode) == 0o755
        assert stat.S_IMODE((link_dir / "gateway.sock").stat().st_mode) == 0o666
        p = h.peer(b"i1", endpoint=link)
        p.ready()
        assert (await p.recv(skip=())).command == protocol.HEARTBEAT
        assert h.broker.routes["f"][0].name.encode() == b"i1"
    finally:
        h.close()
    link_dir.chmod(0o700)  # a folder that exists (a restarted gateway's) is reused and opened to the instances
    again = Harness(link=f"ipc://{link_dir}/second.sock")
    try:
        assert stat.S_IMODE(link_dir.stat().st_mode) == 0o755
        assert stat.S_IMODE((link_dir / "second.sock").stat().st_mode) == 0o666
    finally:
        again.close()


async def test_an_instance_id_that_is_not_utf8_is_described_and_logged_readably(h: Harness) -> None:
    p = await h.instance(b"\xffi1")
    assert h.ready[0].describe()["id"] == "\ufffdi1" and h.logged("instance ready")[0]["id"] == "\ufffdi1"
    p.send(protocol.BYE, {})
    await until(lambda: h.gone, what="the instance to leave")
    assert h.logged("instance gone") == [{"instance": "\ufffdi1", "reason": "said BYE"}]


async def test_queued_calls_fill_exactly_the_room_an_instance_has(h: Harness) -> None:
    h.broker.submit(h.call("g1", "g"), bounded=False)  # waiting before any instance serves g
    for n in (1, 2, 3):
        h.broker.submit(h.call(f"f{n}"), bounded=False)
    # serving f first and g second: f's queue gives it two calls (its credit), g's waits for room
    p = h.peer(b"i1")
    p.ready({"f": 1, "g": 1}, credit=2, concurrency=2)
    assert [hd["call_id"] for hd, _ in await invoked(p)] == ["f1"]
    assert [hd["call_id"] for hd, _ in await invoked(p)] == ["f2"]
    await p.silent(0.05)  # a negative check: no third call beyond the credit
    assert [c.call_id for c in h.broker.queues["f"]] == ["f3"] and [c.call_id for c in h.broker.queues["g"]] == ["g1"]
    p.send(protocol.RESULT, {"call_id": "f1", "status": 200, "took_ms": 0}, b"")  # one still in flight: room for one
    assert [hd["call_id"] for hd, _ in await invoked(p)] == ["f3"]
    p.send(protocol.RESULT, {"call_id": "f2", "status": 200, "took_ms": 0}, b"")  # f's queue is empty: g's turn
    assert [hd["call_id"] for hd, _ in await invoked(p)] == ["g1"]


async def test_an_instance_takes_queued_calls_only_of_the_functions_routed_to_it(h: Harness) -> None:
    old = await h.instance(b"old", {"f": 1, "g": 1}, credit=1)
    new = await h.instance(b"new", {"f": 2}, credit=1)
    g1 = h.call("g1", "g")
    h.broker.submit(g1)
    await invoked(old)
    f1, f2, g2 = h.call("f1"), h.call("f2"), h.call("g2", "g")
    for call in (f1, f2, g2):
        h.broker.submit(call)
    await invoked(new)
    assert [c.call_id for c in h.broker.queues["f"]] == ["f2"] and [c.call_id for c in h.broker.queues["g"]] == ["g2"]
    # the old version's instance is free again: it takes g's call, never f's (f waits for its newest version)
    old.send(protocol.RESULT, {"call_id": "g1", "status": 200}, b"")
    assert [hd["call_id"] for hd, _ in await invoked(old)] == ["g2"]
    assert [c.call_id for c in h.broker.queues["f"]] == ["f2"]
    new.send(protocol.RESULT, {"call_id": "f1", "status": 200}, b"")
    assert [hd["call_id"] for hd, _ in await invoked(new)] == ["f2"]


async def test_during_a_regroup_the_new_group_takes_calls_first_and_the_old_one_the_rest_until_it_says_bye(
        h: Harness) -> None:
    # the same version of f in the group in force and in the group a regroup made: both serve, so a regroup
    # under load keeps the capacity in use while the new group's instances come up
    old = await h.instance(b"old", {"f": 1, "g": 1}, credit=1, group="g-fg", group_version=1)
    new = await h.instance(b"new", {"f": 1}, credit=1, group="g-f", group_version=2)
    assert sorted(i.name for i in h.broker.routes["f"]) == ["new", "old"]
    first, second = h.call("c1"), h.call("c2")
    h.broker.submit(first)
    h.broker.submit(second)
    got = {p.ident: [hdr["call_id"] for hdr, _ in await invoked(p)] for p in (old, new)}
    # the new group first (a fused call stays fused once the regroup is in force), the old one takes the rest
    assert got == {new.ident: ["c1"], old.ident: ["c2"]}, got
    old.send(protocol.BYE, {})
    assert (await old.recv()).command == protocol.BYE
    await until(lambda: h.broker.by_name["old"].draining, what="old to drain")
    assert [i.name for i in h.broker.routes["f"]] == ["new"]


async def test_a_call_given_to_an_instance_in_the_turn_it_says_bye_reaches_it_before_the_acknowledgement(
        h: Harness) -> None:
    # its RESULT frees room, the queued call is dispatched to it, and its BYE is read in the same turn: the
    # INVOKE must leave before the BYE's acknowledgement (an acknowledged instance with nothing in flight exits)
    p = await h.instance(b"i1", credit=1, batch=True)
    first, queued = h.call("c1"), h.call("c2")
    h.broker.submit(first)
    h.broker.submit(queued)
    assert [hdr["call_id"] for hdr, _ in await invoked(p)] == ["c1"]
    p.send(protocol.RESULT, {"call_id": "c1", "status": 200, "took_ms": 0}, b"")
    p.send(protocol.BYE, {})
    got = await p.recv()
    assert got.command == protocol.INVOKE and [hdr["call_id"] for hdr, _ in protocol.unbatch(got)] == ["c2"], got
    assert (await p.recv()).command == protocol.BYE


async def test_a_deleted_function_is_no_longer_served_by_the_instances_that_had_it(h: Harness) -> None:
    # fused with f, g is deleted and deployed again (its versions restart at 1): the old instance's g is not it
    old = await h.instance(b"old", {"f": 1, "g": 1}, credit=1, group="g-fg", group_version=1)
    h.broker.fail_function("g", NotFound("function 'g' was deleted"))
    assert "g" not in h.broker.routes and h.broker.by_name["old"].functions == {"f": 1}
    assert [i.name for i in h.broker.serving("f")] == ["old"]
    redeployed = await h.instance(b"new", {"g": 1}, credit=1, group="g-g", group_version=3)
    call = h.call("c1", "g")
    h.broker.submit(call)
    assert [hdr["call_id"] for hdr, _ in await invoked(redeployed)] == ["c1"]
    await old.silent(0.05)


async def test_a_command_instances_do_not_send_is_logged_and_never_taken_for_a_task_call(h: Harness) -> None:
    p = await h.instance(b"i1")
    p.send(protocol.REQ, {"call_id": "t1", "function": "other"}, b"arg")
    p.send(protocol.CALL, {"call_id": "t2", "function": "other"}, b"arg")  # a real one after it
    await until(lambda: h.calls, what="the CALL")
    assert [msg.header["call_id"] for _, msg in h.calls] == ["t2"]
    assert h.logged("unexpected command from instance") == [
        {"command": protocol.REQ, "peer": h.broker.by_name["i1"].id[:40]}]


async def test_results_that_free_room_for_several_calls_fill_it_across_the_functions_served(h: Harness) -> None:
    for call in (h.call("f1"), h.call("f2"), h.call("f3"), h.call("g1", "g")):
        h.broker.submit(call, bounded=False)
    p = h.peer(b"i1")
    p.ready({"f": 1, "g": 1}, credit=2, concurrency=2, batch=True)
    assert [hd["call_id"] for hd, _ in await invoked(p)] == ["f1", "f2"]
    # both answers in one message: one look at the queues must give both freed places, to f's call and g's
    p.sock.send_multipart(protocol.encode_batch(protocol.RESULT, [{"call_id": "f1", "status": 200, "took_ms": 0},
                                                                  {"call_id": "f2", "status": 200, "took_ms": 0}],
                                                [b"", b""]))
    assert [hd["call_id"] for hd, _ in await invoked(p)] == ["f3", "g1"]
    assert not h.broker.queues["f"] and not h.broker.queues["g"]


async def test_deleting_a_function_leaves_the_instances_that_never_served_it_alone(h: Harness) -> None:
    await h.instance(b"i1", {"f": 1})
    h.broker.fail_function("g", NotFound("function 'g' was deleted"))
    assert h.broker.by_name["i1"].functions == {"f": 1} and [i.name for i in h.broker.serving("f")] == ["i1"]


async def test_an_instance_of_group_version_0_the_default_takes_calls(h: Harness) -> None:
    p = await h.instance(b"i1", group_version=0)
    assert h.broker.by_name["i1"].group_version == 0
    call = h.call("c1")
    h.broker.submit(call)
    assert [hd["call_id"] for hd, _ in await invoked(p)] == ["c1"]
