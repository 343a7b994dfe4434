"""The docker backend's images: builds of env and group images, their cache, and the removal of unused ones.

Images (classic builder, nothing is ever pulled):

- ``nuclide-env:<key>``: FROM the runtime image (``make images``), a function's requirements
  and build commands installed into ``/nuclide/envs/<key>/site``. The key hashes the runtime
  image id, requirements.txt and the build commands; functions with the same dependencies share
  it, and unused ones are kept as a cache (``docker_image_cache``).
- ``nuclide-fn:<namespace>-<group>-v<version>``: FROM the env image (or the runtime image), the
  members' code in ``/nuclide/functions/<name>/<version>``. A code-only change rebuilds only this
  layer. Removed once no container uses it. The runtime image itself (what pool containers run)
  carries no ``nuclide.kind`` label and is never collected.
- a registered runtime's function with a ``dependencies`` command (or another warm-start policy
  than ``function``) gets a ``nuclide-fn`` image too, built in two stages without any shell of ours::

    FROM <runtime image> AS build        USER 0, the code at <path>, WORKDIR <path>,
                                         RUN <dependencies argv> (exec form: no shell)
    FROM build                           + COPY --from=build <path>/ /nuclide/src/

  The copy in ``/nuclide/src`` is what a container's code directory (a tmpfs at ``<path>``: the
  root filesystem stays read-only) is filled from.

Image removal never overlaps a start (:meth:`Images.no_collection`): a start waits for a running
collection, and a collection asked for during starts runs after the last one (images have no
other owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import docker
import docker.errors

from shared.config import Settings
from shared.errors import BuildFailed
from shared.logs import get_logger
from services.deployer.backends.base import InstanceSpec
from services.deployer.backends.docker.engine import ENGINE_ERRORS, USER, Engine, EngineLost, in_thread
from services.deployer.backends.docker.runner import usernet
from services.deployer.backends.docker.runner.box import SRC_DIR
from services.deployer.builder import Builder, build_log_path, env_key, tail

log = get_logger(__name__)

ENV_REPO = "nuclide-env"
GROUP_REPO = "nuclide-fn"
FUNCTIONS_DIR = "/nuclide/functions"
ENVS_DIR = "/nuclide/envs"
CA_PATH = "/nuclide/ca.pem"

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


class DockerBuilder(Builder):
    """Code as the process backend has it; dependencies become a recipe the backend builds into an image.

    ``ensure_env`` installs nothing on this host: the directory it returns (the instance spec's
    ``deps_dir``) holds requirements.txt and commands.json for the env image's build.
    """

    async def ensure_env(self, spec: dict[str, Any], log_path: Path | None = None) -> Path | None:
        # log_path is the process builder's: nothing is built here (the image build, later, logs its own steps)
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
        if spec.get("network") == "host":  # its build steps get the host's network too (env_key tells them apart)
            (tmp / "network-host").write_text("")
        try:
            os.replace(tmp, recipe)
        except OSError:  # built concurrently: theirs is the same
            for leftover in tmp.iterdir():
                leftover.unlink()
            tmp.rmdir()
        return recipe


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tree_hash(path: Path) -> str:
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


def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Build context entries owned by root and readable by the instance's user, nothing else kept."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
    return info


def label_line(labels: dict[str, str]) -> str:
    """A Dockerfile LABEL instruction; right after FROM, so every layer of the build carries the labels."""
    return "LABEL " + " ".join(f"{key}={json.dumps(value)}" for key, value in labels.items())


def registered_dockerfile(base: str, path: str, dependencies: list[str], labels_line: str, with_ca: bool) -> str:
    """The two-stage build of a runtime function's image; user input only as JSON strings and checked paths."""
    lines = [f"FROM {base} AS build", labels_line, "USER 0:0", f"COPY code/ {path}/", f"WORKDIR {path}"]
    if with_ca:  # build arguments: in the RUN's environment, not in the image's
        lines += [f"COPY ca.pem {CA_PATH}"] + [f"ARG {key}={CA_PATH}" for key in
                                              ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")]
    if dependencies:
        lines.append("RUN " + json.dumps(dependencies))
    lines += ["FROM build", f"COPY --from=build {path}/ {SRC_DIR}/"]
    return "\n".join(lines) + "\n"


class Images:
    """Builds, caches and removes this deployer's images on one engine."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.namespace = engine.namespace
        self._locks: dict[str, asyncio.Lock] = {}
        self._starting = 0
        self._collected = asyncio.Event()  # set while no collection runs
        self._collected.set()
        self._collect_wanted = False
        # group id -> the version the deployer wants; None until it knows (no tagged group image is
        # removed then). Set by the service: a function scaled to zero keeps its image, a deleted one
        # loses it, and a deployer that stops its instances on exit leaves no image behind.
        self.wanted_versions: Callable[[], dict[str, int] | None] = lambda: None

    @contextlib.asynccontextmanager
    async def no_collection(self) -> AsyncIterator[None]:
        """A start: waits for a running collection; one asked for meanwhile runs after the last start."""
        while not self._collected.is_set():
            await self._collected.wait()
        self._starting += 1
        try:
            yield
        finally:
            self._starting -= 1
            if not self._starting and self._collect_wanted:
                asyncio.ensure_future(self.collect())

    def lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def image_labels(self, client: docker.DockerClient, ref: str) -> dict[str, str] | None:
        try:
            return client.api.inspect_image(ref)["Config"].get("Labels") or {}
        except docker.errors.ImageNotFound:
            return None

    def ca_bundle(self) -> bytes | None:
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

    def build(self, client: docker.DockerClient, tag: str, dockerfile: str, files: dict[str, bytes],
              dirs: dict[str, Path], network: str = "none", log_path: Path | None = None) -> str:
        """Build an image from a Dockerfile, files and directories; returns the build output (noise removed).

        ``network``: what its RUN steps reach. ``isolated`` (steps that run the user's commands): the network
        namespace of a holder container of their own, network mode none with slirp4netns attached
        (``runner/usernet.py``): outbound connections, nothing on the host's loopback; ``host``: the host's
        (``spec.network: host``); ``none``: nothing (a build that only copies files). ``log_path``: a file
        each line of output is appended to as the engine sends it (the group's build log)."""
        if network != "isolated":
            return self._build(client, tag, dockerfile, files, dirs, network, log_path)
        holder = self._network_holder(client)
        try:
            return self._build(client, tag, dockerfile, files, dirs, f"container:{holder}", log_path)
        finally:
            try:
                client.api.remove_container(holder, force=True)
            except docker.errors.APIError:
                pass  # gone already; the adoption scan removes what is left of this namespace

    def _network_holder(self, client: docker.DockerClient) -> str:
        """A started container that only holds a network namespace with slirp4netns on it, for a build's steps.

        A holder removed before it started (a ``docker container prune`` on the host takes containers that are
        only created) is made once more."""
        for attempt in (1, 2):
            try:
                return self._start_holder(client)
            except docker.errors.NotFound:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start_holder(self, client: docker.DockerClient) -> str:
        # removed by the engine once it exits: after the build, or on its own after the longest build can take
        host = client.api.create_host_config(
            network_mode="none", dns=[usernet.DNS], read_only=True, cap_drop=["ALL"], auto_remove=True,
            security_opt=["no-new-privileges"], pids_limit=8, mem_limit=32 * 1024 * 1024)
        created = client.api.create_container(
            self.settings.runtime_image, command=["sleep", str(int(self.settings.build_timeout_s) + 60)],
            entrypoint=[], user=USER, host_config=host, use_config_proxy=False,
            labels={"nuclide.build-network": self.namespace})  # not a namespace label: no scan removes it
        try:
            client.api.start(created["Id"])
            pid = client.api.inspect_container(created["Id"])["State"].get("Pid")
            usernet.attach(int(pid or 0), self.settings.var_dir.resolve() / "logs" / "slirp4netns.log")
        except BaseException as exc:
            try:
                client.api.remove_container(created["Id"], force=True)
            except docker.errors.APIError:
                pass  # gone already
            if isinstance(exc, usernet.NoUserNet):
                raise BuildFailed(f"the build could not get its network: {exc}") from None
            raise
        return str(created["Id"])

    @staticmethod
    def _build_line(line: str, lines: list[str], layers: list[str], out: Any) -> str | None:
        """One line of a build's output: a layer id, the failed step (returned), or output kept (and written
        to ``out`` at once, so a deploy that follows the log shows it now)."""
        if line.startswith(" ---> ") and " " not in line[6:].strip():
            layers.append(line[6:].strip())
        elif line.startswith(FAILED_STEP):
            return line[len(FAILED_STEP):]
        elif line.strip() and not line.startswith(BUILD_NOISE):
            lines.append(line)
            if out is not None:
                out.write(line + "\n")
                out.flush()
        return None

    def _build(self, client: docker.DockerClient, tag: str, dockerfile: str, files: dict[str, bytes],
               dirs: dict[str, Path], network_mode: str, log_path: Path | None = None) -> str:
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
                    tar.add(str(path), arcname=name, filter=normalize)
            ctx.seek(0)
            stream = client.api.build(fileobj=ctx, custom_context=True, tag=tag, rm=True, forcerm=True, pull=False,
                                      network_mode=network_mode, decode=True,
                                      timeout=self.settings.build_timeout_s)
            if log_path is not None:
                log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(log_path, "a") if log_path is not None else None
            try:
                # a build quiet for build_timeout_s ends in a read timeout: that is the build, not the engine
                partial = ""  # the engine cuts its stream anywhere, a line's middle included
                for chunk in stream:
                    if "stream" in chunk:
                        *complete, partial = (partial + ANSI_ESCAPE.sub("", str(chunk["stream"]))).split("\n")
                        for line in complete:
                            step = self._build_line(line.rstrip("\r"), lines, layers, out) or step
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
                if partial:
                    step = self._build_line(partial.rstrip("\r"), lines, layers, out) or step
                if out is not None:
                    out.close()
        text = "\n".join(lines)
        if failed is not None:
            if log_path is not None and not step:
                with open(log_path, "a") as fh:
                    fh.write(f"image build failed: {failed}\n")
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
            labels = await self.engine.api(self.image_labels, self.engine.require(), image)
        except (EngineLost, *ENGINE_ERRORS) as exc:
            return {"available": False, "detail": f"the Docker Engine did not answer ({str(exc)[:200]})"}
        if labels is None:
            return {"available": False, "detail": f"the docker backend has no image {image} (build it with"
                                                  f" NUCLIDE_IMAGE_PYTHONS={version} make images)"}
        return {"available": True, "detail": image}

    async def runtime_image_id(self, image: str | None = None) -> str:
        client = self.engine.require()
        image = image or self.settings.runtime_image
        labels = await self.engine.api(self.image_labels, client, image)
        if labels is None:
            raise BuildFailed(f"the runtime image '{image}' is not in the local Docker Engine;"
                              " build it with 'make images' (nothing is pulled from a registry)")
        info = await self.engine.api(client.api.inspect_image, image)
        return str(info["Id"])

    async def env_image(self, runtime_id: str, recipe: Path, runtime_image: str | None = None,
                        log_path: Path | None = None) -> tuple[str, str]:
        """The env image of a recipe directory, built when missing; returns (key, tag)."""
        client = self.engine.require()
        requirements = (recipe / "requirements.txt").read_text() if (recipe / "requirements.txt").exists() else ""
        commands = (recipe / "commands.json").read_text()
        network = "host" if (recipe / "network-host").exists() else "isolated"  # see DockerBuilder.ensure_env
        key = digest("env", runtime_id, requirements, commands, BUILD_SCRIPT,  # a new script is a new image
                     *(["network=host"] if network == "host" else []))[:24]
        tag = f"{ENV_REPO}:{key}"
        async with self.lock(tag):
            if await self.engine.api(self.image_labels, client, tag) is not None:
                return key, tag
            started = time.monotonic()
            files = {"recipe/build.py": BUILD_SCRIPT.encode(), "recipe/commands.json": commands.encode()}
            if requirements:
                files["recipe/requirements.txt"] = requirements.encode()
            ca = self.ca_bundle()
            if ca:
                files["recipe/ca.pem"] = ca
            target = f"{ENVS_DIR}/{key}"
            labels = {"nuclide.kind": "env", "nuclide.env": key, "nuclide.runtime": runtime_id}
            dockerfile = (f"FROM {runtime_image or self.settings.runtime_image}\n"
                          f"{label_line(labels)}\n"
                          "USER 0:0\n"
                          f"COPY recipe/ {target}/.recipe/\n"
                          f'RUN ["chown", "-R", "{USER}", "{target}"]\n'
                          f"USER {USER}\n"
                          f'RUN ["python3", "{target}/.recipe/build.py"]\n')
            log.info("building dependencies image", image=tag)
            try:
                await self.engine.api(self.build, client, tag, dockerfile, files, {}, network, log_path)
            except docker.errors.APIError as exc:
                raise BuildFailed(f"image build failed: {exc.explanation or exc}") from None
            log.info("dependencies image built", image=tag, took_s=round(time.monotonic() - started, 2))
            return key, tag

    async def group_image(self, spec: InstanceSpec) -> tuple[str, list[dict[str, Any]]]:
        """The group version's image, built when missing; returns its tag and the functions' in-image config."""
        client = self.engine.require()
        base = self.runtime_image(next((fc["python"] for fc in spec.functions if fc.get("python")), None))
        runtime_id = await self.runtime_image_id(base)
        envs: dict[str, str] = {}  # env key -> env image tag
        functions: list[dict[str, Any]] = []
        code_dirs: dict[str, Path] = {}
        inputs: list[Any] = [runtime_id]
        for i, fc in enumerate(spec.functions):
            in_image = dict(fc, code_dir=f"{FUNCTIONS_DIR}/{fc['name']}/{fc['version']}", deps_dir=None)
            if fc.get("deps_dir"):
                key, env_tag = await self.env_image(runtime_id, Path(fc["deps_dir"]), base,
                                                    build_log_path(self.settings.var_dir, spec.group_id,
                                                                   spec.group_version))
                envs.setdefault(key, env_tag)
                in_image["deps_dir"] = f"{ENVS_DIR}/{key}/site"
            code_dirs[f"code{i}"] = Path(fc["code_dir"])
            inputs.append([fc["name"], fc["version"], in_image["deps_dir"],
                           await in_thread(tree_hash, Path(fc["code_dir"]))])
            functions.append(in_image)
        if envs:
            base = next(iter(envs.values()))
        inputs_hash = digest(inputs, base)[:24]
        tag = f"{GROUP_REPO}:{self.namespace}-{spec.group_id}-v{spec.group_version}"
        async with self.lock(tag):
            labels = await self.engine.api(self.image_labels, client, tag)
            if labels is not None and labels.get("nuclide.inputs") == inputs_hash:
                return tag, functions
            labels = {"nuclide.kind": "group", "nuclide.namespace": self.namespace, "nuclide.group": spec.group_id,
                      "nuclide.group_version": str(spec.group_version), "nuclide.envs": ",".join(envs),
                      "nuclide.inputs": inputs_hash, "nuclide.env": ""}
            lines = [f"FROM {base}", label_line(labels)]
            lines += [f"COPY --from={env_tag} {ENVS_DIR}/{key}/ {ENVS_DIR}/{key}/"
                      for key, env_tag in list(envs.items())[1:]]
            lines += [f"COPY code{i}/ {fc['code_dir']}/" for i, fc in enumerate(functions)]
            started = time.monotonic()
            try:
                await self.engine.api(self.build, client, tag, "\n".join(lines) + "\n", {}, code_dirs)
            except docker.errors.APIError as exc:
                raise BuildFailed(f"image build failed: {exc.explanation or exc}") from None
            log.info("image built", image=tag, took_s=round(time.monotonic() - started, 2))
        return tag, functions

    def _collect_sync(self, client: docker.DockerClient, wanted: dict[str, int] | None) -> list[str]:
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

    async def registered_image(self, spec: InstanceSpec) -> str:
        """The version's image, built when missing (a failed build is a BuildFailed with the log's tail)."""
        client = self.engine.require()
        fc = spec.functions[0]
        definition = fc["registered_runtime"]
        labels = await self.engine.api(self.image_labels, client, definition["image"])
        if labels is None:
            raise BuildFailed(f"the image '{definition['image']}' of runtime '{fc.get('runtime')}' is not in the local"
                              " Docker Engine any more; build or load it, then deploy again")
        runtime_id = str((await self.engine.api(client.api.inspect_image, definition["image"]))["Id"])
        inputs = digest(runtime_id, definition["path"], definition.get("dependencies") or [],
                        await asyncio.to_thread(tree_hash, Path(fc["code_dir"])))[:24]
        tag = f"{GROUP_REPO}:{self.namespace}-{spec.group_id}-v{spec.group_version}"
        async with self.lock(tag):
            current = await self.engine.api(self.image_labels, client, tag)
            if current is not None and current.get("nuclide.inputs") == inputs:
                return tag
            ca = self.ca_bundle()
            image_labels = {"nuclide.kind": "group", "nuclide.namespace": self.namespace, "nuclide.group": spec.group_id,
                            "nuclide.group_version": str(spec.group_version), "nuclide.envs": "",
                            "nuclide.inputs": inputs, "nuclide.env": "", "nuclide.runtime": runtime_id}
            text = registered_dockerfile(definition["image"], definition["path"], list(definition.get("dependencies") or []),
                                         label_line(image_labels), ca is not None)
            started = time.monotonic()
            try:
                await self.engine.api(self.build, client, tag, text, {"ca.pem": ca} if ca else {},
                                      {"code": Path(fc["code_dir"])},
                                      "host" if spec.extra.get("network") == "host" else "isolated",
                                      build_log_path(self.settings.var_dir, spec.group_id, spec.group_version))
            except docker.errors.APIError as exc:
                raise BuildFailed(f"image build failed: {exc.explanation or exc}") from None
            log.info("runtime function image built", image=tag, took_s=round(time.monotonic() - started, 2))
        return tag

    async def collect(self) -> None:
        """Remove unused images now, or after the starts in progress; a caller during a collection waits for it."""
        self._collect_wanted = True
        if self._starting:
            return  # the last start to finish runs it
        if not self._collected.is_set():
            await self._collected.wait()  # the running collection goes round once more for this caller
            return
        client = self.engine.client
        if client is None:
            return
        self._collected.clear()
        try:
            while self._collect_wanted:
                self._collect_wanted = False
                try:
                    removed = await in_thread(self._collect_sync, client, self.wanted_versions())
                except ENGINE_ERRORS as exc:
                    log.warning("could not remove unused images", error=str(exc)[:200])
                    return
                if removed:
                    log.info("removed unused images", images=removed)
        finally:
            self._collected.set()
