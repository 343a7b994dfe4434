"""Async load for crash tests: clients that keep submitting until every call is accepted, and the wait for all to finish."""

from __future__ import annotations

import threading
from collections import Counter
import time

import httpx

from tests.stack import Stack, wait_for

# A body 'hold:<tag>' holds its run for 20 s and logs "holding <tag>" first, so a kill is sure to hit a call in
# flight and the function's log shows each run of it (a function keeps nothing across its instances).
WORK = """
import time

def handler(context, event):
    body = event.body.decode() if isinstance(event.body, bytes) else str(event.body)
    if body.startswith("hold:"):
        context.logger.info("holding " + body)
        time.sleep(20)
        return "held"
    time.sleep(0.002)
    return "ok"
"""


class Load:
    """Clients that submit async calls until ``total`` are accepted, retrying each one (same idempotency key) until it is."""

    def __init__(self, url: str, total: int, clients: int = 4) -> None:
        self.url = url
        self.total = total
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
            if self._next >= self.total:
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
                    time.sleep(0.05)  # a client's pause before it retries a refused submission, not a wait

    def join(self) -> None:
        for t in self._threads:
            t.join(180)


def wait_all_done(s: Stack, ids: set[str], timeout_s: float = 120) -> None:
    """Every call of ``ids`` reaches DONE before the deadline; the failure tells which did not, and how they stand."""
    left = set(ids)
    last: dict[str, object] = {}

    def all_final() -> bool:
        for call_id in sorted(left):
            r = s.client.get(f"/calls/{call_id}")
            last[call_id] = r.json() if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
            if r.status_code == 200 and r.json()["status"] == "DONE":
                left.discard(call_id)
        return not left

    try:
        wait_for(all_final, timeout_s, interval_s=1.0, what="every accepted call to be DONE")
    except AssertionError as exc:
        states = Counter(v["status"] if isinstance(v, dict) else "unreadable" for k, v in last.items() if k in left)
        sample = [last[k] for k in sorted(left)[:3]]
        raise AssertionError(f"{exc}: {len(left)} of {len(ids)} not DONE, by status {dict(states)}; for example"
                             f" {sample}\nstore log:\n{s.service_log('store')[-3000:]}"
                             f"\ngateway log:\n{s.service_log('gateway')[-3000:]}") from None
