"""Hostile input against a real stack: one bad message fails alone, and the platform sends nothing inward."""

from __future__ import annotations

import concurrent.futures
import http.server
import os
import threading
import time
from typing import Any

import pytest
import zmq

from shared import protocol
from shared.ingress import Producer
from tests.stack import Stack, free_port, function_yaml, wait_for

pytestmark = pytest.mark.integration

ECHO = "def handler(context, event):\n    return {'got': event.body}\n"


def store_rpc(stack: Stack, method: str, args: dict[str, Any], *bodies: bytes,
              service: str = "store") -> tuple[bytes, dict[str, Any]]:
    """One raw RPC to the store (or the deployer), as a service: (command, header) of its reply."""
    sock = stack.keys().client(zmq.Context.instance().socket(zmq.DEALER), service)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(stack.endpoints[f"{service}_rpc"])
    try:
        sock.send_multipart(protocol.request(7, method, args, *bodies))
        assert sock.poll(10_000), f"the store did not answer {method}"
        msg = protocol.decode(sock.recv_multipart())
        return msg.command, msg.header
    finally:
        sock.close()


class _Hook(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        _Hook.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_callbacks_to_loopback_are_refused_by_default(fresh_stack: Stack) -> None:
    stack = fresh_stack
    stack.deploy("cbecho", {"function.yaml": function_yaml("cbecho"), "main.py": ECHO})
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for url in (f"http://127.0.0.1:{port}/hook", f"http://localhost:{port}/hook", f"http://[::1]:{port}/hook",
                    f"http://127.9.9.9:{port}/hook", "http://169.254.169.254/latest/meta-data"):
            r = stack.anon.post("/cbecho", json={"x": 1}, headers={"X-Nuclide-Async": "true", "X-Callback-Url": url})
            assert r.status_code == 400, (url, r.text)
            message = r.json()["error"]["message"]
            assert "callback_allow" in message and "refused" in message, message
        # the same call over the PUSH ingress: refused at the edge, never posted
        with Producer(stack.endpoints["gateway_pull"]) as p:
            p.invoke("cbecho", b"{}", content_type="application/json", call_id="cb-push-1",
                     callback_url=f"http://127.0.0.1:{port}/push")
            p.invoke("cbecho", b"{}", content_type="application/json", call_id="cb-push-2")
        wait_for(lambda: stack.client.get("/calls/cb-push-2").json()["status"] == "DONE", 20, what="the clean call")
        assert stack.client.get("/calls/cb-push-1").status_code == 404
        assert _Hook.hits == []
    finally:
        server.shutdown()


def test_callback_allow_setting_opens_loopback(tmp_path: Any) -> None:
    stack = Stack(tmp_path / "var", {"NUCLIDE_CALLBACK_ALLOW": "127.0.0.0/8"}).start()
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Hook.hits.clear()
    try:
        stack.deploy("cbok", {"function.yaml": function_yaml("cbok"), "main.py": ECHO})
        r = stack.anon.post("/cbok", json={}, headers={"X-Nuclide-Async": "true",
                                                       "X-Callback-Url": f"http://127.0.0.1:{port}/allowed"})
        assert r.status_code == 202, r.text
        wait_for(lambda: _Hook.hits == ["/allowed"], 20, what="the allowed callback")
        # a name that resolves to loopback stays refused unless that name or its network is allowed:
        # the allow-list names 127.0.0.0/8, so localhost (127.0.0.1 in /etc/hosts) passes too
        r = stack.anon.post("/cbok", json={}, headers={"X-Nuclide-Async": "true",
                                                       "X-Callback-Url": f"http://[::1]:{port}/v6"})
        assert r.status_code == 400 and "callback_allow" in r.text
    finally:
        server.shutdown()
        stack.stop()


def test_bad_callback_allow_setting_fails_at_start(tmp_path: Any) -> None:
    stack = Stack(tmp_path / "var", {"NUCLIDE_CALLBACK_ALLOW": "127.0.0.0/8, not a host!"})
    with pytest.raises(AssertionError, match="callback_allow entry 'not a host!'"):
        stack.start()
    stack.stop()


def test_poison_push_message_fails_alone(stack: Stack) -> None:
    stack.deploy("poison", {"function.yaml": function_yaml("poison"), "main.py": ECHO})
    bad_headers: list[dict[str, Any]] = [
        {"function": "poison", "call_id": "poison-map-key", "idempotency_key": {"a": 1}},
        {"function": "poison", "call_id": "poison-list-url", "callback_url": ["x"]},
        {"function": "poison", "call_id": "poison-ctype", "content_type": {"x": 1}},
        {"function": "poison", "call_id": "poison-headers", "headers": [["a", {"b": 1}]]},
        {"function": "poison", "call_id": 12345},
        {"function": "poison", "call_id": "poison-long-key", "idempotency_key": "k" * 5000},
    ]
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(stack.endpoints["gateway_pull"])

    def http_async(i: int) -> int:
        return stack.anon.post("/poison", json={"i": i}, headers={"X-Nuclide-Async": "true"}).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(http_async, i) for i in range(200)]
        for header in bad_headers:
            sock.send_multipart(protocol.encode(protocol.INVOKE, header, b"{}"))
        codes = [f.result() for f in futures]
    sock.close()
    assert codes == [202] * 200, sorted(set(codes))
    for header in bad_headers:
        if isinstance(header["call_id"], str):
            assert stack.client.get(f"/calls/{header['call_id']}").status_code == 404, header
    # the ingress keeps serving after the poison
    with Producer(stack.endpoints["gateway_pull"]) as p:
        p.invoke("poison", b'{"after": 1}', content_type="application/json", call_id="poison-after")
    wait_for(lambda: stack.client.get("/calls/poison-after").json()["status"] == "DONE", 20, what="a clean push")


def test_store_refuses_a_bad_call_in_a_batch_and_keeps_the_rest(stack: Stack) -> None:
    now = time.time()
    good = {"id": f"batch-good-{time.time_ns()}", "function": "nobody", "status": "FAILED", "error": "x",
            "queued_at": now}
    bad = {"id": f"batch-bad-{time.time_ns()}", "function": "nobody", "idempotency_key": {"nested": [1]},
           "queued_at": now}
    good2 = dict(good, id=good["id"] + "-2")
    command, header = store_rpc(stack, "calls.submit", {"calls": [good, bad, good2]}, b"", b"", b"")
    assert command == protocol.REP, header
    results = header["result"]
    assert [r["status"] for r in results] == ["FAILED", "REFUSED", "FAILED"], results
    assert "idempotency_key" in results[1]["error"]
    assert stack.client.get(f"/calls/{good['id']}").json()["status"] == "FAILED"
    assert stack.client.get(f"/calls/{good2['id']}").json()["status"] == "FAILED"
    assert stack.client.get(f"/calls/{bad['id']}").status_code == 404


@pytest.mark.parametrize("args", [{"limit": "ten"}, {"limit": 2.5}, {"limit": True}, {"before": "yesterday"},
                                  {"function": ["a"]}, {"status": 3}])
def test_store_list_arguments_are_type_checked(stack: Stack, args: dict[str, Any]) -> None:
    command, header = store_rpc(stack, "calls.list", args)
    assert command == protocol.ERR, header
    error = header["error"]
    assert error["code"] == "invalid_request", error
    assert next(iter(args)) in error["message"], error


def test_yaml_alias_bomb_and_huge_spec_are_400s_and_calls_keep_flowing(stack: Stack) -> None:
    from tests.unit.test_spec import alias_bomb

    stack.deploy("steady", {"function.yaml": function_yaml("steady"), "main.py": "def handler(c, e):\n    return 'up'\n"})
    bomb = alias_bomb(9).replace("spec:\n", "metadata: {name: bomb}\nspec:\n")
    huge = function_yaml("huge", description=os.urandom(1024 * 1024).hex())  # 2 MB that does not compress
    answers: list[str] = []
    stop = threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            answers.append(stack.invoke("steady").text)

    caller = threading.Thread(target=keep_calling)
    caller.start()
    try:
        r = stack.deploy("bomb", {"function.yaml": bomb, "main.py": "def handler(c, e):\n    return 1\n"}, expect=400)
        assert "more than 64 YAML aliases" in r.json()["error"]["message"], r.text
        r = stack.deploy("huge", {"function.yaml": huge, "main.py": "def handler(c, e):\n    return 1\n"}, expect=400)
        assert r.json()["error"]["code"] == "invalid_request", r.text
        assert "over the 262144 byte limit" in r.json()["error"]["message"], r.text
    finally:
        stop.set()
        caller.join(30)
    assert answers and set(answers) == {"up"}
    assert stack.client.get("/bomb").status_code == 404 and stack.client.get("/huge").status_code == 404


def peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("service,socket_name,kind", [("store", "store_rpc", zmq.DEALER),
                                                      ("gateway", "gateway_pull", zmq.PUSH),
                                                      ("gateway", "gateway_sub", zmq.PUB)])
def test_oversized_frames_are_dropped_before_they_take_memory(stack: Stack, service: str, socket_name: str,
                                                              kind: int) -> None:
    from zmq.utils.monitor import recv_monitor_message

    pid = stack.procs[service].pid
    before = peak_rss_mb(pid)
    big = b"\0" * (300 * 1024 * 1024)
    for _ in range(3):
        sock = zmq.Context.instance().socket(kind)
        if socket_name == "store_rpc":
            stack.keys().client(sock, "store")  # a service key: the store admits nothing else
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(stack.endpoints[socket_name])

        def next_event() -> int:
            assert monitor.poll(30_000), "no event from the connection within 30 s"
            return recv_monitor_message(monitor)["event"]

        assert next_event() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        if kind == zmq.PUB:
            # a PUB drops what it sends before the subscriber's subscription has reached it: resend until
            # the gateway cuts the connection (the first copy past the subscription does it)
            for _ in range(150):
                sock.send_multipart([b"some-topic", big])
                if monitor.poll(200):
                    break
        elif kind == zmq.PUSH:
            sock.send_multipart(protocol.encode(protocol.INVOKE, {"function": "nobody"}, big))
        else:
            sock.send_multipart(protocol.request(1, "ping", {}, big))
        # the service reads the frame's size and drops the connection before taking memory for it
        assert next_event() == zmq.EVENT_DISCONNECTED
        sock.disable_monitor()
        monitor.close()
        sock.close()
    del big
    stack.wait_healthy()
    grew = peak_rss_mb(pid) - before
    assert grew < 100, f"{service} peak memory grew {grew:.0f} MB from three 300 MB frames"


def test_slow_and_stalled_bodies_get_408_and_lose_their_connection(tmp_path: Any) -> None:
    import socket

    stack = Stack(tmp_path / "var", {"NUCLIDE_HTTP_BODY_GRACE_S": "1", "NUCLIDE_HTTP_MIN_BODY_RATE": "1024"}).start()
    try:
        stack.deploy("quick", {"function.yaml": function_yaml("quick"), "main.py": "def handler(c, e):\n    return 'ok'\n"})
        heads = [b"POST /quick HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",  # the invoke path
                 b"PUT /slowdeploy HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + stack.token.encode()
                 + b"\r\nContent-Type: application/zip\r\nContent-Length: 100000\r\n\r\n"]  # the control plane
        conns = []
        for i in range(60):
            s = socket.create_connection(("127.0.0.1", stack.http_port))
            s.sendall(heads[i % 2])
            conns.append(s)
        deadline = time.monotonic() + 60
        answers: list[bytes] = []
        for i, s in enumerate(conns):
            s.setblocking(False)
            got = b""
            while time.monotonic() < deadline:
                if i % 3 == 0:  # a third trickle one byte at a time, the rest stall after their headers
                    try:
                        s.send(b"x")
                    except OSError:
                        pass
                try:
                    chunk = s.recv(4096)
                except BlockingIOError:
                    time.sleep(0.2)
                    continue
                except OSError:
                    break
                if not chunk:
                    break  # the server closed the connection
                got += chunk
            answers.append(got)
            s.close()
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), {a[:40] for a in answers}
        assert b"slower than 1024 bytes a second" in answers[0]
        # the gateway served everyone else meanwhile, and serves full-speed bodies as before
        assert stack.invoke("quick", b"y" * 500_000).text == "ok"
        assert stack.client.get("/slowdeploy").status_code == 404
    finally:
        stack.stop()


def test_store_recovers_when_its_database_becomes_writable_again(fresh_stack: Stack) -> None:
    import subprocess

    stack = fresh_stack
    stack.deploy("durable", {"function.yaml": function_yaml("durable"), "main.py": ECHO})
    files = [str(stack.var_dir / name) for name in ("state.db", "state.db-wal")]

    def async_call(i: int) -> Any:
        return stack.anon.post("/durable", json={"i": i}, headers={"X-Nuclide-Async": "true"}, timeout=60)

    accepted = [async_call(i).json()["call_id"] for i in range(10)]
    subprocess.run(["chattr", "+i", *files], check=True)  # root ignores chmod; the immutable flag stops it too
    try:
        r = stack.deploy("during", {"function.yaml": function_yaml("during"), "main.py": ECHO}, expect=503)
        assert "the store cannot use its database right now" in r.json()["error"]["message"], r.text
        health = wait_for(lambda: (h := stack.anon.get("/healthz")).status_code == 503 and h.json(), 10,
                          what="healthz reporting the store down")
        assert health["store"] is False and "store_error" in health, health
        # submissions made during the outage wait for the store (up to 15 s) instead of failing at once
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            waiting = [pool.submit(async_call, 100 + i) for i in range(8)]
            time.sleep(2)  # the outage lasts a while; nothing to wait on but time
            subprocess.run(["chattr", "-i", *files], check=True)
            late = [f.result() for f in waiting]
    finally:
        subprocess.run(["chattr", "-i", *files], check=False)
    assert [r.status_code for r in late] == [202] * 8, [r.text for r in late]
    accepted += [r.json()["call_id"] for r in late]
    wait_for(lambda: stack.anon.get("/healthz").status_code == 200, 20, what="a healthy stack again")
    stack.deploy("after", {"function.yaml": function_yaml("after"), "main.py": ECHO})
    for call_id in accepted:
        wait_for(lambda: stack.client.get(f"/calls/{call_id}").json()["status"] == "DONE", 30, what=f"{call_id} done")
    log = stack.service_log("store")
    assert "Traceback" not in log and log.count("database error") <= 3, log[-3000:]


def test_malformed_topic_messages_are_dropped_and_counted(stack: Stack) -> None:
    topic = f"hostile-{time.time_ns()}"
    stack.deploy("topicsub", {"function.yaml": function_yaml(
        "topicsub", triggers={"t": {"kind": "topic", "attributes": {"topic": topic}}}), "main.py": ECHO})

    def malformed() -> int:
        for line in stack.client.get("/metrics").text.splitlines():
            if line.startswith("nuclide_ingress_malformed_total"):
                return int(float(line.split()[-1]))
        return 0

    before = malformed()
    with Producer(sub_endpoint=stack.endpoints["gateway_sub"]) as p:
        sock = p._pub  # the producer's own PUB, already connected and joined
        assert sock is not None
        # keep publishing a clean message until one arrives (a PUB drops what it sends before joining)
        wait_for(lambda: p.publish(topic, b'{"clean": 1}') or any(
            c["function"] == "topicsub" for c in stack.client.get("/calls", params={"function": "topicsub"}).json()),
                 20, interval_s=0.2, what="a clean topic message through")
        for header in ({"content_type": {"a": 1}}, {"idempotency_key": ["k"]}, {"content_type": 5}):
            sock.send_multipart([topic.encode(), *protocol.encode(protocol.INVOKE, header, b"{}")])
    wait_for(lambda: malformed() - before >= 3, 20, what="three malformed topic messages counted")


RPC_BAD_ARGS = [
    ("store", "function.put", {"name": "x", "spec": {}, "warnings": [{"a": 1}]}, "warnings"),
    ("store", "instance.started", {"id": "i", "group_id": "g", "group_version": 1, "pid": "123"}, "pid"),
    ("store", "instance.started", {"id": "i", "group_id": "g", "group_version": 1, "backend": ["x"]}, "backend"),
    ("store", "instance.exited", {"id": "i", "exit_code": "nine"}, "exit_code"),
    ("store", "instance.exited", {"id": "i", "error": {"e": 1}}, "error"),
    ("store", "instance.ready", {"id": "i", "group_id": "g", "group_version": 1, "functions": [1]}, "functions"),
    ("store", "instances.gone", {"ids": [1, 2]}, "ids"),
    ("store", "instances.list", {"group_id": 5}, "group_id"),
    ("store", "deploy.failed", {"group_id": "g", "group_version": 1, "error": ["x"]}, "error"),
    ("store", "deploy.failed", {"group_id": "g", "group_version": 1, "tasks": "hello"}, "tasks"),
    ("store", "group.scale", {"group_id": "g", "replicas": 1, "reason": {"r": 1}}, "reason"),
    ("store", "runtime.put", {"runtime": {}, "image_id": 7}, "image_id"),
    ("store", "function.get", {"name": True}, "name"),
    ("store", "calls.claim", {"owner": "o", "limit": "all"}, "limit"),
    ("deployer", "instance.replace", {"id": {"x": 1}}, "id"),
    ("deployer", "logs", {"function": "f", "tail": "ten"}, "tail"),
    ("deployer", "logs", {"function": 3}, "function"),
    ("deployer", "warm_start.check", {"policy": ["none"]}, "policy"),
    ("deployer", "python.check", {}, "version"),
]


@pytest.mark.parametrize("service,method,args,key", RPC_BAD_ARGS)
def test_rpc_arguments_of_the_wrong_type_are_refused_by_name(stack: Stack, service: str, method: str,
                                                             args: dict[str, Any], key: str) -> None:
    command, header = store_rpc(stack, method, args, service=service)
    assert command == protocol.ERR, header
    assert header["error"]["code"] == "invalid_request" and repr(key) in header["error"]["message"], header
    stack.wait_healthy()
