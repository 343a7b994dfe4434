"""`nuclide up`: start store, deployer, gateway and optimizer as supervised children, in the foreground.

Children get the same settings through the environment (with absolute paths),
are restarted with backoff when they die, and are stopped in order on Ctrl-C,
SIGTERM or SIGHUP: the deployer first (its instances say BYE to a live gateway and
drain, and it reports their exits to a live store), then the gateway, then the
store. Each child runs in a process group of its own, so a terminal's Ctrl-C
reaches only this supervisor and not every service at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from services.cli.client import CliError
from services.cli.stacks import StackEntry, record_stack
from shared.auth import load_or_create_token, token_path
from shared.config import PORT_BASE_HOW, PORT_KEYS, Settings, gateway_settings

SERVICES = ("store", "deployer", "gateway", "optimizer")
STOP_ORDER = ("optimizer", "deployer", "gateway", "store")  # instances drain against a live gateway
STOP_TIMEOUT_S = 20.0
RESTART_BACKOFF_MAX_S = 10.0
HEALTH_TIMEOUT_S = 60.0


def record_for_cli(settings: Settings, token: str) -> str:
    """Record this stack's URL and token for the CLI, next to other stacks'; say where, or why not."""
    entry = StackEntry(settings.http_url, token, started_by=f"`nuclide up` (state in {settings.var_dir})",
                       token_hint=f"`cat {token_path(settings)}`")
    try:
        return f"recorded in {record_stack(entry)}; it is the current stack"
    except (OSError, CliError) as exc:
        return f"not recorded ({getattr(exc, 'message', None) or exc}); pass --url and --token to the CLI"


@dataclass
class Child:
    name: str
    service: str = ""  # the program (services.<service>); the name when empty
    env: dict[str, str] = field(default_factory=dict)  # what sets this one apart (a second gateway's ports)
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)
    next_start: float = 0.0


class Supervisor:
    def __init__(self, settings: Settings, token: str) -> None:
        self.settings = settings
        self.token = token
        self.children = {name: Child(name) for name in SERVICES}
        # gateways after the first: a name and ports of their own (shared.config.gateway_settings)
        for index in range(1, settings.gateways):
            self.children[f"gateway-{index}"] = Child(f"gateway-{index}", "gateway", gateway_settings(settings, index))
        self.stopping = False
        env = dict(os.environ)
        env.update(settings.child_env())
        env["NUCLIDE_TOKEN"] = token
        env["NUCLIDE_DEPLOYER_STOP_INSTANCES_ON_EXIT"] = "true"
        env.setdefault("NUCLIDE_LOG_FORMAT", "console" if sys.stderr.isatty() else "json")
        self.env = env

    def start(self, child: Child) -> None:
        child.proc = subprocess.Popen([sys.executable, "-m", f"services.{child.service or child.name}"],
                                      env={**self.env, **child.env}, stdin=subprocess.DEVNULL, process_group=0)

    def start_all(self) -> None:
        for child in self.children.values():
            self.start(child)

    def urls(self) -> list[str]:
        """Every gateway's base URL, the first one's first."""
        more = [int(c.env["NUCLIDE_GATEWAY_HTTP_PORT"]) for c in self.children.values() if c.env]
        return [self.settings.http_url] + [self.settings.replace(http_port=port).http_url for port in more]

    def poll(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.proc is None:
                if now >= child.next_start:
                    self.start(child)
                continue
            code = child.proc.poll()
            if code is None:
                continue
            child.proc = None
            child.restarts = [t for t in child.restarts if now - t < 60] + [now]
            delay = min(RESTART_BACKOFF_MAX_S, 0.25 * 2 ** (len(child.restarts) - 1))
            child.next_start = now + delay
            print(f"nuclide: {child.name} exited with code {code}; restarting in {delay:.1f} s", file=sys.stderr)

    def wait_healthy(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        waiting = self.urls()
        while time.monotonic() < deadline and not self.stopping:
            self.poll()
            for url in list(waiting):
                try:
                    with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                        if resp.status == 200:
                            waiting.remove(url)
                except (urllib.error.URLError, OSError):
                    pass
            if not waiting:
                return True
            time.sleep(0.1)
        return False

    def stop_all(self) -> None:
        extra = [name for name in self.children if name not in SERVICES]
        order = [n for name in STOP_ORDER for n in ([name, *extra] if name == "gateway" else [name])]
        for name in order:
            child = self.children[name]
            if child.proc is None or child.proc.poll() is not None:
                continue
            child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"nuclide: {name} did not stop in {STOP_TIMEOUT_S:g} s; killing it", file=sys.stderr)
                child.proc.kill()
                child.proc.wait()


def busy_ports(settings: Settings) -> list[str]:
    """Settings whose TCP port is already taken (another nuclide running, usually)."""
    import socket

    busy = []
    ports = settings.ports()
    for index in range(1, settings.gateways):
        for key, value in gateway_settings(settings, index).items():
            port = value.rpartition(":")[2]
            if port.isdigit():
                ports.append((f"{key} of gateway {index}", settings.http_host if key.endswith("HTTP_PORT") else
                              value[len("tcp://"):].rpartition(":")[0], int(port)))
    for key, host, port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host if host not in ("*", "") else "0.0.0.0", port))
            except OSError:
                busy.append(f"port {port} ({key}) is in use")
    return busy


def busy_message(busy: list[str], settings: Settings) -> str:
    """The one line for taken ports: what is taken, and the one setting that moves the whole stack."""
    base = f" port_base is {settings.port_base};" if settings.port_base else ""
    return (f"nuclide: {'; '.join(busy)}. Is another nuclide running there? Stop it, or move this stack:{base} use"
            f" {PORT_BASE_HOW} to give it ports N to N+{len(PORT_KEYS) - 1} (a port set on its own still wins)")


def print_ports(settings: Settings) -> int:
    """`nuclide up --print-ports`: one "setting port" line per TCP port, what `make up` hands to compose; with
    several gateways, each further one's as ``gateway<i>_http``, ``gateway<i>_router``, ... (compose's
    NUCLIDE_GATEWAY<i>_HTTP_PORT, ...)."""
    for key, _host, port in settings.ports():
        print(key, port)
    for index in range(1, settings.gateways):
        for key, value in gateway_settings(settings, index).items():
            port = value.rpartition(":")[2]
            if port.isdigit():
                short = key[len("NUCLIDE_GATEWAY_"):].lower().replace("gateway_", "").replace("_port", "")
                print(f"gateway{index}_{short}", port)
    return 0


def run(settings: Settings) -> int:
    busy = busy_ports(settings)
    if busy:
        print(busy_message(busy, settings), file=sys.stderr)
        return 1
    settings = settings.replace(var_dir=settings.var_dir.resolve())
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    token = load_or_create_token(settings)
    sup = Supervisor(settings, token)

    def on_signal(signum: int, _frame: object) -> None:
        sup.stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    sup.start_all()
    try:
        if not sup.wait_healthy(HEALTH_TIMEOUT_S):
            if not sup.stopping:
                print(f"nuclide: the stack did not become healthy within {HEALTH_TIMEOUT_S:g} s;"
                      f" see the logs above (is port {settings.http_port} free?)", file=sys.stderr)
                return 1
            return 0
        recorded = record_for_cli(settings, token)
        more = "".join(f"  gateway {i}: {url}\n" for i, url in enumerate(sup.urls()[1:], start=1))
        print(
            "\nnuclide is up\n"
            f"  URL:    {settings.http_url}\n"
            f"{more}"
            f"  token:  {token}\n"
            f"  state:  {settings.var_dir}\n"
            f"  CLI:    {recorded}\n"
            f"  docs:   {settings.http_url}/docs\n"
            "Press Ctrl-C to stop.\n",
            flush=True,
        )
        if settings.fusionizer_mode:
            from shared.config import FUSIONIZER_MODE_WARNING

            print(f"nuclide: WARNING: {FUSIONIZER_MODE_WARNING}", file=sys.stderr, flush=True)
        while not sup.stopping:
            sup.poll()
            time.sleep(0.2)
        return 0
    finally:
        print("nuclide: stopping...", file=sys.stderr, flush=True)
        sup.stop_all()
        print("nuclide: stopped", file=sys.stderr, flush=True)
