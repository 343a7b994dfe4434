"""The store's RPC as typed methods: one method per store method, named after it ("function.get" -> function_get).

Every service reaches the store through this client, so a store method's name and arguments are written once
on each side: here and in ``services/store/server.py``'s ``METHODS`` table (a unit test checks that the two
name the same methods). Each method wraps an :class:`RpcClient`; errors come back as the exceptions of
``shared/errors.py`` (NotFound, Conflict, InvalidRequest, Unavailable, DeadlineExceeded). Records are the maps
the store builds in ``services/store/state.py`` and ``services/store/durable_calls.py``; their main keys are named in
each method's docstring.
"""

from __future__ import annotations

from typing import Any

from shared.aiosock import RpcClient
from shared.liveness import RPC_TIMEOUT_S

BLOB_TIMEOUT_S = 60.0  # a zip of up to the upload limit, read from disk or PostgreSQL and sent in one frame


class StoreClient:
    """Typed calls to the store over one :class:`RpcClient` (which keeps its socket, deadlines and reconnects)."""

    def __init__(self, rpc: RpcClient) -> None:
        self.rpc = rpc

    def close(self) -> None:
        self.rpc.close()

    async def _call(self, method: str, args: dict[str, Any] | None = None, *bodies: bytes,
                    timeout_s: float = RPC_TIMEOUT_S) -> Any:
        return await self.rpc.call(method, args, *bodies, timeout_s=timeout_s)

    # ----- the store itself -------------------------------------------------------------

    async def ping(self, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """``{"ok": True, "seq": N}``: N is the sequence number of the last event published."""
        return await self._call("ping", timeout_s=timeout_s)

    async def health(self, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """``{"store": bool, "store_error": str | None, "deployer": bool, "deployer_age_s": float}``."""
        return await self._call("health", timeout_s=timeout_s)

    async def snapshot(self, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """The whole state at one sequence number: ``seq``, ``functions``, ``groups``, ``instances`` (not exited),
        ``runtimes`` and ``gateways`` (live ones)."""
        return await self._call("snapshot", timeout_s=timeout_s)

    async def deployer_report(self, instances: int, metrics: dict[str, Any] | None = None,
                              interval_s: float | None = None, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """The deployer's liveness beat (``health`` judges the deployer by its age), with its metrics snapshot
        when given (``interval_s``: its report period): ``{"ok": True}``."""
        args: dict[str, Any] = {"instances": instances}
        if metrics is not None:
            args.update(metrics=metrics, interval_s=interval_s)
        return await self._call("deployer.report", args, timeout_s=timeout_s)

    async def metrics_report(self, service: str, metrics: dict[str, Any], interval_s: float, *,
                             timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """A service's newest metrics snapshot (``service``: deployer or optimizer; ``interval_s``: its report
        period, after which a gateway counts it down): ``{"ok": True}``."""
        return await self._call("metrics.report", {"service": service, "metrics": metrics, "interval_s": interval_s},
                                timeout_s=timeout_s)

    async def metrics_get(self, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """``{"store": its own families, "services": the other services' newest snapshots}`` for GET /metrics."""
        return await self._call("metrics.get", {}, timeout_s=timeout_s)

    async def kv_get(self, key: str, *, timeout_s: float = RPC_TIMEOUT_S) -> Any:
        """The value last put under ``key`` (any msgpack value), or None."""
        return await self._call("kv.get", {"key": key}, timeout_s=timeout_s)

    async def kv_put(self, key: str, value: Any, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """Keep ``value`` (any msgpack value) under ``key``: ``{"ok": True}``."""
        return await self._call("kv.put", {"key": key, "value": value}, timeout_s=timeout_s)

    # ----- functions, versions, blobs -----------------------------------------------------

    async def function_get(self, name: str, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """A function record: ``name``, ``version``, ``latest_version``, ``state``, ``runtime``, ``handler``,
        ``group`` {id, version, tasks}, ``replicas``, ...; NotFound when there is none."""
        return await self._call("function.get", {"name": name}, timeout_s=timeout_s)

    async def function_list(self, *, timeout_s: float = RPC_TIMEOUT_S) -> list[dict[str, Any]]:
        """Every function record, by name."""
        return await self._call("function.list", timeout_s=timeout_s)

    async def function_put(self, name: str, spec: dict[str, Any], warnings: list[str], zip_bytes: bytes, *,
                           timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """Store a new version (the zip travels as a raw frame): ``{"function": record, "version": N,
        "group_id": str, "group_version": N}``; publishes ``function.changed`` and the group's events."""
        return await self._call("function.put", {"name": name, "spec": spec, "warnings": warnings}, zip_bytes,
                                timeout_s=timeout_s)

    async def function_delete(self, name: str, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """``{"deleted": name}``; NotFound when there is none."""
        return await self._call("function.delete", {"name": name}, timeout_s=timeout_s)

    async def function_replicas(self, name: str, replicas: int | None, *,
                                timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """Hold the function's group at ``replicas`` (None: back to the autoscaler): ``{"function", "group_id",
        "override", "replicas"}``."""
        return await self._call("function.replicas", {"name": name, "replicas": replicas}, timeout_s=timeout_s)

    async def version_get(self, name: str, version: int, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """One stored version: ``{"name", "version", "digest", "spec", "state"}``."""
        return await self._call("version.get", {"name": name, "version": version}, timeout_s=timeout_s)

    async def blob_get(self, digest: str, *, timeout_s: float = BLOB_TIMEOUT_S) -> bytes:
        """The bytes stored under a sha256 ``digest`` (a function's zip); NotFound when there are none."""
        _, bodies = await self.rpc.call_with_bodies("blob.get", {"digest": digest}, timeout_s=timeout_s)
        return bodies[0]

    # ----- runtimes -------------------------------------------------------------------------

    async def runtime_list(self, *, timeout_s: float = RPC_TIMEOUT_S) -> list[dict[str, Any]]:
        """Every registered runtime: ``{"name", "image", "image_id", "path", ...}``."""
        return await self._call("runtime.list", timeout_s=timeout_s)

    async def runtime_get(self, name: str, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """One registered runtime; NotFound when there is none."""
        return await self._call("runtime.get", {"name": name}, timeout_s=timeout_s)

    async def runtime_put(self, runtime: dict[str, Any], image_id: str = "", *,
                          timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """Register or replace a runtime: its record plus ``created`` (bool); publishes ``runtime.changed``."""
        return await self._call("runtime.put", {"runtime": runtime, "image_id": image_id}, timeout_s=timeout_s)

    async def runtime_delete(self, name: str, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """``{"deleted": name}``; Conflict while a function uses it."""
        return await self._call("runtime.delete", {"name": name}, timeout_s=timeout_s)

    # ----- fusion groups and replicas -------------------------------------------------------

    async def groups_list(self, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """The setup in force: ``{"setup": [[task, ...], ...], "groups": [...], "regroup": record | None}``."""
        return await self._call("groups.list", timeout_s=timeout_s)

    async def groups_set(self, setup: Any, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """Propose a fusion setup (a list of lists of function names): what ``groups_list`` returns, with
        ``regroup`` the regroup it started (None when the setup is already in force)."""
        return await self._call("groups.set", {"setup": setup}, timeout_s=timeout_s)

    async def regroup_get(self, regroup_id: int, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """One regroup: ``{"id", "setup", "state" (deploying, done, failed, superseded, cancelled), "error",
        "failed_tasks", "log_tail", "groups", ...}``."""
        return await self._call("regroup.get", {"id": regroup_id}, timeout_s=timeout_s)

    async def group_spec(self, group_id: str, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """The group's members' specs merged into the one its instances run with."""
        return await self._call("group.spec", {"group_id": group_id}, timeout_s=timeout_s)

    async def group_scale(self, group_id: str, replicas: int, reason: str = "", *,
                          timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """Set a group's desired replicas (kept within its bounds): ``{"group_id", "replicas", "reason"}``."""
        return await self._call("group.scale", {"group_id": group_id, "replicas": replicas, "reason": reason},
                                timeout_s=timeout_s)

    async def deploy_failed(self, group_id: str, group_version: int, error: str, log_tail: str = "",
                            tasks: list[str] | None = None, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """A group version cannot run (``tasks``: the members whose step or spec failed, when known):
        ``{"ok": True}``."""
        args: dict[str, Any] = {"group_id": group_id, "group_version": group_version, "error": error,
                                "log_tail": log_tail}
        if tasks:
            args["tasks"] = list(tasks)
        return await self._call("deploy.failed", args, timeout_s=timeout_s)

    # ----- instances ------------------------------------------------------------------------

    async def instances_list(self, group_id: str | None = None, *,
                             timeout_s: float = RPC_TIMEOUT_S) -> list[dict[str, Any]]:
        """Instance records (``id``, ``group_id``, ``group_version``, ``state``, ``pid``, ...), of one group or all."""
        return await self._call("instances.list", {"group_id": group_id}, timeout_s=timeout_s)

    async def instance_started(self, instance_id: str, group_id: str, group_version: int, backend: str = "",
                               pid: int | None = None, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """``{"ok": True}``."""
        return await self._call("instance.started", {"id": instance_id, "group_id": group_id,
                                                     "group_version": group_version, "backend": backend, "pid": pid},
                                timeout_s=timeout_s)

    async def instance_ready(self, instance_id: str, group_id: str, group_version: int,
                             functions: dict[str, int] | None = None, *,
                             timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """The instance said READY serving ``functions`` (name -> version): ``{"ok": True}``."""
        return await self._call("instance.ready", {"id": instance_id, "group_id": group_id,
                                                   "group_version": group_version, "functions": functions or {}},
                                timeout_s=timeout_s)

    async def instance_exited(self, instance_id: str, exit_code: int | None, error: str | None = None, *,
                              timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """``{"ok": True}``."""
        return await self._call("instance.exited", {"id": instance_id, "exit_code": exit_code, "error": error},
                                timeout_s=timeout_s)

    async def instances_gone(self, instance_ids: list[str], reason: str = "gone", *,
                             timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """Mark instances exited whose exit was never reported: ``{"exited": [id, ...]}``."""
        return await self._call("instances.gone", {"ids": instance_ids, "reason": reason}, timeout_s=timeout_s)

    # ----- gateways -------------------------------------------------------------------------

    async def gateways_list(self, *, timeout_s: float = RPC_TIMEOUT_S) -> list[dict[str, Any]]:
        """The records of the gateways alive (beaten within GATEWAY_TTL_S)."""
        return await self._call("gateways.list", timeout_s=timeout_s)

    async def gateway_announce(self, gateway: dict[str, Any], *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """A gateway's beat with its record: ``{"gateways": [live records]}``."""
        return await self._call("gateway.announce", {"gateway": gateway}, timeout_s=timeout_s)

    async def gateway_bye(self, gateway_id: str, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """A gateway leaves: ``{"removed": bool}``."""
        return await self._call("gateway.bye", {"id": gateway_id}, timeout_s=timeout_s)

    # ----- calls (async calls and the records of sync ones) -------------------------------------

    async def calls_submit(self, calls: list[dict[str, Any]], payloads: list[bytes], *,
                           timeout_s: float = RPC_TIMEOUT_S) -> list[dict[str, Any]]:
        """Store calls as PENDING (one payload frame each): per call ``{"id", "duplicate", "status", ...}``,
        ``status`` REFUSED with an ``error`` for one the store would not take."""
        return await self._call("calls.submit", {"calls": calls}, *payloads, timeout_s=timeout_s)

    async def calls_update(self, updates: list[dict[str, Any]], results: list[bytes], *,
                           timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """Apply call updates (a result frame for each update with ``has_result``): ``{"changed": N}``."""
        return await self._call("calls.update", {"updates": updates}, *results, timeout_s=timeout_s)

    async def calls_record_sync(self, rows: list[Any], *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """Record finished sync calls, each a row in ``SYNC_ROW_FIELDS`` order: ``{"recorded": N}``."""
        return await self._call("calls.record_sync", {"rows": rows}, timeout_s=timeout_s)

    async def calls_claim(self, owner: str, limit: int = 1000, *,
                          timeout_s: float = RPC_TIMEOUT_S) -> tuple[list[dict[str, Any]], tuple[bytes, ...]]:
        """Take over unfinished calls that no live gateway owns: (call records, their payloads)."""
        return await self.rpc.call_with_bodies("calls.claim", {"owner": owner, "limit": limit}, timeout_s=timeout_s)

    async def calls_get(self, call_id: str, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """One call record: ``id``, ``function``, ``status``, ``attempts``, timings, error; NotFound if none."""
        return await self._call("calls.get", {"id": call_id}, timeout_s=timeout_s)

    async def calls_result(self, call_id: str, *, timeout_s: float = RPC_TIMEOUT_S) -> tuple[dict[str, Any], bytes]:
        """A call's record and its raw result (empty until it finished)."""
        rec, bodies = await self.rpc.call_with_bodies("calls.result", {"id": call_id}, timeout_s=timeout_s)
        return rec, bodies[0] if bodies else b""

    async def calls_list(self, function: str | None = None, status: str | None = None, limit: int = 100,
                         source: str | None = None, before: float | None = None, *,
                         timeout_s: float = RPC_TIMEOUT_S) -> list[dict[str, Any]]:
        """A page of call records (no results), newest first; the next page is ``before`` the oldest
        ``queued_ts``."""
        return await self._call("calls.list", {"function": function, "status": status, "limit": limit,
                                               "source": source, "before": before}, timeout_s=timeout_s)

    async def calls_trace(self, trace_id: str, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """The calls of a W3C trace, oldest first (at most 1000): ``{"trace_id", "calls": [...], "truncated"}``."""
        return await self._call("calls.trace", {"trace_id": trace_id}, timeout_s=timeout_s)

    async def calls_redrive(self, call_id: str, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """Run a DEAD call again: its record; Conflict for any other status."""
        return await self._call("calls.redrive", {"id": call_id}, timeout_s=timeout_s)

    async def calls_purge(self, status: str, function: str | None = None, *,
                          timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """Delete finished calls of a status: ``{"purged": N}``."""
        return await self._call("calls.purge", {"status": status, "function": function}, timeout_s=timeout_s)

    async def calls_owned(self, owner: str, call_ids: list[str], *, timeout_s: float = RPC_TIMEOUT_S) -> list[str]:
        """Which of ``call_ids`` (at most 1000) ``owner`` still owns."""
        return await self._call("calls.owned", {"owner": owner, "ids": call_ids}, timeout_s=timeout_s)

    async def calls_take_callback(self, call_id: str, owner: str, *,
                                  timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """Mark a call's callback as being sent, once: ``{"taken": bool}``."""
        return await self._call("calls.take_callback", {"id": call_id, "owner": owner}, timeout_s=timeout_s)

    async def calls_pending_callbacks(self, owner: str, limit: int = 100, *, timeout_s: float = RPC_TIMEOUT_S
                                      ) -> tuple[list[dict[str, Any]], tuple[bytes, ...]]:
        """Finished calls of ``owner`` whose callback is not posted yet: (records, their results)."""
        return await self.rpc.call_with_bodies("calls.pending_callbacks", {"owner": owner, "limit": limit},
                                               timeout_s=timeout_s)

    async def calls_counts(self, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, int]:
        """How many calls there are by status."""
        return await self._call("calls.counts", timeout_s=timeout_s)
