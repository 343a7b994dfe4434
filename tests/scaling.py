"""Autoscaling checks run on a real stack of any backend (tests/integration/test_autoscale.py, test_swarm.py)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable

import httpx

from tests.stack import Stack, function_yaml, wait_for

# windows shortened from 60 s and 6 s so a test sees a whole scale-up and scale-down; the rules are the same
FAST_WINDOWS = {"NUCLIDE_AUTOSCALE_STABLE_WINDOW_S": "4", "NUCLIDE_AUTOSCALE_PANIC_WINDOW_S": "2",
                "NUCLIDE_AUTOSCALE_TICK_S": "0.5"}

BUSY = "import time\n\ndef handler(context, event):\n    time.sleep(0.05)\n    return 'done'\n"
# sleeps as many seconds as the body says: a call that is surely in flight when its instance is removed
SLOW = ("import os, time\n\nINSTANCE = os.urandom(8).hex()  # pids repeat across sandboxes\n\n"
        "def handler(context, event):\n    time.sleep(float(event.body or 0))\n    return INSTANCE\n")


def instances_settle(s: Stack, name: str, count: int) -> None:
    """Wait until ``count`` instance processes of ``name`` run (process backend; the docker backend's
    containers are counted by the store's ready instances, which the callers check already)."""
    if s.env.get("NUCLIDE_BACKEND", "process") == "process":
        wait_for(lambda: len(s.instance_pids_of(name)) == count, 20, what=f"{count} instance(s) of {name}")


class Load:
    """``connections`` clients calling a function back to back until stopped, each call with ``body``; every
    status is counted."""

    def __init__(self, url: str, name: str, connections: int, limit_s: float = 60.0, body: bytes = b"x") -> None:
        self.url, self.name, self.body = url, name, body
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self.answers: list[str] = []  # the first few answers that were not 200, as they came
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit_s  # bounded even if a test forgets to stop it
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(connections)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(40)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=40) as c:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                try:
                    resp = c.post(f"/{self.name}", content=self.body)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.errors.append(repr(exc))
                    continue
                with self._lock:
                    self.statuses[resp.status_code] += 1
                    if resp.status_code != 200 and len(self.answers) < 5:
                        self.answers.append(f"{resp.status_code} {resp.text[:300]}")


    def calls(self) -> int:
        with self._lock:
            return sum(self.statuses.values()) + len(self.errors)

    def failures(self) -> list[str]:
        """Every call that did not answer 200: its status, or the client's error."""
        with self._lock:
            return ([f"{n} x {status}" for status, n in self.statuses.items() if status != 200] + self.errors[:5]
                    + self.answers)


def replicas(s: Stack, name: str) -> dict[str, int]:
    return s.client.get(f"/functions/{name}").json()["replicas"]


def decision(s: Stack, group_id: str) -> dict:
    """The autoscaler's latest decision for a group, as GET /optimizer reports it ({} before the first)."""
    return s.client.get("/optimizer").json()["scaling"]["groups"].get(group_id) or {}


def scale_up_and_back_down(s: Stack) -> None:
    """Load raises a function's replicas to its maximum, they fall back to its minimum once the load stops,
    and no call fails either way."""
    s.deploy("busy", {"function.yaml": function_yaml("busy", minReplicas=1, maxReplicas=4), "main.py": BUSY})
    assert replicas(s, "busy") == {"desired": 1, "ready": 1}
    seen: list[int] = []
    with Load(s.url, "busy", connections=16) as load:
        # 16 calls at once against a target of 1 per instance (maxConcurrency 1): a burst, so a panic
        wait_for(lambda: seen.append(replicas(s, "busy")["ready"]) or seen[-1] > 1, 30, interval_s=0.2,
                 what="more than one ready replica under load")
        wait_for(lambda: replicas(s, "busy")["desired"] == 4, 20, interval_s=0.2, what="maxReplicas (4) under load")
        # the optimizer reports its decisions every second: wait for the one that set 4
        decision = wait_for(lambda: (d := s.client.get("/optimizer").json()["scaling"]["groups"]["g-busy"])["desired"]
                            == 4 and d, 5, interval_s=0.2, what="GET /optimizer to show the decision")
        assert decision["observed_concurrency"] > 1 and 1 <= decision["current"] <= 4 and decision["ready"] >= 1
        assert decision["max_replicas"] == 4 and decision["target_concurrency"] == 1
        assert {"stable_concurrency", "panic_concurrency", "panic", "reason"} <= set(decision)
        metrics = s.client.get("/metrics").text
        assert 'nuclide_autoscaler_desired_replicas{group="g-busy"} 4.0' in metrics, \
            [x for x in metrics.splitlines() if "autoscaler" in x]
        assert 'nuclide_autoscaler_observed_concurrency{group="g-busy"}' in metrics
        # the new instances take calls as they come up: all four serve while the load goes on
        wait_for(lambda: replicas(s, "busy")["ready"] == 4, 30, interval_s=0.2, what="four ready replicas")
        before = sum(load.statuses.values())
        wait_for(lambda: sum(load.statuses.values()) >= before + 100, 30, interval_s=0.1,
                 what="100 more calls on four replicas")
    assert load.statuses and set(load.statuses) == {200}, (load.statuses, load.errors[:3])
    assert not load.errors
    under_load = sum(load.statuses.values())

    # no load: back to minReplicas once the (shortened) stable window has passed, instances stopped too
    wait_for(lambda: replicas(s, "busy") == {"desired": 1, "ready": 1}, 40, interval_s=0.2,
             what="scale-down to minReplicas after the load stopped")
    instances_settle(s, "busy", 1)
    changes = wait_for(lambda: (c := s.client.get("/optimizer").json()["scaling"]["changes"]) and c[-1]["to"] == 1
                       and c, 5, interval_s=0.2, what="GET /optimizer to show the scale-down")
    ups = [c for c in changes if c["group"] == "g-busy" and c["to"] > c["from"]]
    downs = [c for c in changes if c["group"] == "g-busy" and c["to"] < c["from"]]
    assert ups and ups[0]["panic"] is True, changes
    assert downs and downs[-1]["to"] == 1 and downs[-1]["panic"] is False, changes
    print(f"\n{under_load} calls under load, all 200; replicas seen while rising: {seen}; changes:"
          f" {[(c['from'], c['to'], c['reason']) for c in changes]}")


def drain_on_scale_down(s: Stack, watch_removal: Callable[[], Callable[[], bool]]) -> None:
    """An instance removed by a scale-down (a manual override from 2 to 1) answers the call it runs; the
    override holds, then gives the replicas back. ``watch_removal()``, called just before the scale-down, gives
    a predicate that is true once the backend began removing an instance."""
    s.deploy("slow", {"function.yaml": function_yaml("slow", minReplicas=1, maxReplicas=2), "main.py": SLOW})
    held = s.client.put("/functions/slow/replicas", json={"replicas": 2})
    assert held.status_code == 200, held.text
    assert held.json() == {"function": "slow", "group_id": "g-slow", "override": 2, "replicas": 2}
    wait_for(lambda: replicas(s, "slow") == {"desired": 2, "ready": 2}, 30, what="two ready replicas")
    # held: idle for longer than the stable window, the autoscaler keeps them
    assert s.client.get("/functions/slow").json()["scaling"]["override"] == 2

    # one 4 s call on each instance (maxConcurrency 1: the second call goes to the other one)
    results: list[httpx.Response | Exception] = []

    def call() -> None:
        try:
            results.append(httpx.post(f"{s.url}/slow", content=b"4", timeout=30))
        except httpx.HTTPError as exc:
            results.append(exc)

    callers = [threading.Thread(target=call) for _ in range(2)]
    for t in callers:
        t.start()
    wait_for(lambda: inflight(s, "slow") == 2, 10, what="both calls in flight")
    removal_started = watch_removal()
    assert s.client.put("/functions/slow/replicas", json={"replicas": 1}).status_code == 200
    wait_for(removal_started, 10, what="the backend to remove the extra instance")
    assert len(results) == 0, "the scale-down came while both calls ran"
    for t in callers:
        t.join(30)
    assert [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in results] == [200, 200]
    assert len({r.text for r in results if isinstance(r, httpx.Response)}) == 2, "one call on each instance"
    wait_for(lambda: replicas(s, "slow") == {"desired": 1, "ready": 1}, 20, what="one replica left")
    instances_settle(s, "slow", 1)

    # back to the autoscaler: no load, so it stays at the minimum
    back = s.client.put("/functions/slow/replicas", json={"replicas": None})
    assert back.status_code == 200 and back.json()["override"] is None
    assert s.client.get("/functions/slow").json()["scaling"]["override"] is None


def inflight(s: Stack, name: str) -> int:
    """Calls of a function started minus answered, from the gateway's OpenFaaS counters."""
    lines = s.client.get("/metrics").text.splitlines()
    started = sum(float(x.rsplit(" ", 1)[1]) for x in lines
                  if x.startswith(f'gateway_function_invocation_started{{function_name="{name}"}}'))
    answered = sum(float(x.rsplit(" ", 1)[1]) for x in lines
                   if x.startswith(f'gateway_function_invocation_total{{function_name="{name}"'))
    return int(started - answered)
