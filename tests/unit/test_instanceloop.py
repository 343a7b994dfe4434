"""The instance side of the link (shared/instanceloop.py) against a real ROUTER standing in for a gateway."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import zmq

from shared import protocol
from shared.instanceconfig import InstanceConfig
from shared.instanceloop import InstanceLoop

DEADLINE_S = 20.0


def echo(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
    return {"call_id": header["call_id"], "status": 200, "headers": [], "content_type": "text/plain"}, body.upper()


class Gateway:
    """A ROUTER the instance connects to; the test drives it from a thread while the loop runs on the main one."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.peer = b""
        self.edges: list[Any] = []  # task-call reports, from whichever message carried them

    def recv(self, command: bytes) -> protocol.Message:
        """The next message with ``command`` (others, such as HEARTBEATs, are skipped)."""
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                self.peer, msg = protocol.decode_from_peer(self.sock.recv_multipart())
                self.edges += msg.header.get("edges", [])
                if msg.command == command:
                    return msg
        raise AssertionError(f"no {command!r} from the instance within {DEADLINE_S} s")

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([self.peer, *frames])


def serve(tmp_path: Path, script: Callable[[Gateway, InstanceLoop], None], pool: Any = None,
          reports: Any = None, execute: Any = echo) -> tuple[int, list[BaseException]]:
    """Run an instance loop on this thread while ``script`` plays the gateway; (exit code, script errors)."""
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/gw"
    gateway = Gateway(ctx, endpoint)
    config = InstanceConfig("inst-1", "grp", 4, (endpoint,), ({"name": "fn", "version": 2},))
    loop = InstanceLoop(ctx, config, {"functions": {"fn": 2}, "credit": 3, "concurrency": 1, "batch": True},
                        execute, pool, reports)
    errors: list[BaseException] = []

    def play() -> None:
        try:
            script(gateway, loop)
        except BaseException as exc:  # reported by the test, on its own thread
            errors.append(exc)
        finally:
            loop.stop()  # never leave the loop running

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    try:
        code = loop.run()
    finally:
        thread.join(DEADLINE_S)
        loop.close(linger_ms=0)
        gateway.sock.close()
        ctx.term()
    return code, errors


def invoke_header(call_id: str) -> dict[str, Any]:
    return {"call_id": call_id, "function": "fn", "deadline_ms": int((time.time() + 30) * 1000)}


def test_ready_invoke_result_batch_malformed_and_bye(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def script(gw: Gateway, loop: InstanceLoop) -> None:
        ready = gw.recv(protocol.READY)
        seen["ready"] = ready.header
        gw.send([b"NOPE", b"INVOKE", b"\x80", b""])  # malformed: dropped, the loop goes on
        gw.send(protocol.invoke(invoke_header("c1"), b"one"))
        seen["one"] = protocol.unbatch(gw.recv(protocol.RESULT))
        gw.send(protocol.encode_batch(protocol.INVOKE, [invoke_header(f"b{i}") for i in range(3)],
                                      [b"x", b"y", b"z"]))
        got: list[tuple[dict[str, Any], bytes]] = []
        while len(got) < 3:
            got += protocol.unbatch(gw.recv(protocol.RESULT))
        seen["batch"] = got
        loop.stop()
        seen["bye"] = gw.recv(protocol.BYE).header
        gw.send(protocol.encode(protocol.BYE, {}))

    code, errors = serve(tmp_path, script)
    assert not errors, errors
    assert code == 0
    ready = seen["ready"]
    assert (ready["instance_id"], ready["group"], ready["group_version"], ready["functions"], ready["credit"],
            ready["batch"]) == ("inst-1", "grp", 4, {"fn": 2}, 3, True)
    assert isinstance(ready["pid"], int) and ready["idle_s"] >= 0
    assert [(h["call_id"], b) for h, b in seen["one"]] == [("c1", b"ONE")]
    assert [(h["call_id"], b) for h, b in seen["batch"]] == [("b0", b"X"), ("b1", b"Y"), ("b2", b"Z")]
    assert seen["bye"] == {"instance_id": "inst-1"}


def test_pooled_calls_come_back_on_their_link_with_due_reports(tmp_path: Path) -> None:
    class Reports:
        def __init__(self) -> None:
            self.pending = False  # a call makes one (as a handler's in-process task call does)

        def due(self) -> dict[str, Any] | None:
            if not self.pending:
                return None
            self.pending = False
            return {"edges": [["a", "b", True, True, 1.0, 1]]}

        def due_in_s(self) -> float | None:
            return 0.0 if self.pending else None

    reports = Reports()

    def execute(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        if header["call_id"] == "p0":
            reports.pending = True
        return echo(header, body)

    seen: dict[str, Any] = {}

    def script(gw: Gateway, loop: InstanceLoop) -> None:
        gw.recv(protocol.READY)
        for i in range(4):
            gw.send(protocol.invoke(invoke_header(f"p{i}"), b"p%d" % i))
        results: list[tuple[dict[str, Any], bytes]] = []
        while len(results) < 4:
            results += protocol.unbatch(gw.recv(protocol.RESULT))
        if not gw.edges:  # no RESULT took the report: the next HEARTBEAT does, within its due time
            gw.recv(protocol.HEARTBEAT)
        seen["results"] = sorted((h["call_id"], b) for h, b in results)
        seen["inflight"] = loop.inflight
        loop.stop()
        gw.recv(protocol.BYE)
        gw.send(protocol.encode(protocol.BYE, {}))
        seen["edges"] = list(gw.edges)

    with ThreadPoolExecutor(2) as pool:
        code, errors = serve(tmp_path, script, pool, reports, execute)
    assert not errors, errors
    assert code == 0
    assert seen["results"] == [(f"p{i}", b"P%d" % i) for i in range(4)]
    assert seen["edges"] == [["a", "b", True, True, 1.0, 1]]  # reported once, by whichever message left first
    assert seen["inflight"] == 0


def test_a_stopping_instance_waits_for_its_calls_in_flight(tmp_path: Path) -> None:
    release = threading.Event()

    def slow(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        release.wait(DEADLINE_S)
        return echo(header, body)

    seen: dict[str, Any] = {}

    def script(gw: Gateway, loop: InstanceLoop) -> None:
        gw.recv(protocol.READY)
        gw.send(protocol.invoke(invoke_header("s1"), b"slow"))
        deadline = time.monotonic() + DEADLINE_S
        while loop.inflight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        loop.stop()
        gw.recv(protocol.BYE)
        gw.send(protocol.encode(protocol.BYE, {}))  # acknowledged, but a call is still running
        release.set()
        seen["result"] = protocol.unbatch(gw.recv(protocol.RESULT))

    with ThreadPoolExecutor(1) as pool:
        code, errors = serve(tmp_path, script, pool, execute=slow)
    assert not errors, errors
    assert code == 0
    assert [(h["call_id"], b) for h, b in seen["result"]] == [("s1", b"SLOW")]


@pytest.fixture(autouse=True)
def _no_stray_signal_handlers() -> Any:
    import signal

    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGTERM, saved[0])
    signal.signal(signal.SIGINT, saved[1])
