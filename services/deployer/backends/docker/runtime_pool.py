"""Registered runtimes without image builds: started containers per runtime, and spare runner processes.

A function on a registered runtime with no ``dependencies`` command and the default policy
(``warmStart: function``) needs nothing of an image of its own: its containers run the runtime's
image, and the version's code is unpacked into their code volume through the Engine's archive API
(see ``runner/box.py`` for the container and why the code directory is a tmpfs
volume there). What a start would still wait for is made ahead of time, ``docker_runtime_pool_size``
of each (0 disables all of it, and every runtime function's image is built as before):

- :class:`RuntimePool`: started, idle containers per *shape* (the runtime image's id, its code
  path, the memory and CPU limits: what is fixed at create). A start takes one, the deployer puts
  the code in and hands it to the runner as its first warm container; a start that finds none
  creates one at once (still no image build). Shapes are learnt from starts (and adopted runners)
  and kept for the :data:`MAX_SHAPES` used last; each is refilled in the background after a take.
  A container is taken once: it serves that one instance until it is removed with its runner, so
  one function's code never lands in a container that served another.
- :class:`Spares`: runner processes (``python -m services.deployer.backends.docker.runner --spare``) started with
  their imports done, waiting for the path of their config on a pipe from the deployer. One that
  loses its deployer before it was given a config reads EOF and exits.

Pool containers carry generic labels (``nuclide.runtime_pool``); labels cannot change after create,
so the runner's record (``<var>/docker/runners/<id>.json``, ``containers``) says which one a runner
took, and that is what is removed when the runner is gone. At adoption every pool container no
live runner's record names is removed: a new deployer starts from a pool of its own.
"""

from __future__ import annotations

import asyncio
import collections
import os
import secrets
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from shared.config import Settings
from shared.logs import get_logger
from services.deployer.backends.docker.engine import Engine, in_thread, link_source
from services.deployer.backends.refill import PoolClosed, Refilling
from services.deployer.sandbox import base_env
from services.deployer.backends.docker.runner import MODULE as RUNNER_MODULE, SPARE_ARG, box

log = get_logger(__name__)

POOL_LABEL = "nuclide.runtime_pool"
MAX_SHAPES = 4  # runtime shapes kept warm: the ones used last
FAIL_BACKOFF_S = (2.0, 60.0)  # after a failed create: no refills for this long (doubling)
TAR_CACHE_ENTRIES = 16  # code tars of recent versions (code directories are content-addressed)
TAR_CACHE_BYTES = 64 * 1024 * 1024
CLOSE_TIMEOUT_S = 15.0
SOURCE_ROOT = Path(__file__).resolve().parents[4]  # the directory that holds the services package
SPARE_LOG = "spares.log"  # what a spare says before it has an instance's log (an import error, say)


@dataclass(frozen=True)
class Shape:
    """What a pool container is fixed to at create: the image, the code path, the limits."""

    image_id: str
    path: str
    memory_bytes: int
    cpu: str  # "" for no CPU limit

    def as_record(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "path": self.path, "memory_bytes": self.memory_bytes, "cpu": self.cpu}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "Shape":
        return cls(str(rec["image_id"]), str(rec["path"]), int(rec["memory_bytes"]), str(rec.get("cpu") or ""))


class RuntimePool(Refilling):
    """Idle started containers per shape, for :meth:`Runners.start_fast`."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        super().__init__(settings.docker_runtime_pool_size, *FAIL_BACKOFF_S)
        self.settings = settings
        self.engine = engine
        self.idle: collections.OrderedDict[Shape, collections.deque[str]] = collections.OrderedDict()  # LRU
        self.filling: collections.Counter[Shape] = collections.Counter()
        self._known: set[str] = set()  # idle or being created: what close() removes
        self._lock = threading.Lock()  # _known and _closed, shared with the creating threads
        self._tars: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    # ----- shapes and taking ----------------------------------------------------------------

    def want(self, shape: Shape) -> None:
        """``shape`` was used: keep it warm (the least recently used beyond MAX_SHAPES goes)."""
        if self.size <= 0:
            return
        if shape not in self.idle:
            self.idle[shape] = collections.deque()
        self.idle.move_to_end(shape)
        while len(self.idle) > MAX_SHAPES:
            _, dropped = self.idle.popitem(last=False)
            for container_id in dropped:
                self._discard(container_id)

    def take(self, shape: Shape) -> str | None:
        """An idle container of ``shape`` (no longer the pool's), or None; a refill follows either way."""
        self.want(shape)
        queue = self.idle.get(shape)
        container_id = queue.popleft() if queue else None
        if container_id is not None:
            with self._lock:
                self._known.discard(container_id)
        self.refill_soon()
        return container_id

    async def create(self, shape: Shape) -> str:
        """A new started container of ``shape``, for a start that found none idle."""
        client = self.engine.require()
        container_id = await in_thread(self._create, client, shape)
        with self._lock:
            self._known.discard(container_id)
        return container_id

    async def code_tar(self, code_dir: str) -> bytes:
        """The tar of a version's code directory (cached: the directory's path names its content)."""
        data = self._tars.get(code_dir)
        if data is not None:
            self._tars.move_to_end(code_dir)
            return data
        data = await in_thread(box.code_tar, code_dir)
        self._tars[code_dir] = data
        while len(self._tars) > 1 and (len(self._tars) > TAR_CACHE_ENTRIES
                                       or sum(map(len, self._tars.values())) > TAR_CACHE_BYTES):
            self._tars.popitem(last=False)
        return data

    # ----- creating and refilling ------------------------------------------------------------

    def _create(self, client: docker.DockerClient, shape: Shape) -> str:
        """Create and start one container of ``shape`` (blocking: runs in a thread)."""
        with self._lock:
            if self._closed:
                raise PoolClosed()
        api = client.api
        # isolated: a function with spec.network: host never takes a pool container (runners.fast_eligible)
        host = box.host_config(api, shape.path, shape.memory_bytes, shape.cpu or None, auto_remove=False,
                               code_volume=True, isolated=True, link_source=link_source(self.settings))
        labels = {"nuclide.namespace": self.engine.namespace, POOL_LABEL: "true"}
        env = {"HOME": "/tmp", "LANG": "C.UTF-8"}
        name = f"nuclide-{self.engine.namespace}-rtpool-{secrets.token_hex(4)}"
        container_id = box.create(api, shape.image_id, ["/bin/sh", "-c", box.WARM_MAIN], labels, env, "/", host,
                                        stdin_once=False, name=name)
        with self._lock:
            closed = self._closed
            if not closed:
                self._known.add(container_id)
        try:
            if closed:
                raise PoolClosed()
            api.start(container_id)
            if not api.inspect_container(container_id)["State"].get("Running"):
                logs = api.logs(container_id).decode("utf-8", "replace").strip()[-500:]
                raise RuntimeError(f"a container of image {shape.image_id[:19]} exited at start: {logs or 'no output'}"
                                   " (the image needs sh)")
            slirp_log = str(self.settings.var_dir.resolve() / "logs" / "slirp4netns.log")
            why = box.attach_network(api, container_id, slirp_log)
            if why is not None:
                log.warning("a runtime pool container has no outbound network", container=container_id[:12], error=why)
        except BaseException:
            _remove(api, container_id)
            with self._lock:
                self._known.discard(container_id)
            raise
        return container_id

    def _missing(self) -> Shape | None:
        for shape, queue in reversed(self.idle.items()):  # the shape used last first
            if len(queue) + self.filling[shape] < self.size:
                return shape
        return None

    async def _fill_missing(self) -> None:
        while not self._closed and self.engine.up.is_set() and not self.backoff.blocked:
            shape = self._missing()
            client = self.engine.client
            if shape is None or client is None:
                break
            self.filling[shape] += 1
            try:
                container_id = await in_thread(self._create, client, shape)
            except PoolClosed:
                break
            except Exception as exc:
                log.warning("could not create a runtime pool container", error=f"{type(exc).__name__}: {exc}"[:300],
                            retry_in_s=self.backoff.failed())
                break
            finally:
                self.filling[shape] -= 1
            self.backoff.succeeded()
            if shape in self.idle and not self._closed:
                self.idle[shape].append(container_id)
            else:  # its shape was dropped meanwhile
                self._discard(container_id)

    def _discard(self, container_id: str) -> None:
        client = self.engine.client
        with self._lock:
            self._known.discard(container_id)
        if client is None:
            return  # the next adoption removes it
        threading.Thread(target=_remove, args=(client.api, container_id), daemon=True, name="rtpool-discard").start()

    def engine_back(self) -> None:
        """The engine was away: the idle containers may be gone with it; start afresh."""
        for queue in self.idle.values():
            while queue:
                self._discard(queue.popleft())
        self.refill_soon(0)

    # ----- adoption and shutdown ------------------------------------------------------------

    def prune(self, client: docker.DockerClient, taken: set[str]) -> None:
        """At adoption: remove every pool container no live runner took (an earlier deployer's idle ones)."""
        filters = {"label": [f"nuclide.namespace={self.engine.namespace}", POOL_LABEL]}
        for c in client.api.containers(all=True, filters=filters):
            if c["Id"] not in taken:
                _remove(client.api, c["Id"])

    def close(self) -> None:
        """Remove the idle containers (graceful shutdown; after a kill the next deployer removes them)."""
        with self._lock:
            self._closed = True
            idle = sorted(self._known)
        self.cancel_refill()
        self.idle.clear()
        if not idle:
            return
        api = docker.APIClient(base_url=self.settings.docker_host, version="auto", timeout=CLOSE_TIMEOUT_S)
        try:
            for container_id in idle:
                _remove(api, container_id)
        finally:
            api.close()


def _remove(api: Any, container_id: str) -> None:
    try:
        api.remove_container(container_id, force=True, v=True)
    except docker.errors.NotFound:
        pass
    except (docker.errors.DockerException, OSError) as exc:
        log.info("could not remove a runtime pool container", container=container_id[:12], error=str(exc)[:200])


class Spares(Refilling):
    """Runner processes started ahead of need, their imports done; a start hands one its config path."""

    def __init__(self, settings: Settings, runners_dir: Path) -> None:
        super().__init__(settings.docker_runtime_pool_size, *FAIL_BACKOFF_S)
        self.docker_host = settings.docker_host
        self.dir = runners_dir
        self.idle: collections.deque[asyncio.subprocess.Process] = collections.deque()
        self.starting = 0

    async def spawn(self, argv: list[str], stdout: Any, env: dict[str, str], cwd: str,
                    stdin: Any = asyncio.subprocess.DEVNULL) -> asyncio.subprocess.Process:
        """A runner process in a session of its own (it outlives a deployer that dies)."""
        return await asyncio.create_subprocess_exec(sys.executable, "-m", RUNNER_MODULE, *argv,
                                                    stdin=stdin, stdout=stdout, stderr=stdout, cwd=cwd, env=env,
                                                    start_new_session=True)

    def take(self) -> asyncio.subprocess.Process | None:
        """A spare still waiting (one that died idle is skipped); a refill follows."""
        while self.idle:
            proc = self.idle.popleft()
            self.refill_soon()
            if proc.returncode is None:
                return proc
        self.refill_soon()
        return None

    @staticmethod
    async def hand(proc: asyncio.subprocess.Process, config_path: Path) -> None:
        """Give a taken spare its config; it is that instance's runner from then on."""
        if proc.stdin is None:
            raise BrokenPipeError("the spare runner has no stdin pipe")
        proc.stdin.write(f"{config_path}\n".encode())
        await proc.stdin.drain()
        proc.stdin.close()

    async def _fill_missing(self) -> None:
        while not self._closed and not self.backoff.blocked and len(self.idle) + self.starting < self.size:
            env = base_env()
            env["PYTHONPATH"] = str(SOURCE_ROOT)
            self.dir.mkdir(parents=True, exist_ok=True)
            self.starting += 1
            try:
                with open(self.dir / SPARE_LOG, "ab") as out:
                    proc = await self.spawn([SPARE_ARG, self.docker_host], out, env, str(SOURCE_ROOT),
                                            stdin=asyncio.subprocess.PIPE)
            except OSError as exc:
                log.warning("could not start a spare runner", error=str(exc)[:200], retry_in_s=self.backoff.failed())
                return
            finally:
                self.starting -= 1
            if self._closed:
                _stop(proc)
                return
            self.idle.append(proc)
            asyncio.ensure_future(proc.wait())  # reaped when it exits idle (its deployer's pipe closed)

    def close(self) -> None:
        """Stop the idle spares (their pipe closes with this process anyway: they exit at EOF)."""
        self._closed = True
        self.cancel_refill()
        while self.idle:
            _stop(self.idle.popleft())


def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

