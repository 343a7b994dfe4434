"""The default backend: each instance is a local, sandboxed ``services.runtime`` process.

Instances are started in their own session so they outlive a deployer that dies
(invocations must not stop with it); each has a registry file under
``<var>/instances`` so the next deployer adopts it instead of starting a
duplicate. bubblewrap does not forward signals, so stop() signals the runtime
process inside the sandbox directly, then kills the whole tree after a timeout.
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

from shared.config import Settings
from shared.procs import descendants as _descendants, start_time as _start_time
from shared.logs import get_logger
from services.deployer.backends.base import Backend, ExitCallback, InstanceHandle, InstanceSpec
from services.deployer.sandbox import Mounts, base_env, hidden_paths, wrap

log = get_logger(__name__)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class ProcessBackend(Backend):
    name = "process"

    def __init__(self, settings: Settings, on_exit: ExitCallback) -> None:
        super().__init__(on_exit)
        self.settings = settings
        self.var = settings.var_dir.resolve()
        self.registry = self.var / "instances"
        self.registry.mkdir(parents=True, exist_ok=True)
        self.handles: dict[str, InstanceHandle] = {}
        self._watchers: dict[str, asyncio.Task] = {}

    async def start(self, spec: InstanceSpec) -> InstanceHandle:
        inst_dir = self.registry / spec.id
        inst_dir.mkdir(parents=True, exist_ok=True)
        config_path = inst_dir / "config.json"
        config_path.write_text(json.dumps({
            "instance_id": spec.id,
            "group": spec.group_id,
            "group_version": spec.group_version,
            "gateways": [self.settings.gateway_router],
            "gateway_url": self.settings.http_url,
            "fusionizer_host": self.settings.advertised_host,
            "memory_bytes": spec.memory_bytes,
            "functions": spec.functions,
        }))
        code_dirs = tuple(Path(f["code_dir"]) for f in spec.functions)
        deps = tuple(Path(f["deps_dir"]).parent for f in spec.functions if f.get("deps_dir"))
        mounts = Mounts(writable=code_dirs, readonly=(*deps, config_path), hidden=hidden_paths())
        argv = wrap(self.settings, [sys.executable, "-m", "services.runtime", str(config_path)], mounts, code_dirs[0])
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        memory = spec.memory_bytes

        def limits() -> None:
            # RLIMIT_DATA counts the heap and private anonymous memory (Linux >= 4.7): what the
            # interpreter and the handler allocate (an idle instance uses about 45 MB of it),
            # not the address space of shared libraries, which RLIMIT_AS would
            resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))

        with open(spec.log_path, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=base_env(),
                cwd=str(code_dirs[0]), start_new_session=True, preexec_fn=limits,
            )
        functions = tuple(f["name"] for f in spec.functions)
        handle = InstanceHandle(spec.id, spec.group_id, spec.group_version, proc.pid, spec.log_path, time.time(),
                                functions)
        (inst_dir / "instance.json").write_text(json.dumps({
            "id": spec.id, "group_id": spec.group_id, "group_version": spec.group_version, "pid": proc.pid,
            "functions": list(functions),
            "start_time": _start_time(proc.pid), "log_path": str(spec.log_path), "started_at": handle.started_at,
        }))
        self.handles[spec.id] = handle
        self._watchers[spec.id] = asyncio.ensure_future(self._watch_child(handle, proc))
        return handle

    async def _watch_child(self, handle: InstanceHandle, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self._exited(handle, code)

    async def _watch_adopted(self, handle: InstanceHandle) -> None:
        assert handle.pid is not None
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(handle.pid)
        except (ProcessLookupError, OSError):
            self._exited(handle, None)
            return
        done = loop.create_future()
        loop.add_reader(fd, lambda: done.done() or done.set_result(None))
        try:
            await done
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        self._exited(handle, None)  # not our child: its exit code is not ours to read

    def _exited(self, handle: InstanceHandle, code: int | None) -> None:
        self.handles.pop(handle.id, None)
        self._watchers.pop(handle.id, None)
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
        inner = _descendants(handle.pid)
        # the runtime drains on SIGTERM; bwrap itself would ignore or drop it
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
            self._watchers[handle.id] = asyncio.ensure_future(self._watch_adopted(handle))
            adopted.append(handle)
        return adopted

    def list(self) -> list[InstanceHandle]:
        return list(self.handles.values())
