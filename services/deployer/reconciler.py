"""Reconciliation: make the instances running on the backend match the store's groups.

Runs on every state event and on a short tick. It only schedules work (builds,
starts, stops run as tasks), so a slow build never blocks another group or the
loop. Rules per group:

- the target version (group.version) gets replicas_desired instances;
- any other instance (an older version, a group that was regrouped or deleted)
  stops only once every task it serves has as many ready instances of its current
  group elsewhere as that group should run (at least one), or no longer exists:
  redeploys, regroups and deletes never leave a task without an instance, a regroup
  under load keeps the capacity in use until the new groups have theirs, and a
  failed regroup leaves the old ones serving;
- a version whose build failed or whose instances failed to load is reported
  to the store once (deploy.failed, naming the members whose build step or spec
  failed when it was theirs) and not retried;
- an instance that crashes is restarted with backoff; repeated crashes are
  reported so the function shows as failed with its last log lines;
- an instance the store counts but the backend does not run (its exit was never
  reported: the deployer was killed, or the store stopped before it) is reported
  gone after each snapshot, once the backend has adopted all that runs, so replica
  counts match the processes that exist.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from shared.config import Settings
from shared.curve import GROUP_WIDE, Keys
from shared.errors import BuildFailed, Conflict, NuclideError
from shared.exits import EXIT_INIT_FAILED
from shared.fusion import merge_specs
from shared.liveness import DRAIN_TIMEOUT_S
from shared.logs import get_logger
from shared.runtimes import DEFAULT_WARM_START, warm_start_problem
from shared.storeclient import StoreClient
from services.deployer.backends.base import Backend, InstanceHandle, InstanceSpec, ReplicatedBackend
from services.deployer.builder import Builder, build_log_path, members_of_step, tail
from services.deployer.metrics import DeployerMetrics

log = get_logger(__name__)

CRASH_WINDOW_S = 60.0
CRASH_LIMIT = 3  # crashes within the window before the function is reported failed
BACKOFF_MAX_S = 30.0
EXIT_REPORTS_TIMEOUT_S = 5.0  # on shutdown, how long the stopped instances' exit reports may take


def may_stop(serves: Iterable[str], ready: Mapping[str, int], needed: Mapping[str, int]) -> bool:
    """Whether an instance that is not current (older version, regrouped or deleted group) may stop.

    ``serves``: the functions it serves; ``ready``: per function, the ready instances of current groups
    that serve it; ``needed``: per function that still exists, the replicas its current group should
    run. Each function it serves that still exists needs that many ready elsewhere, and at least one.
    """
    return all(ready.get(fn, 0) >= max(1, needed[fn]) for fn in serves if fn in needed)


class Reconciler:
    def __init__(self, settings: Settings, store: StoreClient, builder: Builder, keys: Keys) -> None:
        self.settings = settings
        self.keys = keys  # issues each instance its keypair, bound to its id, group and version
        self.store = store
        self.builder = builder
        self.backend: Backend  # set by the service once it exists
        self.groups: dict[str, dict[str, Any]] = {}
        self.function_groups: dict[str, str] = {}
        self.ever_ready: set[str] = set()
        self.failed_versions: set[tuple[str, int]] = set()
        self.starting: dict[tuple[str, int], asyncio.Task] = {}
        self.crashes: dict[tuple[str, int], list[float]] = {}
        self.backoff_until: dict[str, float] = {}
        self.stopping: set[str] = set()
        self.launching: set[str] = set()  # started, but maybe not registered with the backend or the store yet
        self._unchecked: list[str] | None = None  # instances the store counts, until the backend knows all it runs
        self._versions: dict[tuple[str, int], dict[str, Any]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._kick_pending = False
        self.synced = False
        self.closing = False  # set on shutdown: nothing new is started after it
        self.gateways: dict[str, dict[str, Any]] = {}  # live gateways: a new instance connects to each
        self.metrics = DeployerMetrics()  # sent with every deployer.report

    # ----- state from the store -------------------------------------------------------

    def on_snapshot(self, snap: dict[str, Any]) -> None:
        self.groups = {g["id"]: g for g in snap.get("groups", [])}
        self.function_groups = {f["name"]: f["group"]["id"] for f in snap.get("functions", [])}
        self.gateways = {g["id"]: g for g in snap.get("gateways", [])}
        for inst in snap.get("instances", []):
            if inst.get("state") == "ready":
                self.ever_ready.add(inst["id"])
        self.synced = True
        self._unchecked = [inst["id"] for inst in snap.get("instances", [])]
        self.kick()

    def _report_gone(self, counted: list[str]) -> None:
        """Tell the store which of the instances it counts no longer run (exits it never heard of)."""
        self._unchecked = None
        running = {h.id for h in self.backend.list()} | self.launching
        gone = [inst_id for inst_id in counted if inst_id not in running]
        if not gone:
            return
        self.metrics.ended("gone", len(gone))
        log.info("the store counts instances that no longer run; reporting them gone", instances=gone)

        async def report() -> None:
            try:
                await self.store.instances_gone(gone, "no longer running (found when the deployer synced with the store)")
            except NuclideError as exc:  # the next snapshot tries again
                log.warning("could not report gone instances", error=str(exc))

        self._spawn(report())

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "group.changed":
            group = data["group"]
            self.groups[group["id"]] = group
        elif kind == "group.deleted":
            self.groups.pop(data["group_id"], None)
        elif kind == "function.changed":
            fn = data["function"]
            self.function_groups[fn["name"]] = fn["group"]["id"]
        elif kind == "function.deleted":
            self.function_groups.pop(data["name"], None)
            # versions restart at 1 if the name is deployed again: forget the cached records
            for key in [k for k in self._versions if k[0] == data["name"]]:
                del self._versions[key]
        elif kind == "instance.changed":
            inst = data["instance"]
            if inst.get("state") == "ready":
                self.ever_ready.add(inst["id"])
        elif kind == "gateway.changed":
            self.gateways[data["gateway"]["id"]] = data["gateway"]
            return  # nothing to reconcile: running instances learn of it from the gateways' heartbeats
        elif kind == "gateway.gone":
            self.gateways.pop(data["id"], None)
            return
        self.kick()

    # ----- the loop -------------------------------------------------------------------

    def kick(self) -> None:
        if not self._kick_pending and not self.closing:
            self._kick_pending = True
            asyncio.get_running_loop().call_soon(self._reconcile)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _reconcile(self) -> None:
        self._kick_pending = False
        if not self.synced or self.closing:
            return
        now = time.monotonic()
        if self._unchecked is not None and self.backend.knows_all():
            self._report_gone(self._unchecked)
        self.backend.groups_changed(set(self.groups))
        if isinstance(self.backend, ReplicatedBackend):
            self._reconcile_services(self.backend, now)
            return
        handles = [h for h in self.backend.list() if h.id not in self.stopping]
        current = [h for h in handles if self._is_current(h)]
        for h in handles:
            group = self.groups.get(h.group_id)
            if group is not None and h.group_version == group["version"]:
                if group["state"] == "failed" and group["ready_version"] != group["version"]:
                    self._stop(h, "its version failed")
                continue
            if self._safe_to_stop(h, current):
                self._stop(h, "superseded")
        for group in self.groups.values():
            key = (group["id"], group["version"])
            if key in self.failed_versions or key in self.starting:
                continue
            if group["state"] == "failed" and group["ready_version"] != group["version"]:
                continue
            if now < self.backoff_until.get(group["id"], 0):
                asyncio.get_running_loop().call_later(self.backoff_until[group["id"]] - now + 0.01, self.kick)
                continue
            running = [h for h in handles if h.group_id == group["id"] and h.group_version == group["version"]
                       and h.id not in self.stopping]
            missing = int(group["replicas_desired"]) - len(running)
            if missing > 0:
                self.starting[key] = self._spawn(self._start(group, missing))
            elif missing < 0:
                extras = sorted(running, key=lambda h: (h.id in self.ever_ready, h.started_at))[:-missing]
                for h in extras:
                    self._stop(h, "more replicas than desired")

    def _reconcile_services(self, backend: ReplicatedBackend, now: float) -> None:
        """A backend that runs replicas itself: one service per group at the group's version and desired
        count; the platform places, restarts and rolls the replicas (start-first), so the rules above
        become: a service whose group is gone goes once each task it serves is ready elsewhere; a
        version that failed before any version of its group served loses its service, one that failed
        on a redeploy is left as the platform rolled it back (to the version that serves)."""
        handles = [h for h in backend.list() if h.id not in self.stopping]
        current = [h for h in handles if self._is_current(h)]
        for group_id in backend.services() - set(self.groups):
            if group_id in self.stopping:
                continue
            if all(self._safe_to_stop(h, current) for h in handles if h.group_id == group_id):
                self._remove_service(backend, group_id, "its group is gone")
        for group in self.groups.values():
            key = (group["id"], group["version"])
            if key in self.starting or group["id"] in self.stopping:
                continue
            if key in self.failed_versions or (group["state"] == "failed"
                                               and group["ready_version"] != group["version"]):
                if not group["ready_version"] and group["id"] in backend.services():
                    self._remove_service(backend, group["id"], "its only version failed")
                continue
            if now < self.backoff_until.get(group["id"], 0):
                asyncio.get_running_loop().call_later(self.backoff_until[group["id"]] - now + 0.01, self.kick)
                continue
            replicas = int(group["replicas_desired"])
            if not backend.converged(group["id"], int(group["version"]), replicas):
                self.starting[key] = self._spawn(self._converge(backend, group, replicas))

    def _remove_service(self, backend: ReplicatedBackend, group_id: str, reason: str) -> None:
        self.stopping.add(group_id)
        log.info("removing service", group=group_id, reason=reason)

        async def remove() -> None:
            try:
                await backend.remove(group_id)
            except NuclideError as exc:
                log.warning("could not remove a service, will retry", group=group_id, error=str(exc))
            finally:
                self.stopping.discard(group_id)

        self._spawn(remove())

    async def _converge(self, backend: ReplicatedBackend, group: dict[str, Any], replicas: int) -> None:
        key = (group["id"], group["version"])
        try:
            if self.closing:
                return
            functions, memory, extra = await self._group_spec(group)
            log_path = self.settings.var_dir.resolve() / "logs" / group["id"] / f"{group['id']}.log"
            # Swarm names its tasks itself: the tasks of one group version share a key bound to it
            spec = InstanceSpec(f"{group['id']}-v{group['version']}", group["id"], int(group["version"]), functions,
                                memory, log_path, extra=extra,
                                curve=self.keys.instance_config(GROUP_WIDE, group["id"], int(group["version"])))
            await backend.converge(spec, replicas)
        except BuildFailed as exc:
            await self._build_failed(key, exc)
        except NuclideError as exc:
            log.warning("service update failed, will retry", group=group["id"], error=str(exc))
            self._backoff(group["id"])
        finally:
            self.starting.pop(key, None)
            self.kick()

    def _is_current(self, h: InstanceHandle) -> bool:
        group = self.groups.get(h.group_id)
        return (group is not None and h.group_version == group["version"]
                and not (group["state"] == "failed" and group["ready_version"] != group["version"]))

    def _safe_to_stop(self, h: InstanceHandle, current: list[InstanceHandle]) -> bool:
        ready: dict[str, int] = {}
        for o in current:
            if o is not h and o.id in self.ever_ready:
                for fn in o.functions:
                    ready[fn] = ready.get(fn, 0) + 1
        needed = {}
        for fn in h.functions:
            if fn in self.function_groups:  # a deleted function needs nobody to serve it
                group = self.groups.get(self.function_groups[fn])
                needed[fn] = int(group["replicas_desired"]) if group is not None else 1
        return may_stop(h.functions, ready, needed)

    def replace(self, handle: InstanceHandle) -> None:
        """Kill a stuck instance at once; the next reconcile starts its replacement."""
        log.warning("replacing a stuck instance", instance=handle.id)
        self.stopping.add(handle.id)
        handle.stopping = True

        async def kill() -> None:
            try:
                await self.backend.stop(handle, 0.5)
            finally:
                self.stopping.discard(handle.id)
                self.kick()

        self._spawn(kill())

    def _stop(self, handle: InstanceHandle, reason: str) -> None:
        self.stopping.add(handle.id)
        log.info("stopping instance", instance=handle.id, reason=reason)

        async def stop() -> None:
            try:
                await self.backend.stop(handle, DRAIN_TIMEOUT_S)
            finally:
                self.stopping.discard(handle.id)

        self._spawn(stop())

    async def _version(self, name: str, version: int) -> dict[str, Any]:
        key = (name, version)
        rec = self._versions.get(key)
        if rec is None:
            rec = self._versions[key] = await self.store.version_get(name, version)
        return rec

    async def _group_spec(self, group: dict[str, Any]) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
        """The group version's functions (code and environment built), memory and limits; BuildFailed
        names what will not run."""
        functions = []
        specs: dict[str, dict[str, Any]] = {}
        codes: dict[str, Path] = {}
        for name, version in sorted(group["members"].items()):
            rec = await self._version(name, int(version))
            specs[name] = rec["spec"]
            codes[name] = await self.builder.ensure_code(name, int(version), rec["digest"])
        try:
            merged = merge_specs(specs)  # one environment for the whole group
        except Conflict as exc:
            raise BuildFailed(exc.message, {"tasks": list(exc.details.get("tasks") or [])}) from None
        try:
            build_log = build_log_path(self.settings.var_dir, group["id"], int(group["version"]))
            deps = await self.builder.ensure_env(merged, build_log)
        except BuildFailed as exc:  # a fused group's build: say whose step failed
            if "step" in exc.details:
                exc.details["tasks"] = members_of_step(specs, str(exc.details["step"]))
            raise
        for name, version in sorted(group["members"].items()):
            spec = specs[name]
            functions.append({
                "name": name, "version": int(version), "handler": spec["handler"], "code_dir": str(codes[name]),
                "deps_dir": str(deps) if deps else None, "env": spec.get("env") or {},
                "max_concurrency": int(merged["max_concurrency"]), "timeout_s": spec.get("timeout_s", 30.0),
                "lambda_event": spec.get("lambda_event") or "auto",
            })
            if merged.get("python"):  # another Python 3 than the platform's: the backend starts it there
                functions[-1]["python"] = merged["python"]
            if spec.get("registered_runtime"):  # a registered runtime's function: its definition and warm-start policy
                if self.backend.name != "docker":
                    raise BuildFailed(f"'{name}' runs on the registered runtime '{spec.get('runtime')}', which"
                                      f" needs the docker backend (this deployer uses '{self.backend.name}')",
                                      {"tasks": [name]})
                functions[-1].update(registered_runtime=spec["registered_runtime"], runtime=spec.get("runtime"),
                                     warm_start=spec.get("warm_start") or "function")
            elif (spec.get("warm_start") or DEFAULT_WARM_START) != DEFAULT_WARM_START:
                # deployed before the backend changed: the gateway refuses it up front otherwise
                problem = warm_start_problem(self.backend.name, spec["warm_start"])
                if problem:
                    raise BuildFailed(f"'{name}': {problem}", {"tasks": [name]})
                functions[-1]["warm_start"] = spec["warm_start"]
        memory = int(merged["memory_bytes"] or 0) or self.settings.default_memory_bytes
        extra = {"cpu": merged["cpu"] or None, "pids": merged.get("pids"),
                 "scratch_bytes": merged.get("scratch_bytes"), "network": merged.get("network") or "isolated"}
        return functions, memory, extra

    async def _start(self, group: dict[str, Any], count: int) -> None:
        key = (group["id"], group["version"])
        try:
            if self.closing:
                return
            build_started = time.monotonic()
            try:
                functions, memory, extra = await self._group_spec(group)
            except BuildFailed:
                self.metrics.built(False, time.monotonic() - build_started)
                raise
            self.metrics.built(True, time.monotonic() - build_started)
            for _ in range(count):
                if self.closing:
                    return
                inst_id = f"{group['id']}-v{group['version']}-{secrets.token_hex(3)}"
                log_path = self.settings.var_dir.resolve() / "logs" / group["id"] / f"{inst_id}.log"
                spec = InstanceSpec(inst_id, group["id"], int(group["version"]), functions, memory, log_path,
                                    extra={**extra, "gateways": list(self.gateways.values())},
                                    curve=self.keys.instance_config(inst_id, group["id"], int(group["version"])))
                # its READY may reach the store before the backend has its handle: not "gone" meanwhile
                self.launching.add(inst_id)
                try:
                    handle = await self.backend.start(spec)
                    self.metrics.started += 1
                    log.info("instance started", instance=inst_id, pid=handle.pid)
                    await self.store.instance_started(inst_id, group["id"], int(group["version"]), self.backend.name,
                                                      handle.pid)
                finally:
                    self.launching.discard(inst_id)
        except BuildFailed as exc:
            await self._build_failed(key, exc)
        except NuclideError as exc:
            log.warning("start failed, will retry", group=group["id"], error=str(exc))
            self._backoff(group["id"])
        except OSError as exc:
            log.error("could not start instance", group=group["id"], error=str(exc))
            self._backoff(group["id"])
        finally:
            self.starting.pop(key, None)
            self.kick()

    async def _build_failed(self, key: tuple[str, int], exc: BuildFailed) -> None:
        """A group version that cannot run: not tried again, and the store is told why (and whose step failed)."""
        self.failed_versions.add(key)
        log.warning("build failed", group=key[0], version=key[1], error=exc.message)
        await self._report_failed(key, exc.message, str(exc.details.get("log_tail", "")), exc.details.get("tasks"))

    def _backoff(self, group_id: str) -> None:
        self.metrics.backoffs += 1
        current = self.backoff_until.get(group_id, 0) - time.monotonic()
        delay = min(BACKOFF_MAX_S, max(0.5, current * 2 if current > 0 else 0.5))
        self.backoff_until[group_id] = time.monotonic() + delay

    async def _report_failed(self, key: tuple[str, int], error: str, log_tail: str,
                             tasks: list[str] | None = None) -> None:
        """``tasks``: the members the failure is theirs, when known (a fused group's build step, a spec)."""
        try:
            await self.store.deploy_failed(key[0], key[1], error, log_tail, tasks)
        except NuclideError as exc:
            log.error("could not report a failed deploy", group=key[0], error=str(exc))

    # ----- instance exits -----------------------------------------------------------------

    def on_exit(self, handle: InstanceHandle, code: int | None) -> None:
        self._spawn(self._exited(handle, code))

    async def _exited(self, handle: InstanceHandle, code: int | None) -> None:
        expected = handle.stopping or handle.id in self.stopping
        self.metrics.ended("stopped" if expected else "crash")
        last_lines = ""
        try:
            last_lines = tail(Path(handle.log_path).read_text(errors="replace"), 30)
        except OSError:
            pass
        key = (handle.group_id, handle.group_version)
        crashes: list[float] = []
        init_failed = False
        if not expected:
            # decided before the first await: a reconcile pass that runs meanwhile must already see
            # the failed version and the backoff (a forked replacement starts in milliseconds)
            group = self.groups.get(handle.group_id)
            never_ready = group is not None and group["ready_version"] != handle.group_version
            if code == EXIT_INIT_FAILED and never_ready:
                init_failed = True
                self.failed_versions.add(key)
            else:
                crashes = [t for t in self.crashes.get(key, []) if time.monotonic() - t < CRASH_WINDOW_S]
                crashes.append(time.monotonic())
                self.crashes[key] = crashes
                if len(crashes) >= CRASH_LIMIT:
                    if never_ready:
                        self.failed_versions.add(key)
                    self._backoff(handle.group_id)
        try:
            await self.store.instance_exited(handle.id, code, None if expected else last_lines)
        except NuclideError as exc:
            log.warning("could not report an exit", instance=handle.id, error=str(exc))
        if expected:
            return
        log.warning("instance exited unexpectedly", instance=handle.id, exit_code=code)
        if init_failed:
            await self._report_failed(key, "the function failed to load (exit code 3)", last_lines)
        elif len(crashes) >= CRASH_LIMIT:
            await self._report_failed(key, f"instances keep crashing ({len(crashes)} exits in {CRASH_WINDOW_S:g} s,"
                                           f" last exit code {code})", last_lines)
        self.kick()

    async def stop_all(self) -> None:
        self.closing = True
        if isinstance(self.backend, ReplicatedBackend):
            await self.backend.stop_all()
        await asyncio.gather(*(self.backend.stop(h, DRAIN_TIMEOUT_S) for h in self.backend.list()),
                             return_exceptions=True)
        # each exit is reported to the store by a task of its own (on_exit): let those reports
        # finish, or the store keeps counting this run's instances as ready after it
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=EXIT_REPORTS_TIMEOUT_S)

    def close(self) -> None:
        self.closing = True
        for task in self._tasks:
            task.cancel()
