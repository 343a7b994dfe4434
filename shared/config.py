"""Settings, read once at start: NUCLIDE_<SERVICE>_<KEY>, NUCLIDE_<KEY>, a YAML file, defaults.

Every service gets the same frozen :class:`Settings` (services need each other's
endpoints); a service-specific variable wins over the common one, so
``NUCLIDE_GATEWAY_HTTP_PORT=9000`` changes only what the gateway reads. The YAML
file named by ``NUCLIDE_CONFIG`` may hold the same keys at top level or under a
section named after the service. A bad value fails fast with the key's name.

``port_base`` N moves a whole stack: it gives the eight ports of :data:`PORT_KEYS`
the numbers N to N+7, so a second stack on one machine needs one setting. A port
set on its own (``NUCLIDE_HTTP_PORT``, ``NUCLIDE_STORE_RPC``, ...) still wins.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from shared.netpolicy import CallbackPolicy
from shared.protocol import MAX_HEADER_BYTES


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""


class Secret(str):
    """A string that hides itself in repr and logs."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


BACKENDS = ("process", "docker", "swarm")
SANDBOX_MODES = ("auto", "bwrap", "none")
STRATEGIES = ("none", "static", "feedback")
DATABASE_SCHEMES = ("postgresql://", "postgres://")
MAX_DOCKER_POOL_SIZE = 64  # each idle pool container holds a warm interpreter (about 10 MB)
MAX_BODY_CEILING_BYTES = 128 * 1024 * 1024  # shared.protocol.MAX_MESSAGE_BYTES is 256 MiB
MAX_DOCKER_RUNTIME_POOL_SIZE = 16  # per registered runtime: idle containers (a sh each) and spare runners (~30 MB each)
# every TCP port of a stack, in the order port_base numbers them: port_base + index
PORT_KEYS = ("http_port", "store_rpc", "store_pub", "deployer_rpc", "gateway_router", "gateway_pull", "gateway_sub",
             "gateway_pub")
MAX_PORT_BASE = 65535 - (len(PORT_KEYS) - 1)
MAX_IPC_PATH_BYTES = 107  # sun_path of a unix socket address, less its terminating NUL
PORT_BASE_HOW = "NUCLIDE_PORT_BASE=N or `nuclide up --port-base N`"


# what the gateway and `nuclide up` say when fusionizer_mode is on
FUSIONIZER_MODE_WARNING = ("fusionizer_mode is on: the control API (deploy, delete, groups, calls) takes requests"
                           " with no token from anything that reaches this loopback address; turn it off outside a"
                           " test setup")


@dataclass(frozen=True)
class Settings:
    var_dir: Path = Path("var")
    token: Secret = Secret("")
    # a second token that GET /metrics takes besides the API token, and no other route: what a Prometheus
    # scrape config holds, so it never holds the token that deploys and deletes; empty: /metrics needs the token
    metrics_token: Secret = Secret("")
    # HTTP
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    public_host: str = ""  # host tasks use to reach the gateway; defaults to http_host
    # several gateways: each is a full HTTP API and broker with its own ports; gateways sharing a var_dir (one
    # machine) need distinct names, which name their instance-link sockets; `nuclide up` starts ``gateways``
    gateway_name: str = ""
    gateways: int = 1
    # where services and instances on other machines reach this gateway's ROUTER and PUB; empty: the bound
    # endpoint, with a wildcard host (0.0.0.0, *, ::) replaced by public_host (else this machine's name)
    gateway_router_advertise: str = ""
    gateway_pub_advertise: str = ""
    # the Nuclio Fusionizer's scripts unchanged: no token on the control API (loopback only), and plain-text
    # answers for curl's default Accept: */*
    fusionizer_mode: bool = False
    port_base: int = 0  # N: the ports of PORT_KEYS are N to N+7 unless set on their own; 0: the defaults below
    # ZeroMQ endpoints (bind side and connect side use the same strings)
    gateway_router: str = "tcp://127.0.0.1:5560"
    gateway_pull: str = "tcp://127.0.0.1:5561"
    gateway_sub: str = "tcp://127.0.0.1:5562"
    gateway_pub: str = "tcp://127.0.0.1:5563"
    store_rpc: str = "tcp://127.0.0.1:5550"
    store_pub: str = "tcp://127.0.0.1:5551"
    deployer_rpc: str = "tcp://127.0.0.1:5552"
    # CURVE keys (shared/curve.py): each service's own keypair is <var_dir>/keys/<service>.key, created on first
    # start; a service on another machine is named here by its public key (z85, the 'public = ...' line of its
    # key file); empty: read (or create) the key file in this var_dir
    store_public_key: str = ""
    deployer_public_key: str = ""
    gateway_public_key: str = ""
    optimizer_public_key: str = ""
    # what instance keys are derived from (hex, at least 16 bytes); the deployer and every gateway must share
    # it; empty: <var_dir>/keys/instance-seed, created on first start
    instance_key_seed: Secret = Secret("")
    # comma-separated public keys of producers allowed on the PUSH/PUB ingress; empty: the ingress stays plain
    # (no CURVE) and every message is judged by its credential alone
    producer_public_keys: str = ""
    # state
    # empty: SQLite at <var_dir>/state.db; postgresql://user:password@host:port/database: PostgreSQL (a Secret:
    # the password stays out of repr and logs)
    database_url: Secret = Secret("")
    # deployer
    backend: str = "process"
    # the process backend's sandbox: auto and bwrap both mean bubblewrap, refusing to start instances
    # where it cannot be set up; none runs functions unsandboxed, an explicit choice that is warned about
    sandbox: str = "auto"
    zygote: bool = True  # fork process-backend instances from a warm interpreter per environment (needs bwrap, root)
    build_timeout_s: float = 900.0
    stop_instances_on_exit: bool = False
    default_memory_bytes: int = 1024 * 1024 * 1024
    # docker backend
    docker_host: str = "unix:///var/run/docker.sock"
    runtime_image: str = "nuclide-runtime:latest"  # what `make images` builds; function images start FROM it
    docker_namespace: str = ""  # labels this deployer's containers; empty: generated into <var_dir>/docker-namespace
    # where docker containers' instance link comes from (the directory of the gateway's unix socket, bound
    # read-only into isolated containers): empty, that directory on this host (Settings.instance_link);
    # a Docker volume's name when the deployer runs in a container and the directory lives in that volume
    docker_link_source: str = ""
    docker_image_cache: int = 8  # dependency images kept for reuse once no function uses them
    # started runtime containers waiting to become an instance of a Python function without
    # dependencies (no image build, no interpreter start on the deploy path); 0 disables the pool
    docker_pool_size: int = 2
    # registered runtimes: functions without a dependencies command (warmStart function) get their code
    # copied into a started container of the runtime's own image (no image build); this many such
    # containers wait per runtime, and as many runner processes wait already imported; 0 disables all
    # that (every function's image is built, each runner process is started on demand)
    docker_runtime_pool_size: int = 2
    # swarm backend (it uses the docker_* settings above too): a registry every node of the swarm pulls
    # from, host[:port][/path]; the deployer pushes each function image there. Empty: one node, whose own
    # engine holds the images (nothing is pushed or pulled)
    swarm_registry: str = ""
    # CA bundle handed to image builds, for pip behind a TLS-intercepting proxy:
    # auto (the system bundle, when present), none, or a path
    build_ca_bundle: str = "auto"
    # gateway limits
    max_body_bytes: int = 6 * 1024 * 1024  # an invocation body, unless the function's http trigger asks for more
    # the most a function's spec.triggers.<http>.attributes.maxRequestBodySize may ask for
    max_body_ceiling_bytes: int = 64 * 1024 * 1024
    max_zip_bytes: int = 50 * 1024 * 1024
    deploy_timeout_s: float = 600.0
    # a request body gets this long, then must average at least http_min_body_rate bytes a second (else 408)
    http_body_grace_s: float = 10.0
    http_min_body_rate: int = 1024
    queue_limit: int = 1000  # waiting sync calls per function before 429
    # networks (CIDR) and host names that callback URLs may point into besides the public internet;
    # empty: loopback, link-local and private addresses are refused (shared/netpolicy.py)
    callback_allow: str = ""
    # what a producer on the PUSH or topic ingress presents (header "token") to reach a private function,
    # besides the API token; empty: only the API token opens private functions there
    ingress_token: Secret = Secret("")
    # calls
    call_retention_s: float = 24 * 3600.0  # finished calls are kept this long
    async_batch_max: int = 256  # async calls stored per store transaction
    # optimizer
    optimizer_strategy: str = "none"  # none | static | feedback
    optimizer_schedule: str = ""  # static: JSON/YAML file {"<seconds after start>": setup}
    optimizer_round_s: float = 5.0  # feedback: how long each setup is measured
    optimizer_min_samples: int = 30  # feedback: entry calls needed before a round is judged
    optimizer_tolerance: float = 0.05  # feedback: a change is kept unless latency grows more than this
    # autoscaling (services/optimizer/autoscale.py): Knative KPA's defaults
    autoscale: bool = True  # false: groups keep minReplicas (or a manual override) whatever their load
    autoscale_stable_window_s: float = 60.0  # load averaged over this; scale-down only after it
    autoscale_panic_window_s: float = 6.0  # short window that scales up on bursts
    autoscale_panic_threshold: float = 2.0  # panic when the panic window wants this many times the ready replicas
    autoscale_tick_s: float = 1.0  # how often the optimizer decides
    # logging
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"

    @property
    def state_db(self) -> Path:
        return self.var_dir / "state.db"

    @property
    def max_frame_bytes(self) -> int:
        """The largest ZeroMQ frame a service accepts: an archive or an invoke body (up to the ceiling a
        function's maxRequestBodySize may ask for), or a header."""
        return max(self.max_zip_bytes, self.max_body_bytes, self.max_body_ceiling_bytes, MAX_HEADER_BYTES) + 64 * 1024

    @property
    def instance_link(self) -> str:
        """The gateway's ROUTER as sandboxed instances reach it: a unix socket, bound into each instance (the
        whole link directory is, so a gateway started later on this machine is reachable too)."""
        sock = f"gateway-{self.gateway_name}.sock" if self.gateway_name else "gateway.sock"
        return f"ipc://{self.var_dir.resolve() / 'run' / 'link' / sock}"

    @property
    def router_advertised(self) -> str:
        """The gateway's ROUTER as instances on another machine reach it."""
        return self.gateway_router_advertise or advertise(self.gateway_router, self.public_host)

    @property
    def pub_advertised(self) -> str:
        """The gateway's PUB of call traces as the optimizer reaches it."""
        return self.gateway_pub_advertise or advertise(self.gateway_pub, self.public_host)

    def sandbox_warning(self) -> str | None:
        """What /healthz, the deployer's start and every deploy response say when functions run unsandboxed."""
        if self.backend == "process" and self.sandbox == "none":
            return ("sandbox is 'none': functions run unsandboxed, as the deployer's user, with the host's file"
                    " system and network; set NUCLIDE_SANDBOX=auto (the default) on a host you share with them")
        return None

    @property
    def advertised_host(self) -> str:
        return self.public_host or self.http_host

    @property
    def http_url(self) -> str:
        host = self.http_host if self.http_host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.http_port}"

    def ports(self) -> list[tuple[str, str, int]]:
        """(setting, host, port) of every TCP port this stack binds, in PORT_KEYS order."""
        found = [("http_port", self.http_host, self.http_port)]
        for key in PORT_KEYS[1:]:
            endpoint = getattr(self, key)
            if endpoint.startswith("tcp://"):
                host, _, port = endpoint[6:].rpartition(":")
                if port.isdigit():
                    found.append((key, host, int(port)))
        return found

    def validate(self) -> "Settings":
        check_port_base(self.port_base)
        if self.database_url and not self.database_url.startswith(DATABASE_SCHEMES):
            scheme = self.database_url.partition(":")[0][:20]
            raise ConfigError(f"database_url starts with {scheme!r}: leave it empty for SQLite in var_dir, or write"
                              " postgresql://user:password@host:port/database for PostgreSQL")
        if self.instance_key_seed:
            try:
                seed = bytes.fromhex(self.instance_key_seed)
            except ValueError:
                seed = b""
            if len(seed) < 16:
                raise ConfigError("instance_key_seed must be at least 16 bytes in hex (32 hex digits), e.g. from"
                                  " `python3 -c 'import secrets; print(secrets.token_hex(32))'`; or leave it empty"
                                  " for a seed file in var_dir")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        if self.sandbox not in SANDBOX_MODES:
            raise ConfigError(f"sandbox {self.sandbox!r} is unknown; use one of {', '.join(SANDBOX_MODES)}")
        if self.metrics_token and self.metrics_token == self.token:
            raise ConfigError("metrics_token is the API token: a scrape config would then hold the token that"
                              " deploys and deletes; set metrics_token to a token of its own (or leave it empty)")
        if self.metrics_token != self.metrics_token.strip() or " " in self.metrics_token:
            raise ConfigError("metrics_token has spaces in it; an Authorization header cannot carry them: use a"
                              " token without spaces, e.g. one from `python3 -c 'import secrets;"
                              " print(secrets.token_urlsafe(32))'`")
        if self.ingress_token != self.ingress_token.strip() or " " in self.ingress_token:
            raise ConfigError("ingress_token has spaces in it; use a token without spaces, e.g. one from"
                              " `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        link = self.instance_link[len("ipc://"):]
        if self.backend in ("process", "docker") and len(link.encode()) > MAX_IPC_PATH_BYTES:
            raise ConfigError(f"var_dir {str(self.var_dir)!r} is too deep: the instances' socket {link} would be"
                              f" longer than {MAX_IPC_PATH_BYTES} bytes, the limit of a unix socket's path;"
                              " choose a shorter var_dir")
        if self.gateway_name and not GATEWAY_NAME.match(self.gateway_name):
            raise ConfigError(f"gateway_name {self.gateway_name!r} must be 1-32 letters, digits, '-' or '_' (it names"
                              " the gateway's socket file)")
        if not 1 <= self.gateways <= MAX_GATEWAYS:
            raise ConfigError(f"gateways {self.gateways} is out of range 1-{MAX_GATEWAYS} (how many gateways"
                              " `nuclide up` starts on this machine); set it with NUCLIDE_GATEWAYS=N or"
                              " `nuclide up --gateways N`")
        if self.gateways > 1:
            ports = [self.http_port] + [int(e.rpartition(":")[2]) for e in (self.gateway_router, self.gateway_pull,
                                        self.gateway_sub, self.gateway_pub) if e.rpartition(":")[2].isdigit()]
            top = max(ports) + GATEWAY_PORT_STRIDE * (self.gateways - 1)
            if top > 65535:
                raise ConfigError(f"gateways {self.gateways} would need port {top}, past 65535 (gateway i takes the"
                                  f" first one's ports plus {GATEWAY_PORT_STRIDE}*i); start fewer gateways or give"
                                  " the stack lower ports (`nuclide up --port-base N`)")
        for key in ("gateway_router_advertise", "gateway_pub_advertise"):
            value = getattr(self, key)
            if value and (not value.startswith("tcp://") or wildcard(value)):
                raise ConfigError(f"{key} {value!r} must be a tcp:// endpoint with a host others can reach (not"
                                  " 0.0.0.0, * or ::), such as tcp://gw1.example:5560")
        if not 0 < self.http_port < 65536:
            raise ConfigError(f"http_port {self.http_port} is out of range 1-65535")
        if self.fusionizer_mode and not is_loopback(self.http_host):
            raise ConfigError(f"fusionizer_mode turns the control API's token off, so the gateway must listen on"
                              f" loopback only (http_host 127.0.0.1, ::1 or localhost), not {self.http_host!r}")
        for name in ("max_body_bytes", "max_zip_bytes", "queue_limit", "http_body_grace_s", "http_min_body_rate"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if not self.max_body_bytes <= self.max_body_ceiling_bytes <= MAX_BODY_CEILING_BYTES:
            raise ConfigError(f"max_body_ceiling_bytes {self.max_body_ceiling_bytes} must be at least max_body_bytes"
                              f" ({self.max_body_bytes}) and at most {MAX_BODY_CEILING_BYTES} (half the largest"
                              " message the wire protocol carries)")
        try:
            CallbackPolicy.parse(self.callback_allow)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.docker_image_cache < 0:
            raise ConfigError("docker_image_cache must be 0 or more")
        if not 0 <= self.docker_pool_size <= MAX_DOCKER_POOL_SIZE:
            raise ConfigError(f"docker_pool_size {self.docker_pool_size} is out of range 0-{MAX_DOCKER_POOL_SIZE}"
                              " (idle warm containers of the docker backend; 0 disables the pool)")
        if not 0 <= self.docker_runtime_pool_size <= MAX_DOCKER_RUNTIME_POOL_SIZE:
            raise ConfigError(f"docker_runtime_pool_size {self.docker_runtime_pool_size} is out of range"
                              f" 0-{MAX_DOCKER_RUNTIME_POOL_SIZE} (idle containers per registered runtime and spare"
                              " runner processes; 0 disables them and builds every runtime function's image)")
        if self.swarm_registry and not re.fullmatch(r"[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*", self.swarm_registry):
            raise ConfigError(f"swarm_registry {self.swarm_registry!r} is not a registry address: write host[:port]"
                              "[/path] without a scheme or a tag, e.g. registry.example.com:5000/nuclide")
        if self.optimizer_strategy not in STRATEGIES:
            raise ConfigError(f"optimizer_strategy {self.optimizer_strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
        if self.optimizer_strategy == "static" and not self.optimizer_schedule:
            raise ConfigError("optimizer_strategy 'static' needs optimizer_schedule (a JSON or YAML file)")
        if self.optimizer_round_s <= 0 or self.optimizer_min_samples < 1 or self.optimizer_tolerance < 0:
            raise ConfigError("optimizer_round_s and optimizer_min_samples must be positive, optimizer_tolerance >= 0")
        if not 0 < self.autoscale_tick_s <= self.autoscale_panic_window_s <= self.autoscale_stable_window_s:
            raise ConfigError(f"autoscale windows must satisfy 0 < autoscale_tick_s ({self.autoscale_tick_s:g})"
                              f" <= autoscale_panic_window_s ({self.autoscale_panic_window_s:g})"
                              f" <= autoscale_stable_window_s ({self.autoscale_stable_window_s:g})")
        if self.autoscale_panic_threshold < 1:
            raise ConfigError(f"autoscale_panic_threshold {self.autoscale_panic_threshold:g} must be at least 1"
                              " (the ratio of wanted to ready replicas that starts a panic; Knative uses 2)")
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError("log_format must be auto, json or console")
        return self

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def child_env(self) -> dict[str, str]:
        """Environment that hands these settings to a child service process."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                value = "true" if value else "false"
            env[f"NUCLIDE_{f.name.upper()}"] = str(value)
        return env


GATEWAY_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAX_GATEWAYS = 16  # gateways `nuclide up` starts on one machine; each takes GATEWAY_PORT_STRIDE ports further on
GATEWAY_PORT_STRIDE = 10  # gateway i (from 0) of `nuclide up` takes its ports at this offset times i
_WILDCARDS = ("0.0.0.0", "*", "::", "[::]")


def wildcard(endpoint: str) -> bool:
    """True when a tcp:// endpoint binds every address, so it says nothing about where to reach it."""
    host = endpoint[len("tcp://"):].rpartition(":")[0]
    return host in _WILDCARDS


def advertise(endpoint: str, public_host: str) -> str:
    """Where others reach a bound endpoint: the same, unless it binds a wildcard, then public_host (else the
    machine's name)."""
    if not endpoint.startswith("tcp://") or not wildcard(endpoint):
        return endpoint
    port = endpoint.rpartition(":")[2]
    return f"tcp://{public_host or socket.gethostname()}:{port}"


def gateway_settings(settings: "Settings", index: int) -> dict[str, str]:
    """The environment that makes gateway ``index`` (from 0) of `nuclide up` distinct from the others on one
    machine: its name and its ports, GATEWAY_PORT_STRIDE * index further on (gateway 0 keeps the settings)."""
    if index == 0:
        return {}
    shift = GATEWAY_PORT_STRIDE * index
    env = {"NUCLIDE_GATEWAY_GATEWAY_NAME": f"{settings.gateway_name or 'gw'}{index}",
           "NUCLIDE_GATEWAY_HTTP_PORT": str(settings.http_port + shift)}
    for key in ("gateway_router", "gateway_pull", "gateway_sub", "gateway_pub"):
        endpoint = getattr(settings, key)
        head, _, port = endpoint.rpartition(":")
        if port.isdigit():
            env[f"NUCLIDE_GATEWAY_{key.upper()}"] = f"{head}:{int(port) + shift}"
    return env


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1 or [::1], localhost)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_base(base: int) -> None:
    if base and not 1 <= base <= MAX_PORT_BASE:
        raise ConfigError(f"port_base {base} is out of range 1-{MAX_PORT_BASE}: the stack takes ports {base} to"
                          f" {base + len(PORT_KEYS) - 1}; choose a base in range with {PORT_BASE_HOW}")


def derive_ports(base: int, values: dict[str, Any]) -> None:
    """Fill the ports of PORT_KEYS that ``values`` does not set from ``base`` (0: leave the defaults)."""
    if not base:
        return
    check_port_base(base)
    for offset, key in enumerate(PORT_KEYS):
        if key in values:
            continue
        # endpoints keep their default host and scheme; only the port moves
        default = getattr(Settings, key)
        values[key] = base + offset if key == "http_port" else f"{default.rpartition(':')[0]}:{base + offset}"


def _convert(name: str, raw: Any, kind: Any) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(str(raw))
        if kind is Secret:
            return Secret(str(raw))
        return str(raw)
    except (TypeError, ValueError):
        expected = "a whole number" if kind is int else kind.__name__
        raise ConfigError(f"setting {name} has an invalid value {raw!r}; expected {expected}") from None


def load_settings(service: str = "", environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read settings for one service; explicit overrides win over everything."""
    env = os.environ if environ is None else environ
    file_values: dict[str, Any] = {}
    config_path = env.get("NUCLIDE_CONFIG")
    if config_path:
        try:
            loaded = yaml.safe_load(Path(config_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {config_path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_path} must be a YAML mapping")
        file_values = {k: v for k, v in loaded.items() if not isinstance(v, dict)}
        if service and isinstance(loaded.get(service), dict):
            file_values.update(loaded[service])
    hints = typing.get_type_hints(Settings)
    values: dict[str, Any] = {}
    known = {f.name for f in fields(Settings)}
    for key in file_values:
        if key not in known:
            raise ConfigError(f"config file {config_path}: unknown setting {key!r}")
    for f in fields(Settings):
        key = f.name.upper()
        raw: Any = None
        if service and f"NUCLIDE_{service.upper()}_{key}" in env:
            raw = env[f"NUCLIDE_{service.upper()}_{key}"]
        elif f"NUCLIDE_{key}" in env:
            raw = env[f"NUCLIDE_{key}"]
        elif f.name in file_values:
            raw = file_values[f.name]
        if raw is not None:
            values[f.name] = _convert(f"NUCLIDE_{key}", raw, hints[f.name])
    values.update(overrides)
    derive_ports(values.get("port_base", 0), values)
    return Settings(**values).validate()
