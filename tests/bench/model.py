"""What a scenario reports: rows of (nuclide figure, baseline figure, ratio, target), JSON-ready."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MEASURED = "measured"
PENDING = "pending"  # the feature it measures is another issue's, not landed yet
NOT_IMPLEMENTED = "not implemented yet"  # part of this issue, not built yet
SKIPPED = "skipped"  # its baseline is not installed here: nuclide's figure if measured, the reason in notes


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``op`` applied to the nuclide figure (``of="value"``) or to the ratio."""

    text: str
    op: str  # one of < <= > >=
    value: float
    of: str = "value"  # "value" or "ratio"

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        subject = ratio if self.of == "ratio" else value
        if subject is None or not math.isfinite(subject):
            return None
        return {"<": subject < self.value, "<=": subject <= self.value,
                ">": subject > self.value, ">=": subject >= self.value}[self.op]

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "op": self.op, "value": self.value, "of": self.of}


@dataclass
class Row:
    scenario: str
    metric: str
    unit: str
    nuclide: float | None = None
    baseline: float | None = None
    baseline_label: str = ""
    target: Target | None = None
    notes: str = ""
    errors: int = 0  # failed requests (non-2xx, socket errors) in any measurement behind this row
    status: str = MEASURED
    pending_on: str = ""  # for PENDING rows: the issue whose feature it waits for

    @property
    def ratio(self) -> float | None:
        if self.nuclide is None or not self.baseline:
            return None
        return self.nuclide / self.baseline

    @property
    def met(self) -> bool | None:
        if self.target is None or self.status != MEASURED:
            return None
        return self.target.met(self.nuclide, self.ratio)

    @property
    def flagged(self) -> bool:
        return self.errors > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "metric": self.metric, "unit": self.unit, "status": self.status,
            "nuclide": self.nuclide, "baseline": self.baseline, "baseline_label": self.baseline_label,
            "ratio": self.ratio, "target": self.target.to_json() if self.target else None, "met": self.met,
            "errors": self.errors, "flagged": self.flagged, "notes": self.notes, "pending_on": self.pending_on,
        }


@dataclass
class ScenarioResult:
    name: str
    title: str
    status: str  # ok, failed, pending, skipped
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)  # the measurements behind the rows
    error: str = ""
    took_s: float = 0.0
    loadavg: dict[str, list[float]] = field(default_factory=dict)  # 1/5/15-min load before and after

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "status": self.status, "error": self.error,
                "took_s": round(self.took_s, 2), "loadavg": self.loadavg,
                "rows": [r.to_json() for r in self.rows], "raw": self.raw}
