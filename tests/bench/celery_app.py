"""The Celery baseline of the async throughput scenario: the same no-op handler as a Celery task.

The worker is ``python -m celery -A tests.bench.celery_app worker --pool prefork
--concurrency 2 ...`` and the client ``python -m tests.bench.celery_client``;
both find the broker (and result backend: the same redis-server) in
``NUCLIDE_BENCH_REDIS_URL``. Celery's defaults otherwise (JSON, prefetch
multiplier 4, acks before running, results kept in Redis for a day), which is
what "Celery with a Redis broker" gives out of the box. Needs the ``bench``
extra: ``pip install -e '.[bench]'`` (celery, redis).
"""

from __future__ import annotations

import os

from celery import Celery

from tests.bench.apps import handler

URL_ENV = "NUCLIDE_BENCH_REDIS_URL"
TASK = "nuclide_bench.noop"

url = os.environ.get(URL_ENV, "")
if not url.startswith("redis://127.0.0.1:"):
    raise SystemExit(f"{URL_ENV} must name the benchmark's own redis-server (redis://127.0.0.1:PORT/0), not {url!r}")

app = Celery("nuclide_bench", broker=url, backend=url)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name=TASK)
def noop(body: str = "") -> str:
    # the very function nuclide deploys (tests/bench/apps.py), called as nuclide's runtime calls it
    return handler(None, body.encode())
