"""The deployer's RPC as typed methods: one method per deployer method, named after it ("python.check" -> python_check).

The other side is the ``METHODS`` table of ``services/deployer/rpc.py``; a unit test checks that both name the
same methods. Each method wraps an :class:`RpcClient`; errors come back as the exceptions of
``shared/errors.py``.
"""

from __future__ import annotations

from typing import Any

from shared.aiosock import RpcClient
from shared.liveness import RPC_TIMEOUT_S

# how long a caller waits for each answer before it reports the deployer unavailable (the HTTP request that
# asked is waiting too): an interpreter check may start that interpreter, an image check asks the Docker Engine
PYTHON_CHECK_TIMEOUT_S = 30.0
CHECK_TIMEOUT_S = 10.0
LOGS_TIMEOUT_S = 5.0
REPLACE_TIMEOUT_S = 5.0


class DeployerClient:
    """Typed calls to the deployer over one :class:`RpcClient`."""

    def __init__(self, rpc: RpcClient) -> None:
        self.rpc = rpc

    def close(self) -> None:
        self.rpc.close()

    async def ping(self, *, timeout_s: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        """``{"ok": True, "instances": N}``: N instances on its backend."""
        return await self.rpc.call("ping", timeout_s=timeout_s)

    async def instances(self, *, timeout_s: float = RPC_TIMEOUT_S) -> list[dict[str, Any]]:
        """The instances its backend runs: ``[{"id", "group_id", "group_version", "pid"}, ...]``."""
        return await self.rpc.call("instances", timeout_s=timeout_s)

    async def instance_replace(self, instance_id: str, *, timeout_s: float = REPLACE_TIMEOUT_S) -> dict[str, Any]:
        """Stop a stuck instance so reconciling starts another: ``{"replaced": bool}`` (False: not running here)."""
        return await self.rpc.call("instance.replace", {"id": instance_id}, timeout_s=timeout_s)

    async def runtime_check(self, image: str, *, timeout_s: float = CHECK_TIMEOUT_S) -> dict[str, Any]:
        """A registered runtime's image is local to the engine: ``{"image_id": ...}``; InvalidRequest when it is
        missing or the backend runs no registered runtimes, Unavailable without an engine."""
        return await self.rpc.call("runtime.check", {"image": image}, timeout_s=timeout_s)

    async def python_check(self, version: str, *, timeout_s: float = PYTHON_CHECK_TIMEOUT_S) -> dict[str, Any]:
        """Whether instances can run on Python ``version`` exactly: ``{"available": bool, "detail": str}``."""
        return await self.rpc.call("python.check", {"version": version}, timeout_s=timeout_s)

    async def warm_start_check(self, policy: str, *, timeout_s: float = CHECK_TIMEOUT_S) -> dict[str, Any]:
        """``{"ok": True}`` when the backend can run a function with this warmStart policy; InvalidRequest
        naming why not."""
        return await self.rpc.call("warm_start.check", {"policy": policy}, timeout_s=timeout_s)

    async def logs(self, function: str, tail: int = 200, since_s: float | None = None,
                   cursor: dict[str, int] | None = None, *, timeout_s: float = LOGS_TIMEOUT_S) -> dict[str, Any]:
        """A function's instance logs: ``{"text": str, "cursor": {file key: byte offset}}``: the last ``tail``
        lines, or given the cursor an earlier read returned, the lines written since."""
        return await self.rpc.call("logs", {"function": function, "tail": tail, "since_s": since_s,
                                            "cursor": cursor}, timeout_s=timeout_s)
