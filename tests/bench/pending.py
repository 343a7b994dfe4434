"""Scenarios of issue 6 whose features are other issues': reported as pending rows, with their targets.

Each becomes a real scenario (a module with ``@scenario``) once its feature lands:
- async: publish N invoke messages over ZeroMQ until all are durable and done,
  vs Celery + a real redis-server with the same number of worker processes;
- fusion: a 5-task synchronous chain through the gateway, unfused and fused,
  next to one no-op task invoked the same way;
- scale to zero: what 1,000 idle functions cost the platform (its wake-up
  latency is a row of the cold start scenario, "not implemented yet").
"""

from __future__ import annotations

from tests.bench.model import Target
from tests.bench.registry import pending

pending("async_throughput", "Async invoke throughput vs Celery + Redis", "issue 5: async invocation", (
    ("async: calls durable and done per second", "calls/s", Target(">= 5x Celery+Redis", ">=", 5.0, "ratio")),
))

pending("fusion_chain", "Fusion: 5-task synchronous chain", "issue 4: fusion", (
    ("fusion: fused 5-task chain, p50 latency", "ms", Target("<= 1.2x one no-op task", "<=", 1.2, "ratio")),
    ("fusion: unfused 5-task chain, p50 latency", "ms", None),
))

pending("scale_to_zero", "Scale to zero: what idle functions cost", "issue 6: scale to zero", (
    ("density: 1,000 functions scaled to zero, whole platform", "MB", Target("< 100 MB", "<", 100.0)),
))
