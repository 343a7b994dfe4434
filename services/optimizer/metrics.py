"""The optimizer's counters, sent to the store with ``metrics.report`` every status period (shared/svcmetrics.py)."""

from __future__ import annotations

from typing import Any

from shared.svcmetrics import labelled, single


class OptimizerMetrics:
    """Rounds by decision and regroups by result; the traced counts and scaler moves live where they happen."""

    def __init__(self) -> None:
        self.rounds: dict[str, int] = {}
        self.regroups: dict[str, int] = {}

    def decided(self, decision: str) -> None:
        self.rounds[decision] = self.rounds.get(decision, 0) + 1
        if decision == "reverted":  # the strategy set the previous setup back
            self.regroup("reverted")

    def regroup(self, result: str) -> None:
        self.regroups[result] = self.regroups.get(result, 0) + 1

    def snapshot(self, traced: dict[str, int], scaled: dict[str, int]) -> dict[str, Any]:
        return {
            "nuclide_optimizer_rounds": labelled(self.rounds),
            "nuclide_optimizer_regroups": labelled(self.regroups),
            "nuclide_optimizer_traced_calls": single(traced["calls"]),
            "nuclide_optimizer_traced_edges": single(traced["edges"]),
            "nuclide_optimizer_scaler_decisions": labelled(scaled),
        }
