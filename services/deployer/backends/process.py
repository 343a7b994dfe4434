"""The default backend: each instance is a local, sandboxed ``services.runtime`` process.

Instances are started in their own session so they outlive a deployer that dies
(invocations must not stop with it); each has a registry file under
``<var>/instances`` so the next deployer adopts it instead of starting a
duplicate. bubblewrap does not forward signals, so stop() signals the runtime
process inside the sandbox directly, then kills the whole tree after a timeout.

Every instance is forked by a zygote (``services/deployer/zygotes.py``): the warm
one of its environment, or, when that cannot run or zygotes are off, one started
for this instance alone (a cold start), so that all instances are confined by the
same code (``services/runtime/confine.py``): namespaces of their own, a uid of their
own, seccomp, a process limit and a size-limited scratch tmpfs. The instance is a
PID namespace whose PID 1 is a small init (it reaps orphans, forwards signals to
the runtime and exits with the runtime's status) and, as the deployer is a child
subreaper, that init is the deployer's own child once the zygote's intermediate
process exits, so it is reaped and its exit code read here.

An instance's network (``spec.network``): "isolated" by default, a network
namespace with slirp4netns (outbound connections; no host loopback, so none of the
platform's sockets; ``services/deployer/netns.py`` keeps a few ready) and the
gateway reached over a unix socket bound in; "host"
shares the host's network. Without bubblewrap, slirp4netns, pyseccomp or root, no
instance starts (the deploy fails saying what to install), unless the operator set
``sandbox: none``: then instances are plain ``python -m services.runtime`` processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from shared.gateways import instance_endpoints, this_host
from shared.instanceconfig import InstanceConfig
from shared.config import Settings
from shared.errors import BuildFailed
from shared.procs import descendants as _descendants, start_time as _start_time
from shared.logs import get_logger
from services.deployer import pythons
from services.deployer.backends.base import Backend, ExitCallback, InstanceHandle, InstanceSpec
from services.deployer.children import Children
from services.deployer.netns import RESOLV_CONF, NetPool, NetUnavailable
from services.deployer.sandbox import SandboxUnavailable, base_env, instance_uid, link_dir, problem
from services.deployer.zygotes import ZygoteUnavailable, Zygotes, env_key, wait_child
from shared.spec import DEFAULT_PIDS, DEFAULT_SCRATCH_BYTES

log = get_logger(__name__)


def _tail(path: Path, max_bytes: int = 4096) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - max_bytes))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class ProcessBackend(Backend):
    name = "process"

    def __init__(self, settings: Settings, on_exit: ExitCallback, children: Children | None = None) -> None:
        super().__init__(on_exit)
        self.settings = settings
        self.children = children or Children()
        self.var = settings.var_dir.resolve()
        self.registry = self.var / "instances"
        self.registry.mkdir(parents=True, exist_ok=True)
        self.handles: dict[str, InstanceHandle] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        self.forked: set[str] = set()  # instances forked from a zygote: the runtime is the pid itself
        self.zygotes = Zygotes(settings, self.children)
        self.subreaper = self.children.become_subreaper()
        self._said_cold = False
        self.networks: dict[str, asyncio.subprocess.Process] = {}  # instance id -> its slirp4netns
        self.nets = NetPool(self.children, self.var / "logs" / "slirp4netns.log")
        self.sandbox_problem = problem(settings)
        # the seccomp filter, compiled once for this machine and sent with every spawn: a zygote on
        # another interpreter need not have libseccomp's binding
        self.seccomp_program = b""
        if not self.sandbox_problem and settings.sandbox != "none":
            from shared.seccomp import compile_filter

            self.seccomp_program = compile_filter()
        if self.sandbox_problem:
            log.error("the process backend will refuse to start instances", reason=self.sandbox_problem)
        elif settings.sandbox_warning():
            log.warning(settings.sandbox_warning())

    async def python_check(self, version: str) -> dict[str, Any]:
        path, detail = await pythons.find(version, self.children.exec)
        return {"available": path is not None, "detail": detail}

    async def start(self, spec: InstanceSpec) -> InstanceHandle:
        if self.sandbox_problem:
            raise SandboxUnavailable(self.sandbox_problem)
        inst_dir = self.registry / spec.id
        inst_dir.mkdir(parents=True, exist_ok=True)
        sandboxed = self.settings.sandbox != "none"
        isolated = sandboxed and spec.extra.get("network", "isolated") != "host"
        config = InstanceConfig(
            instance_id=spec.id, group=spec.group_id, group_version=spec.group_version,
            # an isolated instance has no route to the host: it reaches the gateways of this machine by their
            # unix sockets (shared/gateways.py); every live gateway, and those it learns of later
            gateways=tuple(instance_endpoints(spec.extra.get("gateways") or [], isolated, this_host(),
                                              self.settings.instance_link if isolated else self.settings.gateway_router)),
            link=isolated, host=this_host(),
            gateway_url=self.settings.http_url, fusionizer_host=self.settings.advertised_host,
            memory_bytes=int(spec.memory_bytes), functions=tuple(spec.functions),
        )
        config_path = inst_dir / "config.json"
        config_path.write_text(config.to_json())
        code_dirs = tuple(Path(f["code_dir"]) for f in spec.functions)
        deps = tuple(sorted({Path(f["deps_dir"]).parent for f in spec.functions if f.get("deps_dir")}))
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        key = env_key([f["deps_dir"] for f in spec.functions if f.get("deps_dir")])
        # a function on another Python 3 (spec.runtime python:3.X) runs on that interpreter: confined by a
        # zygote of its own on it (the warm zygotes are the platform's interpreter)
        version = next((f["python"] for f in spec.functions if f.get("python")), None)
        python, env = sys.executable, base_env()
        if version is not None:
            found, detail = await pythons.find(version, self.children.exec)
            if found is None:
                raise BuildFailed(f"Python {version} is gone from this host: {detail}; deploy again")
            python, env = found, pythons.child_env(env)
        if sandboxed:
            return await self._fork(spec, config, code_dirs, deps, key, isolated, None if version is None else python)
        # sandbox 'none', the operator's explicit choice (warned about at start, in /healthz and on deploy)
        argv = [python, "-m", "services.runtime", str(config_path)]
        memory = spec.memory_bytes

        def limits() -> None:
            # RLIMIT_DATA counts the heap and private anonymous memory (Linux >= 4.7): what the
            # interpreter and the handler allocate (an idle instance uses about 45 MB of it),
            # not the address space of shared libraries, which RLIMIT_AS would
            resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))

        with open(spec.log_path, "ab") as out:
            proc = await self.children.exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                cwd=str(code_dirs[0]), start_new_session=True, preexec_fn=limits,
            )
        handle = self._register(spec, proc.pid, {"env": key})
        self._watchers[spec.id] = asyncio.ensure_future(self._watch_child(handle, proc))
        return handle

    async def _fork(self, spec: InstanceSpec, config: InstanceConfig, code_dirs: tuple[Path, ...], deps: tuple[Path, ...],
                    key: str, isolated: bool, python: str | None) -> InstanceHandle:
        """A confined instance, forked from its environment's zygote or, failing that (or on another
        interpreter, ``python``), from a zygote of its own."""
        readonly = [str(p) for p in deps] + ([str(link_dir(self.settings))] if isolated else [])
        request = {"op": "spawn", "id": spec.id, "config": config.to_dict(), "writable": [str(p) for p in code_dirs],
                   "readonly": readonly, "cwd": str(code_dirs[0]), "memory_bytes": spec.memory_bytes,
                   "uid": instance_uid(spec.id), "pids": int(spec.extra.get("pids") or DEFAULT_PIDS),
                   "scratch_bytes": int(spec.extra.get("scratch_bytes") or DEFAULT_SCRATCH_BYTES),
                   "network": "isolated" if isolated else "host", "resolv_conf": RESOLV_CONF,
                   "seccomp": self.seccomp_program}
        net = None
        if isolated:
            try:
                net = await self.nets.take()
            except NetUnavailable as exc:
                raise BuildFailed(f"the instance {spec.id} could not get its network: {exc}") from None
        try:
            with open(spec.log_path, "ab") as out, self.children.starting():
                fds = [out.fileno()] + ([net.netns_fd, net.exit_w] if net else [])
                reply = None
                if python is None and self.subreaper and not self.zygotes.unavailable:
                    try:
                        reply = await self.zygotes.spawn(key, spec.group_id, request, fds)
                    except ZygoteUnavailable as exc:
                        log.info("starting the instance cold", instance=spec.id, reason=str(exc))
                elif python is None and not self._said_cold:
                    self._said_cold = True
                    log.warning("no zygotes: every instance starts a zygote of its own (about 0.2 s slower to wake)",
                                reason=self.zygotes.unavailable or "the deployer cannot become a child subreaper")
                if reply is None:
                    try:
                        reply = await self.zygotes.spawn_once(request, fds, python)
                    except ZygoteUnavailable as exc:
                        raise BuildFailed(f"the instance {spec.id} could not be started in its sandbox: {exc}",
                                          {"log_tail": _tail(spec.log_path)}) from None
                pid = int(reply["pid"])
                self.children.own(pid)  # it becomes our child as the zygote's first child exits; _watch_pid reaps it
        except BaseException:
            if net is not None:
                net.discard()
            raise
        if net is not None:
            net.handed_over()  # the instance's init holds the exit pipe: slirp4netns lives as long as it does
            self.networks[spec.id] = net.proc
        log.info("instance forked", instance=spec.id, pid=pid, env=key or "base", fork_ms=reply.get("fork_ms"),
                 steps_ms=reply.get("steps_ms"))
        handle = self._register(spec, pid, {"env": key, "forked": True, "zygote_pid": reply.get("zygote_pid"),
                                            "fork_ms": reply.get("fork_ms"), "network": "isolated" if isolated else "host",
                                            "slirp4netns_pid": net.proc.pid if net else None})
        self.forked.add(spec.id)
        self._watchers[spec.id] = asyncio.ensure_future(self._watch_pid(handle, reap=True))
        return handle

    def _register(self, spec: InstanceSpec, pid: int, extra: dict) -> InstanceHandle:
        functions = tuple(f["name"] for f in spec.functions)
        handle = InstanceHandle(spec.id, spec.group_id, spec.group_version, pid, spec.log_path, time.time(),
                                functions)
        (self.registry / spec.id / "instance.json").write_text(json.dumps({
            "id": spec.id, "group_id": spec.group_id, "group_version": spec.group_version, "pid": pid,
            "functions": list(functions),
            "start_time": _start_time(pid), "log_path": str(spec.log_path), "started_at": handle.started_at,
            **extra,
        }))
        self.handles[spec.id] = handle
        return handle

    async def _watch_child(self, handle: InstanceHandle, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self._exited(handle, code)

    async def _watch_pid(self, handle: InstanceHandle, reap: bool) -> None:
        """Wait for an instance that asyncio did not start: forked (our child by reparenting) or adopted."""
        assert handle.pid is not None
        if reap:
            try:
                code = await wait_child(handle.pid)
            finally:
                self.children.disown(handle.pid)
        else:
            await wait_child(handle.pid, reap_it=False)
            code = None  # adopted: not our child, its exit code is not ours to read
        self._exited(handle, code)

    def _exited(self, handle: InstanceHandle, code: int | None) -> None:
        net = self.networks.pop(handle.id, None)
        if net is not None and net.returncode is None:
            net.kill()  # it exits by itself once the instance's init is gone; this is for a stray one
        self.handles.pop(handle.id, None)
        self._watchers.pop(handle.id, None)
        self.forked.discard(handle.id)
        try:
            (self.registry / handle.id / "instance.json").unlink()
            (self.registry / handle.id / "config.json").unlink()
            (self.registry / handle.id).rmdir()
        except OSError:
            pass
        self.on_exit(handle, code)

    async def stop(self, handle: InstanceHandle, timeout_s: float) -> None:
        if handle.pid is None or handle.id not in self.handles:
            return
        handle.stopping = True
        watcher = self._watchers.get(handle.id)
        # the runtime drains on SIGTERM; bwrap itself would ignore or drop it. A forked
        # instance's pid is its init, which passes SIGTERM on to the runtime
        inner = [] if handle.id in self.forked else _descendants(handle.pid)
        _signal(inner or [handle.pid], signal.SIGTERM)
        if watcher is not None:
            try:
                await asyncio.wait_for(asyncio.shield(watcher), timeout_s)
                return
            except asyncio.TimeoutError:
                pass
        _signal([handle.pid, *_descendants(handle.pid)], signal.SIGKILL)
        if watcher is not None:
            try:
                await asyncio.wait_for(asyncio.shield(watcher), 5)
            except asyncio.TimeoutError:
                log.error("instance did not die after SIGKILL", instance=handle.id, pid=handle.pid)

    def adopt(self) -> list[InstanceHandle]:
        adopted: list[InstanceHandle] = []
        for meta_path in self.registry.glob("*/instance.json"):
            try:
                meta = json.loads(meta_path.read_text())
                pid = int(meta["pid"])
            except (OSError, ValueError, KeyError):
                continue
            if meta.get("start_time") is None or _start_time(pid) != meta["start_time"]:
                for leftover in meta_path.parent.iterdir():
                    leftover.unlink(missing_ok=True)
                meta_path.parent.rmdir()
                continue
            handle = InstanceHandle(meta["id"], meta["group_id"], int(meta["group_version"]), pid,
                                    Path(meta["log_path"]), float(meta.get("started_at", 0)),
                                    tuple(meta.get("functions") or ()), adopted=True)
            self.handles[handle.id] = handle
            if meta.get("forked"):
                self.forked.add(handle.id)
                self.zygotes.adopt(str(meta.get("env") or ""), handle.group_id)
            self._watchers[handle.id] = asyncio.ensure_future(self._watch_pid(handle, reap=False))
            adopted.append(handle)
        return adopted

    def list(self) -> list[InstanceHandle]:
        return list(self.handles.values())

    def groups_changed(self, group_ids: set[str]) -> None:
        self.zygotes.retain(group_ids)

    def close(self) -> None:
        self.zygotes.close()
        self.nets.close()

