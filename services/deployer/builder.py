"""Builds what instances run: the function's code directory and its dependency environment.

Code: the version's zip from the store, extracted once to
``<var>/functions/<name>/<version>/code``. Dependencies: one environment per
hash of (Python version, requirements.txt, build commands) at
``<var>/envs/<hash>``, shared by every function with the same hash and kept
across restarts; built in a temporary directory and renamed into place, so a
half-built environment is never used. Builds run as sandboxed subprocesses and
never block the deployer's loop; builds of the same hash wait for each other.

Each sandboxed build step runs in a network namespace of its own whose only way out is
slirp4netns with host loopback disabled (``services/deployer/netns.py``), as an isolated
instance does: it reaches a package index outside, or a mirror on one of the host's other
addresses, but nothing listening on the host's loopback (the platform's sockets among
them). A group whose spec asks for ``network: host`` builds with the host's network.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from shared.archive import extract_archive, read_archive
from shared.config import Settings
from shared.errors import BuildFailed
from shared.logs import get_logger
from shared.storeclient import StoreClient
from services.deployer import pythons
from services.deployer.children import Children
from services.deployer.netns import RESOLV_CONF, Net, NetPool, NetUnavailable
from services.deployer.sandbox import Mounts, base_env, bwrap_path, hidden_paths, interpreter_paths, wrap

log = get_logger(__name__)

LOG_TAIL_LINES = 30
REQUIREMENTS_STEP = "pip install -r requirements.txt"  # the title of the step that installs requirements.txt


def env_key(spec: dict[str, Any]) -> str | None:
    requirements = (spec.get("requirements") or "").strip()
    commands = [str(c) for c in spec.get("build_commands") or []]
    if not requirements and not commands:
        return None
    h = hashlib.sha256()
    h.update(f"python{spec.get('python') or pythons.HOST_VERSION}\0".encode())
    h.update(requirements.encode() + b"\0")
    for command in commands:
        h.update(command.encode() + b"\0")
    if spec.get("network") == "host":  # built with the host's network: not the same build as an isolated one
        h.update(b"network=host\0")
    return h.hexdigest()[:24]


# The names a build command uses for Python tools. The host's PATH may resolve them to anything (a
# pyenv shim that fails in the read-only sandbox, another Python's pip, nothing at all); a build
# installs into the function's environment, so each must run the interpreter the function runs on.
TOOL_SHIMS = {"python": "", "python3": "", "pip": "-m pip", "pip3": "-m pip"}


def write_tool_shims(bin_dir: Path, python: str) -> Path:
    """Write ``python``, ``python3``, ``pip`` and ``pip3`` into ``bin_dir``, each running ``python``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, args in TOOL_SHIMS.items():
        shim = bin_dir / name
        command = " ".join(part for part in ("exec", shlex.quote(python), args, '"$@"') if part)
        shim.write_text(f"#!/bin/sh\n{command}\n")
        shim.chmod(0o755)
    return bin_dir


def members_of_step(specs: dict[str, dict[str, Any]], step: str) -> list[str]:
    """The members of a fused group whose part of its merged build ``step`` is (the build command, or the
    requirements), to name when that step fails; every member when it is no one's in particular."""
    if step == REQUIREMENTS_STEP:
        owners = [n for n in sorted(specs) if (specs[n].get("requirements") or "").strip()]
    else:
        owners = [n for n in sorted(specs) if step in [str(c) for c in specs[n].get("build_commands") or []]]
    return owners or sorted(specs)


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])



def build_log_path(var_dir: Path, group_id: str, group_version: int) -> Path:
    """Where a group version's build writes its output as it runs: in the group's log folder, beside its
    instances' logs, so `logs -f` and a deploy that follows the function's log show the build too."""
    return var_dir.resolve() / "logs" / group_id / f"build-v{group_version}.log"

class Builder:
    def __init__(self, settings: Settings, store: StoreClient, children: Children | None = None) -> None:
        self.settings = settings
        self.store = store
        self.children = children or Children()
        self.var = settings.var_dir.resolve()
        self._locks: dict[str, asyncio.Lock] = {}
        # a namespace per build step, made when it starts: builds are rare, so none is kept ready
        self.nets = NetPool(self.children, self.var / "logs" / "slirp4netns.log", size=0)

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def code_dir(self, name: str, version: int, digest: str) -> Path:
        # keyed by content too: versions start again at 1 when a function is deleted and redeployed
        return self.var / "functions" / name / f"{version}-{digest[:16]}" / "code"

    async def ensure_code(self, name: str, version: int, digest: str) -> Path:
        target = self.code_dir(name, version, digest)
        if target.exists():
            return target
        async with self._lock(f"code:{name}:{version}"):
            if target.exists():
                return target
            data = await self.store.blob_get(digest)
            if hashlib.sha256(data).hexdigest() != digest:
                raise BuildFailed(f"the stored archive of '{name}' v{version} is corrupt (digest mismatch)",
                                  {"tasks": [name]})
            tmp = target.parent / f".code-{os.getpid()}-{time.monotonic_ns()}"
            await asyncio.to_thread(extract_archive, read_archive(data), tmp)
            os.replace(tmp, target)
            return target

    def env_dir(self, key: str) -> Path:
        return self.var / "envs" / key

    async def ensure_env(self, spec: dict[str, Any], log_path: Path | None = None) -> Path | None:
        """The dependency directory for a spec (to put on sys.path), or None when it needs none.

        A build writes its output to ``log_path`` as it runs (the group's log folder, so `logs -f` and a
        deploy follow it); without one, to ``build.log`` in the environment it builds."""
        key = env_key(spec)
        if key is None:
            return None
        target = self.env_dir(key)
        if (target / "site").is_dir():
            return target / "site"
        async with self._lock(f"env:{key}"):
            if (target / "site").is_dir():
                return target / "site"
            await self._build_env(key, spec, target, log_path)
            return target / "site"

    async def _build_env(self, key: str, spec: dict[str, Any], target: Path, log_path: Path | None) -> None:
        started = time.monotonic()
        python = sys.executable
        if spec.get("python"):  # another Python 3 (spec.runtime python:3.X): its own pip builds for it
            found, detail = await pythons.find(str(spec["python"]), self.children.exec)
            if found is None:
                raise BuildFailed(f"Python {spec['python']} is gone from this host: {detail}; deploy again")
            python = found
        work = target.parent / f".build-{key}-{time.monotonic_ns()}"
        site = work / "site"
        site.mkdir(parents=True)
        cache = self.var / "cache" / "pip"
        cache.mkdir(parents=True, exist_ok=True)
        if log_path is None:
            log_path = work / "build.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tools = write_tool_shims(work / ".tools", python)
        env = base_env(home=str(work))
        env.update({"PIP_TARGET": str(site), "PIP_CACHE_DIR": str(cache), "PYTHONPATH": str(site),
                    "PATH": f"{tools}:{site / 'bin'}:{env['PATH']}", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                    "PIP_NO_INPUT": "1"})
        extra = interpreter_paths(python) if python != sys.executable else ()
        mounts = Mounts(writable=(work, cache), readonly=extra, hidden=hidden_paths())
        steps: list[tuple[str, list[str]]] = []
        requirements = (spec.get("requirements") or "").strip()
        if requirements:
            (work / "requirements.txt").write_text(requirements + "\n")
            steps.append((REQUIREMENTS_STEP, [
                python, "-m", "pip", "install", "--no-input", "--target", str(site),
                "-r", str(work / "requirements.txt"),
            ]))
        for command in spec.get("build_commands") or []:
            # build commands are the user's own shell lines (nuclio's spec.build.commands),
            # run as one argv in the sandbox; nothing of ours is interpolated into them
            steps.append((str(command), ["/bin/sh", "-c", str(command)]))
        isolated = bwrap_path(self.settings) is not None and spec.get("network", "isolated") != "host"
        resolv_conf = None
        if isolated:
            resolv_conf = tools / "resolv.conf"
            resolv_conf.write_text(RESOLV_CONF)
        with open(log_path, "ab") as out:
            for title, argv in steps:
                out.write(f"$ {title}\n".encode())
                out.flush()
                net: Net | None = None
                cmd = wrap(self.settings, argv, mounts, work, resolv_conf)
                if isolated:
                    try:
                        net = await self.nets.make()
                    except NetUnavailable as exc:
                        shutil.rmtree(work, ignore_errors=True)
                        raise BuildFailed(f"build step '{title}' could not get its network: {exc}",
                                          {"step": title}) from None
                    # the sandbox starts inside the step's namespace: nsenter joins it, then runs bwrap
                    cmd = [shutil.which("nsenter") or "/usr/bin/nsenter", f"--net=/proc/self/fd/{net.netns_fd}",
                           "--", *cmd]
                try:
                    proc = await self.children.exec(
                        *cmd, cwd=str(work), env=env, stdout=out, stderr=asyncio.subprocess.STDOUT,
                        stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
                        pass_fds=(net.netns_fd,) if net is not None else (),
                    )
                    try:
                        code = await asyncio.wait_for(proc.wait(), self.settings.build_timeout_s)
                    except asyncio.TimeoutError:
                        proc.kill()
                        await proc.wait()
                        code = None
                finally:
                    if net is not None:
                        net.discard()  # slirp4netns goes with the step
                if code != 0:
                    out.flush()
                    text = log_path.read_text(errors="replace")
                    shutil.rmtree(work, ignore_errors=True)
                    reason = "timed out" if code is None else f"exited with code {code}"
                    raise BuildFailed(f"build step '{title}' {reason}", {"log_tail": tail(text), "step": title})
        shutil.rmtree(tools, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(work, target)
        log.info("environment built", key=key, took_s=round(time.monotonic() - started, 2))
