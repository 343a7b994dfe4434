"""A deployed function attacks the host, the platform and other functions (process backend, bwrap): each attack fails.

Every attack reports the errno it met, and each is checked against the reason the
sandbox gives (ENOENT: not in its view; EPERM: seccomp or no capability;
ECONNREFUSED: its own network namespace has nothing there; ENOSPC, EAGAIN: its
limits), so an attack that fails for an unrelated reason does not pass. The
platform must keep serving throughout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from shared.procs import alive
from tests.stack import Stack, function_yaml, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_bwrap")]

HELLO = "def handler(context, event):\n    return 'still here'\n"

# what each attack returns: "ok", or the errno's name it failed with
ATTACK_HELPERS = r'''
import ctypes, errno, json, os, socket

libc = ctypes.CDLL(None, use_errno=True)

def outcome(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def syscall(nr, *args):
    def call():
        if libc.syscall(nr, *args) == -1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return outcome(call)

def read(path):
    return outcome(lambda: open(path, "rb").read(1))

def connect_tcp(endpoint):
    host, _, port = endpoint.replace("tcp://", "").rpartition(":")
    def go():
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    return outcome(go)

def connect_unix(path):
    def go():
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
    return outcome(go)
'''

# x86_64 system call numbers (the test machine's); the filter itself is built by name by libseccomp
SYSCALLS = {"ptrace": 101, "mount": 165, "keyctl": 250, "bpf": 321, "unshare": 272, "add_key": 248,
            "perf_event_open": 298, "kexec_load": 246, "init_module": 175, "setns": 308}


@pytest.fixture
def outside() -> Iterator[tuple[str, int]]:
    """A server "outside" the platform: another loopback address, as another service on the host would be."""
    srv = socket.socket()
    srv.bind(("127.0.0.2", 0))
    srv.listen(16)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                conn.sendall(b"outside\n")
                conn.close()
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()
    stop.set()
    thread.join(5)
    srv.close()


def attacker(s: Stack, outside: tuple[str, int], victim_code: Path) -> str:
    var = s.var_dir.resolve()
    targets = {
        "shadow": "/etc/shadow", "ssl_private": "/etc/ssl/private", "state_db": str(var / "state.db"),
        "other_code": str(victim_code), "gateway_environ": f"/proc/{s.procs['gateway'].pid}/environ",
        "deployer_environ": f"/proc/{s.procs['deployer'].pid}/environ",
        "cli_config": str(Path.home() / ".config" / "nuclide"), "zygote_log": str(var / "logs" / "zygotes"),
    }
    endpoints = {k: s.endpoints[k] for k in ("store_rpc", "deployer_rpc", "gateway_pull", "gateway_router")}
    endpoints["http"] = s.url.replace("http://", "tcp://")
    endpoints["outside"] = f"tcp://{outside[0]}:{outside[1]}"
    return ATTACK_HELPERS + f"""
TARGETS = {targets!r}
ENDPOINTS = {endpoints!r}
SYSCALLS = {SYSCALLS!r}
CLONE_NEWUSER = 0x10000000

def handler(context, event):
    out = {{"read_" + k: read(v) for k, v in TARGETS.items()}}
    out["list_other_code"] = outcome(lambda: os.listdir(os.path.dirname(os.path.dirname(TARGETS["other_code"]))))
    out["docker_sock"] = connect_unix("/var/run/docker.sock")
    out.update({{"connect_" + k: connect_tcp(v) for k, v in ENDPOINTS.items()}})
    out.update({{"syscall_" + k: syscall(nr, 0, 0, 0, 0, 0) for k, nr in SYSCALLS.items()}})
    out["syscall_unshare_user"] = syscall(SYSCALLS["unshare"], CLONE_NEWUSER)
    out["uid"] = os.getuid()
    out["gid"] = os.getgid()
    out["own_code_write"] = outcome(lambda: open("written-by-the-instance.txt", "w").write("x"))
    out["routes"] = [line.split()[0] for line in open("/proc/net/route").read().splitlines()[1:]
                     if line.split()[1] == "00000000"]
    return out
"""


def test_an_isolated_function_reaches_nothing_of_the_host_or_the_platform(stack: Stack,
                                                                         outside: tuple[str, int]) -> None:
    s = stack
    s.deploy("victim", {"function.yaml": function_yaml("victim"), "main.py": "SECRET = 1\n" + HELLO})
    victim_code = next((s.var_dir.resolve() / "functions" / "victim").glob("*/code/main.py"))
    s.deploy("attacker", {"function.yaml": function_yaml("attacker"), "main.py": attacker(s, outside, victim_code)})
    out: dict[str, Any] = s.invoke("attacker").json()

    for key in ("read_shadow", "read_ssl_private", "read_state_db", "read_other_code", "read_gateway_environ",
                "read_deployer_environ", "read_cli_config", "read_zygote_log", "list_other_code", "docker_sock"):
        assert out[key] == "ENOENT", f"{key}: {out[key]} (must not be in the function's view at all)"
    for key in ("store_rpc", "deployer_rpc", "gateway_pull", "gateway_router", "http", "outside"):
        # the instance's own network namespace: its loopback is not the host's, nothing listens there
        assert out[f"connect_{key}"] == "ECONNREFUSED", f"connect to {key}: {out[f'connect_{key}']}"
    for name in (*SYSCALLS, "unshare_user"):
        assert out[f"syscall_{name}"] == "EPERM", f"{name}: {out[f'syscall_{name}']} (seccomp must deny it)"
    assert out["uid"] >= 1 << 30 and out["gid"] == out["uid"], "an unprivileged uid of the instance's own"
    assert out["own_code_write"] == "ok", "its code directory stays writable (in its scratch layer)"
    assert out["routes"] == ["tap0"], "outbound connections go through the instance's user-mode network"
    code_dir = next((s.var_dir.resolve() / "functions" / "attacker").glob("*/code"))
    assert not (code_dir / "written-by-the-instance.txt").exists(), "writes stay in the instance, off the host's disk"
    assert s.invoke("victim").text == "still here"


def test_the_network_opt_in_reaches_the_hosts_loopback(stack: Stack, outside: tuple[str, int]) -> None:
    code = ATTACK_HELPERS + f"""
def handler(context, event):
    return connect_tcp("tcp://{outside[0]}:{outside[1]}")
"""
    stack.deploy("hostnet", {"function.yaml": function_yaml("hostnet", network="host"), "main.py": code})
    assert stack.invoke("hostnet").text == "ok"
    stack.deploy("isolatednet", {"function.yaml": function_yaml("isolatednet"), "main.py": code})
    assert stack.invoke("isolatednet").text == "ECONNREFUSED"
    # its slirp4netns lives as long as the instance, not longer
    [meta] = [json.loads(p.read_text()) for p in (stack.var_dir / "instances").glob("g-isolatednet-*/instance.json")]
    assert alive(meta["slirp4netns_pid"])
    assert stack.client.delete("/isolatednet").status_code == 204
    wait_for(lambda: not alive(meta["pid"]) and not alive(meta["slirp4netns_pid"]), 30,
             what="the instance and its slirp4netns to exit")


def build_probe(targets: dict[str, str]) -> str:
    """A build command (a shell line) that tries to connect to each ``tcp://`` target and leaves what happened in
    the environment it builds, as module ``buildprobe`` (its RESULT), for the function to return."""
    code = (
        "import errno, json, os, socket\n"
        f"targets = json.loads({json.dumps(json.dumps(targets))})\n"
        "out = {}\n"
        "for name, endpoint in targets.items():\n"
        "    host, _, port = endpoint[len(\"tcp://\"):].rpartition(\":\")\n"
        "    try:\n"
        "        socket.create_connection((host, int(port)), timeout=3).close()\n"
        "        out[name] = \"ok\"\n"
        "    except OSError as exc:\n"
        "        out[name] = errno.errorcode.get(exc.errno, str(exc))\n"
        "with open(os.path.join(os.environ[\"PIP_TARGET\"], \"buildprobe.py\"), \"w\") as fh:\n"
        "    fh.write(\"RESULT = \" + repr(out) + \"\\n\")\n"
    )
    assert "'" not in code
    return f"python3 -c '{code}'"


BUILD_PROBE_HANDLER = "import buildprobe\n\ndef handler(context, event):\n    return buildprobe.RESULT\n"


def loopback_targets(s: Stack, outside: tuple[str, int]) -> dict[str, str]:
    """The platform's loopback sockets (store, deployer, gateway PULL and ROUTER, HTTP) and an outside server."""
    targets = {k: s.endpoints[k] for k in ("store_rpc", "deployer_rpc", "gateway_pull", "gateway_router")}
    targets["http"] = s.url.replace("http://", "tcp://")
    targets["outside"] = f"tcp://{outside[0]}:{outside[1]}"
    return targets


def test_a_build_step_reaches_nothing_on_the_hosts_loopback(stack: Stack, outside: tuple[str, int]) -> None:
    targets = loopback_targets(stack, outside)
    spec = {"build": {"commands": [build_probe(targets)]}}
    stack.deploy("buildprobe", {"function.yaml": function_yaml("buildprobe", **spec), "main.py": BUILD_PROBE_HANDLER})
    assert stack.invoke("buildprobe").json() == {k: "ECONNREFUSED" for k in targets}
    # the opt-in builds with the host's network, as every build did before: the same probe connects
    host = {"build": {"commands": [build_probe(targets)]}, "network": "host"}
    stack.deploy("buildprobe-host", {"function.yaml": function_yaml("buildprobe-host", **host),
                                     "main.py": BUILD_PROBE_HANDLER})
    assert stack.invoke("buildprobe-host").json() == {k: "ok" for k in targets}


FORK_BOMB = """
import os, time

def handler(context, event):
    children, error = [], None
    try:
        for _ in range(200):
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
    except OSError as exc:
        error = exc.errno
    for pid in children:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return {"forked": len(children), "errno": error}
"""


def test_a_fork_bomb_is_stopped_by_the_process_limit(stack: Stack) -> None:
    spec = function_yaml("forkbomb", resources={"limits": {"pids": 32}})
    stack.deploy("forkbomb", {"function.yaml": spec, "main.py": FORK_BOMB})
    out = stack.invoke("forkbomb").json()
    assert out["errno"] == 11 and 0 < out["forked"] < 32, f"EAGAIN once the instance holds 32 tasks: {out}"
    again = stack.invoke("forkbomb").json()
    assert again["forked"] == out["forked"], "the limit frees up as its processes exit"


SHM = """
import os

def handler(context, event):
    if event.body == b"write":
        with open("/dev/shm/left-behind", "w") as fh:
            fh.write("x")
    return sorted(os.listdir("/dev/shm"))
"""


def test_dev_shm_is_private_to_an_instance_and_dies_with_it(stack: Stack) -> None:
    stack.deploy("shm-a", {"function.yaml": function_yaml("shm-a"), "main.py": SHM})
    stack.deploy("shm-b", {"function.yaml": function_yaml("shm-b"), "main.py": SHM})
    assert stack.invoke("shm-a", b"write").json() == ["left-behind"]
    assert stack.invoke("shm-b").json() == [], "another function's /dev/shm is not shared"
    pid = next(p for p in stack.instance_pids_of("shm-a"))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: stack.instance_pids_of("shm-a") and stack.instance_pids_of("shm-a") != [pid], 30,
             what="a new instance of shm-a")
    wait_for(lambda: stack.invoke("shm-a").status_code == 200, 30, what="shm-a to serve again")
    assert stack.invoke("shm-a").json() == [], "/dev/shm does not survive the instance"


FILL = """
import errno, os

def fill(path):
    written = 0
    try:
        with open(path, "wb") as fh:
            for _ in range(64):
                fh.write(b"x" * (1 << 20))
                fh.flush()
                written += 1
    except OSError as exc:
        return {"errno": errno.errorcode.get(exc.errno), "mb": written}
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return {"errno": None, "mb": written}

def handler(context, event):
    return {"tmp": fill("/tmp/fill"), "code": fill("fill"), "shm": fill("/dev/shm/fill")}
"""


def test_filling_tmp_or_the_code_directory_stops_at_the_size_limit(stack: Stack) -> None:
    spec = function_yaml("filler", resources={"limits": {"ephemeral-storage": "8Mi"}})
    stack.deploy("filler", {"function.yaml": spec, "main.py": FILL})
    out = stack.invoke("filler").json()
    for where in ("tmp", "code", "shm"):
        assert out[where]["errno"] == "ENOSPC" and out[where]["mb"] <= 8, f"{where}: {out[where]}"
    assert stack.invoke("filler").status_code == 200, "the space is freed once the files are gone"


# ----- the platform's ZeroMQ sockets, spoken to with real protocol messages (CURVE, shared/curve.py) -----

# a function that opted into the host's network (spec.network: host) reaches the platform's TCP sockets; what
# it says there is judged by its CURVE key: the store and deployer take service keys only, the gateway
# registers an instance only with the key issued for it, and a RESULT counts only from the call's instance
MOLE = r'''
import gc, json, os, time
import zmq
from zmq.utils.monitor import recv_monitor_message
from shared import protocol

TURNED_AWAY = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
               zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_DISCONNECTED}
HELD = {}  # sockets kept between calls: did any INVOKE reach them?

def own_keys():
    # the keypair the deployer issued to this instance is in its memory: a function can always find it
    for o in gc.get_objects():
        for value in list(getattr(o, "__dict__", {}).values()):
            if isinstance(value, dict) and set(value) == {"public", "secret", "server"}:
                return {k: v.encode() for k, v in value.items()}
    raise RuntimeError("no keys found")

def socket(kind, ident=None, key="none", server=None):
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if ident:
        sock.setsockopt(zmq.ROUTING_ID, ident.encode())
    if key != "none":
        public, secret = zmq.curve_keypair() if key == "made-up" else (own_keys()["public"], own_keys()["secret"])
        sock.setsockopt(zmq.CURVE_SERVERKEY, server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    return sock

def rpc(endpoint, server, key, method, args):
    """'answered', 'turned away' (the handshake failed), or 'silent' after 10 s."""
    sock = socket(zmq.DEALER, key=key, server=server)
    monitor = sock.get_monitor_socket()
    sock.connect(endpoint)
    sock.send_multipart(protocol.request(7, method, args))
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sock.poll(20):
                return "answered"
            while monitor.poll(0):
                if recv_monitor_message(monitor)["event"] in TURNED_AWAY:
                    return "turned away"
        return "silent"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)

def ready_header(group, version, functions):
    return {"instance_id": "x", "group": group, "group_version": version, "functions": functions,
            "credit": 64, "concurrency": 64, "pid": os.getpid()}

def handler(context, event):
    ask = json.loads(event.body)
    keys = {k: v.encode() for k, v in ask["keys"].items()}
    if ask["step"] == "rpc":
        out = {}
        for key in ("none", "made-up", "own"):
            out["store function.list " + key] = rpc(ask["store"], keys["store"], key, "function.list", {})
            out["store blob.get " + key] = rpc(ask["store"], keys["store"], key, "blob.get", {"digest": ask["digest"]})
            out["deployer ping " + key] = rpc(ask["deployer"], keys["deployer"], key, "ping", {})
        return out
    if ask["step"] == "ready":
        # READYs for the victim's group and function: with a made-up key, with its own key under another
        # identity, and with its own key under its own identity (a second connection on an identity in use)
        victim = ready_header(ask["group"], ask["version"], {ask["function"]: ask["function_version"]})
        for name, ident, key in (("made-up", "g-mole-fake-1", "made-up"), ("own-key", "g-mole-fake-2", "own"),
                                 ("own-identity", context.log_stream_name, "own")):
            sock = HELD[name] = socket(zmq.DEALER, ident=ident, key=key, server=keys["gateway"])
            sock.connect(ask["router"])
            sock.send_multipart(protocol.encode(protocol.READY, victim))
        return sorted(HELD)
    if ask["step"] == "collect":
        got = {}
        for name, sock in HELD.items():
            got[name] = []
            while sock.poll(0):
                got[name].append(protocol.decode(sock.recv_multipart()).command.decode())
        return got
    if ask["step"] == "result":
        for key in ("made-up", "own", "none"):
            sock = socket(zmq.DEALER, key=key, server=keys["gateway"])
            sock.connect(ask["router"])
            sock.send_multipart(protocol.encode(protocol.RESULT, {"call_id": ask["call_id"], "status": 200},
                                                b"forged"))
            HELD["result-" + key] = sock
        return "sent"
'''

VICTIM = """
import time

def handler(context, event):
    time.sleep(float(event.body or 0))
    return "still here"
"""


def refused(s: Stack) -> float:
    return s.metrics().get("nuclide_instance_messages_refused_total", 0.0)


def mole_asks(s: Stack, step: str, **extra: Any) -> Any:
    keys = s.keys()
    ask = {"step": step, "keys": {k: keys.public(k).decode() for k in ("store", "deployer", "gateway")},
           "store": s.endpoints["store_rpc"], "deployer": s.endpoints["deployer_rpc"],
           "router": s.endpoints["gateway_router"], **extra}
    r = s.invoke("mole", json.dumps(ask).encode())
    assert r.status_code == 200, r.text
    return r.json() if r.headers["content-type"].startswith("application/json") else r.text


def zeromq_attacks(s: Stack) -> None:
    """The attacks on the platform's ZeroMQ sockets from a deployed function, and the platform serving throughout."""
    s.deploy("victim", {"function.yaml": function_yaml("victim"), "main.py": VICTIM})
    s.deploy("mole", {"function.yaml": function_yaml("mole", network="host"), "main.py": MOLE})
    victim = s.client.get("/functions/victim").json()

    # the store and the deployer: nothing but service keys gets a connection, so no request is ever read
    digest = victim.get("digest") or victim.get("blob") or "0" * 64
    out = mole_asks(s, "rpc", digest=digest)
    assert out == {k: "turned away" for k in out} and len(out) == 9, out

    # fake READYs for the victim's function: never registered, so none of its calls reach the mole
    before, instances = refused(s), s.metrics()["nuclide_instances"]
    sent = mole_asks(s, "ready", group=victim["group"]["id"], version=victim["group"]["version"],
                     function="victim", function_version=victim["version"])
    assert sent == ["made-up", "own-identity", "own-key"]
    # the two that got a connection are refused by their key (the third is never read: its identity is taken)
    wait_for(lambda: refused(s) >= before + 2 or s.metrics()["nuclide_instances"] > instances, 30,
             what="the fake READYs to be refused (or registered)")
    for _ in range(12):
        r = s.invoke("victim")
        assert r.status_code == 200 and r.text == "still here"
    assert mole_asks(s, "collect") == {"made-up": [], "own-key": [], "own-identity": []}

    # a forged RESULT for a call running on the victim is dropped; the call ends with the victim's answer
    r = s.client.post("/victim", content=b"8", headers={"X-Nuclide-Async": "true"})
    call_id = r.json()["call_id"]
    wait_for(lambda: s.client.get(f"/calls/{call_id}").json()["status"] == "RUNNING", 30, what="the victim's call")
    before = refused(s)
    assert mole_asks(s, "result", call_id=call_id) == "sent"
    wait_for(lambda: refused(s) >= before + 2 or s.client.get(f"/calls/{call_id}").json()["status"] != "RUNNING",
             30, what="the forged RESULTs to be refused (or taken)")
    final = wait_for(lambda: (c := s.client.get(f"/calls/{call_id}").json())["status"] in ("DONE", "FAILED") and c,
                     60, what="the victim's call to finish")
    assert final["status"] == "DONE" and final["result"] == "still here", final

    # call ids carry 80 random bits after the time: nothing to learn from one about the next
    ids = [s.invoke("victim").headers["x-call-id"] for _ in range(8)]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and len(set(ids)) == 8, ids
    steps = {int(b, 16) - int(a, 16) for a, b in zip(ids, ids[1:])}
    assert len(steps) == len(ids) - 1, f"ids in steps: {ids}"
    assert s.anon.get("/healthz").status_code == 200 and s.invoke("victim").text == "still here"


def test_a_function_cannot_use_the_platforms_zeromq_sockets(stack: Stack) -> None:
    zeromq_attacks(stack)
