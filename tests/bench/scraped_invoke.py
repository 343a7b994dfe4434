"""Sync invoke while Prometheus scrapes: the no-op function measured without, then with, a GET /metrics every second.

Both measurements run on one stack in the same run, one after the other, so the
only difference is the scraper (a thread of this process polling /metrics with
the API token, as Prometheus would at a 1 s scrape interval). The gateway's CPU
per request is compared too: it moves less with other work on a shared machine
than requests per second do.
"""

from __future__ import annotations

import threading

import httpx

from tests.bench.apps import NOOP_SOURCE
from tests.bench.harness import Bench
from tests.bench.model import Row, ScenarioResult, Target
from tests.bench.registry import scenario
from tests.bench.sync_invoke import Point, _disturbed_note, _errors_note, _join, measure, runtime_pid
from tests.stack import Stack, function_yaml

NAME = "sync_invoke_scraped"
SCRAPE_INTERVAL_S = 1.0  # a common Prometheus scrape_interval for a busy target; the default is 15 s
UNSCRAPED = "not scraped"
RPS_VS_UNSCRAPED = Target(">= 0.95x not scraped", ">=", 0.95, "ratio")


class Scraper:
    """Polls GET /metrics every SCRAPE_INTERVAL_S until stopped; counts the scrapes and the ones that failed."""

    def __init__(self, stack: Stack) -> None:
        self.url, self.token = stack.url, stack.token
        self.scrapes = 0
        self.failed = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10, headers={"Authorization": f"Bearer {self.token}"}) as c:
            while not self._stop.is_set():
                try:
                    r = c.get("/metrics")
                    ok = r.status_code == 200
                    self.bytes = len(r.content)
                except httpx.HTTPError:
                    ok = False
                self.scrapes += 1
                self.failed += not ok
                self._stop.wait(SCRAPE_INTERVAL_S)  # the scrape interval, not a wait for a condition


@scenario(NAME, "Sync invoke of a no-op handler while GET /metrics is scraped every second", needs=("wrk",))
def run(bench: Bench, result: ScenarioResult) -> None:
    opts = bench.options
    with bench.stack("scraped") as stack:
        stack.deploy("noop", {"function.yaml": function_yaml("noop"), "main.py": NOOP_SOURCE})
        instances = bench.track_instances(stack)
        if len(instances) != 1:
            raise RuntimeError(f"expected one instance of the no-op function, found {len(instances)}")
        pids = {"gateway": stack.procs["gateway"].pid, "instance": runtime_pid(instances[0])}
        url = stack.url + "/noop"
        plain = measure(bench, "unscraped", url, pids, result.raw)
        with Scraper(stack) as scraper:
            scraped = measure(bench, "scraped", url, pids, result.raw, warmup=False)
        result.raw["scraper"] = {"scrapes": scraper.scrapes, "failed": scraper.failed, "last_bytes": scraper.bytes}
        bench.log(f"scraper: {scraper.scrapes} scrapes of {scraper.bytes} bytes, {scraper.failed} failed")
    secs = f"{opts.duration_s} s, 1 wrk thread"
    for c in opts.concurrency:
        s, p = scraped[c], plain[c]
        scrapes = f"{scraper.scrapes} scrapes over the whole run, {scraper.failed} failed"
        result.rows += [
            Row(NAME, f"sync invoke scraped every 1 s, {c} conn: throughput", "req/s", s.res.rps, p.res.rps,
                UNSCRAPED, RPS_VS_UNSCRAPED,
                _join(f"{s.res.requests} vs {p.res.requests} requests in {secs}", _gateway_cpu(s, p), scrapes,
                      _errors_note(scraped=s, unscraped=p), _disturbed_note(scraped=s, unscraped=p)),
                s.res.errors + p.res.errors + scraper.failed),
            Row(NAME, f"sync invoke scraped every 1 s, {c} conn: p50 latency", "ms", s.res.p50_ms, p.res.p50_ms,
                UNSCRAPED, None,
                _join(f"p99 {s.res.p99_ms:.3f} vs {p.res.p99_ms:.3f} ms", _disturbed_note(scraped=s, unscraped=p)),
                s.res.errors + p.res.errors),
        ]


def _gateway_cpu(scraped: Point, plain: Point) -> str:
    return (f"gateway CPU per request {scraped.cpu_us['gateway']:.1f} us scraped (scrapes included) vs"
            f" {plain.cpu_us['gateway']:.1f} us not scraped")
