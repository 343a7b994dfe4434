"""The deployer's side of the zygotes: one per runtime environment, started on demand, restarted, stopped.

A zygote (``services/runtime/zygote.py``) is a warm interpreter under bwrap that
forks confined instances. :class:`Zygotes` keeps one per environment key (the
dependency environment's directory, "" for none): started when an instance of
that environment is first needed, started again (with backoff) when it dies
while groups still use the environment, and stopped once no group has used it
for ``LINGER_S`` (scaled-to-zero groups still count: waking them is what it is
for). When the zygote of an environment cannot run or zygotes are turned off,
:meth:`spawn_once` starts a zygote for one instance (``--once``, a cold start of
about 0.2 s more), so that every instance is confined by the same code.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.logs import get_logger
from shared.zygotewire import receive, send
from services.deployer import pythons
from services.deployer.children import Children
from services.deployer.sandbox import base_env, install_paths, interpreter_paths, zygote_argv, zygote_stage

log = get_logger(__name__)

READY_TIMEOUT_S = 30.0  # interpreter start, runtime import and the self-test; about 0.2 s here
SPAWN_TIMEOUT_S = 15.0  # the zygote's own limit is 10 s
RESTART_BACKOFF_S = (0.2, 30.0)  # first and longest wait before starting a dead zygote again
# a zygote no group uses is kept this long: deleting and deploying again (tests, CI, a redeploy under
# a new name) should not pay its start (about 0.2 s) each time
LINGER_S = 10.0


class ZygoteUnavailable(Exception):
    """No zygote can fork this instance; start it cold."""


class Zygote:
    """One running zygote: its bwrap process and the deployer's end of the control socket."""

    def __init__(self, key: str, proc: asyncio.subprocess.Process, sock: socket.socket) -> None:
        self.key = key
        self.proc = proc
        self.sock = sock
        self.pid = 0  # the zygote's python (inside bwrap, which is proc)
        self.lock = asyncio.Lock()  # one request at a time on the socket
        self.stopping = False

    async def request(self, message: dict[str, Any] | None, fds: list[int], timeout_s: float) -> dict[str, Any]:
        """Send ``message`` (None: only wait) and return the zygote's answer."""
        loop = asyncio.get_running_loop()
        if message is not None:
            send(self.sock, message, fds)
        readable = loop.create_future()
        fd = self.sock.fileno()
        loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
        try:
            await asyncio.wait_for(readable, timeout_s)
        finally:
            loop.remove_reader(fd)
        reply, extra = receive(self.sock, 0)
        for extra_fd in extra:
            os.close(extra_fd)
        if reply is None:
            raise ZygoteUnavailable(f"the zygote of environment {self.key or 'base'!r} exited")
        return reply

    def close(self) -> None:
        self.stopping = True
        self.sock.close()  # the zygote exits on EOF; bwrap with it
        if self.proc.returncode is None:
            try:
                self.proc.terminate()
            except ProcessLookupError:
                pass


class Zygotes:
    def __init__(self, settings: Settings, children: Children | None = None) -> None:
        self.settings = settings
        self.children = children or Children()
        self.var = settings.var_dir.resolve()
        self.running: dict[str, Zygote] = {}
        self.groups: dict[str, set[str]] = {}  # environment key -> groups that use it
        self._starting: dict[str, asyncio.Task] = {}
        self._retry_at: dict[str, float] = {}
        self._unused_since: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._unavailable: str | None = None  # why no zygote can run here at all
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        self.forks = 0  # instances forked by a long-lived zygote (GET /metrics)
        self.warm_hits = 0  # of those, forks whose zygote was already running
        if not settings.zygote:
            self._unavailable = "zygotes are turned off (NUCLIDE_ZYGOTE=false)"
        elif settings.sandbox == "none" or os.geteuid() != 0 or shutil.which("bwrap") is None:
            self._unavailable = ("zygotes need bubblewrap and root to confine forked instances"
                                 f" (sandbox {settings.sandbox!r}, uid {os.geteuid()})")

    @property
    def unavailable(self) -> str | None:
        """Why no zygote can run here at all (then every instance starts cold), or None."""
        return self._unavailable

    def _argv(self, once: bool = False, python: str | None = None) -> list[str] | None:
        functions, envs = zygote_stage(self.settings)
        argv = [python or sys.executable, "-m", "services.runtime.zygote", "--control-fd", "{fd}", "--var", str(self.var),
                "--stage", str(functions), "--stage", str(envs)]
        for path in install_paths():
            argv += ["--install", str(path)]
        if once:
            argv.append("--once")
        return zygote_argv(self.settings, argv, interpreter_paths(python) if python else ())

    # ----- forking -------------------------------------------------------------------------

    async def spawn(self, key: str, group_id: str, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Fork an instance from the zygote of ``key``; its answer holds the pid. Raises ZygoteUnavailable."""
        if self._unavailable:
            raise ZygoteUnavailable(self._unavailable)
        self.groups.setdefault(key, set()).add(group_id)
        running = self.running.get(key)
        warm = running is not None and not running.stopping
        zygote = await self.ensure(key)
        async with zygote.lock:
            try:
                reply = await zygote.request(request, fds, SPAWN_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError) as exc:
                zygote.close()
                raise ZygoteUnavailable(f"the zygote of environment {key or 'base'!r} did not answer: {exc}") from None
        if "error" in reply:
            # its instance process, when killed on the way, is a child of ours: the deployer's sweep reaps it
            raise ZygoteUnavailable(f"the zygote could not fork the instance: {reply['error']}")
        reply["zygote_pid"] = zygote.pid
        self.forks += 1
        self.warm_hits += warm
        return reply

    async def spawn_once(self, request: dict[str, Any], fds: list[int], python: str | None = None) -> dict[str, Any]:
        """Start a zygote for this one instance (a cold start; on ``python``, another interpreter, when given);
        its answer holds the pid. Raises ZygoteUnavailable."""
        env = pythons.child_env(base_env()) if python else base_env()
        zygote = await self._launch("once", self._argv(once=True, python=python), env)
        try:
            reply = await zygote.request(request, fds, READY_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            zygote.close()
            raise ZygoteUnavailable(f"the cold start's zygote did not answer: {exc}") from None
        zygote.stopping = True
        zygote.sock.close()  # it exits by itself after its one spawn
        if "error" in reply:
            raise ZygoteUnavailable(f"the cold start could not confine the instance: {reply['error']}")
        reply["zygote_pid"] = 0
        return reply

    async def ensure(self, key: str) -> Zygote:
        """The running zygote of ``key``, started if need be; raises ZygoteUnavailable."""
        zygote = self.running.get(key)
        if zygote is not None and not zygote.stopping:
            return zygote
        wait_s = self._retry_at.get(key, 0) - time.monotonic()
        if wait_s > 0:
            raise ZygoteUnavailable(f"the zygote of environment {key or 'base'!r} failed; next try in {wait_s:.1f} s")
        task = self._starting.get(key)
        if task is None:
            task = self._starting[key] = asyncio.ensure_future(self._start(key))
            task.add_done_callback(lambda _t: self._starting.pop(key, None))
        return await asyncio.shield(task)

    async def _launch(self, key: str, argv: list[str] | None, env: dict[str, str] | None = None) -> Zygote:
        """A zygote process that said it is ready; raises ZygoteUnavailable with its reason."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [a.replace("{fd}", str(theirs.fileno())) for a in argv or ()]
        log_path = self.var / "logs" / "zygotes" / f"{key or 'base'}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_path, "ab") as out:
                proc = await self.children.exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env or base_env(),
                    pass_fds=(theirs.fileno(),), start_new_session=True)
        except OSError as exc:
            mine.close()
            raise ZygoteUnavailable(f"could not start: {exc}") from None
        finally:
            theirs.close()
        mine.setblocking(False)
        zygote = Zygote(key, proc, mine)
        try:
            hello = await zygote.request(None, [], READY_TIMEOUT_S)
        except (ZygoteUnavailable, asyncio.TimeoutError, OSError) as exc:
            hello = {"ready": False, "error": str(exc) or type(exc).__name__}
        if not hello.get("ready"):
            zygote.close()
            raise ZygoteUnavailable(str(hello.get("error", "no reason given")))
        zygote.pid = int(hello.get("pid") or 0)
        return zygote

    async def _start(self, key: str) -> Zygote:
        started = time.perf_counter()
        try:
            zygote = await self._launch(key, self._argv())
        except ZygoteUnavailable as exc:
            self._failed(key, str(exc))
            raise ZygoteUnavailable(f"the zygote of environment {key or 'base'!r} cannot run: {exc}") from None
        self.running[key] = zygote
        self._failures.pop(key, None)
        self._spawn_task(self._watch(zygote))
        log.info("zygote ready", env=key or "base", pid=zygote.pid, took_ms=round((time.perf_counter() - started) * 1000, 1))
        return zygote

    def _failed(self, key: str, reason: str) -> None:
        count = self._failures[key] = self._failures.get(key, 0) + 1
        first, longest = RESTART_BACKOFF_S
        delay = min(longest, first * 2 ** (count - 1))
        self._retry_at[key] = time.monotonic() + delay
        log.warning("zygote unavailable; instances of its environment start as fresh interpreters",
                    env=key or "base", reason=reason, retry_in_s=delay)

    async def _watch(self, zygote: Zygote) -> None:
        code = await zygote.proc.wait()
        if self.running.get(zygote.key) is zygote:
            del self.running[zygote.key]
        if zygote.stopping or self._closing:
            return
        zygote.close()
        log.warning("zygote exited; starting it again", env=zygote.key or "base", pid=zygote.pid, exit_code=code)
        self._failed(zygote.key, f"exited with code {code}")
        self._restart_later(zygote.key)

    def _restart_later(self, key: str) -> None:
        async def restart() -> None:
            await asyncio.sleep(max(0.0, self._retry_at.get(key, 0) - time.monotonic()))
            if self._closing or not self.groups.get(key) or key in self.running:
                return
            try:
                await self.ensure(key)
            except ZygoteUnavailable:
                self._restart_later(key)

        self._spawn_task(restart())

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----- lifecycle -------------------------------------------------------------------------

    def adopt(self, key: str, group_id: str) -> None:
        """An instance left by an earlier deployer: its environment's zygote is wanted again."""
        if self._unavailable:
            return
        self.groups.setdefault(key, set()).add(group_id)
        if key not in self.running:
            self._restart_later(key)

    def retain(self, live_groups: set[str]) -> None:
        """Stop the zygotes of environments that no group has used for LINGER_S."""
        now = time.monotonic()
        for key in list(self.groups):
            self.groups[key] &= live_groups
            if self.groups[key]:
                self._unused_since.pop(key, None)
                continue
            if now - self._unused_since.setdefault(key, now) < LINGER_S:
                continue
            del self.groups[key]
            del self._unused_since[key]
            zygote = self.running.pop(key, None)
            if zygote is not None:
                log.info("stopping zygote: no function uses its environment", env=key or "base", pid=zygote.pid)
                zygote.close()

    def pids(self) -> dict[str, int]:
        return {key: z.pid for key, z in self.running.items()}

    def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for zygote in self.running.values():
            zygote.close()
        self.running.clear()


def env_key(deps_dirs: list[str]) -> str:
    """The environment an instance runs in: its dependency directory's name, "" for none."""
    return ",".join(sorted({Path(d).parent.name for d in deps_dirs}))


REAP_WAIT_S = 1.0  # a forked instance becomes our child when the zygote's first child exits, a moment later


async def reap(pidfd: int) -> int | None:
    """The exit code of an exited forked instance (negative: the signal that killed it); None if it never
    became our child (we are no subreaper)."""
    deadline = time.monotonic() + REAP_WAIT_S
    while True:
        try:
            info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        except ChildProcessError:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.005)
            continue
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


async def wait_child(pid: int, reap_it: bool = True) -> int | None:
    """Wait for a process to exit (a pidfd, so it need not be our child) and, with ``reap_it``, reap it and
    return its exit code; None when it is gone already, not ours, or not reaped."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
        return await reap(fd) if reap_it else None
    finally:
        loop.remove_reader(fd)
        os.close(fd)
