"""Scale to zero after an idle period, and wake-up on the first call or trigger (held, not refused)."""

from __future__ import annotations

import time

import pytest

from tests.stack import Stack, function_yaml, never, wait_for

pytestmark = pytest.mark.integration

HELLO = "def handler(context, event):\n    return 'awake'\n"


def test_idle_function_scales_to_zero_and_wakes_on_a_call(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("sleeper", {"function.yaml": function_yaml("sleeper", minReplicas=0, maxReplicas=1,
                                                        scaleToZero={"idleTimeout": "1s"}), "main.py": HELLO})
    assert s.invoke("sleeper").text == "awake"
    wait_for(lambda: (d := s.client.get("/sleeper").json())["state"] == "scaledToZero"
             and d["replicas"] == {"desired": 0, "ready": 0}, 20, what="scale to zero")
    wait_for(lambda: not s.instance_pids(), 15, what="the instance to stop")

    started = time.monotonic()
    r = s.invoke("sleeper")
    cold_s = time.monotonic() - started
    assert r.status_code == 200 and r.text == "awake", "the first call is held until an instance is ready"
    assert r.headers.get("x-nuclide-cold-start") == "true"
    print(f"\nscale-from-zero to first response: {cold_s * 1000:.0f} ms")
    call_id = r.headers["x-call-id"]
    rec = wait_for(lambda: s.client.get(f"/calls/{call_id}").status_code == 200 and
                   s.client.get(f"/calls/{call_id}").json(), 10, what="the call record")
    assert rec["cold_start"] is True
    assert s.client.get("/sleeper").json()["state"] == "ready"
    assert "nuclide_cold_starts_total 1" in s.client.get("/metrics").text
    warm = s.invoke("sleeper")
    assert "x-nuclide-cold-start" not in warm.headers


def test_cron_wakes_a_scaled_to_zero_function(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("nightly", {"function.yaml": function_yaml(
        "nightly", minReplicas=0, scaleToZero={"idleTimeout": "1s"},
        triggers={"tick": {"kind": "cron", "attributes": {"interval": "4s"}}}), "main.py": HELLO})
    wait_for(lambda: s.client.get("/nightly").json()["state"] == "scaledToZero", 20, what="scale to zero")

    def cold_cron_done() -> bool:
        calls = s.client.get("/calls", params={"function": "nightly"}).json()
        return any(c["source"] == "cron" and c["status"] == "DONE" and c["cold_start"] for c in calls)

    wait_for(cold_cron_done, 30, interval_s=0.5, what="a cron call that woke the function")


def test_topic_message_wakes_a_scaled_to_zero_function(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("listener", {"function.yaml": function_yaml(
        "listener", minReplicas=0, scaleToZero={"idleTimeout": "1s"},
        triggers={"news": {"kind": "topic", "attributes": {"topic": "news"}}}), "main.py": HELLO})
    wait_for(lambda: s.client.get("/listener").json()["state"] == "scaledToZero", 20, what="scale to zero")
    wait_for(lambda: not s.instance_pids(), 15, what="the instance to stop")
    with s.publisher() as p:
        p.publish("news", b"hello")

    def woken_call() -> dict | None:
        calls = s.client.get("/calls", params={"function": "listener"}).json()
        done = [c for c in calls if c["source"] == "topic" and c["status"] == "DONE"]
        return done[0] if done else None

    call = wait_for(woken_call, 20, interval_s=0.2, what="the topic call, held until the instance was ready")
    assert call["cold_start"] is True and call["attempts"] == 1, call
    assert s.client.get("/listener").json()["state"] == "ready"


def test_functions_with_min_replicas_never_scale_to_zero(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("always", {"function.yaml": function_yaml("always", scaleToZero={"idleTimeout": "1s"}), "main.py": HELLO})
    assert s.invoke("always").text == "awake"
    # a negative check: it must stay up past three idle timeouts
    never(lambda: (state := s.client.get("/always").json()["state"]) != "ready" and state, 3.5, interval_s=0.5,
          what="a function with minReplicas 1 leaving 'ready'")
