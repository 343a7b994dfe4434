"""What the gateway knows of functions and groups (followed from the store's events), and who waits for a deploy.

:class:`Catalogue` is plain state, read on the invoke path: one dict lookup per call, no store round trip.
:class:`Deploys` tells a deploy request (``PUT /{name}``, ``PUT /groups``) when its instances are ready, from
the instances' READY on the broker and from the store's ``deploy.failed`` and ``regroup.changed`` events.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from shared.errors import DeadlineExceeded, NuclideError, PayloadTooLarge
from shared.logs import get_logger
from shared.triggers import DEFAULT_RETRY, max_body_bytes, validate_triggers

if TYPE_CHECKING:  # pragma: no cover
    from shared.storeclient import StoreClient
    from shared.config import Settings
    from services.gateway.broker import Broker, Instance

log = get_logger(__name__)


class FunctionInfo:
    """What the invoke path needs to know about a function, kept from store events."""

    __slots__ = ("name", "private", "timeout_s", "state", "version", "group_id", "last_error", "retry", "cron",
                 "topics", "min_replicas", "idle_timeout_s", "max_body", "allow_calls_from")

    def __init__(self, record: dict[str, Any]) -> None:
        self.name = record["name"]
        self.private = bool(record.get("private", False))
        self.timeout_s = float(record.get("timeout_s") or 30.0)
        self.state = record.get("state")
        self.version = record.get("version")
        self.group_id = (record.get("group") or {}).get("id")
        self.last_error = record.get("last_error") or ""
        spec = record.get("spec") or {}
        self.min_replicas = int(spec.get("min_replicas", 1))
        self.idle_timeout_s = float(spec.get("idle_timeout_s") or 300.0)
        self.retry = {**DEFAULT_RETRY, **(spec.get("retry") or {})}
        self.allow_calls_from = frozenset(str(n) for n in spec.get("allow_calls_from") or ())
        try:
            triggers = validate_triggers(tuple(spec.get("triggers") or ()))
        except NuclideError:
            triggers = []
        self.cron = [t for t in triggers if t["kind"] == "cron"]
        self.topics = [t["topic"] for t in triggers if t["kind"] == "topic"]
        self.max_body = max_body_bytes(triggers)  # (bytes, http trigger name) the function asks for, or None


class Catalogue:
    """The deployed functions and their fusion groups, as the store's snapshot and events tell them."""

    def __init__(self, settings: Settings) -> None:
        self.functions: dict[str, FunctionInfo] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.max_body_bytes = settings.max_body_bytes
        self.max_body_ceiling_bytes = settings.max_body_ceiling_bytes

    def load(self, snap: dict[str, Any]) -> None:
        """Replace everything with a snapshot of the store."""
        self.functions = {rec["name"]: FunctionInfo(rec) for rec in snap.get("functions", [])}
        self.groups = {g["id"]: g for g in snap.get("groups", [])}

    def apply_function(self, record: dict[str, Any]) -> None:
        self.functions[record["name"]] = FunctionInfo(record)

    def body_limit(self, name: str) -> int:
        """The largest invocation body ``name`` takes: its http trigger's maxRequestBodySize, else max_body_bytes;
        never more than max_body_ceiling_bytes."""
        info = self.functions.get(name)
        asked = info.max_body if info is not None else None
        if asked is None:
            return self.max_body_bytes
        return min(asked[0], self.max_body_ceiling_bytes)

    def body_too_large(self, name: str, size: int | None) -> PayloadTooLarge:
        """The 413 for a body over ``name``'s limit: which limit, where it comes from, and the ceiling."""
        info = self.functions.get(name)
        asked = info.max_body if info is not None else None
        body = f"request body is {size} bytes" if size is not None else "request body is"
        ceiling = f"max_body_ceiling_bytes, {self.max_body_ceiling_bytes}"
        if asked is None:
            return PayloadTooLarge(
                f"{body} over the {self.max_body_bytes} byte invoke limit (max_body_bytes); a function may ask for"
                f" more with spec.triggers.<http trigger>.attributes.maxRequestBodySize, up to the platform's"
                f" ceiling ({ceiling} bytes)")
        limit = min(asked[0], self.max_body_ceiling_bytes)
        capped = (f", capped by the platform's ceiling ({ceiling} bytes)" if asked[0] > limit
                  else f"; the platform's ceiling is {ceiling} bytes")
        return PayloadTooLarge(
            f"{body} over the {limit} byte limit of function '{name}' (its"
            f" spec.triggers.{asked[1]}.attributes.maxRequestBodySize is {asked[0]}{capped})")


class DeployOutcome:
    __slots__ = ("ok", "error", "log_tail")

    def __init__(self, ok: bool, error: str = "", log_tail: str = "") -> None:
        self.ok, self.error, self.log_tail = ok, error, log_tail


class Deploys:
    """Deploy and regroup requests waiting for their instances; reports READY instances to the store."""

    def __init__(self, store: StoreClient, broker: Broker) -> None:
        self.store = store
        self.broker = broker
        self.deploy_waiters: dict[tuple[str, int], asyncio.Future] = {}
        self.regroup_waiters: dict[int, asyncio.Future] = {}  # regroup id -> its record once it ended

    async def instance_ready(self, inst: Instance) -> None:
        try:
            await self.store.instance_ready(inst.name, inst.group, inst.group_version,
                                            inst.functions)
        except NuclideError as exc:
            log.warning("could not report instance ready", error=str(exc))
        self._settle(inst.group, inst.group_version, DeployOutcome(True))

    def deploy_failed(self, data: dict[str, Any]) -> None:
        """The store's ``deploy.failed`` event."""
        self._settle(data["group_id"], int(data["group_version"]),
                     DeployOutcome(False, data.get("error", "deploy failed"), data.get("log_tail", "")))

    def _settle(self, group_id: str, group_version: int, outcome: DeployOutcome) -> None:
        fut = self.deploy_waiters.get((group_id, group_version))
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    def regroup_changed(self, regroup: dict[str, Any]) -> None:
        """The store's ``regroup.changed`` event: a waiter learns the regroup ended."""
        fut = self.regroup_waiters.get(int(regroup["id"]))
        if fut is not None and not fut.done() and regroup["state"] != "deploying":
            fut.set_result(regroup)

    async def wait_deployed(self, group_id: str, group_version: int, timeout_s: float) -> DeployOutcome:
        for inst in self.broker.instances.values():
            if inst.group == group_id and inst.group_version == group_version:
                return DeployOutcome(True)
        key = (group_id, group_version)
        fut = self.deploy_waiters.get(key)
        if fut is None:
            fut = self.deploy_waiters[key] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"the deployment did not become ready within {timeout_s:g} s; it continues in the background,"
                " check GET /functions/{name}"
            ) from None
        finally:
            if fut.done():
                self.deploy_waiters.pop(key, None)

    async def wait_regrouped(self, regroup_id: int, timeout_s: float) -> dict[str, Any]:
        """The regroup's record once it has ended (done, failed, superseded or cancelled)."""
        fut = self.regroup_waiters.get(regroup_id)
        if fut is None:
            fut = self.regroup_waiters[regroup_id] = asyncio.get_running_loop().create_future()
        regroup: dict[str, Any] = {}
        try:
            # it may have ended before this waiter was there to see the event
            regroup = await self.store.regroup_get(regroup_id)
            if regroup["state"] == "deploying":
                regroup = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
            return regroup
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the new setup did not take over within {timeout_s:g} s; it continues in the"
                                   " background, check GET /groups") from None
        finally:
            if fut.done() or regroup.get("state", "deploying") != "deploying":
                self.regroup_waiters.pop(regroup_id, None)

