"""CURVE keys of a stack and the ZAP handler that decides who may connect (zguide's "Ironhouse").

Every ZeroMQ socket of the platform is encrypted and authenticated with CURVE:

- Each service (store, deployer, gateway, optimizer) has a long-lived keypair in
  ``<var_dir>/keys/<service>.key`` (mode 0600, created by that service on its first
  start, reused after) and its public half in ``<service>.pub`` (0644), which the other
  services of a one-machine stack read (they may run as other users: docker-compose
  runs the deployer as root, the rest as nobody). A service on another machine is known
  by its public key alone: the settings ``<service>_public_key`` (z85) carry it.
- Each instance gets a keypair of its own from the deployer, derived from the
  instance-key seed (``<var_dir>/keys/instance-seed``, or the ``instance_key_seed``
  setting, which the deployer and every gateway share) and the instance's id, group
  and group version. A gateway recomputes the public key from what a READY claims and
  registers the instance only when the key it connected with is that one: the key
  binds an identity to the group and version it was started for.

Server sockets name a ZAP domain (:data:`SERVICE_DOMAIN` or :data:`INSTANCE_DOMAIN`);
:class:`ZapHandler` answers libzmq's authentication requests for them in a thread of
its own and tells the socket the peer's public key (z85) as the messages' User-Id.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zmq
import zmq.utils.z85

from shared.config import ConfigError, Settings
from shared.linkkeys import curve_client, link_route

SERVICES = ("store", "deployer", "gateway", "optimizer")
SERVICE_DOMAIN = "nuclide.service"  # store RPC and feed, deployer RPC, gateway feed: service keys only
INSTANCE_DOMAIN = "nuclide.instance"  # the gateway's ROUTER: any CURVE client; messages judged by their key
PRODUCER_DOMAIN = "nuclide.producer"  # the ingress, when producer_public_keys is set: those keys only
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks (RFC 27)
# the instance id of a key shared by every instance of one group version (Swarm names its tasks itself,
# so the deployer cannot issue a key per task); only the swarm backend is given such keys
GROUP_WIDE = ""
SEED_BYTES = 32
KEY_DIR_MODE = 0o755  # the .pub files are for every service's user; the secrets are 0600 each
KEY_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PEER_KEY_WAIT_S = 60.0  # how long a service waits for another's first start to write its public key


class KeyProblem(ConfigError):
    """A key file or key setting cannot be used."""


@dataclass(frozen=True)
class KeyPair:
    """A CURVE keypair, both halves z85-encoded (40 ASCII bytes each)."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.decode()!r}, secret='***')"


def _key_dir(path: Path) -> None:
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(KEY_DIR_MODE)
    if os.geteuid() == 0:
        # a root service (the deployer) making it first: the state directory's owner (the other
        # services' user) must be able to add its own key files too
        owner = path.parent.stat()
        os.chown(path, owner.st_uid, owner.st_gid)


def _write_once(path: Path, data: bytes, mode: int = KEY_FILE_MODE) -> bool:
    """Write ``path`` unless it exists; True when this call wrote it. Two processes racing
    on a first start both end up reading the one file that won."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
        if os.geteuid() == 0:
            # root (the deployer under docker-compose) writes them as the key directory's owner: the
            # gateway, running as that user, reads the instance-key seed too
            owner = path.parent.stat()
            os.fchown(fd, owner.st_uid, owner.st_gid)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails when another process was first
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _check_private(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyProblem(f"key file {path} is readable by others (mode {mode:o}); make it private with"
                        f" `chmod 600 {path}` (and check who read it), or delete it to get a new key")


def load_or_create_keypair(path: Path) -> KeyPair:
    """The keypair in ``path`` (``public = ...`` and ``secret = ...`` lines); a new one on first use."""
    if not path.exists():
        _key_dir(path.parent)
        public, secret = zmq.curve_keypair()
        _write_once(path, b"# nuclide CURVE keypair: keep secret\npublic = %s\nsecret = %s\n" % (public, secret))
    _check_private(path)
    values: dict[str, bytes] = {}
    for line in path.read_bytes().splitlines():
        name, sep, value = line.partition(b"=")
        if sep and not line.startswith(b"#"):
            values[name.strip().decode()] = value.strip()
    try:
        pair = KeyPair(values["public"], values["secret"])
        if zmq.curve_public(pair.secret) != pair.public:
            raise ValueError("the public key is not the secret key's")
    except (KeyError, ValueError, zmq.ZMQError) as exc:
        raise KeyProblem(f"key file {path} is damaged ({exc}); delete it to get a new key (peers that know the"
                        " old public key must then be given the new one)") from None
    public_path = path.with_suffix(".pub")
    try:
        current = public_path.read_bytes().strip()
    except FileNotFoundError:
        current = b""
    if current != pair.public:  # made now, or the key was rotated
        public_path.unlink(missing_ok=True)
        _write_once(public_path, pair.public + b"\n", PUBLIC_FILE_MODE)
    return pair


def read_public(path: Path, wait_s: float = PEER_KEY_WAIT_S) -> bytes:
    """A service's public key from its ``.pub`` file, waiting ``wait_s`` for its first start to write it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return check_public_key(str(path), path.read_text())
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise KeyProblem(f"no public key at {path}: start that service once on this machine (it writes"
                                 f" its key there), or set {path.stem}_public_key to its public key") from None
            time.sleep(0.05)


def load_or_create_seed(path: Path) -> bytes:
    if not path.exists():
        _key_dir(path.parent)
        _write_once(path, os.urandom(SEED_BYTES).hex().encode() + b"\n")
    _check_private(path)
    try:
        seed = bytes.fromhex(path.read_text().strip())
    except ValueError:
        seed = b""
    if len(seed) < 16:
        raise KeyProblem(f"instance-key seed {path} is damaged; delete it to get a new one (running instances"
                        " then have to be restarted)")
    return seed


def check_public_key(name: str, value: str) -> bytes:
    """A z85 public key from a setting, or a clear error naming the setting."""
    raw = value.strip().encode()
    try:
        if len(raw) != 40:
            raise ValueError
        zmq.utils.z85.decode(raw)
    except (ValueError, KeyError, TypeError):
        raise KeyProblem(f"setting {name} is not a CURVE public key (40 z85 characters, as in the 'public = ...'"
                        " line of a key file under <var_dir>/keys/)") from None
    return raw


def instance_keypair(seed: bytes, instance_id: str, group: str, group_version: int) -> KeyPair:
    """The keypair of one instance: only holders of the seed (the deployer, gateways) can make it."""
    material = hmac.new(seed, f"nuclide-instance\0{instance_id}\0{group}\0{int(group_version)}".encode(),
                        hashlib.sha256).digest()
    secret = zmq.utils.z85.encode(material)
    return KeyPair(zmq.curve_public(secret), secret)


class Keys:
    """The keys one process of a stack uses: its own pair, the services' public keys, the seed if it needs it."""

    def __init__(self, own: KeyPair, publics: dict[str, bytes], seed: bytes = b"",
                 producers: frozenset[bytes] = frozenset(), key_dir: Path | None = None) -> None:
        self.own = own
        self._publics = publics  # service -> z85 public key, as far as known
        self.seed = seed
        self.producers = producers
        self._key_dir = key_dir  # where the public keys not yet known appear (None: all are known)
        self._lock = threading.Lock()

    def public(self, name: str, wait_s: float = PEER_KEY_WAIT_S) -> bytes:
        """Service ``name``'s public key (from its setting, or its .pub file, waited for on a first start)."""
        found = self._publics.get(name)
        if found is None:
            if self._key_dir is None:
                raise KeyProblem(f"no public key for {name!r}")
            found = read_public(self._key_dir / f"{name}.pub", wait_s)
            with self._lock:
                self._publics[name] = found
        return found

    def is_service_key(self, key: bytes) -> bool:
        """ZAP's question for the service sockets; a key not known yet sends it to look for new .pub files."""
        if key in self._publics.values():
            return True
        if self._key_dir is None:
            return False
        for name in SERVICES:
            if name not in self._publics:
                try:
                    self.public(name, wait_s=0)
                except KeyProblem:
                    continue
        return key in self._publics.values()

    @classmethod
    def load(cls, settings: Settings, me: str) -> "Keys":
        """Keys of service ``me`` (one of SERVICES); its key file is created on first start."""
        if me not in SERVICES:
            raise KeyProblem(f"unknown service {me!r}; expected one of {', '.join(SERVICES)}")
        key_dir = settings.var_dir / "keys"
        own = load_or_create_keypair(key_dir / f"{me}.key")
        publics: dict[str, bytes] = {me: own.public}
        for name in SERVICES:
            setting = getattr(settings, f"{name}_public_key")
            if setting:
                publics[name] = check_public_key(f"{name}_public_key", setting)
        if publics[me] != own.public:
            raise KeyProblem(f"setting {me}_public_key does not match this {me}'s key file"
                            f" {key_dir / (me + '.key')}; set it to {own.public.decode()} or leave it empty")
        seed = b""
        if me in ("deployer", "gateway"):
            seed = (bytes.fromhex(settings.instance_key_seed) if settings.instance_key_seed
                    else load_or_create_seed(key_dir / "instance-seed"))
        producers = frozenset(check_public_key("producer_public_keys", k)
                              for k in settings.producer_public_keys.split(",") if k.strip())
        return cls(own, publics, seed, producers, key_dir)

    # ----- sockets ---------------------------------------------------------------------

    def server(self, sock: zmq.Socket, domain: str = SERVICE_DOMAIN) -> zmq.Socket:
        """Make ``sock`` a CURVE server whose peers the ZAP handler admits by ``domain``; before bind."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.own.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.own.public)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        return sock

    def client(self, sock: zmq.Socket, server: str) -> zmq.Socket:
        """Make ``sock`` a CURVE client of service ``server``; before connect."""
        return curve_client(sock, self.own.public, self.own.secret, self.public(server))

    def instance(self, instance_id: str, group: str, group_version: int) -> KeyPair:
        if not self.seed:
            raise KeyProblem("only the deployer and gateways hold the instance-key seed")
        return instance_keypair(self.seed, instance_id, group, group_version)

    def issued(self, key: str | None, route: bytes, instance_id: str, group: str, group_version: int) -> bool:
        """Whether ``key`` (z85) is the one the deployer issued for that instance of that group version
        (or, for Swarm's tasks, for every instance of it), and ``route`` the routing id that key makes for
        ``instance_id`` (shared/linkkeys.link_route): what a gateway asks of every READY."""
        if key is None:
            return False
        for ident in (instance_id, GROUP_WIDE):
            pair = self.instance(ident, group, group_version)
            if hmac.compare_digest(pair.public, key.encode()):
                return hmac.compare_digest(link_route(pair.secret, instance_id), route)
        return False

    def client_of_instance(self, sock: zmq.Socket, instance_id: str, group: str, group_version: int) -> zmq.Socket:
        """``sock`` keyed as that instance, a CURVE client of the gateways, with the routing id its key makes
        (tests and benchmarks stand in for one)."""
        pair = self.instance(instance_id, group, group_version)
        sock.setsockopt(zmq.ROUTING_ID, link_route(pair.secret, instance_id))
        return curve_client(sock, pair.public, pair.secret, self.public("gateway"))

    def instance_config(self, instance_id: str, group: str, group_version: int) -> dict[str, str]:
        """What an instance's config carries to connect to the gateways (``"curve"``)."""
        pair = self.instance(instance_id, group, group_version)
        return {"public": pair.public.decode(), "secret": pair.secret.decode(),
                "server": self.public("gateway").decode()}


def memory_keys() -> Keys:
    """Keys of a stack that exists only in memory: one keypair for every service, a random seed."""
    public, secret = zmq.curve_keypair()
    return Keys(KeyPair(public, secret), {name: public for name in SERVICES}, os.urandom(SEED_BYTES))


class ZapHandler:
    """Answers ZAP requests in a thread: CURVE only, admitted by the socket's domain.

    The User-Id a socket attaches to each message is the peer's public key (z85), so
    a receiver can judge a message by the key that sent it.
    """

    def __init__(self, ctx: zmq.Context, keys: Keys) -> None:
        self._policies: dict[bytes, Callable[[bytes], bool]] = {
            SERVICE_DOMAIN.encode(): keys.is_service_key,
            INSTANCE_DOMAIN.encode(): lambda _key: True,  # the broker judges every message by its key
            PRODUCER_DOMAIN.encode(): lambda key: key in keys.producers or keys.is_service_key(key),
        }
        self.refused = 0
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zap", daemon=True)
        self._thread.start()

    def decide(self, frames: list[bytes]) -> list[bytes]:
        """The reply to one ZAP request (pure: unit-tested)."""
        if len(frames) < 6:
            return [b"1.0", frames[1] if len(frames) > 1 else b"", b"400", b"malformed request", b"", b""]
        version, request_id, domain, _address, _identity, mechanism = frames[:6]
        policy = self._policies.get(domain)
        if version != b"1.0" or mechanism != b"CURVE" or policy is None or len(frames) != 7 or len(frames[6]) != 32:
            self.refused += 1
            return [b"1.0", request_id, b"400", b"CURVE with a known domain only", b"", b""]
        key = zmq.utils.z85.encode(frames[6])
        if not policy(key):
            self.refused += 1
            return [b"1.0", request_id, b"400", b"key not admitted", b"", b""]
        return [b"1.0", request_id, b"200", b"OK", key, b""]

    def _run(self) -> None:
        sock = self._sock
        while not self._stop.is_set():
            try:
                if not sock.poll(200):
                    continue
                sock.send_multipart(self.decide(sock.recv_multipart()))
            except zmq.ContextTerminated:
                break
            except zmq.ZMQError:
                if self._stop.is_set():
                    break
        sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
