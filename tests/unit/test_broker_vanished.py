"""The broker over real ZeroMQ sockets: a call routed to an instance that vanished is not lost."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from shared import protocol
from shared.curve import Keys, ZapHandler, memory_keys
from services.gateway.broker import Broker, Call, Instance
from shared.errors import DeadlineExceeded
from tests.stack import free_port, until as wait_until


async def until(predicate, timeout_s: float = 5.0, what: str = "condition"):
    return await wait_until(predicate, timeout_s, what, interval_s=0.01)


def instance(ctx: zmq.Context, endpoint: str, ident: bytes, keys: Keys, **ready: object) -> zmq.Socket:
    sock = keys.client_of_instance(ctx.socket(zmq.DEALER), ident.decode(), "g", 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send_multipart(protocol.encode(protocol.READY, {
        "instance_id": ident.decode(), "group": "g", "group_version": 1, "functions": {"f": 1},
        "credit": 1, "concurrency": 1, "pid": 1, **ready}))
    return sock


async def test_a_call_sent_to_a_vanished_instance_waits_for_the_next_one() -> None:
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ready: list[Instance] = []
    gone: list[str] = []
    keys = memory_keys()
    zap = ZapHandler(ctx, keys)
    broker = Broker(ctx, endpoint, 10, on_ready=ready.append, on_gone=lambda inst, why: gone.append(why), keys=keys)
    try:
        first = instance(ctx, endpoint, b"i1", keys)
        await until(lambda: broker.routes.get("f"), what="the first instance's READY")
        route = broker.by_name["i1"].id  # the routing id its key made (shared/linkkeys.link_route)
        first.close()
        beat = protocol.encode(protocol.HEARTBEAT, {})

        def vanished() -> bool:  # the ROUTER has dropped the peer: sending to it raises now
            try:
                broker._send([route, *beat])
            except zmq.ZMQError:
                return True
            return False

        await until(vanished, what="the ROUTER to drop the closed peer")
        future = asyncio.get_running_loop().create_future()
        call = Call("c1", "f", {"call_id": "c1", "function": "f"}, b"payload", future, 5.0)
        broker.submit(call)  # routed to i1, which the broker still lists
        await until(lambda: gone, what="the vanished instance to be dropped")
        assert not future.done(), "a call that never left must not fail with the vanished instance"
        assert list(broker.queues["f"]) == [call] and call.instance is None
        assert gone[0].startswith("instance unreachable: ") and broker.pending == {}, "it is queued, not in flight"

        second = instance(ctx, endpoint, b"i2", keys)
        try:
            assert await asyncio.wait_for(asyncio.to_thread(second.poll, 5000), 6)
            frames = second.recv_multipart()
            msg = protocol.decode(frames)
            assert msg.command == protocol.INVOKE and msg.header["call_id"] == "c1" and msg.body == b"payload"
            second.send_multipart(protocol.encode(protocol.RESULT, {"call_id": "c1", "status": 200}, b"done"))
            header, body = await asyncio.wait_for(future, 5)
            assert header["status"] == 200 and body == b"done"
        finally:
            second.close()
    finally:
        broker.close()
        zap.close()
        ctx.destroy(linger=0)


async def vanish(broker: Broker, ident: bytes) -> None:
    """Wait until the broker's ROUTER has dropped a closed peer: sending to it raises from then on."""
    beat = protocol.encode(protocol.HEARTBEAT, {})

    def vanished() -> bool:
        try:
            broker._send([ident, *beat])
        except zmq.ZMQError:
            return True
        return False

    await until(vanished, what="the ROUTER to drop the closed peer")


async def test_calls_batched_for_a_vanished_instance_are_queued_again_past_the_queue_limit() -> None:
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    gone: list[str] = []
    keys = memory_keys()
    zap = ZapHandler(ctx, keys)
    broker = Broker(ctx, endpoint, 1, on_ready=lambda inst: None, on_gone=lambda inst, why: gone.append(why),
                    keys=keys)
    loop = asyncio.get_running_loop()
    try:
        first = instance(ctx, endpoint, b"i1", keys, credit=2, concurrency=2, batch=True)
        await until(lambda: broker.routes.get("f"), what="the first instance's READY")
        route = broker.by_name["i1"].id  # the routing id its key made (shared/linkkeys.link_route)
        first.close()
        await vanish(broker, route)
        calls = [Call(f"c{n}", "f", {"call_id": f"c{n}"}, b"", loop.create_future(), 0.05) for n in range(3)]
        for call in calls:  # two fill the instance's credit (sent together at the flush), one fills the queue
            broker.submit(call)
        assert list(broker.queues["f"]) == [calls[2]]
        await until(lambda: gone, what="the vanished instance to be dropped")
        assert list(broker.queues["f"]) == [calls[2], calls[0], calls[1]], "calls that never left wait again"
        for call in calls:  # no instance comes: each fails at its deadline as a call that waited for one
            with pytest.raises(DeadlineExceeded, match="no instance of function 'f' became free"):
                await asyncio.wait_for(call.future, 10)
    finally:
        broker.close()
        zap.close()
        ctx.destroy(linger=0)
