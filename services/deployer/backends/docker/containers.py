"""The docker backend's image-built instances: a container each, run, followed, stopped and adopted.

Containers carry ``nuclide.*`` labels (namespace, group, version, instance, functions; a pool
container generic ones, and the deployer records what it became), a network of their own
(``runner/usernet.py``: outbound only, the gateway over the instance link; the host's with
``spec.network: host``), a read-only root filesystem with a tmpfs ``/tmp`` (and the code
directory a writable copy in a tmpfs, ``/nuclide/work/<name>/<version>``, as writable as on the
process backend), no capabilities, no-new-privileges, user 65534, memory, CPU and pids limits,
and no mount but the instance link's directory (read-only): the instance config travels in the
environment (or a pool container's stdin); a deployer that runs in a container itself names the
link's volume (``docker_link_source``). The memory limit is also the instance's RLIMIT_DATA (as
with the process backend), so a handler that allocates too much gets a MemoryError the runtime
answers with the limit's name; only what escapes it (shared memory, /tmp) meets the kernel's OOM
killer, which the exit report then names.

One thread per container copies its output to the instance's log file (what ``nuclide logs`` and
the reconciler's failure reports read) and reports its exit; instances outlive the deployer and
the next one adopts them by their labels (a pool container by its record, which
:class:`PoolRecords` reads). The namespace label keeps deployers with different state directories
(test stacks, compose projects) from touching each other's containers.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import docker
import docker.errors

from shared.gateways import instance_endpoints, this_host
from shared.instanceconfig import CONFIG_ENV, InstanceConfig
from shared.config import Settings
from shared.errors import BuildFailed, Unavailable
from shared.logs import get_logger
from services.deployer.backends.base import ExitCallback, InstanceHandle, InstanceSpec
from services.deployer.backends.docker.engine import (
    API_TIMEOUT_S, ENGINE_ERRORS, PING_INTERVAL_S, TMPFS_MAX_BYTES, USER, Engine, attach_network, container_env,
    host_config, instance_gateways,
)
from services.deployer.backends.docker.runner import usernet
from services.deployer.backends.docker.runner.box import PY_WORK_DIR, UID

log = get_logger(__name__)

CONFIG_PATH = "/tmp/nuclide-instance.json"
EXIT_REPORT_TIMEOUT_S = 15.0  # after a stop: how long to wait for the exit to be reported
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


class PoolRecords(Protocol):
    """What the adoption scan asks the warm pool about its containers."""

    label: str

    def known(self) -> set[str]: ...

    def record(self, container_id: str) -> dict[str, Any] | None: ...

    def forget(self, container_id: str) -> None: ...


def is_isolated(spec: InstanceSpec) -> bool:
    """Whether an instance gets a network of its own (the default) rather than the host's (``spec.network: host``)."""
    return spec.extra.get("network", "isolated") != "host"


def parse_timestamp(text: str) -> float | None:
    """RFC 3339 with nanoseconds, as the engine prefixes log lines, to Unix seconds."""
    try:
        whole, _, frac = text.rstrip("Z").partition(".")
        return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{frac or 0}")
    except ValueError:
        return None


def memory_limit(api: docker.APIClient, container_id: str) -> int | None:
    """The memory limit a container runs with (its label; the engine's record as a fallback)."""
    try:
        info = api.inspect_container(container_id)
        labels = info["Config"].get("Labels") or {}
        return int(labels.get("nuclide.memory_bytes") or info["HostConfig"].get("Memory") or 0)
    except (*ENGINE_ERRORS, KeyError, ValueError):
        return None


class Containers:
    """The containers of one deployer's instances: each tracked from start (or adoption) to its exit."""

    pool: PoolRecords  # the warm pool, set by the backend once both exist (they know each other)

    def __init__(self, settings: Settings, engine: Engine, on_exit: ExitCallback) -> None:
        self.settings = settings
        self.engine = engine
        self.on_exit = on_exit
        self.handles: dict[str, InstanceHandle] = {}  # every instance the backend runs (runners' too)
        self.containers: dict[str, str] = {}  # instance id -> container id
        self._reported: dict[str, asyncio.Future] = {}  # instance id -> set once its exit is reported

    def instance_config(self, spec: InstanceSpec, functions: list[dict[str, Any]],
                        isolated: bool | None = None) -> InstanceConfig:
        """What services.runtime (and services.runtime.once) read: the functions as they are in the image.
        ``isolated``: whether its container has a network of its own (default: as the spec asks)."""
        isolated = is_isolated(spec) if isolated is None else isolated
        fallback = instance_gateways(self.settings, isolated)[0]
        link_dir = usernet.LINK_DIR if isolated else ""
        return InstanceConfig(
            instance_id=spec.id, group=spec.group_id, group_version=spec.group_version,
            # every gateway known: an isolated container reaches those of this machine through the link
            # directory bound into it, which it sees at link_dir (a gateway's HEARTBEAT names the others)
            gateways=tuple(instance_endpoints(spec.extra.get("gateways") or [], isolated, this_host(), fallback,
                                              link_dir)),
            link=isolated, host=this_host(), link_dir=link_dir,
            gateway_url=self.settings.http_url, fusionizer_host=self.settings.advertised_host,
            memory_bytes=int(spec.memory_bytes), functions=tuple(functions),
        )

    def instance_labels(self, spec: InstanceSpec, names: list[str]) -> dict[str, str]:
        """What identifies an instance's container (a pool container's record holds the same)."""
        labels = {
            "nuclide.managed": "true",
            "nuclide.namespace": self.engine.namespace,
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

    async def run(self, spec: InstanceSpec, image: str, functions: list[dict[str, Any]]) -> InstanceHandle:
        client = self.engine.require()
        # the code directory is writable scratch, as on the process backend: each member's code is copied
        # from the image (read-only root) into a tmpfs at start, a few ms, and the instance runs there
        copies: list[str] = []
        running = []
        for fc in functions:
            here = f"{PY_WORK_DIR}/{fc['name']}/{fc['version']}"
            copies += [fc["code_dir"], here]
            running.append(dict(fc, code_dir=here))
        config = self.instance_config(spec, running)
        memory = int(spec.memory_bytes)
        names = [f["name"] for f in functions]
        labels = self.instance_labels(spec, names)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        spec.log_path.touch()

        def create() -> tuple[str, int | None]:
            size = int(spec.extra.get("scratch_bytes") or min(memory, TMPFS_MAX_BYTES))
            host = host_config(client, memory, spec.extra.get("cpu"), pids=spec.extra.get("pids"),
                               scratch_bytes=spec.extra.get("scratch_bytes"), extra_tmpfs={
                PY_WORK_DIR: f"rw,exec,nosuid,nodev,uid={UID},gid={UID},mode=0700,size={size}"},
                               settings=self.settings, isolated=is_isolated(spec))
            created = client.api.create_container(
                image, name=f"nuclide-{self.engine.namespace}-{spec.id}", labels=labels, user=USER,
                working_dir=PY_WORK_DIR, host_config=host, use_config_proxy=False,
                command=["/bin/sh", "-c", COPY_AND_SERVE, "nuclide-instance", *copies],
                environment={CONFIG_ENV: config.to_json(), **container_env()},
            )
            try:
                client.api.start(created["Id"])
                pid = client.api.inspect_container(created["Id"])["State"].get("Pid") or None
                if is_isolated(spec):
                    attach_network(pid, self.settings, spec.id)
            except BaseException:
                client.api.remove_container(created["Id"], force=True)
                raise
            return created["Id"], pid

        try:
            container_id, pid = await self.engine.api(create)
        except docker.errors.APIError as exc:
            if exc.is_server_error():
                raise Unavailable(f"the Docker Engine could not start the container: {exc.explanation or exc}") \
                    from None
            raise BuildFailed(f"the Docker Engine refused the container: {exc.explanation or exc}") from None
        if spec.id in self.handles:  # a reconnect's scan adopted it meanwhile
            return self.handles[spec.id]
        handle = InstanceHandle(spec.id, spec.group_id, spec.group_version, pid, spec.log_path, time.time(),
                                tuple(names))
        self.track(client, handle, container_id, truncate_log=False)
        return handle

    def track(self, client: docker.DockerClient, handle: InstanceHandle, container_id: str,
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
                            since = parse_timestamp(stamp.decode(errors="replace")) or since
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
                    if self.engine.closed:
                        return None
                    time.sleep(PING_INTERVAL_S)  # the engine went away: its containers too, or it comes back
            code = state.get("ExitCode")
            if state.get("OOMKilled"):
                limit_mib = (memory_limit(api, container_id) or 0) // (1024 * 1024)
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

    async def stop(self, handle: InstanceHandle, timeout_s: float) -> bool:
        """SIGTERM, SIGKILL after ``timeout_s``; waits for the exit report. False when nothing was stopped."""
        container_id = self.containers.get(handle.id)
        if container_id is None or handle.id not in self.handles or self.engine.client is None:
            return False
        handle.stopping = True
        reported = self._reported.get(handle.id)
        try:
            # SIGTERM (the runtime drains and says BYE), SIGKILL after the timeout
            await self.engine.api(self.engine.client.api.stop, container_id, timeout=max(1, int(timeout_s)))
        except docker.errors.NotFound:
            pass
        except (docker.errors.APIError, Unavailable) as exc:
            log.warning("could not stop container", instance=handle.id, error=str(exc)[:200])
            return False
        if reported is not None:
            try:
                await asyncio.wait_for(asyncio.shield(reported), EXIT_REPORT_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.error("container stopped but its exit was not reported", instance=handle.id)
        return True

    def labels_filter(self, *extra: str) -> dict[str, Any]:
        return {"label": [f"nuclide.namespace={self.engine.namespace}", "nuclide.managed=true", *extra]}

    def scan(self, client: docker.DockerClient, tracked: set[str]) -> list[dict[str, Any]]:
        """This namespace's running containers; the exited ones leave their output in their log files and go.

        ``tracked`` containers have a follower, which does that itself.
        """
        running = []
        held = self.pool.known()
        for c in client.api.containers(all=True, filters=self.labels_filter()):
            if c["Id"] in tracked or c["Id"] in held:
                continue
            labels = c.get("Labels") or {}
            if self.pool.label in labels:
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

    def register_adopted(self, client: docker.DockerClient, running: list[dict[str, Any]]) -> list[InstanceHandle]:
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
            self.track(client, handle, c["Id"], truncate_log=True)
            adopted.append(handle)
        return adopted

