"""The whole stack under docker-compose: `make up`'s script, deploy and invoke through the gateway container, down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from services.cli.stacks import StackEntry, record_stack
from tests.docker_util import (  # noqa: F401 (fixtures)
    COMPOSE_FILE, IMAGE_TAG, containers, docker_client, function_containers, group_images, remove_namespace,
    require_compose,
)
from tests.stack import ROOT, free_port_base, function_yaml, make_zip, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_compose_up_deploy_invoke_down(require_compose: None, tmp_path: Path) -> None:
    """`make up` (deploy/compose.sh) on a port base, where an earlier `make run` left its token for that URL."""
    project = "nuclidetest" + os.urandom(4).hex()
    base = free_port_base()
    url = f"http://127.0.0.1:{base}"
    stacks = record_stack(StackEntry(url, "token-of-an-earlier-make-run", "`nuclide up` (state in /old/var)"),
                          tmp_path / "cli.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUCLIDE_", "COMPOSE_"))}
    env.update({"NUCLIDE_PORT_BASE": str(base), "NUCLIDE_IMAGE_TAG": IMAGE_TAG, "COMPOSE_PROJECT_NAME": project,
                "NUCLIDE_CLI_CONFIG": str(stacks), "PYTHON": sys.executable})

    def compose(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "-p", project, *args], env=env,
                              capture_output=True, text=True, timeout=timeout_s)

    namespace = ""
    try:
        up = subprocess.run([str(ROOT / "deploy" / "compose.sh"), "up"], env=env, capture_output=True, text=True,
                            timeout=200)
        assert up.returncode == 0, up.stderr
        assert httpx.get(f"{url}/healthz", timeout=2).status_code == 200, "compose.sh waits until it is healthy"
        token = compose("exec", "-T", "gateway", "cat", "/var/lib/nuclide/token").stdout.strip()
        assert len(token) > 20, "the gateway keeps its token in the state volume"
        assert f"  URL:    {url}\n  token:  {token}\n" in up.stdout
        # the CLI talks to this stack with its token, not the one recorded before for the same URL
        assert f"  CLI:    recorded {url} in {stacks}; it is the current stack" in up.stdout
        recorded = json.loads(stacks.read_text())["stacks"][url]
        assert (recorded["token"], recorded["started_by"]) == (token, f"`make up` (docker-compose project {project})")
        assert stacks.stat().st_mode & 0o777 == 0o600
        listed = subprocess.run([sys.executable, "-m", "services.cli.main", "list", "-o", "json"], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=60)
        assert (listed.returncode, listed.stdout.strip()) == (0, "[]"), listed.stderr
        again = recorded["token_hint"].strip("`").split()
        assert subprocess.run(again, capture_output=True, text=True, timeout=60).stdout.strip() == token
        namespace = compose("exec", "-T", "deployer", "cat", "/var/lib/nuclide/docker-namespace").stdout.strip()
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as client:
            code = ("def handler(context, event):\n    print('composed call', flush=True)\n"
                    "    routes = [line.split()[0] for line in open('/proc/net/route').read().splitlines()[1:]\n"
                    "              if line.split()[1] == '00000000']\n"
                    "    return {'hi': event.body, 'routes': routes}\n")
            r = client.put("/composed", content=make_zip({"function.yaml": function_yaml("composed"), "main.py": code}),
                           headers={"content-type": "application/zip"})
            assert r.status_code == 200 and r.json()["state"] == "ready", r.text
            # served over the link volume; outbound through the slirp4netns the deployer attached from its container
            assert client.post("/composed", json={"x": 1}).json() == {"hi": {"x": 1}, "routes": ["tap0"]}
            # the deployer copies a container's output to the log as it comes: a moment after the call
            wait_for(lambda: "composed call" in client.get("/functions/composed/logs").text, 10,
                     what="the call's print in the function's log")
        # a warm pool container (the compose stack's default) or an image-built one
        [function] = wait_for(lambda: function_containers(namespace, "composed", all_states=False), 15,
                              what="the function's container under its instance name")
        assert function.attrs["HostConfig"]["NetworkMode"] == "none"
        assert [m.get("Name") for m in function.attrs["Mounts"]] == [f"{project}_link"], "only the link's volume"
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


@pytest.mark.timeout(300)
def test_compose_runs_a_second_gateway(require_compose: None, tmp_path: Path) -> None:
    """`NUCLIDE_GATEWAYS=2 make up`: a second gateway container on the first one's ports plus 10, serving the
    same functions; `make down` stops it too; a third is refused."""
    project = "nuclidetest" + os.urandom(4).hex()
    base = free_port_base(18)
    urls = [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 10}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUCLIDE_", "COMPOSE_"))}
    env.update({"NUCLIDE_PORT_BASE": str(base), "NUCLIDE_IMAGE_TAG": IMAGE_TAG, "COMPOSE_PROJECT_NAME": project,
                "NUCLIDE_CLI_CONFIG": str(tmp_path / "cli.json"), "PYTHON": sys.executable, "NUCLIDE_GATEWAYS": "2"})

    def script(command: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "deploy" / "compose.sh"), command], env={**env, **extra},
                              capture_output=True, text=True, timeout=200)

    refused = script("up", NUCLIDE_GATEWAYS="3")
    assert refused.returncode == 2 and "docker-compose.yml runs 2 gateways at most" in refused.stderr
    namespace = ""
    try:
        up = script("up")
        assert up.returncode == 0, up.stderr
        assert f"gateway-1: {urls[1]}\n" in up.stdout
        ids = {httpx.get(f"{url}/healthz", timeout=5).json()["gateway_id"] for url in urls}
        assert len(ids) == 2
        token = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "-p", project, "exec", "-T", "gateway-1",
                                "cat", "/var/lib/nuclide/token"], env=env, capture_output=True, text=True,
                               timeout=60).stdout.strip()
        namespace = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "-p", project, "exec", "-T",
                                    "deployer", "cat", "/var/lib/nuclide/docker-namespace"], env=env,
                                   capture_output=True, text=True, timeout=60).stdout.strip()
        headers = {"Authorization": f"Bearer {token}"}
        code = "def handler(context, event):\n    return {'hi': event.body}\n"
        r = httpx.put(f"{urls[1]}/twogw", content=make_zip({"function.yaml": function_yaml("twogw"), "main.py": code}),
                      headers={**headers, "content-type": "application/zip"}, timeout=120)
        assert r.status_code == 200 and r.json()["state"] == "ready", r.text
        for i, url in enumerate(urls):
            got = wait_for(lambda: (r := httpx.post(f"{url}/twogw", json={"via": i}, timeout=30)).status_code == 200
                           and r, 30, what=f"a call through gateway {i}")
            assert got.json() == {"hi": {"via": i}}
        down = script("down")
        assert down.returncode == 0, down.stderr
        client = docker_client()
        try:
            assert not client.containers.list(all=True, filters={"label": f"com.docker.compose.project={project}"})
        finally:
            client.close()
    finally:
        subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "-p", project, "down", "-v", "--remove-orphans"],
                       env={**env, "COMPOSE_PROFILES": "gateways"}, capture_output=True, timeout=120)
        if namespace:
            remove_namespace(namespace)
