"""The docker backend's instances of functions on registered runtimes: a runner process each, an image or not.

A function without a ``dependencies`` command on the default policy (``warmStart: function``)
needs no image of its own (:meth:`Runners.start_fast`): its containers run the runtime's image and
get the version's code unpacked into their code volume; the first one comes started from the
runtime pool, filled by the deployer, and the runner is a spare process with its imports done
(``runtime_pool.py``). When that cannot be done (``docker_runtime_pool_size`` 0, the engine refuses
the archive upload, the image does not stay up), the start takes the image path, and no
other fast start of that runtime is tried for a while (:data:`FAST_BACKOFF_S`). Functions with dependencies keep
the image: the dependencies command runs at build time, like a Python group's requirements.

Otherwise the function gets an image of its own (``images.py``: the runtime image, its code and
what its ``dependencies`` command made). The instance is a runner process on this host
(``python -m services.deployer.backends.docker.runner``, which drives the engine; see that
package for the warm-start policies), started in a session of its own so it outlives a deployer that dies; a
registry file per runner (``<var>/docker/runners/<id>.json``) lets the next deployer adopt it.
When a runner exits, the containers it left (label ``nuclide.runner=<id>``, and the pool container
it took, which its record names) are removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import docker.errors

from shared.gateways import instance_endpoints
from shared.instanceconfig import InstanceConfig
from shared.config import Settings
from shared.errors import InvalidRequest, Unavailable
from shared.logs import get_logger
from shared.procs import alive, start_time
from services.deployer.backends.base import ExitCallback, InstanceHandle, InstanceSpec
from services.deployer.backends.docker.engine import Engine, EngineLost, link_source
from services.deployer.backends.docker.images import Images
from services.deployer.backends.docker.runtime_pool import SOURCE_ROOT, RuntimePool, Shape, Spares
from services.deployer.backends.refill import Backoff
from services.deployer.sandbox import base_env
from services.deployer.backends.docker.runner import box
from services.deployer.backends.docker.runner.box import PY_WORK_DIR

log = get_logger(__name__)

ADOPTED_POLL_S = 0.5  # how often an adopted runner (not our child) is checked for its exit
KILL_GRACE_S = 5.0
FAST_BACKOFF_S = (5.0, 300.0)  # after a failed fast start: that runtime's images are built this long (doubling)


def is_registered(spec: InstanceSpec) -> bool:
    """A function on a registered runtime (its spec names the runtime's image, path and run command)."""
    return any(fc.get("registered_runtime") for fc in spec.functions)


def fast_eligible(spec: InstanceSpec) -> bool:
    """A registered runtime's function that needs no image of its own: no dependencies command, and the
    function policy (the others copy the code afresh per call or start a container per call)."""
    fc = spec.functions[0]
    return (len(spec.functions) == 1 and bool(fc.get("registered_runtime")) and not fc["registered_runtime"].get("dependencies")
            and (fc.get("warm_start") or "function") == "function"
            and spec.extra.get("network", "isolated") != "host")  # pool containers are made isolated


def is_per_call(spec: InstanceSpec) -> bool:
    """A Python function whose calls each get a process of their own (spec.warmStart none or runtime)."""
    return any((fc.get("warm_start") or "function") != "function" and not fc.get("registered_runtime") for fc in spec.functions)


class Runners:
    """Starts, stops and adopts runner processes for the docker backend."""

    def __init__(self, settings: Settings, var: Path, engine: Engine, images: Images, on_exit: ExitCallback) -> None:
        self.settings = settings
        self.engine = engine
        self.images = images
        self.on_exit = on_exit
        self.dir = var / "docker" / "runners"
        self.handles: dict[str, InstanceHandle] = {}
        self.exits: dict[str, asyncio.Future] = {}  # instance id -> its exit code, once it exited
        self.taken: dict[str, list[str]] = {}  # instance id -> the pool containers its runner took
        self.pool = RuntimePool(settings, engine)
        self.spares = Spares(settings, self.dir)
        self._fast_failed: dict[str, Backoff] = {}  # runtime image -> how long its functions build images

    def owns(self, instance_id: str) -> bool:
        return instance_id in self.exits

    # ----- the engine's side ---------------------------------------------------------------

    async def check_image(self, image: str) -> dict[str, Any]:
        """The id of a local image, for registering a runtime: 400 when it is missing, 503 without an engine."""
        client = self.engine.client
        if client is None:
            raise Unavailable(f"the Docker Engine at {self.settings.docker_host} is not reachable; start dockerd"
                              " (or fix docker_host) and retry")
        try:
            info = await self.engine.api(client.api.inspect_image, image)
        except docker.errors.ImageNotFound:
            raise InvalidRequest(f"image '{image}' is not in the local Docker Engine; build or load it first"
                                 f" (docker build -t {image} ..., docker load): nuclide never pulls images",
                                 {"image": image}) from None
        except docker.errors.APIError as exc:
            raise InvalidRequest(f"image '{image}' cannot be used: {exc.explanation or exc}") from None
        self.spares.refill_soon(0)  # a runtime is being registered: runners will be wanted
        return {"image_id": str(info["Id"])}

    async def _remove_containers(self, instance_id: str | None, taken: list[str] | None = None) -> None:
        """A runner's containers (by its label) and the pool containers it took (``taken``)."""
        client = self.engine.client
        if client is None:
            return

        def remove() -> None:
            labelled = [] if instance_id is None else client.api.containers(all=True, filters={"label": [
                f"nuclide.namespace={self.engine.namespace}", f"nuclide.runner={instance_id}"]})
            for container_id in [c["Id"] for c in labelled] + list(taken or ()):
                try:
                    client.api.remove_container(container_id, force=True, v=True)
                except docker.errors.APIError:
                    pass  # gone, or its removal is in progress already

        try:
            await self.engine.api(remove)
        except Unavailable as exc:
            log.warning("could not remove a runner's containers", instance=instance_id, error=str(exc)[:200])

    # ----- without an image ------------------------------------------------------------------

    async def start_registered(self, spec: InstanceSpec) -> InstanceHandle:
        """A registered runtime's function: without an image build when it can be, else with its image."""
        image = spec.functions[0]["registered_runtime"]["image"]
        failed = self._fast_failed.get(image)
        if self.pool.size > 0 and fast_eligible(spec) and not (failed is not None and failed.blocked):
            handle = await self.start_fast(spec)
            if handle is not None:
                return handle
        return await self.start(spec, await self.images.registered_image(spec))

    async def start_fast(self, spec: InstanceSpec) -> InstanceHandle | None:
        """A runner whose first warm container is ready (started, the code in); None when that failed."""
        fc = spec.functions[0]
        try:
            client = self.engine.require()
            image_id = str((await self.engine.api(client.api.inspect_image, fc["registered_runtime"]["image"]))["Id"])
            shape = Shape(image_id, fc["registered_runtime"]["path"], int(spec.memory_bytes), str(spec.extra.get("cpu") or ""))
            code = await self.pool.code_tar(fc["code_dir"])
            container_id = await self._ready_container(shape, code)
        except EngineLost:
            raise
        except (docker.errors.DockerException, Unavailable, OSError, RuntimeError, ValueError) as exc:
            self._fast_start_failed(spec, exc)
            return None
        self._fast_failed.pop(fc["registered_runtime"]["image"], None)
        try:
            return await self.start(spec, image_id, container=container_id, shape=shape)
        except BaseException:
            await self._remove_containers(spec.id, [container_id])
            raise

    async def _ready_container(self, shape: Shape, code: bytes) -> str:
        """A started container of ``shape`` with the code in: an idle pool one, else a new one."""
        api = self.engine.require().api
        taken = self.pool.take(shape)
        if taken is not None:
            try:
                await self.engine.api(_fill, api, taken, shape.path, code)
                return taken
            except (docker.errors.DockerException, Unavailable, RuntimeError) as exc:
                log.info("a runtime pool container could not take the code; creating one", container=taken[:12],
                         error=str(exc)[:200])
                await self._remove_containers(None, [taken])
        container_id = await self.pool.create(shape)
        try:
            await self.engine.api(_fill, api, container_id, shape.path, code)
        except BaseException:
            await self._remove_containers(None, [container_id])
            raise
        return container_id

    def _fast_start_failed(self, spec: InstanceSpec, exc: Exception) -> None:
        """The runtime's functions build their images for a while (doubling while it keeps failing)."""
        image = spec.functions[0]["registered_runtime"]["image"]
        backoff_s = self._fast_failed.setdefault(image, Backoff(*FAST_BACKOFF_S)).failed()
        log.warning("could not start a runtime function without an image; building its image instead",
                    instance=spec.id, image=image, error=f"{type(exc).__name__}: {exc}"[:300],
                    image_builds_for_s=backoff_s)

    def engine_back(self) -> None:
        self.pool.engine_back()

    def close(self) -> None:
        self.spares.close()
        self.pool.close()

    # ----- runner processes ---------------------------------------------------------------

    async def start(self, spec: InstanceSpec, image: str, python: InstanceConfig | None = None,
                    container: str | None = None, shape: Shape | None = None) -> InstanceHandle:
        """A runner for a registered runtime's function, or with ``python`` (the instance config of the group
        image's one function) for a Python function's per-call containers. ``container``: a started one of
        ``shape`` with the code in (no image of the function's: ``image`` is the runtime's)."""
        fc = spec.functions[0]
        instance = InstanceConfig(
            instance_id=spec.id, group=spec.group_id, group_version=spec.group_version,
            gateways=tuple(instance_endpoints(spec.extra.get("gateways") or [], False, "", self.settings.gateway_router)),
            memory_bytes=int(spec.memory_bytes),
            functions=({"name": fc["name"], "version": fc["version"], "timeout_s": fc.get("timeout_s", 30.0),
                        "env": fc.get("env") or {}},),
        )
        # the instance config, and next to it the runner's own settings (an instance program ignores keys it
        # does not know: shared/instanceconfig.py)
        config = {
            **instance.to_dict(),
            "docker_host": self.settings.docker_host,
            "namespace": self.engine.namespace, "image": image,
            "warm_start": fc.get("warm_start") or "function",
            "cpu": spec.extra.get("cpu"), "max_concurrency": int(fc.get("max_concurrency") or 1),
            "log_path": str(spec.log_path),
            "network": "host" if spec.extra.get("network") == "host" else "isolated",
            "link_source": link_source(self.settings),
            "slirp_log": str(self.settings.var_dir.resolve() / "logs" / "slirp4netns.log"),
        }
        if python is None:
            config.update(path=fc["registered_runtime"]["path"], run=list(fc["registered_runtime"]["run"]))
        else:
            config.update(kind="python", path=PY_WORK_DIR, python=python.to_dict())
        if container is not None:
            config.update(code_volume=True, code_dir=fc["code_dir"], container=container)
        self.dir.mkdir(parents=True, exist_ok=True)
        config_path = self.dir / f"{spec.id}.config.json"
        config_path.write_text(json.dumps(config))
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        taken = [container] if container is not None else []
        proc = self.spares.take() if self.spares.size > 0 else None
        if proc is not None:
            # the record first: a deployer that dies right after leaves a runner the next one adopts
            self._write_record(spec, proc.pid, taken, shape)
            try:
                await Spares.hand(proc, config_path)
            except (BrokenPipeError, ConnectionResetError) as exc:
                log.info("a spare runner was gone; starting one", error=str(exc)[:200])
                proc = None
        if proc is None:
            env = base_env()
            env["PYTHONPATH"] = str(SOURCE_ROOT)
            with open(spec.log_path, "ab") as out:
                proc = await self.spares.spawn([str(config_path)], out, env, str(SOURCE_ROOT))
            self._write_record(spec, proc.pid, taken, shape)
        handle = InstanceHandle(spec.id, spec.group_id, spec.group_version, proc.pid, spec.log_path, time.time(),
                                (fc["name"],))
        self.taken[spec.id] = taken
        self._watch(handle, proc.wait())
        return handle

    def _write_record(self, spec: InstanceSpec, pid: int, taken: list[str], shape: Shape | None) -> None:
        record = {"pid": pid, "start_time": start_time(pid), "group": spec.group_id,
                  "group_version": spec.group_version, "functions": [spec.functions[0]["name"]],
                  "log_path": str(spec.log_path), "started_at": time.time(), "containers": taken,
                  "shape": shape.as_record() if shape is not None else None}
        tmp = self.dir / f".{spec.id}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.dir / f"{spec.id}.json")

    def _watch(self, handle: InstanceHandle, waiting: Any) -> None:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.exits[handle.id] = fut
        self.handles[handle.id] = handle

        async def watch() -> None:
            code = await waiting
            await self._remove_containers(handle.id, self.taken.pop(handle.id, None))
            for suffix in (".json", ".config.json"):
                (self.dir / f"{handle.id}{suffix}").unlink(missing_ok=True)
            self.exits.pop(handle.id, None)
            if not fut.done():
                fut.set_result(code)
            self.handles.pop(handle.id, None)
            self.on_exit(handle, code)

        asyncio.ensure_future(watch())

    async def stop(self, handle: InstanceHandle, timeout_s: float) -> None:
        fut = self.exits.get(handle.id)
        if fut is None or handle.pid is None:
            return
        handle.stopping = True
        for sig, wait_s in ((signal.SIGTERM, max(1.0, timeout_s) + KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
            try:
                os.kill(handle.pid, sig)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(asyncio.shield(fut), wait_s)
                return
            except asyncio.TimeoutError:
                continue
        log.error("runner did not exit after SIGKILL", instance=handle.id, pid=handle.pid)

    def adopt(self) -> list[InstanceHandle]:
        """Runners a previous deployer started that still run; the records of the others go, with their containers."""
        adopted: list[InstanceHandle] = []
        if not self.dir.is_dir():
            return adopted
        for path in self.dir.glob("*.json"):
            if path.name.endswith(".config.json"):
                continue
            instance_id = path.name[:-len(".json")]
            try:
                rec = json.loads(path.read_text())
                pid, started = int(rec["pid"]), rec.get("start_time")
            except (OSError, ValueError, KeyError):
                continue
            taken = [str(c) for c in rec.get("containers") or ()]
            if not alive(pid, started):
                path.unlink(missing_ok=True)
                (self.dir / f"{instance_id}.config.json").unlink(missing_ok=True)
                asyncio.ensure_future(self._remove_containers(instance_id, taken))
                continue
            self.taken[instance_id] = taken
            if rec.get("shape"):
                try:
                    self.pool.want(Shape.from_record(rec["shape"]))  # keep its runtime warm, as before
                except (KeyError, TypeError, ValueError):
                    pass
            handle = InstanceHandle(instance_id, rec["group"], int(rec["group_version"]), pid, Path(rec["log_path"]),
                                    float(rec.get("started_at") or time.time()), tuple(rec.get("functions") or ()),
                                    adopted=True)

            async def poll(pid: int = pid, started: Any = started) -> None:
                while alive(pid, started):
                    await asyncio.sleep(ADOPTED_POLL_S)
                return None

            self._watch(handle, poll())
            adopted.append(handle)
        return adopted

    def taken_containers(self) -> set[str]:
        """The pool containers live runners hold (adoption removes every other pool container)."""
        return {c for taken in self.taken.values() for c in taken}


def _fill(api: Any, container_id: str, path: str, code: bytes) -> None:
    """The code into a started container's code volume; RuntimeError when the container is not running."""
    box.put_code(api, container_id, path, code)
    if not api.inspect_container(container_id)["State"].get("Running"):
        raise RuntimeError(f"container {container_id[:12]} is not running any more")
