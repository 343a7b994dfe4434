"""Async invocation and delivery guarantees, with real services, instances and sockets, on SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import threading
import time
from typing import Any

import httpx
import pytest
import zmq

from shared import protocol
from shared.ingress import Producer
from services.gateway.async_calls import CLAIM_INTERVAL_S
from tests.stack import Stack, free_port, function_yaml, never, wait_for

pytestmark = pytest.mark.integration

ECHO = "def handler(context, event):\n    body = event.body\n    return {'got': body if not isinstance(body, bytes) else body.decode()}\n"


def call_of(stack: Stack, call_id: str) -> dict[str, Any]:
    r = stack.client.get(f"/calls/{call_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_final(stack: Stack, call_id: str, timeout_s: float = 30) -> dict[str, Any]:
    return wait_for(lambda: (c := call_of(stack, call_id))["status"] in ("DONE", "FAILED", "DEAD") and c, timeout_s,
                    what=f"call {call_id} to finish")


@pytest.fixture(scope="module")
def stack(stack_on_each_database: Stack) -> Stack:
    return stack_on_each_database


@pytest.fixture
def fresh_stack(fresh_stack_on_each_database: Stack) -> Stack:
    return fresh_stack_on_each_database


@pytest.fixture(scope="module")
def echo(stack: Stack) -> str:
    stack.deploy("aecho", {"function.yaml": function_yaml("aecho"), "main.py": ECHO})
    return "aecho"


def test_http_async_is_acknowledged_then_done_with_its_result(stack: Stack, echo: str) -> None:
    r = stack.anon.post("/aecho", json={"n": 1}, headers={"X-Nuclide-Async": "true"})
    assert r.status_code == 202, r.text
    call_id = r.json()["call_id"]
    assert r.headers["x-call-id"] == call_id
    rec = wait_final(stack, call_id)
    assert rec["status"] == "DONE" and rec["attempts"] == 1 and rec["result"] == {"got": {"n": 1}}
    assert rec["timings"]["queued"] and rec["timings"]["started"] and rec["timings"]["finished"]
    raw = stack.client.get(f"/calls/{call_id}/result")
    assert raw.status_code == 200 and raw.json() == {"got": {"n": 1}}
    # the OpenFaaS-style route
    r2 = stack.anon.post("/async-function/aecho", content=b"plain")
    assert r2.status_code == 202
    assert wait_final(stack, r2.json()["call_id"])["result"] == {"got": "plain"}


def test_sync_calls_are_recorded_off_the_hot_path(stack: Stack, echo: str) -> None:
    r = stack.invoke("aecho", {"sync": True})
    call_id = r.headers["x-call-id"]
    rec = wait_for(lambda: stack.client.get(f"/calls/{call_id}").status_code == 200 and call_of(stack, call_id), 10,
                   what="the sync call record")
    assert rec["kind"] == "sync" and rec["status"] == "DONE" and rec["result_status"] == 200
    listed = stack.client.get("/calls", params={"function": "aecho", "limit": 500}).json()
    assert call_id in [c["id"] for c in listed]


def test_failed_calls_record_the_error_message_sync_and_async(stack: Stack) -> None:
    stack.deploy("aboom", {"function.yaml": function_yaml("aboom", retry={"maxAttempts": 1}),
                           "main.py": "def handler(context, event):\n    raise ValueError('kaboom')\n"})
    r = stack.invoke("aboom", b"x")
    assert (r.status_code, r.text) == (500, "kaboom")
    sync_id = r.headers["x-call-id"]
    rec = wait_for(lambda: stack.client.get(f"/calls/{sync_id}").status_code == 200 and call_of(stack, sync_id), 10,
                   what="the sync call record")
    assert (rec["kind"], rec["status"], rec["result_status"], rec["error"]) == ("sync", "FAILED", 500, "ValueError: kaboom")
    listed = {c["id"]: c for c in stack.client.get("/calls", params={"function": "aboom"}).json()}
    assert listed[sync_id]["error"] == "ValueError: kaboom"

    async_id = stack.anon.post("/aboom", content=b"x", headers={"X-Nuclide-Async": "true"}).json()["call_id"]
    rec = wait_final(stack, async_id)
    assert (rec["status"], rec["error"]) == ("DEAD", "failed 1 time(s); last error: ValueError: kaboom")


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        _Hook.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_callback_receives_the_result_once(stack: Stack, echo: str) -> None:
    _Hook.received.clear()
    port = free_port()
    _Hook.received.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = stack.anon.post("/aecho", json={"cb": 1}, headers={"X-Nuclide-Async": "true",
                                                                 "X-Callback-Url": f"http://127.0.0.1:{port}/hook"})
        call_id = r.json()["call_id"]
        wait_for(lambda: _Hook.received, 20, what="the callback")
        headers, body = _Hook.received[0]
        assert headers["x-call-id"] == call_id and headers["x-function-status"] == "200"
        assert float(headers["x-duration-seconds"]) >= 0 and json.loads(body) == {"got": {"cb": 1}}
        wait_for(lambda: call_of(stack, call_id)["callback"]["state"] == "sent", 10, what="callback state 'sent'")
        # "once": nothing may follow, across at least two passes of the gateway's claim loop either
        never(lambda: _Hook.received[1:], 2 * CLAIM_INTERVAL_S, what="a second callback POST")
    finally:
        server.shutdown()
    bad = stack.anon.post("/aecho", headers={"X-Nuclide-Async": "true", "X-Callback-Url": "ftp://nope"})
    assert bad.status_code == 400 and "X-Callback-Url" in bad.json()["error"]["message"]


# Appends each body it runs to a file in its code directory; the body "runs" lists them (one instance, serial).
RUNS = """
import os

def handler(context, event):
    body = event.body.decode() if isinstance(event.body, bytes) else str(event.body)
    if body == "runs":
        return open("runs.txt").read().split() if os.path.exists("runs.txt") else []
    with open("runs.txt", "a") as fh:
        fh.write(body + "\\n")
    return body
"""


def test_idempotency_key_returns_the_first_call_and_runs_it_once(stack: Stack) -> None:
    stack.deploy("aruns", {"function.yaml": function_yaml("aruns"), "main.py": RUNS})
    key = f"order-{time.time_ns()}"
    h = {"X-Nuclide-Async": "true", "X-Idempotency-Key": key}
    first = stack.anon.post("/aruns", content=f"{key}-first", headers=h).json()
    assert first["duplicate"] is False
    second = stack.anon.post("/aruns", content=f"{key}-second", headers=h).json()
    assert second["call_id"] == first["call_id"] and second["duplicate"] is True
    # repeats that arrive together (one store transaction) are duplicates too
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: stack.anon.post("/aruns", content=f"{key}-{i}", headers=h).json(), range(8)))
    assert {r["call_id"] for r in together} == {first["call_id"]} and all(r["duplicate"] for r in together)
    assert wait_final(stack, first["call_id"])["result"] == f"{key}-first"
    # a call acknowledged after every repeat: once it ran, anything the repeats had dispatched ran before it
    # (one instance, one call at a time, in order)
    later = stack.anon.post("/aruns", content=f"{key}-later", headers={"X-Nuclide-Async": "true"}).json()["call_id"]
    assert wait_final(stack, later)["status"] == "DONE"
    runs = [b for b in stack.invoke("aruns", b"runs").json() if b.startswith(key)]
    assert runs == [f"{key}-first", f"{key}-later"], f"the handler ran {runs} for one idempotency key"


def test_zeromq_push_ingress_and_bad_messages(stack: Stack, echo: str) -> None:
    prefix = f"push-{time.time_ns()}"
    ids = [f"{prefix}-{i}" for i in range(200)]
    with Producer(stack.endpoints["gateway_pull"]) as p:
        for i, cid in enumerate(ids):
            p.invoke("aecho", json.dumps({"i": i}).encode(), content_type="application/json", call_id=cid)
        p.invoke("no-such-function", b"x", call_id=ids[0] + "-ghost")
        p.invoke("aecho", b"x" * (6 * 1024 * 1024 + 1), call_id=ids[0] + "-huge")
        # malformed messages straight onto the ingress socket: dropped, the socket keeps working
        raw = zmq.Context.instance().socket(zmq.PUSH)
        raw.setsockopt(zmq.LINGER, 2000)
        raw.connect(stack.endpoints["gateway_pull"])
        for frames in ([b"junk"], [b"NUC1", b"INVOKE", b"\xc1"], [b"NUC1", b"INVOKE", protocol.pack_header({}), b""],
                       [b"NUC1", b"RESULT", protocol.pack_header({"function": "aecho"}), b""]):
            raw.send_multipart(frames)
        raw.close()
        p.invoke("aecho", b'{"after": "junk"}', content_type="application/json", call_id=ids[0] + "-after")
    for cid in ids[:5] + ids[-5:] + [ids[0] + "-after"]:
        assert wait_final(stack, cid)["status"] == "DONE"
    wait_for(lambda: sum(1 for c in stack.client.get("/calls", params={"function": "aecho", "status": "DONE",
                                                                         "limit": 1000}).json()
                         if c["id"].startswith(prefix)) >= 201, 30, what="all pushed calls done")
    ghost = wait_for(lambda: call_of(stack, ids[0] + "-ghost"), 10, what="the unknown-function record")
    assert ghost["status"] == "FAILED" and "function 'no-such-function' not found" in ghost["error"]
    huge = wait_for(lambda: call_of(stack, ids[0] + "-huge"), 10, what="the oversized message's record")
    assert huge["status"] == "FAILED" and "over the 6291456 byte invoke limit" in huge["error"]


def test_topics_fan_out_and_cron_fires(fresh_stack: Stack) -> None:
    s = fresh_stack
    for name, topic in (("sub-a", "orders"), ("sub-b", "orders"), ("sub-c", "other")):
        s.deploy(name, {"function.yaml": function_yaml(name, triggers={"t": {"kind": "topic", "attributes": {"topic": topic}}}),
                        "main.py": ECHO})
    s.deploy("ticker", {"function.yaml": function_yaml("ticker", triggers={"tick": {"kind": "cron", "attributes": {
        "interval": "1s", "body": "tick"}}}), "main.py": ECHO})
    with s.publisher() as p:
        p.publish("orders", b'{"order": 7}', content_type="application/json")
    for name in ("sub-a", "sub-b"):
        calls = wait_for(lambda: s.client.get("/calls", params={"function": name}).json(), 15, what=f"{name}'s call")
        assert calls[0]["source"] == "topic"
        assert wait_final(s, calls[0]["id"])["result"] == {"got": {"order": 7}}
    assert s.client.get("/calls", params={"function": "sub-c"}).json() == []
    ticks = wait_for(lambda: len(c := s.client.get("/calls", params={"function": "ticker"}).json()) >= 2 and c, 10,
                     what="two cron calls")
    assert all(c["source"] == "cron" for c in ticks)
    assert wait_final(s, ticks[-1]["id"])["result"] == {"got": "tick"}


FLAKY = """
import os

def handler(context, event):
    mode = event.body.decode() if isinstance(event.body, bytes) else event.body
    path = f"attempts-{mode}.txt"  # runs of this body so far, this one included
    n = int(open(path).read()) + 1 if os.path.exists(path) else 1
    open(path, "w").write(str(n))
    if mode == "always-fail" or (mode == "fail-twice" and n <= 2) or (mode == "fail-thrice" and n <= 3):
        raise RuntimeError(f"attempt {n} failed on purpose")
    return f"ok after {n}"
"""


def test_retries_dead_letters_redrive_and_purge(fresh_stack: Stack) -> None:
    s = fresh_stack
    retry = {"maxAttempts": 3, "backoff": {"initial": "100ms", "max": "200ms", "multiplier": 2}}
    s.deploy("flaky", {"function.yaml": function_yaml("flaky", retry=retry), "main.py": FLAKY})
    ok = s.anon.post("/flaky", content=b"fail-twice", headers={"X-Nuclide-Async": "true"}).json()["call_id"]
    rec = wait_final(s, ok)
    assert rec["status"] == "DONE" and rec["attempts"] == 3 and rec["result"] == "ok after 3"

    # fails three times: dead after maxAttempts, and a redrive's fourth run succeeds
    dead = s.anon.post("/flaky", content=b"fail-thrice", headers={"X-Nuclide-Async": "true"}).json()["call_id"]
    rec = wait_final(s, dead)
    assert rec["status"] == "DEAD" and rec["attempts"] == 3 and "attempt 3 failed on purpose" in rec["error"]
    assert dead in [c["id"] for c in s.client.get("/calls", params={"status": "DEAD"}).json()]

    conflict = s.client.post(f"/calls/{ok}/redrive")
    assert conflict.status_code == 409 and "not DEAD" in conflict.json()["error"]["message"]
    assert s.client.post("/calls/nope/redrive").status_code == 404
    redriven = s.client.post(f"/calls/{dead}/redrive")
    assert redriven.status_code == 200 and redriven.json()["status"] == "PENDING", redriven.text
    rec = wait_final(s, dead)
    assert (rec["status"], rec["result"], rec["attempts"]) == ("DONE", "ok after 4", 1), rec
    assert dead not in [c["id"] for c in s.client.get("/calls", params={"status": "DEAD"}).json()]

    gone = s.anon.post("/flaky", content=b"always-fail", headers={"X-Nuclide-Async": "true"}).json()["call_id"]
    assert wait_final(s, gone)["status"] == "DEAD"
    assert s.client.delete("/calls", params={"status": "DEAD"}).json()["purged"] >= 1
    assert s.client.get(f"/calls/{gone}").status_code == 404
    assert s.client.get(f"/calls/{dead}").status_code == 200, "a purge of DEAD calls keeps the redriven, DONE one"
    assert s.client.delete("/calls", params={"status": "RUNNING"}).status_code == 400


def test_timeouts_are_enforced_named_and_stuck_instances_replaced(fresh_stack: Stack) -> None:
    s = fresh_stack
    code = """
import signal, time

def handler(context, event):
    mode = event.body.decode() if isinstance(event.body, bytes) else str(event.body)
    if mode == "slow":
        time.sleep(10)
        open("slow-finished", "w").close()
    if mode == "stuck":
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # nothing inside can stop it now
        time.sleep(30)
    return "fast"
"""
    s.deploy("sleepy", {"function.yaml": function_yaml("sleepy", timeout="1s"), "main.py": code})
    r = s.invoke("sleepy", b"slow")
    # answered at the timeout, not once the handler was done: it has not written its marker yet
    assert r.status_code == 504 and not list(s.var_dir.glob("functions/sleepy/*/code/slow-finished"))
    err = r.json()["error"]
    assert "'sleepy'" in err["message"] and "1 s timeout" in err["message"]
    assert s.invoke("sleepy", b"quick").text == "fast", "the instance survives a timed-out call"
    pid_before = s.instance_pids()
    r = s.invoke("sleepy", b"stuck")
    assert r.status_code == 504 and "1 s timeout" in r.json()["error"]["message"]
    wait_for(lambda: s.instance_pids() and s.instance_pids() != pid_before, 20, what="the stuck instance's replacement")
    wait_for(lambda: s.invoke("sleepy", b"quick").text == "fast", 20, what="the replacement to serve")


def test_backpressure_sync_gets_429_async_waits(tmp_path, any_database_url: str) -> None:
    s = Stack(tmp_path / "var", env={"NUCLIDE_QUEUE_LIMIT": "2", "NUCLIDE_DATABASE_URL": any_database_url})
    s.start()
    try:
        # one call at a time, each held for 2 s: ten callers released together find one in flight and more
        # than two waiting however slowly a loaded machine starts their threads
        code = "import time\n\ndef handler(context, event):\n    time.sleep(2)\n    return 'done'\n"
        s.deploy("narrow", {"function.yaml": function_yaml("narrow", maxConcurrency=1), "main.py": code})
        # the broker pipelines calls to an instance whose speed it does not know yet: one call teaches it
        # this one is slow, so from then on it holds one call at a time and queues the rest
        assert s.invoke("narrow", b"").text == "done"
        results: list[httpx.Response] = []
        clients = [httpx.Client(base_url=s.url, timeout=60) for _ in range(10)]
        for c in clients:
            assert c.get("/healthz").status_code == 200  # connected before the race starts
        start = threading.Barrier(len(clients))

        def one(c: httpx.Client) -> None:
            start.wait()
            results.append(c.post("/narrow"))

        threads = [threading.Thread(target=one, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in clients:
            c.close()
        refused = [r for r in results if r.status_code == 429]
        assert refused and all(r.headers.get("retry-after") for r in refused)
        assert "queue" in refused[0].json()["error"]["message"]
        assert all(r.status_code in (200, 429) for r in results)
        ids = [s.anon.post("/narrow", headers={"X-Nuclide-Async": "true"}).json()["call_id"] for _ in range(10)]
        for cid in ids:
            assert wait_final(s, cid, 60)["status"] == "DONE"
    finally:
        s.stop()


def test_bad_async_inputs(stack: Stack, echo: str) -> None:
    r = stack.anon.post("/aecho", content=b"x" * (6 * 1024 * 1024 + 1), headers={"X-Nuclide-Async": "true"})
    assert r.status_code == 413
    r = stack.anon.post("/async-function/nope-missing", content=b"x")
    assert r.status_code == 404
    bad_cron = {"function.yaml": function_yaml("badcron", triggers={"t": {"kind": "cron", "attributes": {
        "schedule": "99 * * * *"}}}), "main.py": ECHO}
    from tests.stack import make_zip

    r = stack.client.put("/badcron", files={"z": ("f.zip", make_zip(bad_cron))})
    assert r.status_code == 400 and "spec.triggers.t" in r.json()["error"]["message"]
    r = stack.client.get("/calls", params={"status": "WHATEVER"})
    assert r.status_code == 400
