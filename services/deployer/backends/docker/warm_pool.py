"""The docker backend's warm pool: started runtime containers that each become one instance on demand.

A pool container is created from the runtime image with an instance's lockdown (host network,
read-only root, tmpfs ``/tmp``, no capabilities, no-new-privileges, user 65534, pids limit, log
rotation) plus a tmpfs at ``/nuclide/functions``, and runs ``python3 -m services.runtime.pool_container``:
the runtime imported, waiting on stdin. A start of a Python group without dependencies takes one
(or creates one at once when none is idle: that is still no image build), applies the function's
memory and CPU limits with the Engine's update API (pids and the lockdown are the platform's, the
same for every function), attaches to its stdin through the Engine API and writes the instance
config and a tar of the members' code (``services/runtime/pool_container.py`` draws the frame). Only a
holder of Docker API access can do that; no port is opened. The engine closes the container's
stdin when the deployer detaches and the process reads one frame: a container is specialised
once, then is that instance until it exits and is removed, so one function's code never lands
in a container that served another. The pool is refilled in the background after each take.

Labels cannot change after create, so a pool container keeps its generic ones (``nuclide.pool``)
and the deployer records what it became in ``<var>/docker/pool/<container id>.json`` (state
``pending`` before the frame is written, ``sent`` after); the container is renamed to the name an
image-built instance has (``nuclide-<namespace>-<instance>``) for ``docker ps``. The backend's
adoption scan reads the record in place of the labels: a ``sent`` one is adopted like any
instance; an idle pool container (no record) or a ``pending`` one (a deployer died mid-way) is
removed, so a new deployer starts from a pool of its own. What differs from an image-built
instance: ``/tmp`` is sized for the platform's default memory (the cgroup limit, updated to the
function's, still caps it), and the code directory is at ``/nuclide/functions/<name>/<version>``
(an image-built instance's copy is at ``/nuclide/work/...``); both are writable tmpfs copies.

A little over 400 lines: taking, filling, the records and the shutdown of one pool belong together.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import os
import secrets
import socket
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from shared.errors import Unavailable
from shared.logs import get_logger
from shared.config import Settings
from shared.poolframe import CODE_ROOT, encode
from services.deployer.backends.base import InstanceHandle, InstanceSpec
from services.deployer.backends.docker.containers import Containers
from services.deployer.backends.docker.engine import (
    TMPFS_MAX_BYTES, USER, Engine, attach_network, container_env, host_config, in_thread,
)
from services.deployer.backends.docker.images import Images, normalize
from services.deployer.backends.refill import PoolClosed, Refilling

log = get_logger(__name__)

POOL_LABEL = "nuclide.pool"
POOL_ARGV = ["python3", "-m", "services.runtime.pool_container"]
TAKE_TIMEOUT_S = 30.0  # how long a start waits for a pool container being created before the image path
FAIL_BACKOFF_S = (2.0, 60.0)  # after a failed create: no pool for this long (doubling), starts take the image path
TAR_CACHE_ENTRIES = 16  # code tars of recent group versions (code directories are content-addressed)
TAR_CACHE_BYTES = 64 * 1024 * 1024
CLOSE_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Entry:
    """An idle pool container."""

    container_id: str
    pid: int | None
    image_id: str


class WarmPool(Refilling):
    """Idle started runtime containers, for the starts of Python groups without dependencies."""

    label = POOL_LABEL  # what the adoption scan knows a pool container by

    def __init__(self, settings: Settings, var: Path, engine: Engine, images: Images, containers: Containers) -> None:
        super().__init__(settings.docker_pool_size, *FAIL_BACKOFF_S)
        self.settings = settings
        self.engine = engine
        self.images = images
        self.containers = containers
        self.memory_bytes = settings.default_memory_bytes  # what idle containers run with
        self.dir = var / "docker" / "pool"
        self.idle: collections.deque[Entry] = collections.deque()
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.filling = 0
        self._known: set[str] = set()  # created by us, not taken yet: the adoption scan leaves them alone
        self._busy: set[str] = set()  # taken, being specialised: not an instance the scan could adopt yet
        self._creating = 0  # threads creating a pool container right now
        self._lock = threading.Lock()  # _closed, _known and _creating, shared with the creating threads
        self._tars: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()

    # ----- which starts it serves -------------------------------------------------------

    def eligible(self, spec: InstanceSpec) -> bool:
        """A Python group none of whose members needs an environment image or another Python's runtime image
        (the caller excludes registered runtimes and per-call warm starts)."""
        return (self.size > 0 and spec.extra.get("network", "isolated") != "host"
                and not any(fc.get("deps_dir") or fc.get("python") for fc in spec.functions))

    # ----- records --------------------------------------------------------------------------

    def record(self, container_id: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / f"{container_id}.json").read_text())
        except (OSError, ValueError):
            return None

    def _write_record(self, container_id: str, state: str, labels: dict[str, str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{container_id}.{state}.tmp"
        tmp.write_text(json.dumps({"container": container_id, "state": state, "labels": labels}))
        os.replace(tmp, self.dir / f"{container_id}.json")

    def forget(self, container_id: str) -> None:
        """The container is removed: its record goes (thread-safe; nothing when it was no pool container)."""
        try:
            (self.dir / f"{container_id}.json").unlink()
        except FileNotFoundError:
            pass

    def prune(self, client: docker.DockerClient) -> None:
        """Drop the records of containers that are gone (removed behind the deployer's back); at adoption,
        before anything of this deployer's runs."""
        paths = list(self.dir.glob("*.json")) if self.dir.is_dir() else []
        if not paths:
            return
        filters = {"label": [f"nuclide.namespace={self.engine.namespace}", POOL_LABEL]}
        present = {c["Id"] for c in client.api.containers(all=True, filters=filters)}
        for path in paths:
            if path.stem not in present:
                path.unlink(missing_ok=True)

    def known(self) -> set[str]:
        """Pool containers this deployer holds (idle, being created or being specialised)."""
        with self._lock:
            return self._known | self._busy

    # ----- a start -------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec, labels: dict[str, str]) -> InstanceHandle | None:
        """Specialise a pool container as ``spec``'s instance; None when the pool cannot (the image path then)."""
        functions = [dict(fc, code_dir=f"{CODE_ROOT}/{fc['name']}/{fc['version']}", deps_dir=None)
                     for fc in spec.functions]
        runtime_id = await self.images.runtime_image_id()
        code = await self._code_tar(spec)
        entry = await self._take(runtime_id)
        if entry is None:
            return None
        config = self.containers.instance_config(spec, functions)
        frame = encode(config.to_dict(), spec.memory_bytes, functions[0]["code_dir"], code)
        client = self.engine.require()
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        spec.log_path.touch()
        with self._lock:
            self._busy.add(entry.container_id)
        try:
            await self.engine.api(self._specialise, client, entry, spec, labels, frame)
        except (docker.errors.APIError, Unavailable, OSError) as exc:
            log.warning("could not specialise a pool container; building an image instead",
                        instance=spec.id, error=str(exc)[:300])
            self._discard(entry.container_id)
            return None
        finally:
            with self._lock:
                self._busy.discard(entry.container_id)
        names = tuple(f["name"] for f in functions)
        handle = InstanceHandle(spec.id, spec.group_id, spec.group_version, entry.pid, spec.log_path, time.time(),
                                names)
        self.containers.track(client, handle, entry.container_id, truncate_log=False)
        name = f"nuclide-{self.engine.namespace}-{spec.id}"
        threading.Thread(target=self._rename, args=(client, entry.container_id, name), daemon=True,
                         name="pool-rename").start()
        return handle

    def _specialise(self, client: docker.DockerClient, entry: Entry, spec: InstanceSpec, labels: dict[str, str],
                    frame: bytes) -> None:
        """Limits, the record, then the frame on the container's stdin (a blocking call: runs in a thread)."""
        memory = int(spec.memory_bytes)
        cpu = spec.extra.get("cpu")
        update: dict[str, int] = {}
        if memory != self.memory_bytes:
            update.update(Memory=memory, MemorySwap=memory)
        if cpu:
            update["NanoCpus"] = int(float(cpu) * 1e9)
        api = client.api
        if update:  # docker-py's update_container knows no NanoCpus: the endpoint itself
            api._raise_for_status(api._post_json(api._url("/containers/{0}/update", entry.container_id), data=update))
        self._write_record(entry.container_id, "pending", labels)
        sock = api.attach_socket(entry.container_id, params={"stdin": 1, "stream": 1})
        try:
            raw: socket.socket = getattr(sock, "_sock", sock)
            raw.sendall(frame)
            raw.shutdown(socket.SHUT_WR)  # the engine closes the container's stdin (StdinOnce)
        finally:
            sock.close()
        self._write_record(entry.container_id, "sent", labels)

    def _rename(self, client: docker.DockerClient, container_id: str, name: str) -> None:
        try:
            client.api.rename(container_id, name)
        except (docker.errors.DockerException, OSError) as exc:
            log.info("could not rename a specialised pool container", container=container_id[:12], error=str(exc)[:200])

    async def _code_tar(self, spec: InstanceSpec) -> bytes:
        key = tuple((fc["name"], int(fc["version"]), str(fc["code_dir"])) for fc in spec.functions)
        data = self._tars.get(key)
        if data is None:
            data = await in_thread(_tar_code, key)
            self._tars[key] = data
            while len(self._tars) > TAR_CACHE_ENTRIES or sum(map(len, self._tars.values())) > TAR_CACHE_BYTES:
                self._tars.popitem(last=False)
                if not self._tars:
                    break
        else:
            self._tars.move_to_end(key)
        return data

    # ----- taking and filling --------------------------------------------------------------

    async def _take(self, runtime_id: str) -> Entry | None:
        while self.idle:
            entry = self.idle.popleft()
            with self._lock:
                self._known.discard(entry.container_id)
            self.refill_soon()
            if entry.image_id == runtime_id:
                return entry
            self._discard(entry.container_id)  # the runtime image was rebuilt meanwhile
        if self.backoff.blocked or self._closed:
            return None
        loop = asyncio.get_running_loop()
        while True:
            waiter: asyncio.Future = loop.create_future()
            self.waiters.append(waiter)
            if self.filling < len(self.waiters):
                try:
                    self._fill()  # nothing on the way for this start: create one now (no delay)
                except Unavailable:
                    self.waiters.remove(waiter)
                    return None
            try:
                entry = await asyncio.wait_for(asyncio.shield(waiter), TAKE_TIMEOUT_S)
            except asyncio.TimeoutError:
                self._withdraw(waiter)
                return None
            except asyncio.CancelledError:
                self._withdraw(waiter)  # a container handed over meanwhile goes to the next start
                raise
            except Exception as exc:  # that create failed: the image path for this start
                log.warning("no pool container for a start; building an image instead", error=str(exc)[:300])
                return None
            with self._lock:
                self._known.discard(entry.container_id)
            if entry.image_id == runtime_id:
                return entry
            self._discard(entry.container_id)

    def _withdraw(self, waiter: asyncio.Future) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self._offer(waiter.result())  # it came just too late for this start: the next one takes it

    def _offer(self, entry: Entry) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(entry)
                return
        self.idle.append(entry)

    def _fill(self) -> asyncio.Future:
        """Create one pool container; it goes to the first waiting start, else to the idle ones."""
        client = self.engine.require()  # EngineLost when it is away
        self.filling += 1
        task = asyncio.ensure_future(in_thread(self._create, client))

        def done(task: asyncio.Future) -> None:
            self.filling -= 1
            exc = task.exception() if not task.cancelled() else asyncio.CancelledError()
            if exc is None:
                self.backoff.succeeded()
                self._offer(task.result())
                return
            if isinstance(exc, PoolClosed):
                return
            log.warning("could not create a pool container", error=f"{type(exc).__name__}: {exc}"[:300],
                        retry_in_s=self.backoff.failed())
            while len(self.waiters) > self.filling:  # starts nothing else is on the way for
                waiter = self.waiters.pop()
                if not waiter.done():
                    waiter.set_exception(exc)

        task.add_done_callback(done)
        return task

    def _create(self, client: docker.DockerClient) -> Entry:
        """Create and start one pool container (blocking: runs in a thread)."""
        with self._lock:
            if self._closed:
                raise PoolClosed()
            self._creating += 1
        try:
            return self._create_counted(client)
        finally:
            with self._lock:
                self._creating -= 1

    def _create_counted(self, client: docker.DockerClient) -> Entry:
        api = client.api
        host = host_config(
            client, self.memory_bytes, None, data_limit=False,
            extra_tmpfs={CODE_ROOT: f"rw,noexec,nosuid,nodev,mode=0755,uid=65534,gid=65534,size={TMPFS_MAX_BYTES}"},
            settings=self.settings)  # isolated: eligible() leaves the host network's functions to the image path
        labels = {"nuclide.managed": "true", "nuclide.namespace": self.engine.namespace, POOL_LABEL: "true"}
        created = api.create_container(
            self.settings.runtime_image, name=f"nuclide-{self.engine.namespace}-pool-{secrets.token_hex(4)}",
            labels=labels, user=USER, working_dir="/tmp", host_config=host, use_config_proxy=False,
            stdin_open=True, command=POOL_ARGV, environment=container_env())
        container_id = created["Id"]
        with self._lock:
            if self._closed:
                api.remove_container(container_id, force=True)
                raise PoolClosed()
            self._known.add(container_id)
        try:
            api.start(container_id)
            info = api.inspect_container(container_id)
            attach_network(info["State"].get("Pid"), self.settings, container_id[:12])
        except BaseException:
            api.remove_container(container_id, force=True)
            with self._lock:
                self._known.discard(container_id)
            raise
        return Entry(container_id, info["State"].get("Pid") or None, str(info["Image"]))

    async def _fill_missing(self) -> None:
        while (not self._closed and self.engine.up.is_set() and not self.backoff.blocked
               and len(self.idle) + self.filling - len(self.waiters) < self.size):
            try:
                await self._fill()
            except Exception:
                break  # logged by the fill (or the engine is away); the backoff or a reconnect tries again

    def _discard(self, container_id: str) -> None:
        client = self.engine.client
        with self._lock:
            self._known.discard(container_id)
        if client is None:
            return  # the next adoption scan removes it

        def remove() -> None:
            try:
                client.api.remove_container(container_id, force=True)
            except (docker.errors.DockerException, OSError):
                pass  # the next adoption scan removes it
            self.forget(container_id)

        threading.Thread(target=remove, daemon=True, name="pool-discard").start()

    def engine_back(self) -> None:
        """The engine was away: the idle containers may be gone with it; start afresh."""
        for entry in list(self.idle):
            self._discard(entry.container_id)
        self.idle.clear()
        self.refill_soon(0)

    def close(self) -> None:
        """Remove the idle pool containers (graceful shutdown; after a kill the next deployer removes them)."""
        with self._lock:
            self._closed = True
        self.cancel_refill()
        self.idle.clear()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while time.monotonic() < deadline:  # creating threads remove what they create from now on
            with self._lock:
                if not self._creating:
                    break
            time.sleep(0.02)
        with self._lock:
            idle = sorted(self._known)  # idle, or created and not handed to the loop yet
        if not idle:
            return
        api = docker.APIClient(base_url=self.settings.docker_host, version="auto", timeout=CLOSE_TIMEOUT_S)
        try:
            for container_id in idle:
                try:
                    api.remove_container(container_id, force=True)
                except docker.errors.NotFound:
                    pass
        except (docker.errors.DockerException, OSError) as exc:
            log.warning("could not remove idle pool containers", error=str(exc)[:200])
        finally:
            api.close()


def _tar_code(key: tuple) -> bytes:
    """An uncompressed tar of the group's code directories as ``<name>/<version>/...``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, version, code_dir in key:
            tar.add(str(Path(code_dir)), arcname=f"{name}/{version}", filter=normalize)
    return buf.getvalue()
