"""The attacks of test_attacks.py that the Docker backend's container options stop: fork bomb, /dev/shm, docker socket.

Docker instances use the host's network (no bridge exists on the machines nuclide is
tested on); the platform's sockets are reachable from them until every ZeroMQ
socket authenticates its peers (see README, "Security model").
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.docker_util import own_docker_stack, require_docker  # noqa: F401 (fixture)
from tests.integration.test_attacks import FILL, FORK_BOMB, SHM
from tests.stack import Stack, function_yaml

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
