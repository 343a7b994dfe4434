"""`nuclide up`: start store, deployer, gateway and optimizer as supervised children, in the foreground.

Children get the same settings through the environment (with absolute paths),
are restarted with backoff when they die, and are stopped in order on Ctrl-C or
SIGTERM: the deployer first (its instances say BYE to a live gateway and drain),
then the gateway, then the store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared.auth import load_or_create_token
from shared.config import Settings

SERVICES = ("store", "deployer", "gateway", "optimizer")
STOP_ORDER = ("optimizer", "deployer", "gateway", "store")  # instances drain against a live gateway
STOP_TIMEOUT_S = 20.0
RESTART_BACKOFF_MAX_S = 10.0
HEALTH_TIMEOUT_S = 60.0


def cli_config_path() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "nuclide" / "cli.json"


def write_cli_config(settings: Settings, token: str) -> list[Path]:
    """Where the CLI finds the URL and token: <var>/cli.json and the user's config dir (both 0600)."""
    data = json.dumps({"url": settings.http_url, "token": token}).encode()
    written = []
    for path in (settings.var_dir / "cli.json", cli_config_path()):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(path, 0o600)
            written.append(path)
        except OSError:
            continue
    return written


@dataclass
class Child:
    name: str
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)
    next_start: float = 0.0


class Supervisor:
    def __init__(self, settings: Settings, token: str) -> None:
        self.settings = settings
        self.token = token
        self.children = {name: Child(name) for name in SERVICES}
        self.stopping = False
        env = dict(os.environ)
        env.update(settings.child_env())
        env["NUCLIDE_TOKEN"] = token
        env["NUCLIDE_DEPLOYER_STOP_INSTANCES_ON_EXIT"] = "true"
        env.setdefault("NUCLIDE_LOG_FORMAT", "console" if sys.stderr.isatty() else "json")
        self.env = env

    def start(self, child: Child) -> None:
        child.proc = subprocess.Popen([sys.executable, "-m", f"services.{child.name}"], env=self.env,
                                      stdin=subprocess.DEVNULL)

    def start_all(self) -> None:
        for name in SERVICES:
            self.start(self.children[name])

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
        while time.monotonic() < deadline and not self.stopping:
            self.poll()
            try:
                with urllib.request.urlopen(self.settings.http_url + "/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        return False

    def stop_all(self) -> None:
        for name in STOP_ORDER:
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

    wanted = [("http_port", settings.http_host, settings.http_port)]
    for key in ("store_rpc", "store_pub", "deployer_rpc", "gateway_router", "gateway_pull", "gateway_sub", "gateway_pub"):
        endpoint = getattr(settings, key)
        if endpoint.startswith("tcp://"):
            host, _, port = endpoint[6:].rpartition(":")
            if port.isdigit():
                wanted.append((key, host, int(port)))
    busy = []
    for key, host, port in wanted:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host if host not in ("*", "") else "0.0.0.0", port))
            except OSError:
                busy.append(f"port {port} ({key}) is in use")
    return busy


def run(settings: Settings) -> int:
    busy = busy_ports(settings)
    if busy:
        print(f"nuclide: {'; '.join(busy)}. Is nuclide already running? Stop it, or choose other ports"
              " (NUCLIDE_HTTP_PORT, NUCLIDE_STORE_RPC, ...).", file=sys.stderr)
        return 1
    settings = settings.replace(var_dir=settings.var_dir.resolve())
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    token = load_or_create_token(settings)
    sup = Supervisor(settings, token)

    def on_signal(signum: int, _frame: object) -> None:
        sup.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sup.start_all()
    try:
        if not sup.wait_healthy(HEALTH_TIMEOUT_S):
            if not sup.stopping:
                print(f"nuclide: the stack did not become healthy within {HEALTH_TIMEOUT_S:g} s;"
                      f" see the logs above (is port {settings.http_port} free?)", file=sys.stderr)
                return 1
            return 0
        written = write_cli_config(settings, token)
        print(
            "\nnuclide is up\n"
            f"  URL:    {settings.http_url}\n"
            f"  token:  {token}\n"
            f"  state:  {settings.var_dir}\n"
            f"  CLI config: {', '.join(str(p) for p in written) or '(not written)'}\n"
            f"  docs:   {settings.http_url}/docs\n"
            "Press Ctrl-C to stop.\n",
            flush=True,
        )
        if settings.fusionizer_mode:
            from services.gateway.fusionizer import WARNING

            print(f"nuclide: WARNING: {WARNING}", file=sys.stderr, flush=True)
        while not sup.stopping:
            sup.poll()
            time.sleep(0.2)
        return 0
    finally:
        print("nuclide: stopping...", file=sys.stderr, flush=True)
        sup.stop_all()
        print("nuclide: stopped", file=sys.stderr, flush=True)
