"""Several gateways on one store: real services and instances, each gateway its own process, on SQLite and
PostgreSQL."""

from __future__ import annotations

import http.server
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from services.gateway.async_calls import CLAIM_INTERVAL_S
from shared.gateways import GATEWAY_TTL_S
from tests.stack import (
    Gateway, NuclideUp, Stack, free_port, free_port_base, function_yaml, make_zip, never, parse_metrics, wait_for,
)

pytestmark = pytest.mark.integration

ECHO = ("def handler(context, event):\n    body = event.body\n"
        "    return {'got': body if not isinstance(body, bytes) else body.decode()}\n")
HELLO = "def handler(context, event):\n    return 'awake'\n"
# Appends each body it runs to a file in its code directory; the body "runs" lists them (one instance). A body
# "slow-..." runs for longer than the gateways' claim interval first.
RUNS = """
import os
import time

def handler(context, event):
    body = event.body.decode() if isinstance(event.body, bytes) else str(event.body)
    if body == "runs":
        return open("runs.txt").read().split() if os.path.exists("runs.txt") else []
    if body.startswith("slow-"):
        time.sleep(%s)
    with open("runs.txt", "a") as fh:
        fh.write(body + "\\n")
    return body
""" % (CLAIM_INTERVAL_S + 1.5)
SLOW = "import time\n\ndef handler(context, event):\n    time.sleep(0.05)\n    return event.body\n"


@pytest.fixture
def two_gateways(tmp_path: Path, any_database_url: str) -> Iterator[Stack]:
    """A stack with two gateways on one store (SQLite, then PostgreSQL)."""
    s = Stack(tmp_path / "var", {"NUCLIDE_CALLBACK_ALLOW": "127.0.0.0/8", "NUCLIDE_DATABASE_URL": any_database_url},
              gateways=2)
    try:
        yield s.start()
    finally:
        s.stop()


def metrics_of(gw: Gateway) -> dict[str, float]:
    return parse_metrics(gw.client.get("/metrics"))


def wait_instances(s: Stack, count: int = 1, timeout_s: float = 30) -> None:
    """Until every running gateway has ``count`` instances connected (its nuclide_instances gauge)."""
    for gw in s.gateways:
        if s.procs[gw.key].poll() is None:
            wait_for(lambda: metrics_of(gw)["nuclide_instances"] >= count, timeout_s,
                     what=f"{count} instance(s) registered with {gw.key}")


def call_of(gw: Gateway, call_id: str) -> dict[str, Any]:
    r = gw.client.get(f"/calls/{call_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_final(gw: Gateway, call_id: str, timeout_s: float = 30) -> dict[str, Any]:
    return wait_for(lambda: (c := call_of(gw, call_id))["status"] in ("DONE", "FAILED", "DEAD") and c, timeout_s,
                    what=f"call {call_id} to finish")


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        _Hook.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_each_gateway_serves_sync_and_an_async_call_runs_once(two_gateways: Stack) -> None:
    s = two_gateways
    a, b = s.gateways
    health = [gw.anon.get("/healthz").json() for gw in (a, b)]
    assert health[0]["gateway_id"] != health[1]["gateway_id"]
    wait_for(lambda: all(gw.anon.get("/healthz").json()["gateways"] == 2 for gw in (a, b)), 10,
             what="each gateway to know of both")
    for gw, id_ in zip((a, b), (health[0]["gateway_id"], health[1]["gateway_id"])):
        m = metrics_of(gw)
        name = "" if gw is a else "gw1"
        assert m[f'nuclide_gateway_info{{gateway_id="{id_}",gateway_name="{name}"}}'] == 1
        assert m["nuclide_gateways"] == 2

    s.deploy("gecho", {"function.yaml": function_yaml("gecho"), "main.py": ECHO})
    wait_instances(s)
    pids = sorted(s.instance_pids_of("gecho"))
    for i, gw in enumerate((a, b)):
        r = gw.anon.post("/gecho", json={"via": i})
        assert (r.status_code, r.json()) == (200, {"got": {"via": i}}), r.text
    assert sorted(s.instance_pids_of("gecho")) == pids, "one set of instances serves both gateways"

    # an async call accepted by gateway A: one run, one result, one callback, seen the same through B
    s.deploy("gruns", {"function.yaml": function_yaml("gruns"), "main.py": RUNS}, )
    wait_instances(s, 2)
    _Hook.received.clear()
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # it runs past the other gateway's claim pass: that gateway must leave it to A
        key = f"slow-{time.time_ns()}"
        r = a.anon.post("/gruns", content=key, headers={"X-Nuclide-Async": "true",
                                                        "X-Callback-Url": f"http://127.0.0.1:{port}/hook"})
        assert r.status_code == 202, r.text
        call_id = r.json()["call_id"]
        rec = wait_final(b, call_id)
        assert (rec["status"], rec["attempts"], rec["result"]) == ("DONE", 1, key)
        wait_for(lambda: _Hook.received, 20, what="the callback")
        assert _Hook.received[0][0]["x-call-id"] == call_id and _Hook.received[0][1] == key.encode()
        # "once": across two claim passes of both gateways, and past a gateway's liveness period
        never(lambda: _Hook.received[1:], max(2 * CLAIM_INTERVAL_S, GATEWAY_TTL_S + 1), what="a second callback")
    finally:
        server.shutdown()
    assert b.anon.post("/gruns", content=b"runs").json() == [key], "the handler ran the call once"
    assert a.client.get(f"/calls/{call_id}/result").text == key


def test_a_stalled_gateway_leaves_the_result_and_the_callback_to_the_one_that_took_its_call(
        two_gateways: Stack) -> None:
    """Gateway A stops (SIGSTOP) with an async call running, past its liveness: B claims the call and runs it again.
    When A resumes, its late result is not recorded and it posts no callback: one result, one callback."""
    s = two_gateways
    a, b = s.gateways
    s.deploy("gstall", {"function.yaml": function_yaml("gstall", maxConcurrency=2), "main.py": RUNS})
    wait_instances(s)
    _Hook.received.clear()
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stalled = s.procs["gateway"]
    try:
        key = f"slow-{time.time_ns()}"
        call_id = a.anon.post("/gstall", content=key, headers={
            "X-Nuclide-Async": "true", "X-Callback-Url": f"http://127.0.0.1:{port}/hook"}).json()["call_id"]
        wait_for(lambda: call_of(b, call_id)["status"] == "RUNNING", 10, what="A to run the call")
        stalled.send_signal(signal.SIGSTOP)
        wait_for(lambda: call_of(b, call_id)["attempts"] == 2, 30, what="B to claim and run A's call")
        stalled.send_signal(signal.SIGCONT)
        rec = wait_final(b, call_id)
        assert (rec["status"], rec["attempts"], rec["result"]) == ("DONE", 2, key)
        wait_for(lambda: _Hook.received, 20, what="the callback")
        # A's result reaches A after it resumes: it must not post it (nor record it) as well
        never(lambda: _Hook.received[1:], max(2 * CLAIM_INTERVAL_S, GATEWAY_TTL_S + 1), what="a second callback")
        assert a.anon.get("/healthz").status_code == 200, "A serves again"
    finally:
        stalled.send_signal(signal.SIGCONT)
        server.shutdown()
    # the stalled gateway had handed the call to an instance before it stopped: it ran twice (at least once)
    assert b.anon.post("/gstall", content=b"runs").json() == [key, key]


def test_scale_to_zero_wakes_through_the_other_gateway(two_gateways: Stack) -> None:
    s = two_gateways
    a, b = s.gateways
    s.deploy("gsleeper", {"function.yaml": function_yaml("gsleeper", minReplicas=0, maxReplicas=1,
                                                         scaleToZero={"idleTimeout": "1s"}), "main.py": HELLO})
    assert a.anon.post("/gsleeper").text == "awake"
    wait_for(lambda: a.client.get("/gsleeper").json()["state"] == "scaledToZero", 30, what="scale to zero")
    wait_for(lambda: not s.instance_pids_of("gsleeper"), 15, what="the instance to stop")
    r = b.anon.post("/gsleeper")
    assert (r.status_code, r.text) == (200, "awake"), "gateway B holds the first call until an instance is ready"
    assert r.headers.get("x-nuclide-cold-start") == "true"
    assert a.anon.post("/gsleeper").text == "awake", "the instance woken by B serves A too"


def test_the_optimizer_sees_calls_through_every_gateway(two_gateways: Stack) -> None:
    s = two_gateways
    a, b = s.gateways
    s.deploy("gtraced", {"function.yaml": function_yaml("gtraced"), "main.py": HELLO})
    wait_instances(s)

    def traced() -> dict[str, Any]:
        r = a.client.get("/optimizer")
        return r.json().get("traced") or {} if r.status_code == 200 else {}

    wait_for(lambda: sorted(traced().get("gateways") or []) == sorted([a.endpoints["gateway_pub"],
                                                                       b.endpoints["gateway_pub"]]),
             20, what="the optimizer to follow both gateways' traces")

    # calls through B alone: the optimizer counts them (once its subscription is up: probe until it does)
    before = traced()["calls"]

    def counted_from_b() -> bool:
        assert b.anon.post("/gtraced").status_code == 200
        return traced()["calls"] > before

    wait_for(counted_from_b, 20, interval_s=0.3, what="calls through gateway B in the optimizer's call graph")
    before_a = traced()["calls"]
    for _ in range(5):
        assert a.anon.post("/gtraced").status_code == 200
    wait_for(lambda: traced()["calls"] >= before_a + 5, 20, what="calls through gateway A counted too")


def test_a_gateway_started_later_gets_the_running_instances(tmp_path: Path, any_database_url: str) -> None:
    s = Stack(tmp_path / "var", {"NUCLIDE_DATABASE_URL": any_database_url})
    try:
        s.start()
        s.deploy("glate", {"function.yaml": function_yaml("glate"), "main.py": ECHO})
        pids = sorted(s.instance_pids_of("glate"))
        assert pids
        late = s.start_gateway()
        wait_for(lambda: metrics_of(late)["nuclide_instances"] >= 1, 30,
                 what="the running instance to register with the new gateway")
        r = late.anon.post("/glate", content=b"late")
        assert (r.status_code, r.json()) == (200, {"got": "late"})
        assert sorted(s.instance_pids_of("glate")) == pids, "no instance was restarted"
        assert s.anon.post("/glate", content=b"first").json() == {"got": "first"}
    finally:
        s.stop()


CONNECTION_ERRORS = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError)


def test_kill_one_gateway_under_mixed_load(two_gateways: Stack) -> None:
    """Sync and async calls through both gateways for a bounded time; gateway B is killed with SIGKILL half-way."""
    s = two_gateways
    a, b = s.gateways
    s.deploy("gload", {"function.yaml": function_yaml("gload", minReplicas=2, maxReplicas=2,
                                                      maxConcurrency=4), "main.py": SLOW})
    wait_instances(s, 2)
    stop = threading.Event()
    killed = threading.Event()
    lock = threading.Lock()
    outcomes: dict[str, list[Any]] = {"a_sync": [], "b_sync": [], "accepted": [], "b_sync_errors": [],
                                      "unexpected": []}

    def worker(gw: Gateway, name: str, n: int) -> None:
        with httpx.Client(base_url=gw.url, timeout=30) as c:
            i = 0
            while not stop.is_set() and not (gw is b and killed.is_set()):
                i += 1
                body = f"{name}-{n}-{i}".encode()
                try:
                    if i % 2:
                        r = c.post("/gload", content=body)
                        with lock:
                            outcomes[f"{name}_sync"].append((killed.is_set(), r.status_code, r.content == body))
                    else:
                        r = c.post("/gload", content=body, headers={"X-Nuclide-Async": "true"})
                        with lock:
                            if r.status_code == 202:
                                outcomes["accepted"].append((gw.key, r.json()["call_id"], body))
                            else:
                                outcomes["unexpected"].append((gw.key, "async", r.status_code, r.text[:200]))
                except CONNECTION_ERRORS as exc:
                    with lock:
                        if gw is b:
                            outcomes["b_sync_errors" if i % 2 else "b_async_errors"].append(type(exc).__name__)
                        else:
                            outcomes["unexpected"].append((gw.key, type(exc).__name__, str(exc)))
                    if gw is b:
                        return

    threads = [threading.Thread(target=worker, args=(gw, name, n), daemon=True)
               for gw, name in ((a, "a"), (b, "b")) for n in range(3)]
    outcomes["b_async_errors"] = []
    for t in threads:
        t.start()
    try:
        # kill B once both gateways carry sync and async calls, then keep A under load for a while longer
        wait_for(lambda: len(outcomes["b_sync"]) >= 20 and sum(1 for k, _, _ in outcomes["accepted"]
                                                              if k == "gateway-1") >= 20, 20,
                 what="load through gateway B")
        s.procs["gateway-1"].send_signal(signal.SIGKILL)
        s.procs["gateway-1"].wait(10)
        killed.set()
        after = len(outcomes["a_sync"])
        wait_for(lambda: len(outcomes["a_sync"]) >= after + 50, 20, what="50 sync calls through A after the kill")
    finally:
        stop.set()
    for t in threads:
        t.join(60)

    assert not outcomes["unexpected"], outcomes["unexpected"][:5]
    a_sync = outcomes["a_sync"]
    assert a_sync and all(code == 200 and same for _, code, same in a_sync), \
        [o for o in a_sync if o[1] != 200 or not o[2]][:5]
    assert any(after for after, _, _ in a_sync), "gateway A served calls after B was killed"
    # B's sync calls: each either answered in full or failed with a connection error, nothing else
    assert all(code == 200 and same for _, code, same in outcomes["b_sync"]), outcomes["b_sync"][:5]
    accepted = outcomes["accepted"]
    by_gateway = {key: sum(1 for k, _, _ in accepted if k == key) for key in ("gateway", "gateway-1")}
    assert by_gateway["gateway"] and by_gateway["gateway-1"], by_gateway
    print(f"\nsync through A: {len(a_sync)} ({sum(1 for o in a_sync if o[0])} after the kill); sync through B:"
          f" {len(outcomes['b_sync'])}, connection errors {outcomes['b_sync_errors']}; async accepted {by_gateway},"
          f" refused by B's connection {outcomes['b_async_errors']}")

    # every accepted async call finishes, the dead gateway's too (claimed by A once B's liveness ran out)
    pending = {call_id: body for _, call_id, body in accepted}

    def all_done() -> bool:
        for call_id in list(pending):
            rec = call_of(a, call_id)
            if rec["status"] in ("FAILED", "DEAD"):
                raise AssertionError(f"accepted call {call_id} ended {rec['status']}: {rec.get('error')}")
            if rec["status"] == "DONE":
                assert a.client.get(f"/calls/{call_id}/result").content == pending.pop(call_id)
        return not pending

    wait_for(all_done, 60, interval_s=0.5, what="every accepted async call to finish")


@pytest.mark.timeout(300)
def test_nuclide_up_starts_n_gateways_on_ports_of_their_own(tmp_path: Path) -> None:
    from tests.integration.test_stacks import user_env

    env = user_env(tmp_path)
    if os.environ.get("NUCLIDE_SANDBOX"):
        env["NUCLIDE_SANDBOX"] = os.environ["NUCLIDE_SANDBOX"]
    base = free_port_base(28)  # gateway i takes the first one's ports plus 10*i
    up = NuclideUp(tmp_path / "up", env, "--port-base", str(base), "--gateways", "3")
    try:
        urls = [f"http://127.0.0.1:{base + 10 * i}" for i in range(3)]
        assert up.url == urls[0]
        assert f"  gateway 1: {urls[1]}\n" in up.banner and f"  gateway 2: {urls[2]}\n" in up.banner
        ids = {httpx.get(f"{url}/healthz", timeout=5).json()["gateway_id"] for url in urls}
        assert len(ids) == 3, "three gateway processes answer"
        headers = {"Authorization": f"Bearer {up.token}"}
        archive = make_zip({"function.yaml": function_yaml("gup"), "main.py": ECHO})
        r = httpx.put(f"{urls[2]}/gup", headers=headers, timeout=120,
                      files={"zip_file": ("t.zip", archive, "application/zip")})
        assert r.status_code == 200, r.text
        for i, url in enumerate(urls):
            got = wait_for(lambda: (r := httpx.post(f"{url}/gup", content=f"via {i}", timeout=30)).status_code == 200
                           and r, 30, what=f"a call through gateway {i}")
            assert got.json() == {"got": f"via {i}"}
    finally:
        up.stop()
    assert up.proc.returncode == 0
    for url in urls:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)
