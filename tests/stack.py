"""A real nuclide stack for integration tests: each service its own process, on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import httpx

from services.gateway.traces import TRACE_FLUSH_S

if TYPE_CHECKING:  # pragma: no cover
    from shared.curve import Keys
    from shared.ingress import Producer

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("store", "deployer", "gateway", "optimizer")


def _test_port_range() -> range:
    """Ports the kernel never hands out as the local end of an outgoing connection.

    A port free when a test picks it can be taken before the service binds it; with ports from the
    ephemeral range any connection made meanwhile (a client, a ZeroMQ reconnect) may take it, and the
    service then fails to start. Below (or above) that range only another bind can take it.
    """
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low - 10_000 >= 4096:
        return range(10_000, low)
    if 65535 - high >= 4096:
        return range(high + 1, 65536)
    raise AssertionError(f"the ephemeral port range ({low}-{high}) leaves no room for test ports")


_PORTS = _test_port_range()
# each test process walks the range from its own offset, so processes running side by side rarely meet
_next_port = _PORTS.start + (os.getpid() * 7919) % len(_PORTS)


def free_port() -> int:
    """A loopback port outside the ephemeral range, free now and not handed out before by this process."""
    global _next_port
    for _ in range(len(_PORTS)):
        port = _next_port
        _next_port = _PORTS.start + (_next_port + 1 - _PORTS.start) % len(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1}")


def free_port_base(count: int = 8) -> int:
    """A port N such that N to N+count-1 are all free now, for a stack started with a port base."""
    global _next_port
    for _ in range(100):
        base = free_port()
        if base + count > _PORTS.stop:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        _next_port = _PORTS.start + (base + count - _PORTS.start) % len(_PORTS)  # the block is the stack's
        return base
    raise AssertionError(f"found no {count} free ports in a row")


class ServiceDied(AssertionError):
    """A service of the stack exited on its own: fails the wait at once, whatever the wait was for."""


async def until(predicate: Callable[[], Any], timeout_s: float, what: str = "condition",
                interval_s: float = 0.005) -> Any:
    """:func:`wait_for` inside an event loop: poll ``predicate`` between turns of the loop until it holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except ServiceDied:
            raise
        except Exception as exc:  # the condition may raise until it holds
            last_exc = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last error: {last_exc})")


def never(predicate: Callable[[], Any], for_s: float, interval_s: float = 0.05, what: str = "condition") -> None:
    """Fail as soon as ``predicate`` holds during ``for_s``: a bounded look for something that must not happen."""
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            raise AssertionError(f"{what} happened: {value!r}")
        time.sleep(interval_s)


def parse_metrics(response: httpx.Response) -> dict[str, float]:
    """A GET /metrics answer parsed with prometheus_client's parser: 'name' or 'name{label="value",...}' (labels
    sorted) -> value. Fails on a non-200 answer and on a sample whose family has no '# TYPE' line."""
    from prometheus_client.parser import text_string_to_metric_families

    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain"), response.text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        # the parser calls a family without a TYPE line "unknown", as it does one typed "untyped"
        assert family.type != "unknown" or f"# TYPE {family.name} untyped" in response.text, family
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def make_zip(files: dict[str, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content.encode() if isinstance(content, str) else content)
    return buf.getvalue()


def function_yaml(name: str, handler: str = "main:handler", **spec: Any) -> str:
    import yaml

    return yaml.safe_dump({"metadata": {"name": name}, "spec": {"handler": handler, "runtime": "python", **spec}})


def sandbox_problem() -> str | None:
    """Why the process backend's sandbox cannot run here (what to install), or None."""
    import shutil

    missing = [tool for tool in ("bwrap", "slirp4netns") if shutil.which(tool) is None]
    if missing:
        return f"the sandbox's tools are not installed ({', '.join(missing)}): apt-get install bubblewrap slirp4netns"
    if os.geteuid() != 0:
        return "the sandbox needs root (instances run as uids of their own)"
    if subprocess.run(["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "true"], capture_output=True).returncode:
        return "bubblewrap cannot create a sandbox here"
    return None


def io_uring_rings(pid: int) -> int:
    """How many io_uring rings process ``pid`` holds open (see shared.seccomp.deny_io_uring)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]"
        except OSError:  # closed meanwhile (the listing's own descriptor among them)
            pass
    return count


class Gateway:
    """One gateway of a stack as a test reaches it: its name (its process's key in Stack.procs), HTTP URL and
    ZeroMQ endpoints, and HTTP clients (with and without the token)."""

    def __init__(self, key: str, url: str, endpoints: dict[str, str], client: httpx.Client, anon: httpx.Client) -> None:
        self.key = key
        self.url = url
        self.endpoints = endpoints
        self.client = client
        self.anon = anon

    @classmethod
    def at(cls, key: str, http_port: int, endpoints: dict[str, str], token: str) -> "Gateway":
        url = f"http://127.0.0.1:{http_port}"
        client = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"})
        return cls(key, url, endpoints, client, httpx.Client(base_url=url, timeout=120))

    def close(self) -> None:
        self.client.close()
        self.anon.close()


class Stack:
    def __init__(self, var_dir: Path, env: dict[str, str] | None = None, gateways: int = 1) -> None:
        """``gateways``: how many gateways :meth:`start` starts; the first is ``gateway`` (``self.url``,
        ``self.client``, ``self.endpoints``), the others ``gateway-1``... on ports of their own, all in
        ``self.gateways``. More can be started later with :meth:`start_gateway`."""
        self.var_dir = var_dir
        self.gateway_count = gateways
        self.http_port = free_port()
        self.token = "test-token-" + os.urandom(6).hex()
        ports = {k: free_port() for k in ("store_rpc", "store_pub", "deployer_rpc", "gateway_router",
                                            "gateway_pull", "gateway_sub", "gateway_pub")}
        self.env = dict(os.environ)
        self.env.update({
            "NUCLIDE_VAR_DIR": str(var_dir),
            "NUCLIDE_TOKEN": self.token,
            "NUCLIDE_HTTP_PORT": str(self.http_port),
            "NUCLIDE_LOG_FORMAT": "json",
            "NUCLIDE_DEPLOYER_STOP_INSTANCES_ON_EXIT": "true",
            "PYTHONFAULTHANDLER": "1",  # a service that dies by a signal leaves its Python stacks in its log
            **{f"NUCLIDE_{k.upper()}": f"tcp://127.0.0.1:{p}" for k, p in ports.items()},
        })
        if "NUCLIDE_SANDBOX" not in (env or {}) and os.environ.get("NUCLIDE_REQUIRE_BWRAP") != "1" \
                and sandbox_problem():
            # a developer's machine without the sandbox: the functional tests run unsandboxed (the
            # sandbox's own tests skip, and CI requires it)
            self.env["NUCLIDE_SANDBOX"] = "none"
        self.env.update(env or {})
        self.endpoints = {k: f"tcp://127.0.0.1:{p}" for k, p in ports.items()}
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.client = httpx.Client(base_url=self.url, timeout=120, headers={"Authorization": f"Bearer {self.token}"})
        self.anon = httpx.Client(base_url=self.url, timeout=120)
        self.more_gateways: list[Gateway] = []  # after the first, whose URL, endpoints and clients are the stack's

    @property
    def gateways(self) -> list[Gateway]:
        """Every gateway, the first (``gateway``: this stack's own url, endpoints and clients) first."""
        return [Gateway("gateway", self.url, self.endpoints, self.client, self.anon), *self.more_gateways]

    # ----- lifecycle --------------------------------------------------------------

    def start_service(self, name: str, extra_env: dict[str, str] | None = None, key: str = "") -> None:
        """Start service ``name``; ``key`` (default: the name) tells a second process of one service apart."""
        key = key or name
        log_path = self.var_dir / f"{key}.service.log"
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.logs[key] = log_path
        out = open(log_path, "ab")
        self.procs[key] = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env={**self.env, **(extra_env or {})},
                                            cwd=ROOT, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        out.close()

    def start(self) -> "Stack":
        """Start every service and wait until the stack is healthy; a service that dies meanwhile fails the test."""
        for name in SERVICES:
            self.start_service(name)
        for _ in range(1, self.gateway_count):
            self.start_gateway(wait=False)
        self.wait_healthy()
        return self

    def start_gateway(self, wait: bool = True) -> Gateway:
        """Start one more gateway (``gateway-<i>``): ports of its own, the same store, deployer and var_dir;
        with ``wait``, return once it answers /healthz."""
        key = f"gateway-{len(self.more_gateways) + 1}"
        ports = {k: free_port() for k in ("gateway_router", "gateway_pull", "gateway_sub", "gateway_pub")}
        endpoints = {**self.endpoints, **{k: f"tcp://127.0.0.1:{p}" for k, p in ports.items()}}
        http_port = free_port()
        gw = Gateway.at(key, http_port, endpoints, self.token)
        self.more_gateways.append(gw)
        self.start_service("gateway", {"NUCLIDE_GATEWAY_GATEWAY_NAME": key.replace("gateway-", "gw"),
                                       "NUCLIDE_GATEWAY_HTTP_PORT": str(http_port),
                                       **{f"NUCLIDE_GATEWAY_{k.upper()}": v for k, v in gw.endpoints.items()
                                          if k in ports}}, key=key)
        if wait:
            self.wait_healthy()
        return gw

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        def healthy() -> bool:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    code = proc.returncode
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
                    log = self.service_log(name)[-6000:]
                    raise ServiceDied(f"{name} {how} while the stack started; its log:\n{log}")
            # the first gateway, and the others still running (a test may have killed one)
            running = [gw for gw in self.more_gateways if gw.key in self.procs and self.procs[gw.key].poll() is None]
            return all(gw.anon.get("/healthz", timeout=2).status_code == 200 for gw in [self.gateways[0], *running])

        wait_for(healthy, timeout_s, what="a healthy stack")

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(sig)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop(self) -> None:
        for name in ("optimizer", "deployer", "gateway", *(k for k in self.procs if k not in SERVICES), "store"):
            self.stop_service(name)
        for gw in self.gateways:
            gw.close()

    def service_log(self, name: str) -> str:
        path = self.logs.get(name)
        return path.read_text(errors="replace") if path and path.exists() else ""

    # ----- helpers --------------------------------------------------------------------

    def deploy(self, name: str, files: dict[str, str | bytes], expect: int = 200, **kw: Any) -> httpx.Response:
        resp = self.client.put(f"/{name}", files={"zip_file": ("task.zip", make_zip(files), "application/zip")}, **kw)
        assert resp.status_code == expect, f"deploy {name}: {resp.status_code} {resp.text[:3000]}"
        return resp

    def invoke(self, name: str, body: Any = None, **kw: Any) -> httpx.Response:
        if body is not None and not isinstance(body, (bytes, str)):
            return self.anon.post(f"/{name}", json=body, **kw)
        return self.anon.post(f"/{name}", content=body or b"", **kw)

    def instance_pids(self) -> list[int]:
        return self.instance_pids_of("*")

    def instance_pids_of(self, name: str) -> list[int]:
        """The pids of the instances of group ``g-<name>`` (``*``: of every group)."""
        import json

        pids = []
        pattern = "*" if name == "*" else f"g-{name}-v*"
        for meta in (self.var_dir / "instances").glob(f"{pattern}/instance.json"):
            try:
                pids.append(int(json.loads(meta.read_text())["pid"]))
            except (OSError, ValueError, KeyError):
                continue  # being written or removed
        return pids

    def metrics(self) -> dict[str, float]:
        """GET /metrics parsed by prometheus_client's own parser: sample name (with labels, in the order the
        gateway wrote them) -> value. A sample outside a typed family fails the parse."""
        return parse_metrics(self.client.get("/metrics"))

    @contextlib.contextmanager
    def publisher(self) -> Iterator["Producer"]:
        """A Producer on the topic ingress whose connection is up: a PUB drops what it sends before that
        (ZeroMQ's slow joiner), so probe messages go out until the gateway counts one (a topic no one has)."""
        from shared.ingress import Producer

        with Producer(sub_endpoint=self.endpoints["gateway_sub"]) as p:
            seen = self.metrics()["nuclide_ingress_topic_messages_total"]

            def arrived() -> bool:
                p.publish("nuclide-test-handshake", b"")
                return self.metrics()["nuclide_ingress_topic_messages_total"] > seen

            wait_for(arrived, 10, what="the topic ingress to take a message")
            yield p

    def keys(self) -> "Keys":
        """The CURVE keys a test speaks to this stack's services with: the gateway's (a service key, and the
        instance-key seed, so a test can stand in for an instance the deployer issued a key to)."""
        from shared.config import Settings
        from shared.curve import Keys

        return Keys.load(Settings(var_dir=self.var_dir), "gateway")

    def traces(self, probe: Callable[[], Any] | None = None) -> "TraceListener":
        """A listener of the call graph; with ``probe`` (something that makes a call) it returns once subscribed."""
        listener = TraceListener(self.endpoints["gateway_pub"], self.keys())
        if probe is not None:
            listener.wait_subscribed(probe)
        return listener


class NuclideUp:
    """`nuclide up ARGS` as a user runs it: in the foreground in a working directory; its banner read from stdout."""

    def __init__(self, cwd: Path, env: dict[str, str], *args: str) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self.log = cwd / "nuclide-up.log"
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "up", *args], cwd=cwd, env=env,
                                         stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True)
        lines: list[str] = []
        assert self.proc.stdout is not None
        # Ends at the banner (the stack is healthy), or when `nuclide up` gives up and exits (its own 60 s limit).
        for line in self.proc.stdout:
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        self.banner = "".join(lines)
        if "Press Ctrl-C" not in self.banner:
            raise AssertionError(f"nuclide up exited with {self.proc.wait()} before its banner:\n"
                                 f"{self.log.read_text(errors='replace')[-3000:]}")
        fields = dict(line.strip().split(":", 1) for line in lines if line.startswith("  ") and ":" in line)
        self.url, self.token = fields["URL"].strip(), fields["token"].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(60)


class TraceListener:
    """Collects the gateway's published call graph (topic "trace") in a background thread."""

    def __init__(self, endpoint: str, keys: "Keys") -> None:
        import threading

        import zmq

        from shared import protocol

        self.edges: list[list[Any]] = []
        self.calls: list[list[Any]] = []
        self._stop = threading.Event()
        ctx = zmq.Context.instance()

        def run() -> None:
            sock = keys.client(ctx.socket(zmq.SUB), "gateway")  # the gateway publishes to services only
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"trace")
            sock.connect(endpoint)
            try:
                while not self._stop.is_set():
                    if sock.poll(100):
                        _, msg = protocol.decode_published(sock.recv_multipart())
                        self.edges.extend(msg.header.get("edges") or [])
                        self.calls.extend(msg.header.get("calls") or [])
            finally:
                sock.close(linger=0)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def wait_subscribed(self, probe: Callable[[], Any], timeout_s: float = 10.0) -> None:
        """Make a call with ``probe`` until a trace arrives, then forget what the probes left.

        A SUB misses what is published before its subscription reaches the publisher (ZeroMQ's
        slow joiner); a trace that arrives proves the subscription is up. Probe with an entry call
        (it adds to ``calls``, not ``edges``) when a test counts edges."""
        def arrived() -> bool:
            probe()
            deadline = time.monotonic() + 5 * TRACE_FLUSH_S
            while time.monotonic() < deadline:
                if self.edges or self.calls:
                    return True
                time.sleep(0.01)
            return False

        wait_for(arrived, timeout_s, what="the first trace (the subscription to the gateway's traces)")
        self.edges.clear()
        self.calls.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
