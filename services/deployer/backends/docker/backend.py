"""The docker backend: each instance is a container, from a warm pool or of an image built per group version.

Python groups without dependencies (no requirements, no build commands; not on a registered
runtime, not a per-call warm start) start from the warm pool (``warm_pool.py``, on by default,
``docker_pool_size``): a started runtime container gets the instance config and the code over its
stdin, through the Engine API, and becomes the instance; no image is built. Functions on registered
runtimes are run by a runner process each (``runners.py``); without a dependencies command they
skip the image too (``runtime_pool.py``). Everything else (and a start the pools cannot serve)
takes the image path: ``images.py`` builds the group version's image, ``containers.py`` runs it.

The package, by responsibility (each module holds the engine object, none another's privates):

- ``engine.py``: the connection, its liveness, calls off the loop, the containers' lockdown;
- ``images.py``: builds, the cache, the removal of unused images;
- ``containers.py``: image-built and pool instances' containers: run, logs, stop, adoption;
- ``warm_pool.py``: started runtime containers that become Python instances;
- ``runtime_pool.py``: registered runtimes' started containers and spare runner processes;
- ``runners.py``: the runner processes of registered runtimes' (and per-call Python) functions;
- this module: the :class:`~services.deployer.backends.base.Backend` interface over them.

Instances outlive the deployer; the next one adopts them (containers by their labels, a pool
container by its record, runners by theirs). While the engine is away, starts wait for it to
come back; then what runs is adopted and what exited meanwhile is removed.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable

import docker

from shared.config import Settings
from services.deployer.backends.base import Backend, ExitCallback, InstanceHandle, InstanceSpec
from services.deployer.backends.docker.containers import Containers
from services.deployer.backends.docker.engine import ENGINE_ERRORS, Engine, EngineLost, in_thread
from services.deployer.backends.docker.images import Images
from services.deployer.backends.docker.runners import Runners, is_per_call, is_registered
from services.deployer.backends.docker.warm_pool import WarmPool
from shared.logs import get_logger

log = get_logger(__name__)

COLLECT_INTERVAL_S = 60.0  # unused images are removed after stops, and at least this often
NAMESPACE_FILE = "docker-namespace"


def load_namespace(settings: Settings, var: Path) -> str:
    if settings.docker_namespace:
        ns = settings.docker_namespace
    else:
        path = var / NAMESPACE_FILE
        try:
            ns = path.read_text().strip()
        except FileNotFoundError:
            var.mkdir(parents=True, exist_ok=True)
            ns = secrets.token_hex(6)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "w") as fh:
                    fh.write(ns + "\n")
            except FileExistsError:
                ns = path.read_text().strip()
    if not ns or not all(c.isalnum() or c in "_.-" for c in ns) or not ns[0].isalnum() or len(ns) > 40:
        raise ValueError(f"docker_namespace {ns!r} must be 1-40 letters, digits, '_', '.' or '-'")
    return ns.lower()



class DockerBackend(Backend):
    name = "docker"

    def __init__(self, settings: Settings, on_exit: ExitCallback) -> None:
        super().__init__(on_exit)
        self.settings = settings
        self.var = settings.var_dir.resolve()
        self.engine = Engine(settings, load_namespace(settings, self.var))
        self.images = Images(settings, self.engine)
        # the callbacks look on_exit up when called: the service may set it after construction
        self.containers = Containers(settings, self.engine, lambda h, code: self.on_exit(h, code))
        self.pool = WarmPool(settings, self.var, self.engine, self.images, self.containers)
        self.containers.pool = self.pool  # the adoption scan reads the pool's records
        self.runners = Runners(settings, self.var, self.engine, self.images, lambda h, code: self.on_exit(h, code))
        self._monitor: asyncio.Task | None = None
        self._next_collection = 0.0

    @property
    def namespace(self) -> str:
        return self.engine.namespace

    @property
    def wanted_versions(self) -> Callable[[], dict[str, int] | None]:
        return self.images.wanted_versions

    @wanted_versions.setter
    def wanted_versions(self, fn: Callable[[], dict[str, int] | None]) -> None:
        """Set by the service: group id -> the version it wants (None until it knows), for image removal."""
        self.images.wanted_versions = fn

    async def python_check(self, version: str) -> dict[str, Any]:
        return await self.images.python_check(version)

    async def check_image(self, image: str) -> dict[str, Any]:
        """A registered runtime's image must be local: its id, or a 400 naming it (503 without an engine)."""
        return await self.runners.check_image(image)

    # ----- the engine -------------------------------------------------------------------

    async def _engine_up(self, client: docker.DockerClient) -> None:
        """(Re)connected: adopt what runs untracked, remove what exited while nobody could."""
        running = await in_thread(self.containers.scan, client, set(self.containers.containers.values()))
        adopted = self.containers.register_adopted(client, running)
        if adopted:
            log.info("adopted running instances", count=len(adopted))

    def _engine_back(self) -> None:
        self.pool.engine_back()
        self.runners.engine_back()

    def _tick(self) -> None:
        if time.monotonic() > self._next_collection:
            self._next_collection = time.monotonic() + COLLECT_INTERVAL_S
            asyncio.ensure_future(self.images.collect())  # what stops alone do not catch: deletes at zero

    def _ensure_monitor(self) -> None:
        if self._monitor is None:
            self._next_collection = time.monotonic() + COLLECT_INTERVAL_S
            self._monitor = asyncio.ensure_future(self.engine.watch(self._engine_up, self._engine_back, self._tick))

    def close(self) -> None:
        self.engine.closed = True
        if self._monitor is not None:
            self._monitor.cancel()
        self.pool.close()
        self.runners.close()

    # ----- adoption -----------------------------------------------------------------------

    def adopt(self) -> list[InstanceHandle]:
        runners = self.runners.adopt()
        try:
            client = self.engine.connect()
            running = self.containers.scan(client, set())
            self.pool.prune(client)
            self.runners.pool.prune(client, self.runners.taken_containers())
        except ENGINE_ERRORS as exc:
            self.engine.went_down(exc)
            self._ensure_monitor()
            return runners
        adopted = runners + self.containers.register_adopted(client, running)
        self.engine.came_up(client)
        self._ensure_monitor()
        asyncio.ensure_future(self.images.collect())
        self.pool.refill_soon(0)
        self.runners.pool.refill_soon(0)
        if runners:
            self.runners.spares.refill_soon(0)
        return adopted

    def list(self) -> list[InstanceHandle]:
        return [*self.containers.handles.values(), *self.runners.handles.values()]

    def knows_all(self) -> bool:
        return self.engine.up.is_set()  # while the engine is away, containers it runs are not adopted yet

    # ----- instances ----------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> InstanceHandle:
        self._ensure_monitor()
        async with self.images.no_collection():
            while True:
                # while the engine is away a start waits for it (the monitor said so once), no error each time
                await self.engine.up.wait()
                try:
                    if is_registered(spec):
                        return await self.runners.start_registered(spec)
                    if not is_per_call(spec) and self.pool.eligible(spec):
                        names = [fc["name"] for fc in spec.functions]
                        handle = await self.pool.start(spec, self.containers.instance_labels(spec, names))
                        if handle is not None:
                            return handle
                    image, functions = await self.images.group_image(spec)
                    if is_per_call(spec):  # warmStart none/runtime: the runner drives per-call containers
                        return await self.runners.start(spec, image, self.containers.instance_config(spec, functions))
                    return await self.containers.run(spec, image, functions)
                except EngineLost:
                    continue

    async def stop(self, handle: InstanceHandle, timeout_s: float) -> None:
        if self.runners.owns(handle.id):
            await self.runners.stop(handle, timeout_s)
        elif not await self.containers.stop(handle, timeout_s):
            return
        await self.images.collect()
