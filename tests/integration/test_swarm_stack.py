"""The platform itself as a Docker Swarm stack (`make swarm-up`'s deploy/swarm.sh): PostgreSQL, store, gateway,
deployer (swarm backend), optimizer as Swarm services; a function deployed through the gateway runs as a Swarm
service; `swarm.sh down` leaves nothing behind.

The module makes the engine a single-node swarm manager when it is not one (and leaves the swarm afterwards),
removing the overlay networks at once, as tests/integration/test_swarm.py does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.docker_util import IMAGE_TAG, docker_client, docker_problem, need, one_node_swarm, swarm_state
from tests.stack import ROOT, free_port_base, function_yaml, make_zip, wait_for

pytestmark = pytest.mark.integration
SWARM_SH = ROOT / "deploy" / "swarm.sh"


def swarm_env(tmp_path: Path, stack: str, base: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUCLIDE_")}
    env.update({"NUCLIDE_PORT_BASE": str(base), "NUCLIDE_IMAGE_TAG": IMAGE_TAG, "NUCLIDE_STACK": stack,
                "NUCLIDE_SWARM_DIR": str(tmp_path / "swarm"), "NUCLIDE_CLI_CONFIG": str(tmp_path / "cli.json"),
                "PYTHON": sys.executable})
    return env


def test_swarm_up_on_an_engine_that_is_no_swarm_manager_prints_the_fix(tmp_path: Path) -> None:
    """First in the module, before the module makes this engine a swarm manager; skipped on an engine that is one."""
    need(docker_problem())
    client = docker_client()
    try:
        if swarm_state(client) == "active":
            pytest.skip("this engine is in a swarm already (another test's): the refusal needs one that is not")
        stack = "nuclidetest" + os.urandom(3).hex()
        up = subprocess.run([str(SWARM_SH), "up"], env=swarm_env(tmp_path, stack, free_port_base(9)),
                            capture_output=True, text=True, timeout=60)
        assert up.returncode != 0
        assert "not a swarm manager" in up.stderr and "docker swarm init --advertise-addr 127.0.0.1" in up.stderr, up.stderr
        assert "ingress docker_gwbridge" in up.stderr, up.stderr
        assert swarm_state(client) != "active", "the refusal changes nothing"
        assert not (tmp_path / "swarm").exists(), "the refusal comes before anything is made"
    finally:
        client.close()


@pytest.fixture(scope="module")
def swarm() -> Iterator[None]:
    with one_node_swarm():
        yield


@pytest.mark.timeout(900)
def test_swarm_up_deploy_invoke_down(swarm: None, tmp_path: Path) -> None:
    stack = "nuclidetest" + os.urandom(3).hex()
    base = free_port_base(9)
    url = f"http://127.0.0.1:{base}"
    env = swarm_env(tmp_path, stack, base)
    namespace = f"swarm-{stack}"
    client = docker_client()
    try:
        up = subprocess.run([str(SWARM_SH), "up"], env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert httpx.get(f"{url}/healthz", timeout=2).status_code == 200, "swarm.sh waits until the gateway answers"
        [line] = [line for line in up.stdout.splitlines() if line.startswith("  token:  ")]
        token = line.split()[-1]
        assert len(token) > 20
        assert f"  CLI:    recorded {url} in {tmp_path / 'cli.json'}" in up.stdout, up.stdout
        services = {s.name: s for s in client.services.list(filters={"label": f"com.docker.stack.namespace={stack}"})}
        assert sorted(services) == sorted(f"{stack}_{n}" for n in ("deployer", "gateway", "optimizer", "postgres", "store"))
        pgpass = (tmp_path / "swarm" / f"{stack}.pgpass")
        assert pgpass.stat().st_mode & 0o777 == 0o600
        # the store runs on PostgreSQL, which listens on loopback only and asks for the password
        [store] = client.containers.list(filters={"label": f"com.docker.swarm.service.name={stack}_store"})
        envs = dict(e.split("=", 1) for e in store.attrs["Config"]["Env"])
        assert envs["NUCLIDE_DATABASE_URL"] == f"postgresql://nuclide@127.0.0.1:{base + 8}/nuclide"
        [pg] = client.containers.list(filters={"label": f"com.docker.swarm.service.name={stack}_postgres"})
        no_password = pg.exec_run(["psql", "-h", "127.0.0.1", "-p", str(base + 8), "-U", "nuclide", "-w",
                                   "-c", "select 1"], user="postgres")
        assert no_password.exit_code != 0 and b"password" in no_password.output, no_password.output
        listening = pg.exec_run(["sh", "-c", "cat /proc/net/tcp"]).output.decode()
        port_hex = f":{base + 8:04X} "
        local = [ln.split()[1] for ln in listening.splitlines()[1:] if ln.split()[1].endswith(port_hex.strip())
                 and ln.split()[3] == "0A"]
        assert local == [f"0100007F:{base + 8:04X}"], listening
        with httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {token}"}) as http:
            code = "def handler(context, event):\n    return {'hi': event.body}\n"
            r = http.put("/swarmed", content=make_zip({"function.yaml": function_yaml("swarmed"), "main.py": code}),
                         headers={"content-type": "application/zip"})
            assert r.status_code == 200 and r.json()["state"] == "ready", r.text
            assert http.post("/swarmed", json={"x": 1}).json() == {"hi": {"x": 1}}
        [function] = client.services.list(filters={"label": f"nuclide.namespace={namespace}"})
        assert function.attrs["Spec"]["Labels"].get("nuclide.managed") == "true"

        down = subprocess.run([str(SWARM_SH), "down"], env=env, capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr
        assert not client.services.list(filters={"label": f"com.docker.stack.namespace={stack}"})
        assert not client.services.list(filters={"label": f"nuclide.namespace={namespace}"})
        assert not client.containers.list(all=True, filters={"label": f"com.docker.stack.namespace={stack}"})
        assert not client.containers.list(all=True, filters={"label": f"nuclide.namespace={namespace}"})
        assert not client.secrets.list(filters={"label": f"com.docker.stack.namespace={stack}"})
    finally:
        subprocess.run([str(SWARM_SH), "down"], env=env, capture_output=True, text=True, timeout=300)
        for volume in client.volumes.list(filters={"label": f"com.docker.stack.namespace={stack}"}):
            with contextlib.suppress(Exception):
                volume.remove()
        for image in client.images.list("nuclide-fn"):  # the function's image, built for this stack only
            for tag in image.tags:
                if tag.startswith(f"nuclide-fn:{namespace}-"):
                    with contextlib.suppress(Exception):
                        client.images.remove(tag)
        client.close()
