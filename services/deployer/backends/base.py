"""The one interface every deployment backend implements (process, docker, ...)."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from services.deployer import logread


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a backend needs to start one instance of a group version."""

    id: str
    group_id: str
    group_version: int
    functions: list[dict[str, Any]]  # runtime config per function: name, version, handler, code_dir, deps_dir, env
    memory_bytes: int
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)
    # the instance's CURVE keys for the gateways (shared/curve.py Keys.instance_config): public, secret, server
    curve: dict[str, str] = field(default_factory=dict)


@dataclass
class InstanceHandle:
    """A running instance as the backend knows it."""

    id: str
    group_id: str
    group_version: int
    pid: int | None
    log_path: Path
    started_at: float
    # the tasks it serves: the reconciler stops a superseded instance only once each of
    # these is ready elsewhere, so a backend must fill it (also for adopted instances)
    functions: tuple[str, ...] = ()
    adopted: bool = False
    stopping: bool = False


ExitCallback = Callable[[InstanceHandle, "int | None"], None]


class Backend(abc.ABC):
    name = "abstract"

    def __init__(self, on_exit: ExitCallback) -> None:
        self.on_exit = on_exit

    @abc.abstractmethod
    async def start(self, spec: InstanceSpec) -> InstanceHandle:
        """Start an instance; returns once it is launched (READY comes later, to the gateway)."""

    @abc.abstractmethod
    async def stop(self, handle: InstanceHandle, timeout_s: float) -> None:
        """Ask the instance to drain and stop; kill it after ``timeout_s``."""

    @abc.abstractmethod
    def adopt(self) -> list[InstanceHandle]:
        """Instances left running by an earlier deployer process, now watched by this one."""

    @abc.abstractmethod
    def list(self) -> list[InstanceHandle]:
        """Instances this backend is running."""

    def knows_all(self) -> bool:
        """True when list() holds every instance that runs (adoption is done): one missing from it is gone."""
        return True

    async def python_check(self, version: str) -> dict[str, Any]:
        """Whether instances of a ``python:<version>`` function can run on that exact interpreter here:
        ``{"available": bool, "detail": why not, or what runs it}``."""
        return {"available": False, "detail": f"the {self.name} backend has no Python {version}: its instances run"
                                              " the platform's Python only"}

    def groups_changed(self, group_ids: set[str]) -> None:
        """The groups that exist now (scaled to zero or not); a backend may free what only others used."""

    def logs(self, paths: list[Path], tail_lines: int, since_s: float | None = None,
             cursor: dict[str, int] | None = None) -> tuple[str, dict[str, int]]:
        """The last lines across the given instance log files, oldest first, or (given the cursor an earlier
        read returned) the lines written since; either way with the cursor to follow from (logread.py)."""
        if cursor is None:
            return logread.tail(paths, tail_lines, since_s)
        return logread.after(paths, cursor, since_s)


class ReplicatedBackend(Backend):
    """A backend whose platform runs a group's replicas itself (a Docker Swarm service; a Kubernetes
    Deployment would be one too): the reconciler hands it the group version and the replica count it
    wants (:meth:`converge`), and the platform schedules, restarts and rolls the instances.

    Its instances (the platform's tasks) show in :meth:`list`, with ids the instances say in their
    READY, and their exits reach ``on_exit`` like any backend's, so the store counts them and crash
    reports work the same. ``start`` is not used: the platform starts each replica.
    """

    async def start(self, spec: InstanceSpec) -> InstanceHandle:
        raise NotImplementedError(f"the {self.name} backend starts replicas itself: converge() a group instead")

    @abc.abstractmethod
    def converged(self, group_id: str, version: int, replicas: int) -> bool:
        """True when the group's service already runs (or is rolling to) this version at this count."""

    @abc.abstractmethod
    async def converge(self, spec: InstanceSpec, replicas: int) -> None:
        """Make the group's service run ``spec``'s version at ``replicas`` (a rolling update when the version
        changes); returns once the platform has the change, not when every replica serves."""

    @abc.abstractmethod
    async def remove(self, group_id: str) -> None:
        """Remove the group's service (its instances drain and stop)."""

    @abc.abstractmethod
    def services(self) -> set[str]:
        """The groups that have a service."""

    async def stop_all(self) -> None:
        """Remove every service (a deployer stopping with stop_instances_on_exit)."""
        for group_id in sorted(self.services()):
            await self.remove(group_id)
