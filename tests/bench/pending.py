"""Scenarios of issue 6 whose features are other issues': reported as pending rows, with their targets.

Each becomes a real scenario (a module with ``@scenario``) once its feature lands
(async throughput and the fusion chain already have: ``async_throughput.py``,
``fusion_chain.py``):
- scale to zero: what 1,000 idle functions cost the platform (its wake-up
  latency is a row of the cold start scenario, "not implemented yet").
"""

from __future__ import annotations

from tests.bench.model import Target
from tests.bench.registry import pending

pending("scale_to_zero", "Scale to zero: what idle functions cost", "issue 6: scale to zero", (
    ("density: 1,000 functions scaled to zero, whole platform", "MB", Target("< 100 MB", "<", 100.0)),
))
