"""The runner's side of the Docker Engine: the function's containers, created and driven per call.

Every method blocks (the runner runs them on worker threads). The sh scripts here are fixed,
never built from user input: the run command arrives as their positional arguments.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from dataclasses import replace
from typing import Any

from shared.instanceconfig import CONFIG_ENV, InstanceConfig
from shared.oncewire import ARGV as ONCE_ARGV
from services.deployer.backends.docker.runner import box
from services.deployer.backends.docker.runner.box import SRC_DIR, USER, WARM_MAIN
from services.deployer.backends.docker.runner.results import STDERR_TAIL_CHARS

RENAME_DELAY_S = 1.0  # a container handed over by the deployer gets the instance's name this much later
MAX_OUTPUT_BYTES = 64 * 1024 * 1024
API_TIMEOUT_S = 60.0

# $1: fresh (empty the code directory and /tmp, copy the code in) or keep; $2: the code directory; then
# the command's argv
PREPARE = r'''
mode=$1; dir=$2; shift 2
if [ "$mode" = fresh ]; then
  rm -rf "$dir"/* "$dir"/.[!.]* "$dir"/..?* /tmp/* /tmp/.[!.]* /tmp/..?* 2>/dev/null
  cp -R "$SRC"/. "$dir"/ || { echo "nuclide: could not copy the code from $SRC into $dir (the image needs sh and cp)" >&2; exit 125; }
fi
cd "$dir" || exit 125
'''
# a Python function's call: the command (services.runtime.once) speaks for itself on stdin and stdout
PY_DRIVER = PREPARE + 'exec "$@"\n'
# a registered runtime's call: prints "<exit code> J|S" and then output.json (J) or the command's stdout (S)
DRIVER = PREPARE + r'''
rm -f output.json
cat > input.json || { echo "nuclide: could not write input.json in $dir" >&2; exit 125; }
"$@" < input.json > /tmp/.nuclide-stdout
code=$?
if [ -f output.json ]; then
  echo "$code J"; cat output.json; cat /tmp/.nuclide-stdout >&2
else
  echo "$code S"; cat /tmp/.nuclide-stdout
fi
rm -f /tmp/.nuclide-stdout
'''
# run once in a new warm container before it takes calls: the function policy's code goes in here
WARM_SETUP = r'''
if [ "$1" = copy ]; then
  cp -R "$SRC"/. "$2"/ || { echo "nuclide: could not copy the code from $SRC into $2 (the image needs sh and cp)" >&2; exit 125; }
fi
'''



def _raw(sock: Any) -> socket.socket:
    return getattr(sock, "_sock", sock)


def exchange(sock: Any, data: bytes, deadline: float) -> tuple[bytes, bytes, bool]:
    """Send ``data`` as stdin, then read the engine's multiplexed stdout/stderr until EOF or the deadline."""
    raw = _raw(sock)
    out, err = bytearray(), bytearray()
    buf = bytearray()
    try:
        raw.settimeout(max(0.001, deadline - time.monotonic()))
        raw.sendall(data)
        raw.shutdown(socket.SHUT_WR)
        while True:
            raw.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = raw.recv(65536)
            if not chunk:
                return bytes(out), bytes(err), False
            buf += chunk
            while len(buf) >= 8:
                stream, size = buf[0], struct.unpack(">I", bytes(buf[4:8]))[0]
                if len(buf) < 8 + size:
                    break
                (err if stream == 2 else out).extend(buf[8:8 + size])
                del buf[:8 + size]
            if len(out) + len(err) > MAX_OUTPUT_BYTES:
                err += b"\nnuclide: output cut at 64 MiB"
                return bytes(out), bytes(err), False
    except (socket.timeout, TimeoutError):
        return bytes(out), bytes(err), True
    finally:
        try:
            raw.close()
        except OSError:
            pass


def engine_client(docker_host: str, max_concurrency: int) -> Any:
    """The runner's Engine API client: a connection per concurrent call, a few for the rest."""
    import docker

    return docker.APIClient(base_url=docker_host, version="auto", timeout=API_TIMEOUT_S,
                            max_pool_size=max_concurrency + 4)


class CallContainers:
    """Creates and drives the function's containers; every method blocks (run them on worker threads)."""

    def __init__(self, config: dict[str, Any], api: Any = None) -> None:
        self.config = config
        self.api = api if api is not None else engine_client(config["docker_host"], int(config["max_concurrency"]))
        self.image = config["image"]
        self.path = config["path"]
        self.memory = int(config["memory_bytes"])
        self.labels = {"nuclide.namespace": config["namespace"], "nuclide.runner": config["instance_id"],
                       "nuclide.runner_function": config["functions"][0]["name"]}
        self.env = {"HOME": "/tmp", "LANG": "C.UTF-8", "SRC": SRC_DIR, **(config["functions"][0].get("env") or {})}
        self.python = config.get("kind") == "python"
        # no image of the function's: the code goes into each warm container's code volume from here
        self.code_volume = bool(config.get("code_volume"))
        self._code: bytes | None = None
        self.workdir = "/"
        # a network of its own for each container (runner/usernet.py) unless the function asks for the host's
        self.isolated = config.get("network", "isolated") != "host"
        self.link_source = str(config.get("link_source") or "")
        self.slirp_log = str(config.get("slirp_log") or "slirp4netns.log")
        if self.python:
            # the image's code directory is the source; each call runs in a fresh, writable copy at path
            # (the code directory is scratch on every backend)
            python = InstanceConfig.from_dict(config["python"])
            src = python.functions[0]["code_dir"]
            instance = replace(python, functions=(dict(python.functions[0], code_dir=self.path, max_concurrency=1),))
            self.env.update({"SRC": src, CONFIG_ENV: instance.to_json(), "PYTHONUNBUFFERED": "1",
                             "PYTHONDONTWRITEBYTECODE": "1", "MALLOC_ARENA_MAX": "2"})
            self.run, self.workdir = list(ONCE_ARGV), src
            self.fresh_argv = self.warm_argv = ["/bin/sh", "-c", PY_DRIVER, "nuclide-driver", "fresh", self.path,
                                                *ONCE_ARGV]
        else:
            self.run = list(config["run"])
            self.fresh_argv = ["/bin/sh", "-c", DRIVER, "nuclide-driver", "fresh", self.path, *self.run]
            self.warm_argv = ["/bin/sh", "-c", DRIVER, "nuclide-driver",
                              "fresh" if config["warm_start"] == "runtime" else "keep", self.path, *self.run]

    def _create(self, argv: list[str], auto_remove: bool, stdin_once: bool, env: dict[str, str] | None = None) -> str:
        """A container running one of our sh scripts or the once runner (the image's own entrypoint is replaced)."""
        host = box.host_config(self.api, self.path, self.memory, self.config.get("cpu"), auto_remove,
                               self.code_volume, isolated=self.isolated, link_source=self.link_source)
        return box.create(self.api, self.image, argv, self.labels, {**self.env, **env} if env else self.env,
                          self.workdir, host, stdin_once)

    def fresh_call(self, data: bytes, timeout_s: float, argv: list[str] | None = None,
                   env: dict[str, str] | None = None) -> tuple[bytes, bytes, bool]:
        """Policy none: a container of its own for one call (``env``: variables of this call only); its (stdout,
        stderr, timed out)."""
        deadline = time.monotonic() + timeout_s
        cid, sock = self._start_fresh(argv or self.fresh_argv, env)
        timed_out = True
        try:
            # the command reads its input first: sent once the network is there, it never runs without it
            self._attach(cid)
            out, err, timed_out = exchange(sock, data, deadline)
        finally:
            if timed_out:  # it may still run, or never started: the engine removes the others itself
                self.remove(cid)
        return out, err, timed_out

    def _start_fresh(self, argv: list[str], env: dict[str, str] | None) -> tuple[str, Any]:
        """A per-call container, attached then started; a second one when the engine failed to set the first
        up (box.transient_start: nothing ran in it). Its id and attached socket."""
        import docker.errors

        for attempt in range(2):
            cid = self._create(argv, auto_remove=True, stdin_once=True, env=env)
            sock = None
            try:
                sock = self.api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
                self.api.start(cid)
                return cid, sock
            except BaseException as exc:
                if sock is not None:
                    sock.close()
                self.remove(cid)
                if attempt or not (isinstance(exc, docker.errors.APIError) and box.transient_start(exc)):
                    raise
                time.sleep(box.START_RETRY_S)
        raise AssertionError("unreachable")

    def start_warm(self) -> str:
        """A warm container, running and idle; raises RuntimeError with its output when it does not stay up."""
        mode = "copy" if self.config["warm_start"] == "function" else "none"
        cid = self._create(["/bin/sh", "-c", WARM_MAIN], auto_remove=False, stdin_once=False)
        try:
            self.api.start(cid)
            self._attach(cid)
            output = b""
            code: int | None = None
            if self.code_volume:
                if self._code is None:
                    self._code = box.code_tar(self.config["code_dir"])
                box.put_code(self.api, cid, self.path, self._code)
                code = 0
            elif self.api.inspect_container(cid)["State"].get("Running"):
                ex = self.api.exec_create(cid, ["/bin/sh", "-c", WARM_SETUP, "nuclide-setup", mode, self.path],
                                          user=USER, environment=self.env)
                output = self.api.exec_start(ex["Id"]) or b""
                code = self.api.exec_inspect(ex["Id"]).get("ExitCode")
            state = self.api.inspect_container(cid)["State"]
            if not state.get("Running") or code != 0:
                logs = (self.api.logs(cid) + output).decode("utf-8", "replace").strip()
                why = (f"exited at start (exit code {state.get('ExitCode')})" if not state.get("Running")
                       else f"could not be set up (exit code {code})")
                raise RuntimeError(f"the warm container of image {self.image} {why}:"
                                   f" {logs[-STDERR_TAIL_CHARS:] or 'no output'}")
        except BaseException:
            self.remove(cid)
            raise
        return cid

    def warm_call(self, cid: str, data: bytes, timeout_s: float, argv: list[str] | None = None,
                  env: dict[str, str] | None = None) -> tuple[bytes, bytes, bool]:
        """One call as an exec in a warm container (``env``: variables of this call only); its (stdout, stderr,
        timed out)."""
        deadline = time.monotonic() + timeout_s
        ex = self.api.exec_create(cid, argv or self.warm_argv, stdin=True, user=USER,
                                  environment={**self.env, **env} if env else self.env)
        sock = self.api.exec_start(ex["Id"], socket=True)
        return exchange(sock, data, deadline)

    def _attach(self, cid: str) -> None:
        if not self.isolated:
            return
        why = box.attach_network(self.api, cid, self.slirp_log)
        if why is not None:
            print(f"nuclide: container {cid[:12]} has no outbound network: {why}", file=sys.stderr, flush=True)

    def adopt(self, cid: str) -> None:
        """A warm container the deployer made ready (code in place) becomes one of ours; renamed for ``docker
        ps`` (its labels are the pool's: the deployer's record says whose it is), later: not in a first call's way."""
        import docker.errors

        def rename() -> None:
            try:
                self.api.rename(cid, f"nuclide-{self.config['namespace']}-{self.config['instance_id']}")
            except docker.errors.NotFound:
                pass  # the instance stopped first
            except Exception as exc:  # cosmetic: the container serves either way
                print(f"nuclide: could not rename container {cid[:12]}: {exc}", file=sys.stderr, flush=True)

        timer = threading.Timer(RENAME_DELAY_S, rename)
        timer.daemon = True
        timer.start()

    def remove(self, cid: str) -> None:
        import docker.errors

        try:
            self.api.remove_container(cid, force=True, v=True)  # v: its anonymous code volume goes with it
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: its removal is in progress already
                print(f"nuclide: could not remove container {cid[:12]}: {exc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.api.close()
