"""The attacks of test_attacks.py against the Docker backend: the network, fork bomb, /dev/shm, docker socket, builds.

A function container has a network of its own (Docker's network mode ``none``, with
slirp4netns attached for outbound connections, host loopback disabled) and reaches the
gateway only over the instance link, a unix socket bound in read-only; its image's build
steps run in a namespace like it. So nothing listening on the host's loopback, the
platform's sockets included, is in reach unless the function opts in (``spec.network: host``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.docker_util import (  # noqa: F401 (require_docker: a fixture)
    RUNTIME_IMAGE, docker_client, function_containers, namespace, own_docker_stack, require_docker,
)
from tests.integration.test_attacks import (  # noqa: F401 (outside: a fixture)
    ATTACK_HELPERS, BUILD_PROBE_HANDLER, FILL, FORK_BOMB, SHM, build_probe, loopback_targets, outside,
    zeromq_attacks,
)
from tests.integration.test_private import CALLER, KEEPER
from tests.stack import Stack, function_yaml, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_docker")]

PROBE = """
import errno, os, socket

def handler(context, event):
    out = {}
    for name, path in (("docker_sock", "/var/run/docker.sock"), ("docker_sock_run", "/run/docker.sock")):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            out[name] = "ok"
        except OSError as exc:
            out[name] = errno.errorcode.get(exc.errno)
    out["uid"] = os.getuid()
    return out
"""


@pytest.fixture(scope="module")
def docker_attacked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # without the warm pool: every instance is created with its function's own limits
    with own_docker_stack(tmp_path_factory.mktemp("dattack") / "var", {"NUCLIDE_DOCKER_POOL_SIZE": "0"}) as s:
        yield s


def test_a_fork_bomb_in_a_container_is_stopped_by_the_functions_pids_limit(docker_attacked: Stack) -> None:
    spec = function_yaml("dforkbomb", resources={"limits": {"pids": 32}})
    docker_attacked.deploy("dforkbomb", {"function.yaml": spec, "main.py": FORK_BOMB})
    out = docker_attacked.invoke("dforkbomb").json()
    assert out["errno"] == 11 and 0 < out["forked"] < 32, f"EAGAIN once the container holds 32 tasks: {out}"


def test_tmp_and_dev_shm_are_the_containers_own_and_stop_at_its_size_limit(docker_attacked: Stack) -> None:
    spec = function_yaml("dfiller", resources={"limits": {"ephemeral-storage": "8Mi"}})
    docker_attacked.deploy("dfiller", {"function.yaml": spec, "main.py": FILL})
    out = docker_attacked.invoke("dfiller").json()
    for where in ("tmp", "shm"):  # the code directory is read-only in a container
        assert out[where]["errno"] == "ENOSPC" and out[where]["mb"] <= 8, f"{where}: {out[where]}"
    docker_attacked.deploy("dshm-a", {"function.yaml": function_yaml("dshm-a"), "main.py": SHM})
    docker_attacked.deploy("dshm-b", {"function.yaml": function_yaml("dshm-b"), "main.py": SHM})
    assert docker_attacked.invoke("dshm-a", b"write").json() == ["left-behind"]
    assert docker_attacked.invoke("dshm-b").json() == [], "another function's /dev/shm is not shared"
    docker_attacked.deploy("dprobe", {"function.yaml": function_yaml("dprobe"), "main.py": PROBE})
    out = docker_attacked.invoke("dprobe").json()
    assert out == {"docker_sock": "ENOENT", "docker_sock_run": "ENOENT", "uid": 65534}, out


LINK = "/run/nuclide/link"  # where a container finds the instance link (runner/usernet.py)


def network_attacker(targets: dict[str, str]) -> str:
    return ATTACK_HELPERS + f"""
TARGETS = {targets!r}

def handler(context, event):
    out = {{k: connect_tcp(v) for k, v in TARGETS.items()}}
    out["docker_sock"] = connect_unix("/var/run/docker.sock")
    out["link"] = connect_unix("{LINK}/gateway.sock")
    try:
        out["link_dir"] = sorted(os.listdir("{LINK}"))
    except OSError as exc:
        out["link_dir"] = errno.errorcode.get(exc.errno)
    out["link_write"] = outcome(lambda: open("{LINK}/planted", "w"))
    out["routes"] = [line.split()[0] for line in open("/proc/net/route").read().splitlines()[1:]
                     if line.split()[1] == "00000000"]
    out["resolver"] = [line.split()[1] for line in open("/etc/resolv.conf") if line.startswith("nameserver")]
    return out
"""


def test_a_container_reaches_its_link_and_nothing_on_the_hosts_loopback(docker_attacked: Stack,
                                                                        outside: tuple[str, int]) -> None:
    s = docker_attacked
    targets = loopback_targets(s, outside)
    s.deploy("dnet", {"function.yaml": function_yaml("dnet"), "main.py": network_attacker(targets)})
    out = s.invoke("dnet").json()
    for name in targets:
        # the container's 127.0.0.1 is its own; slirp4netns does not forward to the host's loopback
        assert out[name] == "ECONNREFUSED", f"connect to {name}: {out[name]}"
    assert out["docker_sock"] == "ENOENT"
    assert out["link"] == "ok" and out["link_dir"] == ["gateway.sock"], "its link, and nothing else of the host"
    assert out["link_write"] in ("EROFS", "EACCES"), out["link_write"]
    assert out["routes"] == ["tap0"], "outbound connections leave through slirp4netns"
    assert out["resolver"] == ["100.64.255.3"], "slirp4netns's DNS forwarder, not the host's loopback resolver"
    [container] = function_containers(namespace(s), "dnet", all_states=False)
    host = container.attrs["HostConfig"]
    assert host["NetworkMode"] == "none"
    [mount] = container.attrs["Mounts"]
    assert (mount["Destination"], mount["RW"]) == (LINK, False), mount


def test_the_network_opt_in_gives_a_container_the_hosts_network(docker_attacked: Stack,
                                                                outside: tuple[str, int]) -> None:
    s = docker_attacked
    targets = loopback_targets(s, outside)
    s.deploy("dnet-host", {"function.yaml": function_yaml("dnet-host", network="host"),
                           "main.py": network_attacker(targets)})
    out = s.invoke("dnet-host").json()
    assert {k: out[k] for k in targets} == {k: "ok" for k in targets}, "the operator's opt-in reaches the host"
    [container] = function_containers(namespace(s), "dnet-host", all_states=False)
    assert container.attrs["HostConfig"]["NetworkMode"] == "host"


def test_an_image_build_step_reaches_nothing_on_the_hosts_loopback(docker_attacked: Stack,
                                                                   outside: tuple[str, int]) -> None:
    s = docker_attacked
    targets = loopback_targets(s, outside)
    spec = {"build": {"commands": [build_probe(targets)]}}
    s.deploy("dbuildprobe", {"function.yaml": function_yaml("dbuildprobe", **spec), "main.py": BUILD_PROBE_HANDLER})
    assert s.invoke("dbuildprobe").json() == {k: "ECONNREFUSED" for k in targets}
    host = {**spec, "network": "host"}
    s.deploy("dbuildprobe-host", {"function.yaml": function_yaml("dbuildprobe-host", **host),
                                  "main.py": BUILD_PROBE_HANDLER})
    assert s.invoke("dbuildprobe-host").json() == {k: "ok" for k in targets}, "the opt-in builds on the host's network"
    wait_for(lambda: not docker_build_holders(namespace(s)), 30, what="the builds' network holders to go")


def docker_build_holders(ns: str) -> list:
    """Containers that held a build's network namespace (``nuclide.build-network`` label)."""
    client = docker_client()
    try:
        return client.containers.list(all=True, filters={"label": f"nuclide.build-network={ns}"})
    finally:
        client.close()



def test_task_calls_from_containers_reach_a_private_function_only_when_listed(docker_attacked: Stack) -> None:
    """The gateway ties a call to the container's instance over the link, as for a process-backend instance."""
    s = docker_attacked
    s.deploy("dvault", {"function.yaml": function_yaml("dvault", private=True, allowCallsFrom=["dfriend"]),
                        "main.py": KEEPER})
    for name in ("dfriend", "dstranger"):
        s.deploy(name, {"function.yaml": function_yaml(name),
                        "main.py": CALLER.replace('"vault"', '"dvault"').replace("NAME", name)})
    assert s.invoke("dfriend").json() == {"result": "ran dfriend"}
    out = s.invoke("dstranger").json()
    assert out["status"] == 403 and "function 'dvault' is private: function 'dstranger' may not call it" \
        in out["message"], out
    assert s.client.post("/dvault", content=b"ran?").json() == ["dfriend"], "the refused call never ran"


# a registered runtime's program (python3 main.py in the runtime image): the network attacks, as JSON on stdout
RUNTIME_PROGRAM = """
import errno, json, socket, sys
json.load(sys.stdin)
out = {}
for name, endpoint in TARGETS.items():
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        out[name] = "ok"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc))
out["routes"] = [line.split()[0] for line in open("/proc/net/route").read().splitlines()[1:]
                 if line.split()[1] == "00000000"]
print(json.dumps(out))
"""


@pytest.mark.parametrize("warm_start", ["function", "none"])
def test_a_registered_runtimes_containers_reach_nothing_on_the_hosts_loopback(docker_attacked: Stack,
                                                                             outside: tuple[str, int],
                                                                             warm_start: str) -> None:
    """A warm container (from the runtime pool) and a container per call; the opt-in reaches the host."""
    s = docker_attacked
    runtime = {"image": RUNTIME_IMAGE, "path": "/ws", "run": ["python3", "main.py"]}
    assert s.client.put("/runtimes/attackrt", json=runtime).status_code in (200, 201)
    targets = loopback_targets(s, outside)
    program = f"TARGETS = {targets!r}\n" + RUNTIME_PROGRAM
    for name, network, reached in ((f"drt-{warm_start}", "isolated", "ECONNREFUSED"),
                                   (f"drt-{warm_start}-host", "host", "ok")):
        spec = {"runtime": "attackrt", "warmStart": warm_start, "network": network}
        s.deploy(name, {"function.yaml": yaml.safe_dump({"metadata": {"name": name}, "spec": spec}),
                        "main.py": program})
        r = s.invoke(name, {})
        assert r.status_code == 200, r.text
        out = json.loads(r.text)
        assert {k: out[k] for k in targets} == {k: reached for k in targets}, f"{name}: {out}"
        if network == "isolated":
            assert out["routes"] == ["tap0"], "outbound connections leave through slirp4netns"


def test_a_function_in_a_container_cannot_use_the_platforms_zeromq_sockets(docker_attacked: Stack) -> None:
    # a container on the host's network (the opt-in) reaches the TCP sockets; CURVE decides what it may say
    zeromq_attacks(docker_attacked)
