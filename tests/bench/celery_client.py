"""The Celery side's client: ``delay()`` N no-op tasks, then ``get()`` every result (issue 6's method).

Run by the async throughput scenario as a subprocess of its own (Celery's
client, its connections and threads never live in the benchmark process),
speaking JSON lines on stdin/stdout::

    python -m tests.bench.celery_client --warmup 50 --timeout 120
    -> {"ready": true, "warmup_s": 0.4}            after warm-up tasks made the round trip
    <- run 5000
    -> {"count": 5000, "ok": 5000, "send_s": ..., "total_s": ..., "cpu_s": ...}
    <- quit (or end of input)

``total_s`` is from the first ``delay()`` to the return of the last ``get()``;
``cpu_s`` is this process's own CPU time over that span (user + system).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _say(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def batch(count: int, timeout_s: float) -> dict:
    from tests.bench.celery_app import noop

    cpu0 = _cpu()
    t0 = time.perf_counter()
    results = [noop.delay("") for _ in range(count)]
    t_sent = time.perf_counter()
    deadline = t0 + timeout_s
    ok = 0
    for res in results:
        value = res.get(timeout=max(0.1, deadline - time.perf_counter()))
        ok += value == "ok"
    t_end = time.perf_counter()
    return {"count": count, "ok": ok, "send_s": t_sent - t0, "total_s": t_end - t0, "cpu_s": _cpu() - cpu0}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.celery_client")
    parser.add_argument("--warmup", type=int, default=50, help="tasks sent and awaited before saying ready")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one batch may take at most")
    args = parser.parse_args()
    t0 = time.perf_counter()
    warm = batch(args.warmup, args.timeout)
    if warm["ok"] != args.warmup:
        raise SystemExit(f"warm-up: {warm['ok']} of {args.warmup} tasks answered 'ok'")
    _say({"ready": True, "warmup_s": round(time.perf_counter() - t0, 3)})
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] != "run" or len(words) != 2:
            raise SystemExit(f"unknown command {line.strip()!r}")
        _say(batch(int(words[1]), args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
