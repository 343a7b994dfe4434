"""The swarm backend: each function group is a Docker Swarm service, its replicas Swarm's tasks.

The reconciler gives a group's service its version and replica count (:meth:`SwarmBackend.converge`);
Swarm's scheduler places the tasks, restarts one that dies, and rolls a new version out task by
task, starting the new one before it stops an old one (``spec.py``: update order start-first,
rollback on failure). An old task's SIGTERM makes its instance drain (BYE, then it finishes what it
runs), and calls that find no instance meanwhile wait at the gateway, so a redeploy fails no call.

Images: the group version's image is built on this engine by the docker backend's ``images.py``
(the same image as there) and the service names it by its id, so a task on this node never asks a
registry for it. A swarm of several nodes needs a registry every node pulls from: with
``swarm_registry`` set, the image is pushed there (``<registry>/nuclide-fn:<tag>``) and the
service names it by that reference and its digest.

Tasks are followed by polling the task list (:data:`POLL_INTERVAL_S`): a task that runs becomes an
instance (:meth:`list`), a follower thread copies its container's output into the instance's log
file (on this node), and a task that ends is reported to ``on_exit`` with its exit code: one Swarm
stopped (update, scale-down, removal) as expected, any other as a crash. A deployer that restarts
adopts the services by their labels (namespace, group, version) and their tasks by the next poll.

The module is past 400 lines because the service side (converge, remove) and the task side (poll,
follow, report) share one record of what was given and what runs; split, each would reach into the
other's state.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

import docker
import docker.errors

from shared.config import ConfigError, Settings
from shared.errors import BuildFailed, Unavailable
from shared.logs import get_logger
from services.deployer.backends.base import ExitCallback, InstanceHandle, InstanceSpec, ReplicatedBackend
from services.deployer.backends.docker.backend import load_namespace
from services.deployer.backends.docker.containers import COPY_AND_SERVE, CONFIG_ENV, Containers
from services.deployer.backends.docker.engine import (
    API_TIMEOUT_S, ENGINE_ERRORS, LOG_MAX_FILES, LOG_MAX_SIZE, PIDS_LIMIT, TMPFS_MAX_BYTES, USER, Engine, EngineLost,
    container_env, in_thread,
)
from services.deployer.backends.docker.images import Images
from services.deployer.backends.swarm.spec import (
    STOPPED_BY_SWARM, TERMINAL_STATES, WORK_DIR, instance_id, replicas_of, service_name, service_spec, swarm_problem,
    templated_config,
)

log = get_logger(__name__)

POLL_INTERVAL_S = 1.0  # how often the task list is read: how soon a started or ended task is noticed
STOP_ALL_TIMEOUT_S = 30.0  # a stop with stop_instances_on_exit waits this long for the tasks to end
FOLLOW_JOIN_S = 2.0  # an ended task's follower gets this long to copy the last output before the exit report
COLLECT_INTERVAL_S = 60.0
ENGINE_COPY_FAILED = "failed to copy files"  # the classic builder's COPY, on the engine's side
ENGINE_COPY_RETRY_S = (1.0, 3.0)  # the pauses before the builds again after such a failure


class SwarmBackend(ReplicatedBackend):
    name = "swarm"

    def __init__(self, settings: Settings, on_exit: ExitCallback) -> None:
        super().__init__(on_exit)
        self.settings = settings
        self.var = settings.var_dir.resolve()
        self.engine = Engine(settings, load_namespace(settings, self.var))
        self.images = Images(settings, self.engine)
        # the docker backend's instance config and labels; its containers are never run here
        self._config = Containers(settings, self.engine, on_exit)
        self.given: dict[str, tuple[int, int]] = {}  # group id -> (version, replicas) its service was given
        self.handles: dict[str, InstanceHandle] = {}  # instance id -> a running task
        self.task_of: dict[str, tuple[str, str | None]] = {}  # instance id -> (task id, container id)
        self.followers: dict[str, threading.Thread] = {}  # instance id -> the thread copying its output
        self.ended: set[str] = set()  # task ids whose end was reported (or that ended before this deployer)
        self.removed: set[str] = set()  # groups whose service this deployer removed: their tasks' ends are expected
        self._polled = False
        self._listed: dict[str, tuple[int, int]] = {}
        self._converging = 0  # service changes in flight
        self._changes = 0  # service changes begun: a listing taken across one is not trusted
        self._watch: asyncio.Task | None = None
        self._next_collection = 0.0
        self._network: str | None = None

    @property
    def namespace(self) -> str:
        return self.engine.namespace

    @property
    def wanted_versions(self) -> Callable[[], dict[str, int] | None]:
        return self.images.wanted_versions

    @wanted_versions.setter
    def wanted_versions(self, fn: Callable[[], dict[str, int] | None]) -> None:
        self.images.wanted_versions = fn

    async def python_check(self, version: str) -> dict[str, Any]:
        return await self.images.python_check(version)

    # ----- the swarm ----------------------------------------------------------------------

    def _labels_filter(self) -> dict[str, Any]:
        return {"label": [f"nuclide.namespace={self.namespace}", "nuclide.managed=true", "nuclide.kind=service"]}

    def adopt(self) -> list[InstanceHandle]:
        """Check the swarm (ConfigError naming the fix when this node cannot run services), take over this
        namespace's services and their running tasks. An engine that does not answer is waited for."""
        try:
            client = self.engine.connect()
            problem = swarm_problem(client.info())
        except ENGINE_ERRORS as exc:
            self.engine.went_down(exc)
            self._ensure_watch()
            return []
        if problem:
            client.close()
            raise ConfigError(problem)
        self._adopt_services(client)
        self.engine.came_up(client)
        adopted = self._apply(*self._poll(client))
        self._ensure_watch()
        return adopted

    def _adopt_services(self, client: docker.DockerClient) -> None:
        self.given = self._services_given(client.api.services(filters=self._labels_filter()))

    @staticmethod
    def _services_given(listed: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
        """group -> (version, replicas) as the services say: what an operator changed or removed behind the
        deployer's back (docker service scale/rm), or what Swarm rolled back, the reconciler converges again."""
        given = {}
        for svc in listed:
            labels = (svc.get("Spec") or {}).get("Labels") or {}
            try:
                given[labels["nuclide.group"]] = (int(labels["nuclide.group_version"]), replicas_of(svc))
            except (KeyError, ValueError):
                continue
        return given

    def services(self) -> set[str]:
        return set(self.given)

    def list(self) -> list[InstanceHandle]:
        return list(self.handles.values())

    def knows_all(self) -> bool:
        return self._polled and self.engine.up.is_set()

    def converged(self, group_id: str, version: int, replicas: int) -> bool:
        return self.given.get(group_id) == (version, replicas)

    def _host_network(self, client: docker.DockerClient) -> str:
        if self._network is None:
            found = [n for n in client.api.networks(names=["host"]) if n.get("Name") == "host"]
            if not found:
                raise Unavailable("the Docker Engine has no 'host' network, which every service joins")
            self._network = str(found[0]["Id"])
        return self._network

    async def converge(self, spec: InstanceSpec, replicas: int) -> None:
        self._ensure_watch()
        if not self.engine.up.is_set():
            raise Unavailable(f"the Docker Engine at {self.settings.docker_host} is not reachable")
        client = self.engine.require()
        name = service_name(self.namespace, spec.group_id)
        self._converging += 1
        self._changes += 1
        try:
            if self.given.get(spec.group_id, (None,))[0] == spec.group_version:
                await self.engine.api(self._scale, client, name, replicas)
            else:
                async with self.images.no_collection():
                    tag, functions = await self._group_image(spec)
                    image = await self.engine.api(self._publish, client, tag)
                    body = self._spec(client, spec, name, image, functions, replicas)
                    await self.engine.api(self._create_or_update, client, name, body)
        except EngineLost:
            raise
        except docker.errors.APIError as exc:
            text = str(exc.explanation or exc)
            if exc.is_server_error():
                problem = swarm_problem(await self.engine.api(client.info)) if "swarm" in text.lower() else None
                raise Unavailable(problem or f"Docker Swarm did not take the service: {text}") from None
            raise BuildFailed(f"Docker Swarm refused the service {name}: {text}") from None
        finally:
            self._converging -= 1
        self.removed.discard(spec.group_id)
        self.given[spec.group_id] = (spec.group_version, replicas)
        log.info("service converging", service=name, version=spec.group_version, replicas=replicas)

    async def _group_image(self, spec: InstanceSpec) -> tuple[str, list[dict[str, Any]]]:
        """The group version's image; a build the engine broke off copying the code (seen on Engine 20.10
        under load: its copy target vanished) is tried again (twice), as it is the engine's failure, not the code's."""
        for delay_s in ENGINE_COPY_RETRY_S:
            try:
                return await self.images.group_image(spec)
            except BuildFailed as exc:
                if ENGINE_COPY_FAILED not in exc.message:
                    raise
                log.warning("the engine failed copying the code into the image; building again",
                            group=spec.group_id, after_s=delay_s, error=exc.message[:200])
            await asyncio.sleep(delay_s)
        return await self.images.group_image(spec)

    def _publish(self, client: docker.DockerClient, tag: str) -> str:
        """The reference tasks run: the image id on one node, or the image pushed to ``swarm_registry``."""
        registry = self.settings.swarm_registry
        if not registry:
            return str(client.api.inspect_image(tag)["Id"])  # an id: Swarm never tries to pull it
        repo, _, version = tag.partition(":")
        target = f"{registry}/{repo}"
        client.api.tag(tag, target, version)
        failed = [line for line in client.api.push(target, version, stream=True, decode=True) if "error" in line]
        if failed:
            raise BuildFailed(f"could not push {target}:{version} to swarm_registry {registry}:"
                              f" {failed[0]['error']} (log in with 'docker login {registry}' on the deployer's"
                              " engine, or fix swarm_registry)")
        digests = [d for d in client.api.inspect_image(tag).get("RepoDigests") or [] if d.startswith(target + "@")]
        return f"{target}:{version}@{digests[0].split('@', 1)[1]}" if digests else f"{target}:{version}"

    def _spec(self, client: docker.DockerClient, spec: InstanceSpec, name: str, image: str,
              functions: list[dict[str, Any]], replicas: int) -> dict[str, Any]:
        copies: list[str] = []
        running = []
        for fc in functions:
            here = f"{WORK_DIR}/{fc['name']}/{fc['version']}"
            copies += [fc["code_dir"], here]
            running.append(dict(fc, code_dir=here))
        config = self._config.instance_config(spec, running, isolated=False)  # a task has the host's network
        names = [f["name"] for f in functions]
        labels = {k: v for k, v in self._config.instance_labels(spec, names).items()
                  if k not in ("nuclide.instance", "nuclide.log_path")}
        memory = int(spec.memory_bytes)
        scratch = int(spec.extra.get("scratch_bytes") or min(memory, TMPFS_MAX_BYTES))
        env = {CONFIG_ENV: templated_config(config.to_dict(), spec.group_id, spec.group_version), **container_env()}
        return service_spec(
            name=name, labels=labels, image=image,
            command=["/bin/sh", "-c", COPY_AND_SERVE, "nuclide-instance", *copies], env=env, user=USER,
            workdir="/tmp", memory_bytes=memory, cpu=spec.extra.get("cpu"),
            pids=int(spec.extra.get("pids") or PIDS_LIMIT), tmp_bytes=scratch,
            replicas=replicas, network=self._host_network(client),
            log_options={"max-size": LOG_MAX_SIZE, "max-file": LOG_MAX_FILES})

    @staticmethod
    def _create_or_update(client: docker.DockerClient, name: str, body: dict[str, Any]) -> None:
        parts = dict(task_template=body["TaskTemplate"], name=name, labels=body["Labels"], mode=body["Mode"],
                     update_config=body["UpdateConfig"], rollback_config=body["RollbackConfig"],
                     endpoint_spec=body["EndpointSpec"])
        try:
            current = client.api.inspect_service(name)
        except docker.errors.NotFound:
            client.api.create_service(**parts)
            return
        client.api.update_service(current["ID"], current["Version"]["Index"], **parts)

    @staticmethod
    def _scale(client: docker.DockerClient, name: str, replicas: int) -> None:
        current = client.api.inspect_service(name)
        spec = current["Spec"]
        if replicas_of(current) == replicas:
            return
        client.api.update_service(current["ID"], current["Version"]["Index"], task_template=spec["TaskTemplate"],
                                  name=spec["Name"], labels=spec.get("Labels"),
                                  mode={"Replicated": {"Replicas": int(replicas)}},
                                  update_config=spec.get("UpdateConfig"), rollback_config=spec.get("RollbackConfig"),
                                  endpoint_spec=spec.get("EndpointSpec"))

    async def remove(self, group_id: str) -> None:
        client = self.engine.client
        if client is None:
            raise Unavailable(f"the Docker Engine at {self.settings.docker_host} is not reachable")
        self.removed.add(group_id)
        self._converging += 1
        self._changes += 1
        for h in self.handles.values():
            if h.group_id == group_id:
                h.stopping = True
        try:
            await self.engine.api(client.api.remove_service, service_name(self.namespace, group_id))
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            raise Unavailable(f"could not remove the service of group {group_id}: {exc.explanation or exc}") from None
        finally:
            self._converging -= 1
        self.given.pop(group_id, None)

    async def stop_all(self) -> None:
        await super().stop_all()
        deadline = time.monotonic() + STOP_ALL_TIMEOUT_S
        while self.handles and time.monotonic() < deadline and self.engine.client is not None:
            await asyncio.sleep(POLL_INTERVAL_S / 2)

    async def stop(self, handle: InstanceHandle, timeout_s: float) -> None:
        """Stop one task (a stuck instance): its container is killed and Swarm starts another."""
        handle.stopping = True
        container_id = self.task_of.get(handle.id, ("", None))[1]
        client = self.engine.client
        if container_id is None or client is None:
            return
        try:
            await self.engine.api(client.api.stop, container_id, timeout=max(0, int(timeout_s)))
        except (docker.errors.APIError, Unavailable) as exc:
            log.warning("could not stop a task's container", instance=handle.id, error=str(exc)[:200])

    def close(self) -> None:
        self.engine.closed = True
        if self._watch is not None:
            self._watch.cancel()

    # ----- the tasks ----------------------------------------------------------------------

    def _ensure_watch(self) -> None:
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_tasks())

    async def _watch_tasks(self) -> None:
        while not self.engine.closed:
            await asyncio.sleep(POLL_INTERVAL_S)
            try:
                client = self.engine.client
                if client is None:
                    client = await in_thread(self.engine.connect)
                    problem = swarm_problem(await in_thread(client.info))
                    if problem:
                        log.error(problem)
                        client.close()
                        await asyncio.sleep(5 * POLL_INTERVAL_S)
                        continue
                    await in_thread(self._adopt_services, client)
                    self.engine.came_up(client)
                changes = self._changes
                polled = await in_thread(self._poll, client)
                if changes == self._changes and not self._converging:  # else it may predate a change: it would undo it
                    self.given = dict(self._listed)
                self._apply(*polled)
            except ENGINE_ERRORS as exc:
                self.engine.went_down(exc)
                continue
            if self.ended and time.monotonic() > self._next_collection:
                self._next_collection = time.monotonic() + COLLECT_INTERVAL_S
                asyncio.ensure_future(self.images.collect())

    def _poll(self, client: docker.DockerClient) -> tuple[list[tuple[InstanceHandle, str | None]],
                                                           list[tuple[InstanceHandle, int | None, bool]]]:
        """(tasks that run and are not known yet, known tasks that ended: handle, exit code, expected)."""
        listed = client.api.services(filters=self._labels_filter())
        self._listed = self._services_given(listed)
        services = {s["ID"]: (s.get("Spec") or {}).get("Labels") or {} for s in listed}
        tasks = client.api.tasks(filters={"service": list(services)}) if services else []
        first = not self._polled
        started: list[tuple[InstanceHandle, str | None]] = []
        ended: list[tuple[InstanceHandle, int | None, bool]] = []
        seen: set[str] = set()
        for task in tasks:
            try:
                labels = task["Spec"]["ContainerSpec"].get("Labels") or {}
                group, version = labels["nuclide.group"], int(labels["nuclide.group_version"])
            except (KeyError, ValueError):
                continue
            inst = instance_id(group, version, task["ID"])
            status = task.get("Status") or {}
            state = status.get("State") or ""
            container = (status.get("ContainerStatus") or {}).get("ContainerID") or None
            seen.add(inst)
            if state in TERMINAL_STATES:
                if task["ID"] in self.ended:
                    continue
                self.ended.add(task["ID"])
                if first and inst not in self.handles:
                    continue  # it ended before this deployer: its exit was another's to report
                handle = self.handles.get(inst) or self._handle(inst, group, version, labels, container, task)
                code = (status.get("ContainerStatus") or {}).get("ExitCode")
                expected = state in STOPPED_BY_SWARM or handle.stopping or group in self.removed
                self._write_end(client, handle, inst, container, state, status.get("Err") or "")
                ended.append((handle, None if code is None else int(code), expected))
            elif state == "running" and inst not in self.handles:
                handle = self._handle(inst, group, version, labels, container, task, adopted=first)
                handle.pid = (status.get("ContainerStatus") or {}).get("PID") or None
                self.task_of[inst] = (task["ID"], container)
                started.append((handle, container))
        for inst, handle in list(self.handles.items()):
            if inst not in seen:  # its service was removed with its tasks
                follower = self.followers.pop(inst, None)
                if follower is not None:
                    follower.join(FOLLOW_JOIN_S)
                ended.append((handle, None, True))
        self.ended &= {task["ID"] for task in tasks}  # Swarm keeps a short history: what it dropped never returns
        self._polled = True
        return started, ended

    def _handle(self, inst: str, group: str, version: int, labels: dict[str, str], container: str | None,
                task: dict[str, Any], adopted: bool = False) -> InstanceHandle:
        functions = tuple(n for n in labels.get("nuclide.functions", "").split(",") if n)
        log_path = self.var / "logs" / group / f"{inst}.log"
        return InstanceHandle(inst, group, version, None, log_path, time.time(), functions, adopted=adopted)

    def _write_end(self, client: docker.DockerClient, handle: InstanceHandle, inst: str, container: str | None,
                   state: str, error: str) -> None:
        """Let the follower copy the last output; a task that never ran says why (Swarm's error) in its log."""
        follower = self.followers.pop(inst, None)
        if follower is not None:
            follower.join(FOLLOW_JOIN_S)
        elif state in ("failed", "rejected") and container is not None:
            try:
                handle.log_path.parent.mkdir(parents=True, exist_ok=True)
                handle.log_path.write_bytes(client.api.logs(container))
            except (*ENGINE_ERRORS, docker.errors.APIError):
                pass
        if error and state in ("failed", "rejected"):
            hint = (" (a node without the image: set swarm_registry so every node can pull it)"
                    if "no such image" in error.lower() else "")
            handle.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(handle.log_path, "a") as out:
                out.write(f"nuclide: Docker Swarm could not run task {inst}: {error}{hint}\n")

    def _apply(self, started: list[tuple[InstanceHandle, str | None]],
               ended: list[tuple[InstanceHandle, int | None, bool]]) -> list[InstanceHandle]:
        for handle, container in started:
            self.handles[handle.id] = handle
            if container is not None:
                self._follow(handle, container)
        for handle, code, expected in ended:
            self.handles.pop(handle.id, None)
            self.task_of.pop(handle.id, None)
            handle.stopping = handle.stopping or expected
            self.on_exit(handle, code)
        return [h for h, _ in started]

    def _follow(self, handle: InstanceHandle, container: str) -> None:
        """Copy the task container's output into the instance's log file until it exits (on this node)."""
        handle.log_path.parent.mkdir(parents=True, exist_ok=True)
        docker_host = self.settings.docker_host

        def follow() -> None:
            api = docker.APIClient(base_url=docker_host, version="auto", timeout=API_TIMEOUT_S)
            try:
                with open(handle.log_path, "wb") as out:  # one file per task: its whole output
                    pending = b""
                    for chunk in api.logs(container, stream=True, follow=True):
                        pending += chunk
                        *lines, pending = pending.split(b"\n")
                        for line in lines:
                            out.write(line + b"\n")
                        out.flush()
                    if pending:
                        out.write(pending + b"\n")
            except (*ENGINE_ERRORS, docker.errors.APIError):
                pass  # on another node, or the engine went away: the output stays in Docker's own log
            finally:
                api.close()

        thread = threading.Thread(target=follow, daemon=True, name=f"follow-{handle.id[-12:]}")
        self.followers[handle.id] = thread
        thread.start()
