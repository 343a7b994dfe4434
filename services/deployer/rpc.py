"""The deployer's RPC: a table from method name to a small handler (the gateway calls it through shared/deployerclient.py)."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from shared.config import Settings
from shared.errors import InvalidRequest
from shared.rpcargs import optional, required
from shared.runtimes import DEFAULT_WARM_START, warm_start_problem
from services.deployer.backends.base import Backend
from services.deployer.reconciler import Reconciler

Args = dict[str, Any]


class DeployerRpc:
    """Answers the deployer's methods from its backend and reconciler: ``handle`` is an AsyncRpcServer handler."""

    def __init__(self, settings: Settings, backend: Backend, reconciler: Reconciler) -> None:
        self.settings = settings
        self.backend = backend
        self.reconciler = reconciler

    def handle(self, method: str, args: Args, _bodies: tuple[bytes, ...]) -> Any:
        handler = METHODS.get(method)
        if handler is None:
            raise InvalidRequest(f"unknown deployer method {method!r}")
        return handler(self, args)

    def ping(self, args: Args) -> dict[str, Any]:
        return {"ok": True, "instances": len(self.backend.list())}

    def instances(self, args: Args) -> list[dict[str, Any]]:
        return [{"id": h.id, "group_id": h.group_id, "group_version": h.group_version, "pid": h.pid}
                for h in self.backend.list()]

    def instance_replace(self, args: Args) -> dict[str, Any]:
        # the gateway found it stuck past a call's timeout: stop it; reconcile starts a new one
        inst_id = required(args, "id", str)
        handle = next((h for h in self.backend.list() if h.id == inst_id), None)
        if handle is None:
            return {"replaced": False}
        handle.stopping = False
        self.reconciler.replace(handle)
        return {"replaced": True}

    def runtime_check(self, args: Args) -> Awaitable[dict[str, Any]]:
        check = getattr(self.backend, "check_image", None)
        if check is None:
            raise InvalidRequest(f"registered runtimes run on the docker backend; this deployer uses the"
                                 f" '{self.backend.name}' backend (set NUCLIDE_BACKEND=docker)")
        return check(required(args, "image", str))

    def python_check(self, args: Args) -> Awaitable[dict[str, Any]]:
        return self.backend.python_check(required(args, "version", str))

    def warm_start_check(self, args: Args) -> dict[str, Any]:
        problem = warm_start_problem(self.backend.name, optional(args, "policy", str, DEFAULT_WARM_START))
        if problem:
            raise InvalidRequest(problem)
        return {"ok": True}

    def logs(self, args: Args) -> dict[str, Any]:
        name = required(args, "function", str)
        tail = optional(args, "tail", int, 200)
        since_s = optional(args, "since_s", (int, float))
        cursor = optional(args, "cursor", dict)
        if cursor is not None and not all(isinstance(k, str) and type(v) is int for k, v in cursor.items()):
            raise InvalidRequest("argument 'cursor' must map log file keys to byte offsets")
        group = self.reconciler.function_groups.get(name)
        if group is None:
            return {"text": "", "cursor": cursor or {}}
        logs_dir = self.settings.var_dir.resolve() / "logs" / group
        paths = list(logs_dir.glob("*.log")) if logs_dir.is_dir() else []
        text, moved = self.backend.logs(paths, tail, since_s, cursor)
        return {"text": text, "cursor": moved}


METHODS: dict[str, Callable[[DeployerRpc, Args], Any]] = {
    "ping": DeployerRpc.ping,
    "instances": DeployerRpc.instances,
    "instance.replace": DeployerRpc.instance_replace,
    "runtime.check": DeployerRpc.runtime_check,
    "python.check": DeployerRpc.python_check,
    "warm_start.check": DeployerRpc.warm_start_check,
    "logs": DeployerRpc.logs,
}
