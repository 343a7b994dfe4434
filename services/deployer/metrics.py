"""The deployer's counters, sent to the store with each ``deployer.report`` (shared/svcmetrics.py)."""

from __future__ import annotations

from typing import Any

from shared.svcmetrics import BUILD_BUCKETS_S, Histogram, labelled, single


class DeployerMetrics:
    """Plain integers the reconciler bumps; :meth:`snapshot` adds what the backend knows at report time."""

    def __init__(self) -> None:
        self.builds: dict[str, int] = {}
        self.build_seconds: dict[str, Histogram] = {}
        self.started = 0
        self.exited: dict[str, int] = {}  # stopped / crash / gone
        self.backoffs = 0

    def built(self, ok: bool, took_s: float) -> None:
        outcome = "ok" if ok else "failed"
        self.builds[outcome] = self.builds.get(outcome, 0) + 1
        hist = self.build_seconds.get(outcome)
        if hist is None:
            hist = self.build_seconds[outcome] = Histogram(BUILD_BUCKETS_S)
        hist.observe(took_s)

    def ended(self, reason: str, count: int = 1) -> None:
        self.exited[reason] = self.exited.get(reason, 0) + count

    def snapshot(self, backend: Any) -> dict[str, Any]:
        snap: dict[str, Any] = {
            "nuclide_deployer_builds": labelled(self.builds),
            "nuclide_deployer_build_seconds": labelled(self.build_seconds),
            "nuclide_deployer_instances_started": single(self.started),
            "nuclide_deployer_instances_exited": labelled(self.exited),
            "nuclide_deployer_restart_backoffs": single(self.backoffs),
            "nuclide_deployer_instances": [[backend.name, len(backend.list())]],
        }
        zygotes = getattr(backend, "zygotes", None)  # the process backend's: forks are its way to start instances
        if zygotes is not None:
            snap["nuclide_deployer_zygote_forks"] = single(zygotes.forks)
            snap["nuclide_deployer_zygote_warm_hits"] = single(zygotes.warm_hits)
        return snap
