"""The docker backend's instances of functions on registered runtimes: an image per version, a runner process each.

Image (``nuclide-fn:<namespace>-<group>-v<version>``, like a Python group's, so the same
collection rules apply), built in two stages without any shell of ours::

    FROM <runtime image> AS build        USER 0, the code at <path>, WORKDIR <path>,
                                         RUN <dependencies argv> (exec form: no shell)
    FROM build                           + COPY --from=build <path>/ /nuclide/src/

The copy in ``/nuclide/src`` is what a container's code directory (a tmpfs at ``<path>``: the
root filesystem stays read-only) is filled from. The instance is a runner process on this host
(``python -m services.runtime.shell``, which drives the engine; see that module for the
warm-start policies), started in a session of its own so it outlives a deployer that dies; a
registry file per runner (``<var>/docker/runners/<id>.json``) lets the next deployer adopt it.
When a runner exits, the containers it left (label ``nuclide.runner=<id>``) are removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker.errors

from shared.errors import BuildFailed, InvalidRequest, Unavailable
from shared.logs import get_logger
from shared.procs import alive, start_time
from services.deployer.backends.base import InstanceHandle, InstanceSpec

if TYPE_CHECKING:
    from services.deployer.backends.docker import DockerBackend

log = get_logger(__name__)

ROOT = Path(__file__).resolve().parents[3]  # the directory that holds the services package
SRC_DIR = "/nuclide/src"
CA_PATH = "/nuclide/ca.pem"
ADOPTED_POLL_S = 0.5  # how often an adopted runner (not our child) is checked for its exit
KILL_GRACE_S = 5.0
PY_WORK_DIR = "/nuclide/work"  # a Python function's fresh code directory per call (warmStart runtime), a tmpfs


def is_shell(spec: InstanceSpec) -> bool:
    return any(fc.get("shell") for fc in spec.functions)


def is_per_call(spec: InstanceSpec) -> bool:
    """A Python function whose calls each get a process of their own (spec.warmStart none or runtime)."""
    return any((fc.get("warm_start") or "function") != "function" and not fc.get("shell") for fc in spec.functions)


def dockerfile(base: str, path: str, dependencies: list[str], labels_line: str, with_ca: bool) -> str:
    """The two-stage build of a runtime function's image; user input only as JSON strings and checked paths."""
    lines = [f"FROM {base} AS build", labels_line, "USER 0:0", f"COPY code/ {path}/", f"WORKDIR {path}"]
    if with_ca:  # build arguments: in the RUN's environment, not in the image's
        lines += [f"COPY ca.pem {CA_PATH}"] + [f"ARG {key}={CA_PATH}" for key in
                                               ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")]
    if dependencies:
        lines.append("RUN " + json.dumps(dependencies))
    lines += ["FROM build", f"COPY --from=build {path}/ {SRC_DIR}/"]
    return "\n".join(lines) + "\n"


class Runners:
    """Starts, stops and adopts runner processes for a :class:`DockerBackend`."""

    def __init__(self, backend: "DockerBackend") -> None:
        self.backend = backend
        self.dir = backend.var / "docker" / "runners"
        self.exits: dict[str, asyncio.Future] = {}  # instance id -> its exit code, once it exited

    def owns(self, instance_id: str) -> bool:
        return instance_id in self.exits

    # ----- the engine's side ---------------------------------------------------------------

    async def check_image(self, image: str) -> dict[str, Any]:
        """The id of a local image, for registering a runtime: 400 when it is missing, 503 without an engine."""
        b = self.backend
        client = b.client
        if client is None:
            raise Unavailable(f"the Docker Engine at {b.settings.docker_host} is not reachable; start dockerd (or fix"
                              " docker_host) and retry")
        try:
            info = await b._api(client.api.inspect_image, image)
        except docker.errors.ImageNotFound:
            raise InvalidRequest(f"image '{image}' is not in the local Docker Engine; build or load it first"
                                 f" (docker build -t {image} ..., docker load): nuclide never pulls images",
                                 {"image": image}) from None
        except docker.errors.APIError as exc:
            raise InvalidRequest(f"image '{image}' cannot be used: {exc.explanation or exc}") from None
        return {"image_id": str(info["Id"])}

    async def image(self, spec: InstanceSpec) -> str:
        """The version's image, built when missing (a failed build is a BuildFailed with the log's tail)."""
        from services.deployer.backends.docker import GROUP_REPO, _digest, _label_line, _tree_hash

        b = self.backend
        client = b._require()
        fc = spec.functions[0]
        shell = fc["shell"]
        labels = await b._api(b._image_labels, client, shell["image"])
        if labels is None:
            raise BuildFailed(f"the image '{shell['image']}' of runtime '{fc.get('runtime')}' is not in the local"
                              " Docker Engine any more; build or load it, then deploy again")
        runtime_id = str((await b._api(client.api.inspect_image, shell["image"]))["Id"])
        inputs = _digest(runtime_id, shell["path"], shell.get("dependencies") or [],
                         await asyncio.to_thread(_tree_hash, Path(fc["code_dir"])))[:24]
        tag = f"{GROUP_REPO}:{b.namespace}-{spec.group_id}-v{spec.group_version}"
        async with b._lock(tag):
            current = await b._api(b._image_labels, client, tag)
            if current is not None and current.get("nuclide.inputs") == inputs:
                return tag
            ca = b._ca_bundle()
            image_labels = {"nuclide.kind": "group", "nuclide.namespace": b.namespace, "nuclide.group": spec.group_id,
                            "nuclide.group_version": str(spec.group_version), "nuclide.envs": "",
                            "nuclide.inputs": inputs, "nuclide.env": "", "nuclide.runtime": runtime_id}
            text = dockerfile(shell["image"], shell["path"], list(shell.get("dependencies") or []),
                              _label_line(image_labels), ca is not None)
            started = time.monotonic()
            try:
                await b._api(b._build, client, tag, text, {"ca.pem": ca} if ca else {}, {"code": Path(fc["code_dir"])})
            except docker.errors.APIError as exc:
                raise BuildFailed(f"image build failed: {exc.explanation or exc}") from None
            log.info("runtime function image built", image=tag, took_s=round(time.monotonic() - started, 2))
        return tag

    async def _remove_containers(self, instance_id: str) -> None:
        b = self.backend
        client = b.client
        if client is None:
            return

        def remove() -> None:
            for c in client.api.containers(all=True, filters={"label": [f"nuclide.namespace={b.namespace}",
                                                                        f"nuclide.runner={instance_id}"]}):
                try:
                    client.api.remove_container(c["Id"], force=True)
                except docker.errors.APIError:
                    pass  # its removal is in progress already

        try:
            await b._api(remove)
        except Unavailable as exc:
            log.warning("could not remove a runner's containers", instance=instance_id, error=str(exc)[:200])

    # ----- runner processes ---------------------------------------------------------------

    async def start(self, spec: InstanceSpec, image: str, python: dict[str, Any] | None = None) -> InstanceHandle:
        """A runner for a registered runtime's function, or with ``python`` (the instance config of the group
        image's one function) for a Python function's per-call containers."""
        from services.deployer.sandbox import base_env

        b = self.backend
        fc = spec.functions[0]
        config = {
            "instance_id": spec.id, "group": spec.group_id, "group_version": spec.group_version,
            "gateways": [b.settings.gateway_router], "docker_host": b.settings.docker_host,
            "namespace": b.namespace, "image": image,
            "warm_start": fc.get("warm_start") or "function", "memory_bytes": spec.memory_bytes,
            "cpu": spec.extra.get("cpu"), "max_concurrency": int(fc.get("max_concurrency") or 1),
            "function": {"name": fc["name"], "version": fc["version"], "timeout_s": fc.get("timeout_s", 30.0),
                         "env": fc.get("env") or {}},
        }
        if python is None:
            config.update(path=fc["shell"]["path"], run=list(fc["shell"]["run"]))
        else:
            config.update(kind="python", path=PY_WORK_DIR, python=python)
        self.dir.mkdir(parents=True, exist_ok=True)
        config_path = self.dir / f"{spec.id}.config.json"
        config_path.write_text(json.dumps(config))
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = base_env()
        env["PYTHONPATH"] = str(ROOT)
        with open(spec.log_path, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.runtime.shell", str(config_path), stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=out, cwd=str(ROOT), env=env, start_new_session=True)
        handle = InstanceHandle(spec.id, spec.group_id, spec.group_version, proc.pid, spec.log_path, time.time(),
                                (fc["name"],))
        record = {"pid": proc.pid, "start_time": start_time(proc.pid), "group": spec.group_id,
                  "group_version": spec.group_version, "functions": [fc["name"]], "log_path": str(spec.log_path),
                  "started_at": handle.started_at}
        (self.dir / f"{spec.id}.json").write_text(json.dumps(record))
        self._watch(handle, proc.wait())
        return handle

    def _watch(self, handle: InstanceHandle, waiting: Any) -> None:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.exits[handle.id] = fut
        self.backend.handles[handle.id] = handle

        async def watch() -> None:
            code = await waiting
            await self._remove_containers(handle.id)
            for suffix in (".json", ".config.json"):
                (self.dir / f"{handle.id}{suffix}").unlink(missing_ok=True)
            self.exits.pop(handle.id, None)
            if not fut.done():
                fut.set_result(code)
            self.backend.handles.pop(handle.id, None)
            self.backend.on_exit(handle, code)

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
            if not alive(pid, started):
                path.unlink(missing_ok=True)
                (self.dir / f"{instance_id}.config.json").unlink(missing_ok=True)
                asyncio.ensure_future(self._remove_containers(instance_id))
                continue
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
