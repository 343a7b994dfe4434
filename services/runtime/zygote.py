"""The zygote: a warm interpreter per runtime environment that forks confined instances on request.

``python -m services.runtime.zygote --control-fd N --var DIR [--stage DIR]... [--install DIR]...``
runs inside bubblewrap (``services/deployer/sandbox.py: zygote_argv``) with the
capabilities it needs to build namespaces, and never imports user code itself.
It imports the runtime (ZeroMQ, asyncio, the handler machinery) once, so an
instance costs a fork instead of a fresh interpreter (about 2 ms to a first
ZeroMQ message instead of 40 ms to import pyzmq alone), and the pages it loaded
are shared by every instance it forks.

The deployer talks to it over a Unix SOCK_SEQPACKET pair (one msgpack map per
packet, file descriptors beside it), one request at a time::

    zygote -> deployer, once:  {"ready": true, "pid": P, "warm_ms": T}  or  {"ready": false, "error": "..."}
    deployer -> zygote:        {"op": "spawn", "id": ID, "config": {...}, "writable": [dirs], "readonly": [dirs],
                                "cwd": DIR, "memory_bytes": N, "uid": U, "pids": N, "scratch_bytes": N,
                                "network": "isolated" | "host", "resolv_conf": TEXT, "seccomp": BPF}
                               + SCM_RIGHTS [log file] (+ [network namespace, net exit] when isolated)
    zygote -> deployer:        {"id": ID, "pid": PID, "fork_ms": T, "steps_ms": {...}}
                               or  {"id": ID, "error": "...", "pid": PID or 0 (killed; the deployer reaps it)}

A spawn forks three times (see ``confine.py``): the first child unshares
namespaces and builds the instance's mounts, the second is PID 1 of the new PID
namespace and drops every privilege, then forks the runtime (PID 2), which
reports "ok" and only then loads the function, while PID 1 stays a small init
(reaps orphans, forwards signals, exits with the runtime's status; see
``_init``). The first child exits at once, so the instance's init is reparented
to the deployer (a child subreaper), which reaps it and reads its exit code as
for a cold instance. The zygote exits when the deployer's end of the socket closes.

An isolated instance enters the network namespace the deployer prepared
(``services/deployer/netns.py``: slirp4netns is up in it already); its init holds
"net exit" open for the instance's life (slirp4netns exits when it closes).

``--once`` serves one spawn and exits: the cold start, when no warm zygote can
fork the instance, confines it exactly like a forked one.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any, NamedTuple

import msgpack

from shared.zygotewire import receive, send
from services.runtime import confine

SPAWN_TIMEOUT_S = 10.0  # fork to "ok" (namespaces, mounts, privileges dropped); milliseconds normally
PROBE_UID = 65534  # the self-test's instance runs as nobody


class SpawnFailed(RuntimeError):
    """A fork did not end in a confined instance; ``pid`` is the instance process killed on the way (or 0)."""

    def __init__(self, message: str, pid: int = 0) -> None:
        super().__init__(message)
        self.pid = pid


class Zygote:
    def __init__(self, sock: socket.socket, var_dir: str, staged: tuple[str, ...], install: tuple[str, ...]) -> None:
        self.sock = sock
        self.var_dir = var_dir
        self.staged = staged
        self.install = install
        self.cap_last = confine.cap_last()
        self.steps_ms: dict[str, float] = {}  # of the last spawn: when each step in the children was done
        self.pending_first = 0  # the last spawn's first child, not reaped yet
        self.once = False  # serve one spawn, then exit

    def plan(self, writable: tuple[str, ...] = (), readonly: tuple[str, ...] = (), **limits: Any) -> confine.Plan:
        return confine.Plan(self.var_dir, writable, readonly, self.staged, self.install, **limits)

    def spawn(self, plan: confine.Plan, limits: "Limits", run: Any) -> tuple[int, float]:
        """Fork a confined instance that calls ``run()`` once confined; returns its pid and the ms it took."""
        started = time.perf_counter()
        r, w = os.pipe()
        first = os.fork()
        if first == 0:  # pragma: no cover (runs in the child)
            os.close(r)
            self._first_child(plan, limits, run, w)
        os.close(w)
        try:
            report = _read_all(r, SPAWN_TIMEOUT_S, until=("ok", "error"))
        finally:
            os.close(r)
        self.pending_first = first  # reaped once the reply is out: its exit costs about a millisecond
        pid = 0
        self.steps_ms = {}
        for line in report.splitlines():
            word, _, rest = line.partition(" ")
            if word == "pid":
                pid = int(rest)
            elif word == "t":  # a child's step and when it finished (perf_counter is system-wide)
                step, _, at = rest.partition(" ")
                self.steps_ms[step] = round((float(at) - started) * 1000, 3)
            elif word == "error":
                raise SpawnFailed(rest, _kill(pid))
        if not pid or "ok" not in report.splitlines():
            raise SpawnFailed("the forked instance did not confirm its sandbox (it exited, or took over"
                              f" {SPAWN_TIMEOUT_S:g} s; see its log)", _kill(pid))
        return pid, (time.perf_counter() - started) * 1000

    def _first_child(self, plan: confine.Plan, limits: "Limits", run: Any, w: int) -> None:  # pragma: no cover
        try:
            _stamp(w, "forked")
            self.sock.close()
            confine.enter(plan)
            _stamp(w, "mounts")
            second = os.fork()
            if second == 0:
                self._instance(limits, run, w)
            os.write(w, f"pid {second}\n".encode())
            os._exit(0)
        except BaseException as exc:
            _report_error(w, exc)
            os._exit(1)

    def _instance(self, limits: "Limits", run: Any, w: int) -> None:  # pragma: no cover
        try:
            _stamp(w, "pid_namespace")
            confine.finish(limits.memory_bytes, self.cap_last, limits.uid, limits.pids, limits.seccomp)
            _stamp(w, "privileges_dropped")
        except BaseException as exc:
            _report_error(w, exc)
            os._exit(1)
        runtime = os.fork()
        if runtime:
            os.close(w)
            _init(runtime, limits.keep_fd)
        try:
            code = run(w)  # closes w once it said "ok": from here on errors go to the instance's log
        except BaseException:
            traceback.print_exc()
            code = 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    def serve(self) -> int:
        from services.runtime.loop import serve

        while True:
            try:
                message, fds = receive(self.sock, 3)
            except (ValueError, msgpack.UnpackException) as exc:
                print(f"nuclide zygote: dropped a malformed request: {exc}", file=sys.stderr)
                continue
            if message is None:
                return 0  # the deployer closed its end (stopped, or died): instances live on without us
            inst_id = str(message.get("id", ""))
            try:
                isolated = message.get("network", "host") == "isolated"
                if message.get("op") != "spawn" or len(fds) != (3 if isolated else 1):
                    raise ValueError("expected a spawn request with a log file descriptor (and a network namespace"
                                     " and a pipe for an isolated instance)")
                config = message["config"]
                cwd = str(message["cwd"])
                uid = int(message.get("uid") or 0)
                seccomp = bytes(message.get("seccomp") or b"")
                if uid <= 0 or not seccomp:
                    raise ValueError("a spawn request needs the instance's own uid (not root) and its seccomp filter")
                plan = self.plan(tuple(map(str, message.get("writable") or ())),
                                 tuple(map(str, message.get("readonly") or ())), uid=uid,
                                 scratch_bytes=int(message.get("scratch_bytes") or 0),
                                 netns_fd=fds[1] if isolated else -1,
                                 resolv_conf=str(message.get("resolv_conf") or "") if isolated else "")
                log_fd = fds[0]
                limits = Limits(int(message.get("memory_bytes") or 0), uid, int(message.get("pids") or 0),
                                fds[2] if isolated else -1, seccomp)

                def run(w: int) -> int:
                    _become_instance(log_fd, w, cwd)
                    try:
                        return serve(config)
                    finally:
                        atexit._run_exitfuncs()  # what interpreter teardown would run, without the teardown

                pid, took_ms = self.spawn(plan, limits, run)
                send(self.sock, {"id": inst_id, "pid": pid, "fork_ms": round(took_ms, 3), "steps_ms": self.steps_ms})
            except SpawnFailed as exc:
                # its instance process, if it got that far, is the deployer's to reap
                send(self.sock, {"id": inst_id, "error": str(exc), "pid": exc.pid})
            except Exception as exc:
                send(self.sock, {"id": inst_id, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                for fd in fds:
                    os.close(fd)
                if self.pending_first:
                    os.waitpid(self.pending_first, 0)
                    self.pending_first = 0
            if self.once:
                return 0

    def probe(self) -> None:
        """Fork a confined no-op once, so a missing privilege shows now and not at the first instance."""

        def run(w: int) -> int:
            os.write(w, b"ok\n")
            return 0

        r, w = os.pipe()
        first = os.fork()
        if first == 0:  # pragma: no cover
            os.close(r)
            try:
                self.sock.close()
                confine.enter(self.plan(uid=PROBE_UID, scratch_bytes=1 << 20))
                second = os.fork()
                if second == 0:
                    self._instance(Limits(0, PROBE_UID, 16, -1, b""), run, w)
                os.write(w, f"pid {second}\n".encode())
                _, status = os.waitpid(second, 0)  # ours to reap: a probe must not reach the deployer
                os._exit(os.waitstatus_to_exitcode(status))
            except BaseException as exc:
                _report_error(w, exc)
                os._exit(1)
        os.close(w)
        try:
            report = _read_all(r, SPAWN_TIMEOUT_S)
        finally:
            os.close(r)
            _, status = os.waitpid(first, 0)
        errors = [line[6:] for line in report.splitlines() if line.startswith("error ")]
        if errors or "ok" not in report.splitlines() or os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(errors[0] if errors else f"the probe instance failed ({report.strip() or 'no report'})")


_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


class Limits(NamedTuple):
    """What ``confine.finish`` applies to one instance, and the descriptor its init keeps open."""

    memory_bytes: int
    uid: int
    pids: int
    keep_fd: int  # the "net exit" pipe: slirp4netns lives as long as it is open; -1 for none
    seccomp: bytes  # the compiled filter (shared/seccomp.py), loaded last


def _init(runtime: int, keep_fd: int = -1) -> None:  # pragma: no cover (PID 1 of the instance's namespace)
    """What bwrap's init does for a cold instance: reap orphans, pass signals on, exit as the runtime did.

    Processes a handler starts and leaves behind are re-parented to PID 1 of the
    namespace; without a reaper they would stay zombies for the instance's life. The
    deployer tracks this process: its signals go to the runtime, and its exit status
    is the runtime's (128 + n for a signal). When it exits the kernel kills whatever
    is left in the namespace.
    """
    confine.set_name("nuclide-init")
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if keep_fd >= 3:
        os.closerange(3, keep_fd)
        os.closerange(keep_fd + 1, os.sysconf("SC_OPEN_MAX"))
    else:
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))

    def forward(signum: int, frame: Any) -> None:
        try:
            os.kill(runtime, signum)
        except ProcessLookupError:
            pass

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == runtime:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def _become_instance(log_fd: int, w: int, cwd: str) -> None:  # pragma: no cover (runs in the child)
    """Confined already: stdio to the instance's log, no descriptor of the zygote's left, then "ok"."""
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.closerange(3, w)
    os.closerange(w + 1, os.sysconf("SC_OPEN_MAX"))
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(cwd)
    sys.path[0] = cwd  # what `python -m services.runtime` in the code directory has
    _stamp(w, "stdio")
    os.write(w, b"ok\n")
    os.close(w)


def _stamp(w: int, step: str) -> None:  # pragma: no cover (runs in the child)
    os.write(w, f"t {step} {time.perf_counter()!r}\n".encode())


def _report_error(w: int, exc: BaseException) -> None:  # pragma: no cover (runs in the child)
    try:
        os.write(w, f"error {type(exc).__name__}: {exc}\n".encode())
    except OSError:
        pass


def _read_all(fd: int, timeout_s: float, until: tuple[str, ...] = ()) -> str:
    """What is written to a pipe until every writer has closed it, the deadline, or both a "pid" line and
    one of ``until`` (as lines) have come."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
        if until and chunk.endswith(b"\n"):
            words = {line.partition(" ")[0] for line in b"".join(chunks).decode(errors="replace").splitlines()}
            if "pid" in words and words.intersection(until):
                break
    return b"".join(chunks).decode(errors="replace")


def _kill(pid: int) -> int:
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.runtime.zygote")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--var", required=True, help="the state directory, as instances see it")
    parser.add_argument("--stage", action="append", default=[], help="a staged directory detached in instances")
    parser.add_argument("--install", action="append", default=[], help="nuclide's own files, bound back under /tmp")
    parser.add_argument("--once", action="store_true", help="serve one spawn request, then exit (a cold start)")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.control_fd)
    started = time.perf_counter()
    try:
        import asyncio  # noqa: F401 (the runtime imports it on demand: for async handlers, warm here)

        import services.runtime.loop  # noqa: F401 (the point of a zygote: imported once, shared by every fork)

        zygote = Zygote(sock, args.var, tuple(args.stage), tuple(args.install))
        zygote.once = args.once
        if not args.once:  # a cold start's spawn is its own test
            zygote.probe()
    except Exception as exc:
        traceback.print_exc()
        send(sock, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    gc.collect()
    gc.freeze()  # the imported objects leave the collector's view: forks do not copy their pages by collecting
    send(sock, {"ready": True, "pid": os.getpid(), "warm_ms": round((time.perf_counter() - started) * 1000, 3)})
    return zygote.serve()


if __name__ == "__main__":
    sys.exit(main())
