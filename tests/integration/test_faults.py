"""Crash safety: kill -9 each part during an async load; every accepted call still finishes (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from shared.procs import descendants as _descendants
from tests.async_load import WORK, Load, wait_all_done
from tests.stack import Stack, function_yaml, wait_for

pytestmark = pytest.mark.integration

TOTAL = 2000


@pytest.fixture
def fresh_stack(fresh_stack_on_each_database: Stack) -> Stack:
    return fresh_stack_on_each_database


def _runtime_pids(s: Stack) -> list[int]:
    pids = []
    for outer in s.instance_pids():
        pids.extend(_descendants(outer) or [outer])
    return pids


def test_every_accepted_call_finishes_through_crashes(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("work", {"function.yaml": function_yaml("work", retry={"maxAttempts": 5, "backoff": {"initial": "100ms"}}),
                      "main.py": WORK})
    load = Load(s.url, TOTAL).start()

    def after(n: int) -> None:
        wait_for(lambda: len(load.accepted) >= n, 90, interval_s=0.05, what=f"{n} accepted calls")

    after(300)
    hold = f"hold:{time.time_ns()}"
    held = s.anon.post("/work", content=hold.encode(), headers={"X-Nuclide-Async": "true"}).json()["call_id"]
    wait_for(lambda: f"holding {hold}" in s.client.get("/functions/work/logs").text, 60, interval_s=0.2,
             what="the held call to run in the instance")
    for pid in _runtime_pids(s):
        os.kill(pid, signal.SIGKILL)  # the instance dies mid-call
    # the kill hit the call in flight: it runs again, in a new instance, and then finishes
    wait_for(lambda: s.client.get("/functions/work/logs").text.count(f"holding {hold}") >= 2, 60, interval_s=0.2,
             what="the held call to run again after the kill")
    rec = wait_for(lambda: (r := s.client.get(f"/calls/{held}").json())["status"] == "DONE" and r, 60,
                   what="the call the instance kill hit to finish")
    assert rec["result"] == "held" and rec["attempts"] >= 2, f"the kill did not hit the held call: {rec}"
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

    wait_all_done(s, ids)
    attempts = [s.client.get(f"/calls/{cid}").json()["attempts"] for cid in ids]
    retried = sum(1 for a in attempts if a > 1)
    print(f"\n{TOTAL} accepted, {TOTAL} done, {retried} ran more than once (counted in attempts),"
          f" {load.refusals} submissions refused while parts were down and retried by the client")
    assert all(a >= 1 for a in attempts)
