"""Crash safety: kill -9 each part during an async load; every accepted call still finishes."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from shared.procs import descendants as _descendants
from tests.stack import Stack, function_yaml, wait_for

pytestmark = pytest.mark.integration

# A body 'hold:<tag>' holds its first run (so a kill is sure to hit a call in flight) and returns at once when
# run again: the marker lives in the code directory, which outlives the instance.
WORK = """
import os, time

def handler(context, event):
    body = event.body.decode() if isinstance(event.body, bytes) else str(event.body)
    if body.startswith("hold:"):
        if os.path.exists(body):
            return "ran again"
        open(body, "w").close()
        context.logger.info("holding " + body)
        time.sleep(20)
        return "never killed"
    time.sleep(0.002)
    return "ok"
"""
TOTAL = 2000


class Load:
    """Clients that submit async calls until TOTAL are accepted, retrying each one (same idempotency key) until it is."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.accepted: dict[str, str] = {}  # idempotency key -> call id
        self.refusals = 0
        self._next = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def _take(self) -> str | None:
        with self._lock:
            if self._next >= TOTAL:
                return None
            self._next += 1
            return f"fault-{self._next}"

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while (key := self._take()) is not None:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        r = c.post("/work", content=key.encode(),
                                   headers={"X-Nuclide-Async": "true", "X-Idempotency-Key": key})
                        if r.status_code == 202:
                            with self._lock:
                                self.accepted[key] = r.json()["call_id"]
                            break
                        self.refusals += 1
                    except httpx.HTTPError:
                        self.refusals += 1
                    time.sleep(0.05)

    def join(self) -> None:
        for t in self._threads:
            t.join(180)


def _runtime_pids(s: Stack) -> list[int]:
    pids = []
    for outer in s.instance_pids():
        pids.extend(_descendants(outer) or [outer])
    return pids


def test_every_accepted_call_finishes_through_crashes(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("work", {"function.yaml": function_yaml("work", retry={"maxAttempts": 5, "backoff": {"initial": "100ms"}}),
                      "main.py": WORK})
    load = Load(s.url).start()

    def after(n: int) -> None:
        wait_for(lambda: len(load.accepted) >= n, 90, interval_s=0.05, what=f"{n} accepted calls")

    after(300)
    hold = f"hold:{time.time_ns()}"
    held = s.anon.post("/work", content=hold.encode(), headers={"X-Nuclide-Async": "true"}).json()["call_id"]
    wait_for(lambda: f"holding {hold}" in s.client.get("/functions/work/logs").text, 60, interval_s=0.2,
             what="the held call to run in the instance")
    for pid in _runtime_pids(s):
        os.kill(pid, signal.SIGKILL)  # the instance dies mid-call
    rec = wait_for(lambda: (r := s.client.get(f"/calls/{held}").json())["status"] == "DONE" and r, 60,
                   what="the call the instance kill hit to finish")
    assert rec["result"] == "ran again" and rec["attempts"] >= 2, f"the kill did not hit the held call: {rec}"
    after(600)
    s.stop_service("deployer", signal.SIGKILL)
    s.start_service("deployer")
    after(900)
    s.stop_service("store", signal.SIGKILL)
    time.sleep(0.5)  # the store stays down a moment: submissions wait, results queue in the gateway
    s.start_service("store")
    after(1200)
    s.stop_service("gateway", signal.SIGKILL)
    s.start_service("gateway")
    load.join()
    assert len(load.accepted) == TOTAL, f"only {len(load.accepted)} accepted"

    ids = set(load.accepted.values())
    assert len(ids) == TOTAL, "every idempotency key maps to exactly one call"

    def all_final() -> bool:
        done = 0
        for call_id in ids:
            r = s.client.get(f"/calls/{call_id}")
            if r.status_code == 200 and r.json()["status"] == "DONE":
                done += 1
        return done == TOTAL

    wait_for(all_final, 120, interval_s=1.0, what="every accepted call to be DONE")
    attempts = [s.client.get(f"/calls/{cid}").json()["attempts"] for cid in ids]
    retried = sum(1 for a in attempts if a > 1)
    print(f"\n{TOTAL} accepted, {TOTAL} done, {retried} ran more than once (counted in attempts),"
          f" {load.refusals} submissions refused while parts were down and retried by the client")
    assert all(a >= 1 for a in attempts)
