"""The scenario registry: each scenario module registers itself; ``__main__`` runs them in order.

A scenario is a function ``run(bench, result)`` that fills ``result.rows`` (and
``result.raw`` with what the rows were computed from) while it goes, so a
failure part-way still reports what was measured. A feature that has not landed
yet is registered with :func:`pending`: it shows up in the report as rows marked
"pending: issue N" with its target, never with invented numbers. To add a
scenario, write a module with a ``@scenario(...)`` function and list the module
in ``SCENARIO_MODULES``; to turn a pending one into a real one, replace its
:func:`pending` call with that.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from tests.bench.model import NOT_IMPLEMENTED, PENDING, Row, ScenarioResult, Target

if TYPE_CHECKING:
    from tests.bench.harness import Bench

# imported in this order; the report lists scenarios in registration order
SCENARIO_MODULES = ("tests.bench.sync_invoke", "tests.bench.scraped_invoke", "tests.bench.gateways_invoke",
                    "tests.bench.cold_start",
                    "tests.bench.density", "tests.bench.async_throughput", "tests.bench.fusion_chain",
                    "tests.bench.docker_cold_start", "tests.bench.autoscale_step", "tests.bench.pending")

RunFn = Callable[["Bench", ScenarioResult], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: RunFn | None = None
    needs: tuple[str, ...] = ()  # executables it cannot run without (e.g. wrk)
    pending_on: str = ""  # "issue 5: async invocation" when the feature has not landed
    pending_rows: tuple[tuple[str, str, Target | None, str], ...] = ()  # (metric, unit, target, status)

    @property
    def is_pending(self) -> bool:
        return self.run is None


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, title: str, needs: tuple[str, ...] = ()) -> Callable[[RunFn], RunFn]:
    def register(fn: RunFn) -> RunFn:
        if name in SCENARIOS:
            raise ValueError(f"benchmark scenario {name!r} is registered twice")
        SCENARIOS[name] = Scenario(name, title, fn, needs)
        return fn

    return register


def pending(name: str, title: str, pending_on: str,
            rows: tuple[tuple[str, str, Target | None], ...]) -> None:
    """Register a scenario whose feature is another issue's: reported as pending rows with their targets."""
    if name in SCENARIOS:
        raise ValueError(f"benchmark scenario {name!r} is registered twice")
    SCENARIOS[name] = Scenario(name, title, None, (), pending_on, tuple((m, u, t, PENDING) for m, u, t in rows))


def pending_rows(name: str, pending_on: str, rows: tuple[tuple[str, str, Target | None], ...],
                 status: str = NOT_IMPLEMENTED) -> list[Row]:
    """Rows for parts of an implemented scenario that measure something not built yet."""
    label = "not implemented yet" if status == NOT_IMPLEMENTED else f"pending: {pending_on}"
    return [Row(name, metric, unit, target=target, status=status, pending_on=pending_on, notes=label)
            for metric, unit, target in rows]


def load_all() -> dict[str, Scenario]:
    for module in SCENARIO_MODULES:
        importlib.import_module(module)
    return SCENARIOS
