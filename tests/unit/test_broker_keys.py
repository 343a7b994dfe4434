"""The broker judges instances by the CURVE key and the routing id that key makes (real sockets, a real ZAP handler)."""

from __future__ import annotations

import asyncio
from typing import Iterator

import pytest
import zmq
from structlog.testing import capture_logs

from shared import protocol
from shared.curve import Keys, ZapHandler, memory_keys
from shared.linkkeys import curve_client
from services.gateway.broker import Broker, Call, Instance
from tests.stack import free_port
from tests.unit.test_broker_vanished import until

MEMBERS = {"g": {"f"}, "h": {"victim"}}


def admits(inst: Instance) -> str | None:
    strangers = set(inst.functions) - MEMBERS.get(inst.group, set())
    return f"{sorted(strangers)} not in group {inst.group}" if strangers else None


def ready(sock: zmq.Socket, ident: str, group: str = "g", version: int = 1,
          functions: tuple[str, ...] = ("f",)) -> None:
    sock.send_multipart(protocol.encode(protocol.READY, {
        "instance_id": ident, "group": group, "group_version": version, "functions": {f: 1 for f in functions},
        "credit": 4, "concurrency": 4, "pid": 1}))


def handshake_failed(sock: zmq.Socket, monitor: zmq.Socket, timeout_ms: int = 10_000) -> bool:
    """Whether ``sock``'s connection is turned away in its handshake (the server closes it or says ERROR);
    ``monitor``: its monitor socket, made before it connected."""
    from zmq.utils.monitor import recv_monitor_message

    failed = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
              zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_DISCONNECTED}
    try:
        while monitor.poll(timeout_ms):
            event = recv_monitor_message(monitor)["event"]
            if event in failed:
                return True
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return False
        return False
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


def next_invoke(sock: zmq.Socket) -> protocol.Message:
    while sock.poll(5000):
        msg = protocol.decode(sock.recv_multipart())
        if msg.command == protocol.INVOKE:
            return msg
    raise AssertionError("no INVOKE arrived")


class Peers:
    def __init__(self, ctx: zmq.Context, endpoint: str, keys: Keys) -> None:
        self.ctx, self.endpoint, self.keys = ctx, endpoint, keys
        self.socks: list[zmq.Socket] = []
        self.monitors: dict[zmq.Socket, zmq.Socket] = {}
        self.logs: list[dict] = []  # what the broker logged (the rig captures it)
        self.key: dict[zmq.Socket, str] = {}  # each socket's CURVE public key (z85), as the broker reads it

    def refusals(self, event: str) -> list[dict]:
        """The broker's log entries for ``event``, without the event and level."""
        return [{k: v for k, v in e.items() if k not in ("event", "log_level")} for e in self.logs
                if e["event"] == event]

    def open(self, ident: str, key_of: tuple[str, str, int] | None = None, made_up: bool = False,
             plain: bool = False) -> zmq.Socket:
        """A DEALER keyed as instance ``key_of`` (default: ``ident`` of group g v1) on the routing id that key
        makes for it; or keyed as another instance, with a made-up keypair or with no CURVE at all, on
        routing id ``ident``."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, ident.encode())
        if made_up:
            public, secret = zmq.curve_keypair()
            curve_client(sock, public, secret, self.keys.public("gateway"))
            self.key[sock] = public.decode()
        elif not plain:
            issued = key_of or (ident, "g", 1)
            self.keys.client_of_instance(sock, *issued)
            self.key[sock] = self.keys.instance(*issued).public.decode()
            if key_of is not None and key_of[0] != ident:  # another instance's key: its own routing id
                sock.setsockopt(zmq.ROUTING_ID, ident.encode())
        self.monitors[sock] = sock.get_monitor_socket()
        sock.connect(self.endpoint)
        self.socks.append(sock)
        return sock


@pytest.fixture
async def rig() -> Iterator[tuple[Broker, ZapHandler, Peers]]:
    ctx = zmq.Context()
    keys = memory_keys()
    zap = ZapHandler(ctx, keys)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with capture_logs() as logs:
        broker = Broker(ctx, endpoint, 10, on_ready=lambda inst: None, on_gone=lambda inst, why: None, keys=keys,
                        admits=admits)
        peers = Peers(ctx, endpoint, keys)
        peers.logs = logs
        try:
            yield broker, zap, peers
        finally:
            for sock in peers.socks:
                if not peers.monitors[sock].closed:
                    sock.disable_monitor()
                    peers.monitors[sock].close(linger=0)
                sock.close(linger=0)
            broker.close()
            zap.close()
            ctx.term()


async def test_an_instance_registers_only_with_the_key_issued_for_it(rig) -> None:
    broker, zap, peers = rig
    plain = peers.open("plain", plain=True)
    ready(plain, "plain")
    assert await asyncio.to_thread(handshake_failed, plain, peers.monitors[plain]), "no CURVE: not let in"
    attempts = [
        (peers.open("madeup", made_up=True), "madeup", "h", 1, ("victim",)),  # a key of its own making
        (peers.open("other", key_of=("issued", "g", 1)), "other", "g", 1, ("f",)),  # another instance's key
        (peers.open("v2", key_of=("v2", "g", 1)), "v2", "g", 2, ("f",)),  # its key, another version
        (peers.open("hop", key_of=("hop", "g", 1)), "hop", "h", 1, ("victim",)),  # its key, another group
        (peers.open("greedy"), "greedy", "g", 1, ("f", "victim")),  # its key, a function not its group's
    ]
    for sock, ident, group, version, functions in attempts:
        ready(sock, ident, group, version, functions)
    await until(lambda: broker.refused >= len(attempts), what="every forged READY to be refused")
    assert broker.instances == {} and broker.routes.get("victim") in (None, [])
    # each refusal counted once and logged with who tried what (the operator's record of an attack)
    assert broker.refused == len(attempts)
    not_issued = peers.refusals("refused a READY whose key or routing id was not issued for that instance, group"
                                " and version")
    not_members = peers.refusals("refused a READY for functions that are not its group's")
    assert sorted(e.pop("refused") for e in not_issued + not_members) == list(range(1, len(attempts) + 1))
    expected = [{"peer": sock.getsockopt(zmq.ROUTING_ID)[:40], "key": peers.key[sock], "group": group,
                 "group_version": version} for sock, _, group, version, _ in attempts[:4]]
    assert sorted(not_issued, key=repr) == sorted(expected, key=repr)
    greedy = attempts[4][0]
    assert not_members == [{"peer": greedy.getsockopt(zmq.ROUTING_ID)[:40], "key": peers.key[greedy],
                            "problem": "['victim'] not in group g"}]
    good = peers.open("good")
    ready(good, "good")
    await until(lambda: broker.routes.get("f"), what="the READY with the issued key")
    assert list(broker.by_name) == ["good"]


async def test_a_result_counts_only_from_the_instance_the_call_was_sent_to(rig) -> None:
    broker, zap, peers = rig
    runner = peers.open("runner", key_of=("runner", "h", 1))
    ready(runner, "runner", "h", 1, ("victim",))
    await until(lambda: broker.routes.get("victim"), what="the victim's instance")
    future = asyncio.get_running_loop().create_future()
    broker.submit(Call("c-victim", "victim", {"call_id": "c-victim", "function": "victim"}, b"secret", future, 10.0))
    assert (await asyncio.to_thread(next_invoke, runner)).header["call_id"] == "c-victim"

    forger = peers.open("forger")  # a registered instance of another group, with its own issued key
    ready(forger, "forger")
    await until(lambda: "forger" in broker.by_name, what="the forger's READY")
    forger.send_multipart(protocol.encode(protocol.RESULT, {"call_id": "c-victim", "status": 200}, b"forged"))
    # a connection on the victim's instance id as routing id, with a key of its own: not the victim's route
    squatter = peers.open("runner", made_up=True)
    squatter.send_multipart(protocol.encode(protocol.RESULT, {"call_id": "c-victim", "status": 200}, b"squat"))
    await until(lambda: broker.refused >= 2, what="the forged RESULTs to be refused")
    assert not future.done(), "a RESULT from another instance must not settle the call"
    assert broker.refused == 2
    [other] = peers.refusals("dropped a RESULT for a call sent to another instance")
    assert other == {"peer": forger.getsockopt(zmq.ROUTING_ID)[:40], "key": None, "function": "victim",
                     "refused": other["refused"]}
    [unregistered] = peers.refusals("dropped a message from an unregistered peer")
    assert unregistered["peer"] == b"runner" and unregistered["command"] == protocol.RESULT
    runner.send_multipart(protocol.encode(protocol.RESULT, {"call_id": "c-victim", "status": 200}, b"real"))
    header, body = await asyncio.wait_for(future, 5)
    assert body == b"real"


async def test_a_call_names_the_instance_its_key_belongs_to(rig) -> None:
    broker, zap, peers = rig
    calls: list[protocol.Message] = []
    broker._on_call = lambda ident, msg: calls.append(msg)
    caller = peers.open("caller")
    ready(caller, "caller")
    await until(lambda: "caller" in broker.by_name, what="the caller's READY")
    stranger = peers.open("stranger", made_up=True)
    stranger.send_multipart(protocol.encode(protocol.CALL, {"call_id": "1", "function": "victim",
                                                            "instance": "caller"}, b""))
    await until(lambda: broker.refused >= 1, what="the CALL from an unregistered key to be refused")
    assert broker.refused == 1 and not calls
    assert peers.refusals("dropped a CALL from a key no registered instance holds") == [
        {"peer": b"stranger", "key": peers.key[stranger], "refused": 1}]
    # the task caller's socket: another routing id, the instance's key; the header lies about who calls
    task = peers.open("task-socket", key_of=("caller", "g", 1))
    task.send_multipart(protocol.encode(protocol.CALL, {"call_id": "2", "function": "victim",
                                                        "instance": "runner-of-victim"}, b""))
    await until(lambda: calls, what="the instance's CALL")
    assert [m.header["call_id"] for m in calls] == ["2"] and calls[0].header["instance"] == "caller"


async def test_a_gone_instance_s_key_makes_no_more_calls_and_the_others_keep_theirs(rig) -> None:
    broker, zap, peers = rig
    calls: list[protocol.Message] = []
    broker._on_call = lambda ident, msg: calls.append(msg)
    leaving, staying = peers.open("leaving"), peers.open("staying")
    ready(leaving, "leaving")
    ready(staying, "staying")
    await until(lambda: {"leaving", "staying"} <= set(broker.by_name), what="both instances")
    leaving_task = peers.open("leaving-task", key_of=("leaving", "g", 1))
    staying_task = peers.open("staying-task", key_of=("staying", "g", 1))
    leaving.send_multipart(protocol.encode(protocol.BYE, {}))
    await until(lambda: "leaving" not in broker.by_name, what="the instance that said BYE to be forgotten")
    leaving_task.send_multipart(protocol.encode(protocol.CALL, {"call_id": "1", "function": "f"}, b""))
    await until(lambda: broker.refused >= 1, what="the gone instance's CALL to be refused")
    staying_task.send_multipart(protocol.encode(protocol.CALL, {"call_id": "2", "function": "f"}, b""))
    await until(lambda: calls, what="the staying instance's CALL")
    assert [(m.header["call_id"], m.header["instance"]) for m in calls] == [("2", "staying")]
    assert broker.refused == 1 and list(broker.by_key.values()) == [broker.by_name["staying"]]


async def test_nobody_takes_over_the_routing_of_an_instance_whose_connection_is_gone(rig) -> None:
    """An instance's connection drops (a crash) while the broker still lists it: a peer that connects under the
    victim's instance id, as it is known from the API and logs, must not receive the calls meant for it."""
    broker, zap, peers = rig
    from zmq.utils.monitor import recv_monitor_message

    router_events = broker._asock.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    victim = peers.keys.client_of_instance(peers.ctx.socket(zmq.DEALER), "victim-i", "h", 1)
    victim.setsockopt(zmq.LINGER, 0)
    victim.connect(peers.endpoint)
    ready(victim, "victim-i", "h", 1, ("victim",))
    await until(lambda: broker.routes.get("victim"), what="the victim's instance")
    victim.close(linger=0)
    assert await asyncio.to_thread(router_events.poll, 5000), "the gateway saw the victim's connection close"
    assert recv_monitor_message(router_events)["event"] == zmq.EVENT_DISCONNECTED
    broker._asock.sock.disable_monitor()
    router_events.close(linger=0)
    assert "victim-i" in broker.by_name, "still listed: no heartbeat was missed yet"
    squatters = [peers.open("victim-i", made_up=True),  # a key of its own making
                 peers.open("victim-i", key_of=("forger", "g", 1))]  # a key issued to another instance
    for sock in squatters:
        assert not await asyncio.to_thread(handshake_failed, sock, peers.monitors[sock]), "connected"
    future = asyncio.get_running_loop().create_future()
    broker.submit(Call("c-victim", "victim", {"call_id": "c-victim", "function": "victim"}, b"secret", future, 10.0))
    # the INVOKE finds no peer on the victim's routing id: the broker drops the victim and the call waits
    await until(lambda: "victim-i" not in broker.by_name, what="the victim to be dropped as unreachable")
    assert not future.done() and list(broker.queues["victim"])[0].call_id == "c-victim"
    for sock in squatters:
        assert not sock.poll(200), "no message reaches a squatter"
    future.cancel()
