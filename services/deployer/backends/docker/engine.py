"""The docker backend's connection to the Docker Engine: liveness, calls off the loop, the containers' lockdown.

The docker SDK is synchronous: every call runs in a daemon thread of its own (:func:`in_thread`),
so a slow engine never blocks the loop or the process's exit. An engine that stops answering is
logged once; starts wait for it to come back (:attr:`Engine.up`): a monitor pings it every
:data:`PING_INTERVAL_S` and, once it answers again, calls ``on_up`` with the new client (the backend
adopts what runs and removes what exited meanwhile) before it counts as up.

The lockdown every container of the backend gets (:func:`host_config`) lives here too, so the
image-built instances and the warm pool's containers are locked down alike.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import docker
import docker.errors
import docker.types
import requests

from shared.config import Settings
from shared.errors import Unavailable
from shared.logs import get_logger
from services.deployer.backends.docker.runner import usernet

log = get_logger(__name__)

T = TypeVar("T")

USER = "65534:65534"  # nobody: owns nothing in the image
PIDS_LIMIT = 512
TMPFS_MAX_BYTES = 256 * 1024 * 1024  # /tmp is memory: the container's memory limit caps it too
LOG_MAX_SIZE, LOG_MAX_FILES = "10m", "3"  # the engine's copy of an instance's output
API_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 5.0
PING_INTERVAL_S = 2.0  # engine liveness checks; also how fast a returning engine is noticed
ENGINE_ERRORS = (docker.errors.DockerException, requests.RequestException, OSError)


class EngineLost(Unavailable):
    """The engine stopped answering (not: it refused something); whatever needs it waits for it."""


def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> "asyncio.Future[T]":
    """Run a blocking call in a daemon thread of its own; its result as a future of the running loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def run() -> None:
        try:
            result = (True, fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting coroutine
            result = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *result)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=run, daemon=True, name="docker-call").start()
    return fut


def link_source(settings: Settings) -> str:
    """What isolated containers bind at the instance link's place: a host directory, or a volume's name."""
    return settings.docker_link_source or str(Path(settings.instance_link[len("ipc://"):]).parent)


def instance_gateways(settings: Settings, isolated: bool) -> list[str]:
    """The gateway endpoints an instance's runtime connects to: the link in an isolated container."""
    return [usernet.link_endpoint(settings.instance_link)] if isolated else [settings.gateway_router]


def attach_network(pid: int | None, settings: Settings, what: str) -> None:
    """Give an isolated container its way out (blocking); without it the container still serves, with no
    outbound connections, and the log says why."""
    if not pid:
        return
    try:
        usernet.attach(pid, settings.var_dir.resolve() / "logs" / "slirp4netns.log")
    except usernet.NoUserNet as exc:
        log.warning("a container has no outbound network", container=what, error=str(exc))


def host_config(client: docker.DockerClient, memory: int, cpu: Any, data_limit: bool = True,
                extra_tmpfs: dict[str, str] | None = None, pids: int | None = None,
                scratch_bytes: int | None = None, *, settings: Settings, isolated: bool = True) -> dict[str, Any]:
    """An instance's lockdown and limits (a pool container's too: it sets its data limit itself).

    ``pids`` and ``scratch_bytes`` are the function's spec.resources.limits.pids and
    ephemeral-storage: its process limit, and the size of its /tmp and of its /dev/shm
    (private to the container: ipc mode private, never shareable). ``isolated``: the container's own
    network (``runner/usernet.py``) and the instance link; else the host's (``spec.network: host``)."""
    scratch = scratch_bytes or min(memory, TMPFS_MAX_BYTES)
    return client.api.create_host_config(
        **usernet.network_options(isolated, link_source(settings)), read_only=True, cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        tmpfs={"/tmp": f"rw,noexec,nosuid,nodev,mode=1777,size={scratch}", **(extra_tmpfs or {})},
        ipc_mode="private", shm_size=scratch,
        mem_limit=memory, memswap_limit=memory, nano_cpus=int(float(cpu) * 1e9) if cpu else None,
        pids_limit=pids or PIDS_LIMIT,
        ulimits=[docker.types.Ulimit(name="data", soft=memory, hard=memory)] if data_limit else None,
        log_config=docker.types.LogConfig(type="json-file", config={"max-size": LOG_MAX_SIZE,
                                                                    "max-file": LOG_MAX_FILES}),
    )


def container_env() -> dict[str, str]:
    """The environment of a Python instance's container (the instance config comes on top)."""
    return {"HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "MALLOC_ARENA_MAX": "2"}


class Engine:
    """One Docker Engine, as the backend and its pools use it: a client while it answers, none while it is away."""

    def __init__(self, settings: Settings, namespace: str) -> None:
        self.settings = settings
        self.namespace = namespace  # what this deployer's containers and group images are labelled with
        self.client: docker.DockerClient | None = None
        self.up = asyncio.Event()
        self.closed = False
        self._down_logged = False

    def connect(self) -> docker.DockerClient:
        client = docker.DockerClient(base_url=self.settings.docker_host, version="auto", timeout=CONNECT_TIMEOUT_S,
                                     max_pool_size=32)
        client.api.timeout = API_TIMEOUT_S
        return client

    def went_down(self, error: Exception) -> None:
        self.up.clear()
        client, self.client = self.client, None
        if client is not None:
            client.close()
        if not self._down_logged:
            self._down_logged = True
            log.error("Docker Engine not reachable: instances start once it is back (retrying every"
                      f" {PING_INTERVAL_S:g} s); start dockerd or set docker_host",
                      docker_host=self.settings.docker_host, error=str(error)[:200])

    def came_up(self, client: docker.DockerClient) -> None:
        self.client = client
        if self._down_logged:
            log.info("Docker Engine reachable again", docker_host=self.settings.docker_host)
        self._down_logged = False
        self.up.set()

    async def watch(self, on_up: Callable[[docker.DockerClient], Awaitable[None]], on_back: Callable[[], None],
                    on_tick: Callable[[], None]) -> None:
        """Ping the engine until closed. After a (re)connect ``on_up`` runs with the new client before the
        engine counts as up (the backend adopts what runs), ``on_back`` right after; ``on_tick`` on each
        round while it is up."""
        while not self.closed:
            if self.up.is_set():
                on_tick()
            try:
                if self.client is None:
                    client = await in_thread(self.connect)
                    await on_up(client)
                    self.came_up(client)
                    on_back()
                else:
                    await in_thread(self.client.ping)
            except ENGINE_ERRORS as exc:
                self.went_down(exc)
            await asyncio.sleep(PING_INTERVAL_S)

    def require(self) -> docker.DockerClient:
        client = self.client
        if client is None:
            raise EngineLost(f"the Docker Engine at {self.settings.docker_host} is not reachable")
        return client

    async def api(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """An engine call off the loop; a lost engine becomes EngineLost (a start waits for it to return)."""
        try:
            return await in_thread(fn, *args, **kwargs)
        except docker.errors.APIError:
            raise
        except ENGINE_ERRORS as exc:
            client = self.client
            try:  # a local failure (a file, a timeout of one call) is not a lost engine
                if client is not None and await in_thread(client.ping):
                    raise Unavailable(f"a Docker Engine call failed: {type(exc).__name__}: {exc}") from None
            except ENGINE_ERRORS:
                pass
            self.went_down(exc)
            raise EngineLost(f"the Docker Engine at {self.settings.docker_host} is not reachable: {exc}") from None
