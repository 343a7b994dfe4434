"""The whole stack under docker-compose: up, deploy and invoke through the gateway container, down."""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest

from tests.docker_util import (  # noqa: F401 (fixtures)
    COMPOSE_FILE, IMAGE_TAG, containers, docker_client, function_containers, group_images, remove_namespace,
    require_compose,
)
from tests.stack import free_port, function_yaml, make_zip, wait_for

pytestmark = pytest.mark.integration

PORTS = ("HTTP_PORT", "STORE_RPC_PORT", "STORE_PUB_PORT", "DEPLOYER_RPC_PORT", "GATEWAY_ROUTER_PORT",
         "GATEWAY_PULL_PORT", "GATEWAY_SUB_PORT", "GATEWAY_PUB_PORT")


@pytest.mark.timeout(300)
def test_compose_up_deploy_invoke_down(require_compose: None) -> None:
    project = "nuclidetest" + os.urandom(4).hex()
    ports = {name: free_port() for name in PORTS}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUCLIDE_", "COMPOSE_"))}
    env.update({f"NUCLIDE_{name}": str(port) for name, port in ports.items()})
    env["NUCLIDE_IMAGE_TAG"] = IMAGE_TAG

    def compose(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "-p", project, *args], env=env,
                              capture_output=True, text=True, timeout=timeout_s)

    url = f"http://127.0.0.1:{ports['HTTP_PORT']}"
    namespace = ""
    try:
        up = compose("up", "-d")
        assert up.returncode == 0, up.stderr
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 90, interval_s=0.5,
                 what="the compose stack to be healthy")
        token = compose("exec", "-T", "gateway", "cat", "/var/lib/nuclide/token").stdout.strip()
        assert len(token) > 20, "the gateway keeps its token in the state volume"
        namespace = compose("exec", "-T", "deployer", "cat", "/var/lib/nuclide/docker-namespace").stdout.strip()
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as client:
            code = ("def handler(context, event):\n    print('composed call', flush=True)\n"
                    "    return {'hi': event.body}\n")
            r = client.put("/composed", content=make_zip({"function.yaml": function_yaml("composed"), "main.py": code}),
                           headers={"content-type": "application/zip"})
            assert r.status_code == 200 and r.json()["state"] == "ready", r.text
            assert client.post("/composed", json={"x": 1}).json() == {"hi": {"x": 1}}
            # the deployer copies a container's output to the log as it comes: a moment after the call
            wait_for(lambda: "composed call" in client.get("/functions/composed/logs").text, 10,
                     what="the call's print in the function's log")
        # a warm pool container (the compose stack's default) or an image-built one
        [function] = wait_for(lambda: function_containers(namespace, "composed", all_states=False), 15,
                              what="the function's container under its instance name")
        assert function.attrs["HostConfig"]["NetworkMode"] == "host"
        assert function.labels.get("nuclide.pool") == "true", "a deployer in a container specialises pool containers"
        client = docker_client()
        try:
            services = client.containers.list(filters={"label": f"com.docker.compose.project={project}"})
            assert sorted(c.labels["com.docker.compose.service"] for c in services) == ["deployer", "gateway", "optimizer", "store"]

            def healthy() -> bool:
                for c in services:
                    c.reload()
                return all(c.attrs["State"]["Health"]["Status"] == "healthy" for c in services)

            wait_for(healthy, 60, interval_s=0.5, what="every service's health check to pass")
        finally:
            client.close()
        down = compose("down", "-v")
        assert down.returncode == 0, down.stderr
        client = docker_client()
        try:
            assert not client.containers.list(all=True, filters={"label": f"com.docker.compose.project={project}"})
            assert not containers(namespace), "function containers must stop with the stack"
            assert not group_images(namespace), "a deployer that stops its functions removes their images"
            assert not [v for v in client.volumes.list() if v.name.startswith(project)]
        finally:
            client.close()
    finally:
        compose("down", "-v", "--remove-orphans")
        if namespace:
            remove_namespace(namespace)
