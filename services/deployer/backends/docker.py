"""The docker backend: each instance is a container, from a warm pool or of an image built per group version.

Python groups without dependencies (no requirements, no build commands; not on a registered
runtime, not a per-call warm start) start from the warm pool (``docker_pool.py``, on by default,
``docker_pool_size``): a started runtime container gets the instance config and the code over its
stdin, through the Engine API, and becomes the instance; no image is built. Functions on registered
runtimes without a dependencies command skip the image too (``shell.py``, ``shell_pool.py``).
Everything else (and a start the pools cannot serve) takes the image path.

Images (classic builder, nothing is ever pulled):

- ``nuclide-env:<key>``: FROM the runtime image (``make images``), a function's requirements
  and build commands installed into ``/nuclide/envs/<key>/site``. The key hashes the runtime
  image id, requirements.txt and the build commands; functions with the same dependencies share
  it, and unused ones are kept as a cache (``docker_image_cache``).
- ``nuclide-fn:<namespace>-<group>-v<version>``: FROM the env image (or the runtime image), the
  members' code in ``/nuclide/functions/<name>/<version>``. A code-only change rebuilds only this
  layer. Removed once no container uses it. The runtime image itself (what pool containers run)
  carries no ``nuclide.kind`` label and is never collected.

Containers carry ``nuclide.*`` labels (namespace, group, version, instance, functions; a pool
container generic ones, and the deployer records what it became), use the host network, a
read-only root filesystem with a tmpfs ``/tmp`` (and the code directory a writable copy in a tmpfs,
``/nuclide/work/<name>/<version>``, as writable as on the process backend), no capabilities, no-new-privileges, user 65534,
memory, CPU and pids limits, and no mounts at all: the instance config travels in the environment
(or a pool container's stdin), so nothing depends on host paths and the deployer works the
same when it runs in a container itself. The memory limit is also the instance's RLIMIT_DATA (as
with the process backend), so a handler that allocates too much gets a MemoryError the runtime
answers with the limit's name; only what escapes it (shared memory, /tmp) meets the kernel's OOM
killer, which the exit report then names.

One thread per container copies its output to the instance's log file (what ``nuclide logs`` and
the reconciler's failure reports read) and reports its exit; instances outlive the deployer and
the next one adopts them by their labels (a pool container by its record). The namespace label
keeps deployers with different state directories (test stacks, compose projects) from touching
each other's containers.

An engine that stops answering is logged once; starts wait for it to come back (a monitor pings it
every few seconds, then adopts what runs and removes what exited meanwhile) instead of failing.
The docker SDK is synchronous: every call runs in a daemon thread of its own, so a slow engine
never blocks the loop or the process's exit. This module is longer than most because it is one
backend (images, containers, logs, adoption, engine liveness), one module per platform; the warm
pool and registered runtimes' runners (with their own pool, ``shell_pool.py``) have modules of their own.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import io
import json
import os
import re
import secrets
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import docker
import docker.errors
import docker.types
import requests

from shared.config import Settings
from shared.errors import BuildFailed, Unavailable
from shared.logs import get_logger
from services.deployer.backends.base import Backend, ExitCallback, InstanceHandle, InstanceSpec
from services.deployer.backends.docker_pool import POOL_LABEL, WarmPool
from services.deployer.backends.shell import PY_WORK_DIR, Runners, is_per_call, is_shell
from services.deployer.builder import Builder, env_key, tail
from services.runtime.shell_box import UID

log = get_logger(__name__)

T = TypeVar("T")

ENV_REPO = "nuclide-env"
GROUP_REPO = "nuclide-fn"
FUNCTIONS_DIR = "/nuclide/functions"
ENVS_DIR = "/nuclide/envs"
CONFIG_ENV = "NUCLIDE_INSTANCE_CONFIG_JSON"
CONFIG_PATH = "/tmp/nuclide-instance.json"
USER = f"{UID}:{UID}"  # nobody: owns nothing in the image
PIDS_LIMIT = 512
TMPFS_MAX_BYTES = 256 * 1024 * 1024  # /tmp is memory: the container's memory limit caps it too
LOG_MAX_SIZE, LOG_MAX_FILES = "10m", "3"  # the engine's copy of an instance's output
API_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 5.0
PING_INTERVAL_S = 2.0  # engine liveness checks; also how fast a returning engine is noticed
COLLECT_INTERVAL_S = 60.0  # unused images are removed after stops, and at least this often
EXIT_REPORT_TIMEOUT_S = 15.0  # after a stop: how long to wait for the exit to be reported
ENGINE_ERRORS = (docker.errors.DockerException, requests.RequestException, OSError)
NAMESPACE_FILE = "docker-namespace"
# an image-built instance's start: copy each (source, destination) pair of code directories, then serve in
# the first; a copy that fails is a function that cannot load (exit 3), named on stderr for the deploy's answer
COPY_AND_SERVE = f'''first=$2
while [ "$#" -gt 0 ]; do
  mkdir -p "$2" && cp -R "$1"/. "$2"/ || {{ echo "nuclide: could not copy the code from $1 into $2" >&2; exit 3; }}
  shift 2
done
cd "$first" || exit 3
printf "%s" "${CONFIG_ENV}" > {CONFIG_PATH} && exec python3 -m services.runtime {CONFIG_PATH}
'''

# what the env image's RUN step executes: the process builder's steps, in the image
BUILD_SCRIPT = r'''"""nuclide: install a function's dependencies into this environment's site directory."""
import json, os, subprocess, sys

here = os.path.dirname(os.path.abspath(__file__))
env_dir = os.path.dirname(here)
site = os.path.join(env_dir, "site")
os.makedirs(site, exist_ok=True)
# python, python3, pip and pip3 run this interpreter, whatever the image's PATH holds
tools = "/tmp/nuclide-tools"
os.makedirs(tools, exist_ok=True)
for name, args in (("python", ""), ("python3", ""), ("pip", " -m pip"), ("pip3", " -m pip")):
    with open(os.path.join(tools, name), "w") as fh:
        fh.write("#!/bin/sh\nexec %s%s \"$@\"\n" % (sys.executable, args))
    os.chmod(os.path.join(tools, name), 0o755)
env = dict(os.environ, PIP_TARGET=site, PYTHONPATH=site, HOME="/tmp",
           PATH=tools + ":" + site + "/bin:" + os.environ.get("PATH", "/usr/bin:/bin"),
           PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
ca = os.path.join(here, "ca.pem")
if os.path.exists(ca):  # the deployer's trust store, for a TLS-intercepting proxy
    env.update(PIP_CERT=ca, SSL_CERT_FILE=ca, REQUESTS_CA_BUNDLE=ca)
steps = []
requirements = os.path.join(here, "requirements.txt")
if os.path.exists(requirements):
    steps.append(("pip install -r requirements.txt",
                  [sys.executable, "-m", "pip", "install", "--no-input", "--target", site, "-r", requirements]))
with open(os.path.join(here, "commands.json")) as fh:
    for command in json.load(fh):
        steps.append((command, ["/bin/sh", "-c", command]))
for title, argv in steps:
    print("$ " + title, flush=True)
    code = subprocess.call(argv, cwd=env_dir, env=env, stdin=subprocess.DEVNULL)
    if code != 0:
        print("nuclide-build-failed: build step '%s' exited with code %d" % (title, code), flush=True)
        sys.exit(code)
'''
FAILED_STEP = "nuclide-build-failed: "
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # the engine colours a step's stderr
BUILD_NOISE = ("Step ", " ---> ", "Removing intermediate container", "Successfully built", "Successfully tagged")


class EngineLost(Unavailable):
    """The engine stopped answering (not: it refused something); whatever needs it waits for it."""


class DockerBuilder(Builder):
    """Code as the process backend has it; dependencies become a recipe the backend builds into an image.

    ``ensure_env`` installs nothing on this host: the directory it returns (the instance spec's
    ``deps_dir``) holds requirements.txt and commands.json for the env image's build.
    """

    async def ensure_env(self, spec: dict[str, Any]) -> Path | None:
        key = env_key(spec)
        if key is None:
            return None
        recipe = self.var / "docker" / "recipes" / key
        if (recipe / "commands.json").exists():
            return recipe
        tmp = recipe.parent / f".{key}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir(parents=True)
        requirements = (spec.get("requirements") or "").strip()
        if requirements:
            (tmp / "requirements.txt").write_text(requirements + "\n")
        (tmp / "commands.json").write_text(json.dumps([str(c) for c in spec.get("build_commands") or []]))
        try:
            os.replace(tmp, recipe)
        except OSError:  # built concurrently: theirs is the same
            for leftover in tmp.iterdir():
                leftover.unlink()
            tmp.rmdir()
        return recipe


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _tree_hash(path: Path) -> str:
    """A hash of a directory's file names, modes and contents."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            h.update(f"{full.relative_to(path)}\0{full.lstat().st_mode & 0o111}\0".encode())
            if full.is_file() and not full.is_symlink():
                with open(full, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            h.update(b"\0")
    return h.hexdigest()


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Build context entries owned by root and readable by the instance's user, nothing else kept."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
    return info


def _label_line(labels: dict[str, str]) -> str:
    """A Dockerfile LABEL instruction; right after FROM, so every layer of the build carries the labels."""
    return "LABEL " + " ".join(f"{key}={json.dumps(value)}" for key, value in labels.items())


def _parse_timestamp(text: str) -> float | None:
    """RFC 3339 with nanoseconds, as the engine prefixes log lines, to Unix seconds."""
    try:
        whole, _, frac = text.rstrip("Z").partition(".")
        return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{frac or 0}")
    except ValueError:
        return None


def _load_namespace(settings: Settings, var: Path) -> str:
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


def _memory_limit(api: docker.APIClient, container_id: str) -> int | None:
    """The memory limit a container runs with (its label; the engine's record as a fallback)."""
    try:
        info = api.inspect_container(container_id)
        labels = info["Config"].get("Labels") or {}
        return int(labels.get("nuclide.memory_bytes") or info["HostConfig"].get("Memory") or 0)
    except (*ENGINE_ERRORS, KeyError, ValueError):
        return None


def _in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> "asyncio.Future[T]":
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


class DockerBackend(Backend):
    name = "docker"

    def __init__(self, settings: Settings, on_exit: ExitCallback) -> None:
        super().__init__(on_exit)
        self.settings = settings
        self.var = settings.var_dir.resolve()
        self.namespace = _load_namespace(settings, self.var)
        self.client: docker.DockerClient | None = None
        self.handles: dict[str, InstanceHandle] = {}
        self.containers: dict[str, str] = {}  # instance id -> container id
        self._reported: dict[str, asyncio.Future] = {}  # instance id -> set once its exit is reported
        self._up = asyncio.Event()
        self._down_logged = False
        self._locks: dict[str, asyncio.Lock] = {}
        # image removal never overlaps a start: a start waits for a running collection, and a
        # collection asked for during starts runs after the last one (images have no other owner)
        self._starting = 0
        self._collected = asyncio.Event()  # set while no collection runs
        self._collected.set()
        self._collect_wanted = False
        self._monitor: asyncio.Task | None = None
        self._closed = False
        # group id -> the version the deployer wants; None until it knows (no tagged group image is
        # removed then). Set by the service: a function scaled to zero keeps its image, a deleted one
        # loses it, and a deployer that stops its instances on exit leaves no image behind.
        self.wanted_versions: Callable[[], dict[str, int] | None] = lambda: None
        self.runners = Runners(self)  # instances of functions on registered runtimes
        self.pool = WarmPool(self)  # started runtime containers that become instances of Python groups

    async def check_image(self, image: str) -> dict[str, Any]:
        """A registered runtime's image must be local: its id, or a 400 naming it (503 without an engine)."""
        return await self.runners.check_image(image)

    # ----- the engine -------------------------------------------------------------------

    def _connect(self) -> docker.DockerClient:
        client = docker.DockerClient(base_url=self.settings.docker_host, version="auto", timeout=CONNECT_TIMEOUT_S,
                                     max_pool_size=32)
        client.api.timeout = API_TIMEOUT_S
        return client

    def _engine_down(self, error: Exception) -> None:
        self._up.clear()
        client, self.client = self.client, None
        if client is not None:
            client.close()
        if not self._down_logged:
            self._down_logged = True
            log.error("Docker Engine not reachable: instances start once it is back (retrying every"
                      f" {PING_INTERVAL_S:g} s); start dockerd or set docker_host",
                      docker_host=self.settings.docker_host, error=str(error)[:200])

    def _engine_up(self, client: docker.DockerClient) -> None:
        self.client = client
        if self._down_logged:
            log.info("Docker Engine reachable again", docker_host=self.settings.docker_host)
        self._down_logged = False
        self._up.set()

    async def _watch_engine(self) -> None:
        next_collection = time.monotonic() + COLLECT_INTERVAL_S
        while not self._closed:
            if self._up.is_set() and time.monotonic() > next_collection:
                next_collection = time.monotonic() + COLLECT_INTERVAL_S
                asyncio.ensure_future(self._collect_images())  # what stops alone do not catch: deletes at zero
            try:
                if self.client is None:
                    # (re)connected: adopt what runs untracked, remove what exited while nobody could
                    client = await _in_thread(self._connect)
                    running = await _in_thread(self._scan, client, set(self.containers.values()))
                    adopted = self._register_adopted(client, running)
                    if adopted:
                        log.info("adopted running instances", count=len(adopted))
                    self._engine_up(client)
                    self.pool.engine_back()
                    self.runners.engine_back()
                else:
                    await _in_thread(self.client.ping)
            except ENGINE_ERRORS as exc:
                self._engine_down(exc)
            await asyncio.sleep(PING_INTERVAL_S)

    def _ensure_monitor(self) -> None:
        if self._monitor is None:
            self._monitor = asyncio.ensure_future(self._watch_engine())

    def _require(self) -> docker.DockerClient:
        client = self.client
        if client is None:
            raise EngineLost(f"the Docker Engine at {self.settings.docker_host} is not reachable")
        return client

    async def _api(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """An engine call off the loop; a lost engine becomes EngineLost (a start waits for it to return)."""
        try:
            return await _in_thread(fn, *args, **kwargs)
        except docker.errors.APIError:
            raise
        except ENGINE_ERRORS as exc:
            client = self.client
            try:  # a local failure (a file, a timeout of one call) is not a lost engine
                if client is not None and await _in_thread(client.ping):
                    raise Unavailable(f"a Docker Engine call failed: {type(exc).__name__}: {exc}") from None
            except ENGINE_ERRORS:
                pass
            self._engine_down(exc)
            raise EngineLost(f"the Docker Engine at {self.settings.docker_host} is not reachable: {exc}") from None

    def close(self) -> None:
        self._closed = True
        if self._monitor is not None:
            self._monitor.cancel()
        self.pool.close()
        self.runners.close()

    # ----- adoption -----------------------------------------------------------------------

    def _labels_filter(self, *extra: str) -> dict[str, Any]:
        return {"label": [f"nuclide.namespace={self.namespace}", "nuclide.managed=true", *extra]}

    def _scan(self, client: docker.DockerClient, tracked: set[str]) -> list[dict[str, Any]]:
        """This namespace's running containers; the exited ones leave their output in their log files and go.

        ``tracked`` containers have a follower, which does that itself.
        """
        running = []
        held = self.pool.known()
        for c in client.api.containers(all=True, filters=self._labels_filter()):
            if c["Id"] in tracked or c["Id"] in held:
                continue
            labels = c.get("Labels") or {}
            if POOL_LABEL in labels:
                # a pool container is an instance once its record says the frame was sent; an idle one
                # (no record) or one a deployer died specialising ("pending") goes
                record = self.pool.record(c["Id"])
                if record is None or record.get("state") != "sent":
                    try:
                        client.api.remove_container(c["Id"], force=True)
                        self.pool.forget(c["Id"])
                    except (docker.errors.APIError, OSError) as exc:
                        log.warning("could not remove a pool container", container=c["Id"][:12], error=str(exc))
                    continue
                c = dict(c, Labels={**labels, **record.get("labels", {})})
                labels = c["Labels"]
            if c.get("State") == "running":
                running.append(c)
                continue
            try:
                if labels.get("nuclide.log_path"):
                    path = Path(labels["nuclide.log_path"])
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(client.api.logs(c["Id"]))
                client.api.remove_container(c["Id"], force=True)
                self.pool.forget(c["Id"])
            except (docker.errors.APIError, OSError) as exc:
                log.warning("could not remove an exited container", container=c["Id"][:12], error=str(exc))
        return running

    def _register_adopted(self, client: docker.DockerClient, running: list[dict[str, Any]]) -> list[InstanceHandle]:
        adopted = []
        for c in running:
            labels = c.get("Labels") or {}
            try:
                handle = InstanceHandle(labels["nuclide.instance"], labels["nuclide.group"],
                                        int(labels["nuclide.group_version"]), None, Path(labels["nuclide.log_path"]),
                                        float(c.get("Created") or time.time()),
                                        tuple(n for n in labels.get("nuclide.functions", "").split(",") if n),
                                        adopted=True)
            except (KeyError, ValueError):
                continue
            if handle.id in self.handles:
                continue
            self._track(client, handle, c["Id"], truncate_log=True)
            adopted.append(handle)
        return adopted

    def adopt(self) -> list[InstanceHandle]:
        runners = self.runners.adopt()
        try:
            client = self._connect()
            running = self._scan(client, set())
            self.pool.prune(client)
            self.runners.pool.prune(client, self.runners.taken_containers())
        except ENGINE_ERRORS as exc:
            self._engine_down(exc)
            self._ensure_monitor()
            return runners
        adopted = runners + self._register_adopted(client, running)
        self._engine_up(client)
        self._ensure_monitor()
        asyncio.ensure_future(self._collect_images())
        self.pool.refill_soon(0)
        self.runners.pool.refill_soon(0)
        if runners:
            self.runners.spares.refill_soon(0)
        return adopted

    def list(self) -> list[InstanceHandle]:
        return list(self.handles.values())

    def knows_all(self) -> bool:
        return self._up.is_set()  # while the engine is away, containers it runs are not adopted yet

    # ----- images ---------------------------------------------------------------------------

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _image_labels(self, client: docker.DockerClient, ref: str) -> dict[str, str] | None:
        try:
            return client.api.inspect_image(ref)["Config"].get("Labels") or {}
        except docker.errors.ImageNotFound:
            return None

    def _ca_bundle(self) -> bytes | None:
        setting = self.settings.build_ca_bundle
        if setting in ("", "none"):
            return None
        path = Path("/etc/ssl/certs/ca-certificates.crt" if setting == "auto" else setting)
        try:
            return path.read_bytes()
        except OSError:
            if setting != "auto":
                log.warning("build_ca_bundle cannot be read; builds get no CA bundle", path=str(path))
            return None

    def _build(self, client: docker.DockerClient, tag: str, dockerfile: str, files: dict[str, bytes],
               dirs: dict[str, Path]) -> str:
        """Build an image from a Dockerfile, files and directories; returns the build output (noise removed)."""
        deadline = time.monotonic() + self.settings.build_timeout_s
        lines: list[str] = []
        layers: list[str] = []  # image ids of the steps, to remove what a failed build leaves
        step: str | None = None  # the failed build step, as build.py names it
        failed: str | None = None
        with tempfile.TemporaryFile() as ctx:
            with tarfile.open(fileobj=ctx, mode="w") as tar:
                for name, data in {"Dockerfile": dockerfile.encode(), **files}.items():
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                    tar.addfile(info, io.BytesIO(data))
                for name, path in dirs.items():
                    tar.add(str(path), arcname=name, filter=_normalize)
            ctx.seek(0)
            stream = client.api.build(fileobj=ctx, custom_context=True, tag=tag, rm=True, forcerm=True, pull=False,
                                      network_mode="host", decode=True,
                                      timeout=self.settings.build_timeout_s)
            try:
                # a build quiet for build_timeout_s ends in a read timeout: that is the build, not the engine
                for chunk in stream:
                    if "stream" in chunk:
                        for line in ANSI_ESCAPE.sub("", str(chunk["stream"])).splitlines():
                            if line.startswith(" ---> ") and " " not in line[6:].strip():
                                layers.append(line[6:].strip())
                            elif line.startswith(FAILED_STEP):
                                step = line[len(FAILED_STEP):]
                            elif line.strip() and not line.startswith(BUILD_NOISE):
                                lines.append(line)
                    if "error" in chunk:
                        failed = str(chunk["error"]).strip()
                    if time.monotonic() > deadline:
                        failed = f"timed out after {self.settings.build_timeout_s:g} s"
                        break
            except ENGINE_ERRORS:
                if time.monotonic() < deadline - 1:
                    raise
                failed = f"timed out after {self.settings.build_timeout_s:g} s"
            finally:
                stream.close()  # a build left behind is cancelled by the engine when its client goes
        text = "\n".join(lines)
        if failed is not None:
            for layer in reversed(layers):  # untagged ones only: the first is the tagged image built FROM
                try:
                    if not client.api.inspect_image(layer).get("RepoTags"):
                        client.api.remove_image(layer)
                except docker.errors.APIError:
                    pass
            message = step or f"image build failed: {failed}"
            raise BuildFailed(message, {"log_tail": tail(text + ("" if step else "\n" + failed))})
        return text

    def runtime_image(self, python: str | None = None) -> str:
        """The image instances run: the runtime image, or for a function on another Python 3 (``python``
        "3.X") the runtime built on the Debian release that ships it, ``<runtime image>-py3.X`` (make images
        with NUCLIDE_IMAGE_PYTHONS)."""
        image = self.settings.runtime_image
        if not python:
            return image
        repo, sep, tag = image.rpartition(":")
        if not sep or "/" in tag:  # no tag: the reference means :latest
            repo, tag = image, "latest"
        return f"{repo}:{tag}-py{python}"

    async def python_check(self, version: str) -> dict[str, Any]:
        image = self.runtime_image(version)
        try:
            labels = await self._api(self._image_labels, self._require(), image)
        except (EngineLost, *ENGINE_ERRORS) as exc:
            return {"available": False, "detail": f"the Docker Engine did not answer ({str(exc)[:200]})"}
        if labels is None:
            return {"available": False, "detail": f"the docker backend has no image {image} (build it with"
                                                  f" NUCLIDE_IMAGE_PYTHONS={version} make images)"}
        return {"available": True, "detail": image}

    async def _runtime_image_id(self, image: str | None = None) -> str:
        client = self._require()
        image = image or self.settings.runtime_image
        labels = await self._api(self._image_labels, client, image)
        if labels is None:
            raise BuildFailed(f"the runtime image '{image}' is not in the local Docker Engine;"
                              " build it with 'make images' (nothing is pulled from a registry)")
        info = await self._api(client.api.inspect_image, image)
        return str(info["Id"])

    async def _env_image(self, runtime_id: str, recipe: Path, runtime_image: str | None = None) -> tuple[str, str]:
        """The env image of a recipe directory, built when missing; returns (key, tag)."""
        client = self._require()
        requirements = (recipe / "requirements.txt").read_text() if (recipe / "requirements.txt").exists() else ""
        commands = (recipe / "commands.json").read_text()
        key = _digest("env", runtime_id, requirements, commands, BUILD_SCRIPT)[:24]  # a new script is a new image
        tag = f"{ENV_REPO}:{key}"
        async with self._lock(tag):
            if await self._api(self._image_labels, client, tag) is not None:
                return key, tag
            started = time.monotonic()
            files = {"recipe/build.py": BUILD_SCRIPT.encode(), "recipe/commands.json": commands.encode()}
            if requirements:
                files["recipe/requirements.txt"] = requirements.encode()
            ca = self._ca_bundle()
            if ca:
                files["recipe/ca.pem"] = ca
            target = f"{ENVS_DIR}/{key}"
            labels = {"nuclide.kind": "env", "nuclide.env": key, "nuclide.runtime": runtime_id}
            dockerfile = (f"FROM {runtime_image or self.settings.runtime_image}\n"
                          f"{_label_line(labels)}\n"
                          "USER 0:0\n"
                          f"COPY recipe/ {target}/.recipe/\n"
                          f'RUN ["chown", "-R", "{USER}", "{target}"]\n'
                          f"USER {USER}\n"
                          f'RUN ["python3", "{target}/.recipe/build.py"]\n')
            log.info("building dependencies image", image=tag)
            try:
                await self._api(self._build, client, tag, dockerfile, files, {})
            except docker.errors.APIError as exc:
                raise BuildFailed(f"image build failed: {exc.explanation or exc}") from None
            log.info("dependencies image built", image=tag, took_s=round(time.monotonic() - started, 2))
            return key, tag

    async def _group_image(self, spec: InstanceSpec) -> tuple[str, list[dict[str, Any]]]:
        """The group version's image, built when missing; returns its tag and the functions' in-image config."""
        client = self._require()
        base = self.runtime_image(next((fc["python"] for fc in spec.functions if fc.get("python")), None))
        runtime_id = await self._runtime_image_id(base)
        envs: dict[str, str] = {}  # env key -> env image tag
        functions: list[dict[str, Any]] = []
        code_dirs: dict[str, Path] = {}
        inputs: list[Any] = [runtime_id]
        for i, fc in enumerate(spec.functions):
            in_image = dict(fc, code_dir=f"{FUNCTIONS_DIR}/{fc['name']}/{fc['version']}", deps_dir=None)
            if fc.get("deps_dir"):
                key, env_tag = await self._env_image(runtime_id, Path(fc["deps_dir"]), base)
                envs.setdefault(key, env_tag)
                in_image["deps_dir"] = f"{ENVS_DIR}/{key}/site"
            code_dirs[f"code{i}"] = Path(fc["code_dir"])
            inputs.append([fc["name"], fc["version"], in_image["deps_dir"],
                           await _in_thread(_tree_hash, Path(fc["code_dir"]))])
            functions.append(in_image)
        if envs:
            base = next(iter(envs.values()))
        inputs_hash = _digest(inputs, base)[:24]
        tag = f"{GROUP_REPO}:{self.namespace}-{spec.group_id}-v{spec.group_version}"
        async with self._lock(tag):
            labels = await self._api(self._image_labels, client, tag)
            if labels is not None and labels.get("nuclide.inputs") == inputs_hash:
                return tag, functions
            labels = {"nuclide.kind": "group", "nuclide.namespace": self.namespace, "nuclide.group": spec.group_id,
                      "nuclide.group_version": str(spec.group_version), "nuclide.envs": ",".join(envs),
                      "nuclide.inputs": inputs_hash, "nuclide.env": ""}
            lines = [f"FROM {base}", _label_line(labels)]
            lines += [f"COPY --from={env_tag} {ENVS_DIR}/{key}/ {ENVS_DIR}/{key}/"
                      for key, env_tag in list(envs.items())[1:]]
            lines += [f"COPY code{i}/ {fc['code_dir']}/" for i, fc in enumerate(functions)]
            started = time.monotonic()
            try:
                await self._api(self._build, client, tag, "\n".join(lines) + "\n", {}, code_dirs)
            except docker.errors.APIError as exc:
                raise BuildFailed(f"image build failed: {exc.explanation or exc}") from None
            log.info("image built", image=tag, took_s=round(time.monotonic() - started, 2))
        return tag, functions

    def _collect_images_sync(self, client: docker.DockerClient, wanted: dict[str, int] | None) -> list[str]:
        """Remove this namespace's group images no container uses and no wanted version is, and env
        images beyond the cache.

        Never runs during one of this deployer's starts. Env images are shared by every namespace,
        so an untagged one (a layer of a build, perhaps another deployer's, in progress) only goes
        once it is older than any build can take.
        """
        removed: list[str] = []
        stale_before = time.time() - self.settings.build_timeout_s

        def remove(image: dict[str, Any]) -> None:
            tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
            try:
                client.api.remove_image(image["Id"], force=len(tags) > 1)
                removed.extend(tags or [image["Id"][7:19]])
            except docker.errors.APIError:
                pass  # a container or a newer build uses it now, or it is gone already

        used = {c["ImageID"] for c in client.api.containers(all=True, filters={"label": "nuclide.managed=true"})}
        mine = {"label": ["nuclide.kind=group", f"nuclide.namespace={self.namespace}"]}
        for image in client.api.images(filters=mine):
            labels = image.get("Labels") or {}
            tagged = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
            if image["Id"] in used or (tagged and wanted is None):
                continue
            if tagged and str(wanted.get(labels.get("nuclide.group", ""), "")) == labels.get("nuclide.group_version"):
                continue  # the wanted version, perhaps scaled to zero: kept for the next start
            remove(image)
        referenced: set[str] = set()
        for image in client.api.images(filters={"label": "nuclide.kind=group"}):
            referenced.update(k for k in ((image.get("Labels") or {}).get("nuclide.envs") or "").split(",") if k)
        cached: list[dict[str, Any]] = []
        for image in client.api.images(filters={"label": "nuclide.kind=env"}):
            if image["Id"] in used or (image.get("Labels") or {}).get("nuclide.env") in referenced:
                continue
            if any(t.startswith(f"{ENV_REPO}:") for t in image.get("RepoTags") or []):
                cached.append(image)
            elif (image.get("Created") or 0) < stale_before:
                remove(image)
        cached.sort(key=lambda image: image.get("Created") or 0, reverse=True)
        for image in cached[self.settings.docker_image_cache:]:
            remove(image)
        return removed

    async def _collect_images(self) -> None:
        """Remove unused images now, or after the starts in progress; a caller during a collection waits for it."""
        self._collect_wanted = True
        if self._starting:
            return  # the last start to finish runs it
        if not self._collected.is_set():
            await self._collected.wait()  # the running collection goes round once more for this caller
            return
        client = self.client
        if client is None:
            return
        self._collected.clear()
        try:
            while self._collect_wanted:
                self._collect_wanted = False
                try:
                    removed = await _in_thread(self._collect_images_sync, client, self.wanted_versions())
                except ENGINE_ERRORS as exc:
                    log.warning("could not remove unused images", error=str(exc)[:200])
                    return
                if removed:
                    log.info("removed unused images", images=removed)
        finally:
            self._collected.set()

    # ----- instances ----------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> InstanceHandle:
        self._ensure_monitor()
        while not self._collected.is_set():
            await self._collected.wait()
        self._starting += 1
        try:
            while True:
                # while the engine is away a start waits for it (the monitor said so once), no error each time
                await self._up.wait()
                try:
                    if is_shell(spec):
                        return await self.runners.start_shell(spec)
                    if not is_per_call(spec) and self.pool.eligible(spec):
                        names = [fc["name"] for fc in spec.functions]
                        handle = await self.pool.start(spec, self._instance_labels(spec, names))
                        if handle is not None:
                            return handle
                    image, functions = await self._group_image(spec)
                    if is_per_call(spec):  # warmStart none/runtime: the runner drives per-call containers
                        return await self.runners.start(spec, image, self._instance_config(spec, functions))
                    return await self._run(spec, image, functions)
                except EngineLost:
                    continue
        finally:
            self._starting -= 1
            if not self._starting and self._collect_wanted:
                asyncio.ensure_future(self._collect_images())

    def _instance_config(self, spec: InstanceSpec, functions: list[dict[str, Any]]) -> dict[str, Any]:
        """What services.runtime (and services.runtime.once) read: the functions as they are in the image."""
        return {
            "instance_id": spec.id,
            "group": spec.group_id,
            "group_version": spec.group_version,
            "gateways": [self.settings.gateway_router],
            "gateway_url": self.settings.http_url,
            "fusionizer_host": self.settings.advertised_host,
            "memory_bytes": spec.memory_bytes,
            "functions": functions,
        }

    def _instance_labels(self, spec: InstanceSpec, names: list[str]) -> dict[str, str]:
        """What identifies an instance's container (a pool container's record holds the same)."""
        labels = {
            "nuclide.managed": "true",
            "nuclide.namespace": self.namespace,
            "nuclide.group": spec.group_id,
            "nuclide.group_version": str(spec.group_version),
            "nuclide.instance": spec.id,
            "nuclide.functions": ",".join(names),
            "nuclide.memory_bytes": str(int(spec.memory_bytes)),
            "nuclide.log_path": str(spec.log_path),
        }
        if len(names) == 1:
            labels["nuclide.function"] = names[0]
        return labels

    def _host_config(self, client: docker.DockerClient, memory: int, cpu: Any, data_limit: bool = True,
                     extra_tmpfs: dict[str, str] | None = None, pids: int | None = None,
                     scratch_bytes: int | None = None) -> dict[str, Any]:
        """An instance's lockdown and limits (a pool container's too: it sets its data limit itself).

        ``pids`` and ``scratch_bytes`` are the function's spec.resources.limits.pids and
        ephemeral-storage: its process limit, and the size of its /tmp and of its /dev/shm
        (private to the container: ipc mode private, never shareable)."""
        scratch = scratch_bytes or min(memory, TMPFS_MAX_BYTES)
        return client.api.create_host_config(
            network_mode="host", read_only=True, cap_drop=["ALL"], security_opt=["no-new-privileges"],
            tmpfs={"/tmp": f"rw,noexec,nosuid,nodev,mode=1777,size={scratch}", **(extra_tmpfs or {})},
            ipc_mode="private", shm_size=scratch,
            mem_limit=memory, memswap_limit=memory, nano_cpus=int(float(cpu) * 1e9) if cpu else None,
            pids_limit=pids or PIDS_LIMIT,
            ulimits=[docker.types.Ulimit(name="data", soft=memory, hard=memory)] if data_limit else None,
            log_config=docker.types.LogConfig(type="json-file", config={"max-size": LOG_MAX_SIZE,
                                                                        "max-file": LOG_MAX_FILES}),
        )

    @staticmethod
    def _container_env() -> dict[str, str]:
        return {"HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
                "MALLOC_ARENA_MAX": "2"}

    async def _run(self, spec: InstanceSpec, image: str, functions: list[dict[str, Any]]) -> InstanceHandle:
        client = self._require()
        # the code directory is writable scratch, as on the process backend: each member's code is copied
        # from the image (read-only root) into a tmpfs at start, a few ms, and the instance runs there
        copies: list[str] = []
        running = []
        for fc in functions:
            here = f"{PY_WORK_DIR}/{fc['name']}/{fc['version']}"
            copies += [fc["code_dir"], here]
            running.append(dict(fc, code_dir=here))
        config = self._instance_config(spec, running)
        memory = int(spec.memory_bytes)
        names = [f["name"] for f in functions]
        labels = self._instance_labels(spec, names)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        spec.log_path.touch()

        def create() -> tuple[str, int | None]:
            size = int(spec.extra.get("scratch_bytes") or min(memory, TMPFS_MAX_BYTES))
            host_config = self._host_config(client, memory, spec.extra.get("cpu"), pids=spec.extra.get("pids"),
                                            scratch_bytes=spec.extra.get("scratch_bytes"), extra_tmpfs={
                PY_WORK_DIR: f"rw,exec,nosuid,nodev,uid={UID},gid={UID},mode=0700,size={size}"})
            created = client.api.create_container(
                image, name=f"nuclide-{self.namespace}-{spec.id}", labels=labels, user=USER,
                working_dir=PY_WORK_DIR, host_config=host_config, use_config_proxy=False,
                command=["/bin/sh", "-c", COPY_AND_SERVE, "nuclide-instance", *copies],
                environment={CONFIG_ENV: json.dumps(config), **self._container_env()},
            )
            try:
                client.api.start(created["Id"])
                pid = client.api.inspect_container(created["Id"])["State"].get("Pid") or None
            except BaseException:
                client.api.remove_container(created["Id"], force=True)
                raise
            return created["Id"], pid

        try:
            container_id, pid = await self._api(create)
        except docker.errors.APIError as exc:
            if exc.is_server_error():
                raise Unavailable(f"the Docker Engine could not start the container: {exc.explanation or exc}") \
                    from None
            raise BuildFailed(f"the Docker Engine refused the container: {exc.explanation or exc}") from None
        if spec.id in self.handles:  # a reconnect's scan adopted it meanwhile
            return self.handles[spec.id]
        handle = InstanceHandle(spec.id, spec.group_id, spec.group_version, pid, spec.log_path, time.time(),
                                tuple(names))
        self._track(client, handle, container_id, truncate_log=False)
        return handle

    def _track(self, client: docker.DockerClient, handle: InstanceHandle, container_id: str,
               truncate_log: bool) -> None:
        """Watch a container: its output goes to the handle's log file, its exit to on_exit."""
        loop = asyncio.get_running_loop()
        self.handles[handle.id] = handle
        self.containers[handle.id] = container_id
        self._reported[handle.id] = loop.create_future()
        # a client of its own: a follow stream holds its connection for the container's lifetime
        version = client.api.api_version

        def report(code: int | None) -> None:
            try:
                loop.call_soon_threadsafe(self._exited, handle, code)
            except RuntimeError:  # the deployer is gone; the next one reads the output from the engine
                pass

        def follow() -> None:
            api = docker.APIClient(base_url=self.settings.docker_host, version=version, timeout=API_TIMEOUT_S)
            try:
                report(self._follow(api, handle, container_id, truncate_log))
            finally:
                api.close()

        threading.Thread(target=follow, daemon=True, name=f"follow-{handle.id}").start()

    def _follow(self, api: docker.APIClient, handle: InstanceHandle, container_id: str, truncate: bool) -> int | None:
        """Copy the output until the container exits (riding out engine restarts); remove it; its exit code."""
        since: float | None = None
        handle.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(handle.log_path, "wb" if truncate else "ab") as out:
            while True:
                try:
                    pending = b""
                    for chunk in api.logs(container_id, stream=True, follow=True, timestamps=True,
                                          since=since + 1e-6 if since else None):
                        pending += chunk
                        *lines, pending = pending.split(b"\n")
                        for line in lines:
                            stamp, _, text = line.partition(b" ")
                            since = _parse_timestamp(stamp.decode(errors="replace")) or since
                            out.write(text + b"\n")
                        out.flush()
                    if pending:
                        out.write(pending.partition(b" ")[2] + b"\n")
                        out.flush()
                    state = api.inspect_container(container_id)["State"]
                    if state.get("Running"):
                        time.sleep(0.1)
                        continue  # the stream broke, not the container
                    break
                except docker.errors.NotFound:
                    return None  # removed behind our back
                except ENGINE_ERRORS:
                    if self._closed:
                        return None
                    time.sleep(PING_INTERVAL_S)  # the engine went away: its containers too, or it comes back
            code = state.get("ExitCode")
            if state.get("OOMKilled"):
                limit_mib = (_memory_limit(api, container_id) or 0) // (1024 * 1024)
                out.write((f"nuclide: instance {handle.id} was killed by the kernel for using more than its memory"
                           f" limit of {limit_mib} MiB (spec.resources.limits.memory)\n").encode())
                out.flush()
        try:
            api.remove_container(container_id, force=True)
            self.pool.forget(container_id)
        except ENGINE_ERRORS:
            pass  # the next adoption scan removes it
        return int(code) if code is not None else None

    def _exited(self, handle: InstanceHandle, code: int | None) -> None:
        self.handles.pop(handle.id, None)
        self.containers.pop(handle.id, None)
        reported = self._reported.pop(handle.id, None)
        if reported is not None and not reported.done():
            reported.set_result(code)
        self.on_exit(handle, code)

    async def stop(self, handle: InstanceHandle, timeout_s: float) -> None:
        if self.runners.owns(handle.id):
            await self.runners.stop(handle, timeout_s)
            await self._collect_images()
            return
        container_id = self.containers.get(handle.id)
        if container_id is None or handle.id not in self.handles or self.client is None:
            return
        handle.stopping = True
        reported = self._reported.get(handle.id)
        try:
            # SIGTERM (the runtime drains and says BYE), SIGKILL after the timeout
            await self._api(self.client.api.stop, container_id, timeout=max(1, int(timeout_s)))
        except docker.errors.NotFound:
            pass
        except (docker.errors.APIError, Unavailable) as exc:
            log.warning("could not stop container", instance=handle.id, error=str(exc)[:200])
            return
        if reported is not None:
            try:
                await asyncio.wait_for(asyncio.shield(reported), EXIT_REPORT_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.error("container stopped but its exit was not reported", instance=handle.id)
        await self._collect_images()

