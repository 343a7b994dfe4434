"""The `feedback` strategy, after Fusionize: fuse along observed synchronous calls, keep what helps.

Each round it measures the entry task's median end-to-end latency under the
current setup, proposes ONE change (merge the groups joined by the busiest
synchronous call edge that crosses groups), applies it, measures again, and keeps
it only if the median did not get worse (within the tolerance); otherwise it goes
back to the best setup and never proposes that merge again. Asynchronous edges are
never fusion candidates, so asynchronously called tasks stay in their own groups.
It converges when no candidate is left, and keeps observing for new traffic.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from shared.errors import NuclideError
from shared.logs import get_logger
from services.optimizer.strategies.base import Strategy

if TYPE_CHECKING:  # pragma: no cover
    from services.optimizer.strategies.base import Optimizer

log = get_logger(__name__)

SETTLE_S = 1.0  # after a change, calls still finishing on the old setup are not counted
MAX_WINDOW_FACTOR = 6  # a round waits at most this many round_s for enough samples


def merge(setup: list[list[str]], a: str, b: str) -> list[list[str]]:
    ga = next(g for g in setup if a in g)
    gb = next(g for g in setup if b in g)
    rest = [g for g in setup if g is not ga and g is not gb]
    return [sorted(ga + gb)] + [sorted(g) for g in rest]


def candidates(setup: list[list[str]], sync_edges: Counter, rejected: set[frozenset[str]]) -> list[tuple[str, str, int]]:
    group_of = {name: i for i, g in enumerate(setup) for name in g}
    found = []
    for (caller, callee), count in sync_edges.most_common():
        if caller not in group_of or callee not in group_of or group_of[caller] == group_of[callee]:
            continue
        key = frozenset(setup[group_of[caller]] + setup[group_of[callee]])
        if key in rejected:
            continue
        found.append((caller, callee, count))
    return found


class FeedbackStrategy(Strategy):
    name = "feedback"

    async def measure(self, opt: "Optimizer") -> dict[str, Any] | None:
        """One window of traffic: entry task, its median latency, sync edge counts."""
        start = time.monotonic()
        round_s = self.settings.optimizer_round_s
        need = self.settings.optimizer_min_samples
        while True:
            await asyncio.sleep(min(0.5, round_s))
            elapsed = time.monotonic() - start
            calls = [c for c in opt.calls if c[0] >= start and c[3] < 500]
            per_fn = Counter(c[1] for c in calls)
            if elapsed >= round_s and per_fn and per_fn.most_common(1)[0][1] >= need:
                break
            if elapsed >= round_s * MAX_WINDOW_FACTOR:
                return None
        entry = per_fn.most_common(1)[0][0]
        durations = [c[2] for c in calls if c[1] == entry]
        sync_edges: Counter = Counter()
        for e in opt.edges:
            if e[0] >= start and e[1] and e[3]:  # asynchronous edges are never fusion candidates
                sync_edges[(e[1], e[2])] += e[6]
        return {"entry": entry, "median_ms": statistics.median(durations), "samples": len(durations),
                "sync_edges": sync_edges}

    async def run(self, opt: "Optimizer") -> None:
        rejected: set[frozenset[str]] = set()
        best_setup: list[list[str]] | None = None
        best_median = 0.0
        converged_logged = False
        while True:
            if not converged_logged:
                opt.status["state"] = "measuring"
            setup = await opt.current_setup()
            window = await self.measure(opt)
            if window is None:
                if not converged_logged:
                    opt.status["state"] = "waiting for traffic"
                continue
            if best_setup is None or not _same(best_setup, setup):
                best_setup, best_median = setup, window["median_ms"]
                opt.status.update(best_setup=best_setup, best_median_ms=round(best_median, 3), entry=window["entry"])
                opt.decide(setup, "baseline", f"entry task '{window['entry']}' median {best_median:.3f} ms",
                           median_ms=best_median, samples=window["samples"])
            found = candidates(setup, window["sync_edges"], rejected)
            if not found:
                opt.status["state"] = "converged"
                if not converged_logged:
                    opt.decide(setup, "converged", "no synchronous edge crosses groups any more",
                               median_ms=window["median_ms"])
                    converged_logged = True
                continue
            converged_logged = False
            caller, callee, count = found[0]
            proposal = merge(setup, caller, callee)
            opt.status["state"] = f"trying {caller}+{callee}"
            try:
                await opt.apply(proposal)
            except NuclideError as exc:
                rejected.add(frozenset(next(g for g in proposal if caller in g)))
                opt.decide(proposal, "refused", f"fusing {caller} with {callee} was refused: {exc.message}")
                continue
            await asyncio.sleep(SETTLE_S)
            after = await self.measure(opt)
            if after is None:
                opt.decide(proposal, "kept", "no traffic to judge it; keeping it until traffic returns")
                continue
            evidence = {"median_before_ms": round(best_median, 3), "median_after_ms": round(after["median_ms"], 3),
                        "edge": [caller, callee, count], "samples": after["samples"]}
            if after["median_ms"] <= best_median * (1 + self.settings.optimizer_tolerance):
                best_setup, best_median = proposal, after["median_ms"]
                opt.status.update(best_setup=best_setup, best_median_ms=round(best_median, 3))
                opt.decide(proposal, "kept", f"fusing {caller}+{callee} (sync, {count} calls) did not slow "
                           f"'{after['entry']}': {evidence['median_before_ms']} -> {evidence['median_after_ms']} ms",
                           **evidence)
            else:
                rejected.add(frozenset(next(g for g in proposal if caller in g)))
                opt.decide(proposal, "reverted", f"fusing {caller}+{callee} made '{after['entry']}' slower: "
                           f"{evidence['median_before_ms']} -> {evidence['median_after_ms']} ms", **evidence)
                await opt.apply(best_setup)


def _same(a: list[list[str]], b: list[list[str]]) -> bool:
    return sorted(map(sorted, a)) == sorted(map(sorted, b))
