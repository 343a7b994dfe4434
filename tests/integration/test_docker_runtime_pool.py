"""Registered runtimes without image builds, on a real Docker Engine: the runtime pool and spare runners.

A function on a registered runtime with no ``dependencies`` command (``warmStart: function``) runs
in containers of the runtime's own image with its code unpacked into their code volume; the first
one comes from the deployer's runtime pool (see services/deployer/backends/docker/runtime_pool.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.docker_util import (  # noqa: F401 (fixtures)
    RUNTIME_IMAGE, containers, docker_client, group_images, json_records, mounts_besides_link, namespace,
    own_docker_stack, require_docker, shared_docker_stack,
)
from tests.stack import ROOT, Stack, wait_for

pytestmark = pytest.mark.integration

POOL_LABEL = "nuclide.runtime_pool=true"
DEFAULT_MEMORY = 1024 * 1024 * 1024  # default_memory_bytes: the pool's shape for functions that set none
RUNTIME = {"image": RUNTIME_IMAGE, "path": "/ws", "run": ["python3", "main.py"]}
WITH_DEPS = {**RUNTIME, "dependencies": ["python3", "-c", "open('deps.txt', 'w').write('built')"]}

# a user's program: what it sees of its container, and what calls leave behind
PROBE = """
import json, os, sys
data = json.load(sys.stdin)

def attempt(path):
    try:
        with open(path, "w") as fh:
            fh.write("x")
        return "ok"
    except OSError as exc:
        return type(exc).__name__

if isinstance(data, dict) and data.get("sleep"):
    import time
    time.sleep(data["sleep"])
with open("calls.txt", "a") as fh:
    fh.write("x")
print(json.dumps({
    "stdin": data, "me": open("me.txt").read().strip(), "uid": os.getuid(), "cwd": os.getcwd(),
    "files": sorted(os.listdir(".")), "tmp": sorted(os.listdir("/tmp")), "calls": len(open("calls.txt").read()),
    "root": attempt("/x"), "tmp_write": attempt("/tmp/" + open("me.txt").read().strip()),
    "deps": open("deps.txt").read() if os.path.exists("deps.txt") else None,
    "caps": [line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff")][0],
}))
"""


def files(name: str, runtime: str = "fastrt", **spec: Any) -> dict[str, str]:
    return {"function.yaml": yaml.safe_dump({"metadata": {"name": name}, "spec": {"runtime": runtime, **spec}}),
            "main.py": PROBE, "me.txt": name + "\n", "sub/data.bin": "\x00\x01binary-ish"}


def records(stack: Stack) -> dict[str, dict[str, Any]]:
    """The deployer's runner records: instance id -> pid, functions, the pool containers it took."""
    return json_records(stack.var_dir / "docker" / "runners", ".config.json")


def taken(stack: Stack) -> set[str]:
    return {c for rec in records(stack).values() for c in rec.get("containers") or ()}


def idle_pool(stack: Stack, memory_bytes: int = DEFAULT_MEMORY) -> list[str]:
    """Running runtime pool containers no runner took, of the default shape (memory)."""
    held = taken(stack)
    return sorted(c.id for c in containers(namespace(stack), POOL_LABEL, all_states=False)
                  if c.id not in held and c.attrs["HostConfig"]["Memory"] == memory_bytes)


def pool_instances(stack: Stack, function: str) -> list[Any]:
    """Running pool containers a runner of ``function`` took."""
    mine = {c for rec in records(stack).values() if function in rec.get("functions", ())
            for c in rec.get("containers") or ()}
    return [c for c in containers(namespace(stack), POOL_LABEL, all_states=False) if c.id in mine]


def runner_containers(stack: Stack, function: str) -> list[Any]:
    """Containers a runner of ``function`` created itself (an image's, or more of the runtime's)."""
    return containers(namespace(stack), f"nuclide.runner_function={function}", all_states=False)


def full_pool(stack: Stack, size: int = 2) -> list[str]:
    return wait_for(lambda: (idle := idle_pool(stack)) and len(idle) >= size and idle, 60,
                    what=f"{size} idle runtime pool containers")


def deploy(stack: Stack, name: str, expect: int = 200, runtime: str = "fastrt", **spec: Any) -> Any:
    return stack.deploy(name, files(name, runtime, **spec), expect=expect)


def warm_the_pool(stack: Stack) -> list[str]:
    """The pool learns a runtime's shape from a start: one deploy, then the pool is full."""
    deploy(stack, "primer")
    assert stack.invoke("primer", {}).status_code == 200
    assert stack.client.delete("/primer").status_code == 204
    return full_pool(stack)


@pytest.fixture(scope="module")
def fstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A docker-backend stack (runtime pool of 2, the default) with 'fastrt' (no dependencies) registered."""
    with shared_docker_stack(tmp_path_factory.mktemp("fstack") / "var") as s:
        assert s.client.put("/runtimes/fastrt", json=RUNTIME).status_code == 201
        assert s.client.put("/runtimes/depsrt", json=WITH_DEPS).status_code == 201
        warm_the_pool(s)
        yield s


# ----- the fast path ----------------------------------------------------------------------------


def test_deploy_takes_a_pool_container_and_builds_no_image(fstack: Stack) -> None:
    idle = full_pool(fstack)
    r = deploy(fstack, "quick", env=[{"name": "GREETING", "value": "hi"}])
    assert r.json()["state"] == "ready"
    out = fstack.invoke("quick", {"n": 1})
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["stdin"] == {"n": 1} and body["me"] == "quick" and body["cwd"] == "/ws"
    assert {"calls.txt", "input.json", "main.py", "me.txt", "sub"} <= set(body["files"]) and body["deps"] is None
    [container] = pool_instances(fstack, "quick")
    assert container.id in idle, "the instance must be one of the pool's idle containers"
    assert not group_images(namespace(fstack), "nuclide.group=g-quick"), "no image of the function's own"
    assert fstack.invoke("quick", {"n": 2}).json()["calls"] == 2, "warmStart function: the container stays warm"
    record = next(rec for rec in records(fstack).values() if "quick" in rec["functions"])
    wait_for(lambda: docker_client().containers.get(container.id).name.startswith(
        f"nuclide-{namespace(fstack)}-g-quick-v"), 10, what="the instance's name")
    assert record["shape"]["path"] == "/ws"
    full_pool(fstack)  # refilled after the take
    assert fstack.client.delete("/quick").status_code == 204
    wait_for(lambda: container.id not in [c.id for c in containers(namespace(fstack))], 30,
             what="the instance's container to go")


def test_lockdown_is_the_same(fstack: Stack) -> None:
    deploy(fstack, "locked", resources={"limits": {"memory": "96Mi", "cpu": "500m"}})
    body = fstack.invoke("locked", {}).json()
    assert body["uid"] == 65534 and body["caps"] == "0000000000000000"
    assert body["root"] == "OSError" and body["tmp_write"] == "ok"
    [container] = pool_instances(fstack, "locked")  # a shape of its own: created at once, still no image
    host = container.attrs["HostConfig"]
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
    assert any("no-new-privileges" in o for o in host["SecurityOpt"]) and host["PidsLimit"] == 512
    assert host["Memory"] == 96 * 1024 * 1024 and host["NanoCpus"] == 500_000_000
    assert [u for u in host["Ulimits"] if u["Name"] == "data"][0]["Hard"] == 96 * 1024 * 1024
    assert container.attrs["Config"]["User"] == "65534:65534" and "/tmp" in host["Tmpfs"]
    assert all(b.endswith(":/run/nuclide/link:ro") for b in host.get("Binds") or []), "no host directory but the link"
    # the code directory: one anonymous volume of memory (tmpfs), no host path, no Docker socket
    [mount] = mounts_besides_link(container)
    assert mount["Type"] == "volume" and mount["Destination"] == "/ws" and mount["Driver"] == "local"
    options = docker_client().volumes.get(mount["Name"]).attrs["Options"]
    assert options["type"] == "tmpfs" and options["device"] == "tmpfs" and "uid=65534" in options["o"]
    assert "nosuid" in options["o"] and "nodev" in options["o"]
    assert fstack.client.delete("/locked").status_code == 204
    wait_for(lambda: mount["Name"] not in [v.name for v in docker_client().volumes.list()], 30,
             what="the code volume to go with its container")


def test_two_functions_never_share_a_container(fstack: Stack) -> None:
    full_pool(fstack)
    deploy(fstack, "twin-a")
    deploy(fstack, "twin-b")
    a, b = fstack.invoke("twin-a", {}).json(), fstack.invoke("twin-b", {}).json()
    assert a["me"] == "twin-a" and b["me"] == "twin-b"
    assert "twin-a" not in b["tmp"] and "twin-b" not in a["tmp"], "a file written by one is not visible to the other"
    assert b["calls"] == 1
    [ca] = pool_instances(fstack, "twin-a")
    [cb] = pool_instances(fstack, "twin-b")
    assert ca.id != cb.id
    # a new version gets a fresh container; the old one is removed, never handed back to the pool
    deploy(fstack, "twin-a")
    fresh = fstack.invoke("twin-a", {}).json()
    assert fresh["calls"] == 1 and "twin-a" not in fresh["tmp"]
    wait_for(lambda: ca.id not in [c.id for c in containers(namespace(fstack))], 30,
             what="the old version's container to go")
    [ca2] = pool_instances(fstack, "twin-a")
    assert ca2.id not in (ca.id, cb.id) and ca.id not in idle_pool(fstack)
    for name in ("twin-a", "twin-b"):
        assert fstack.client.delete(f"/{name}").status_code == 204


def test_scale_from_zero_takes_a_pool_container(fstack: Stack) -> None:
    deploy(fstack, "sleeper", minReplicas=0, maxReplicas=1, scaleToZero={"idleTimeout": "1s"})
    assert fstack.invoke("sleeper", {}).status_code == 200
    wait_for(lambda: fstack.client.get("/sleeper").json()["state"] == "scaledToZero", 30, what="scale to zero")
    wait_for(lambda: not pool_instances(fstack, "sleeper"), 30, what="the container to go")
    idle = full_pool(fstack)
    r = fstack.invoke("sleeper", {"back": True})
    assert r.status_code == 200 and r.headers.get("x-nuclide-cold-start") == "true", r.text
    assert r.json()["stdin"] == {"back": True} and r.json()["calls"] == 1
    [container] = pool_instances(fstack, "sleeper")
    assert container.id in idle
    assert fstack.client.delete("/sleeper").status_code == 204


def test_more_containers_get_the_code_too(fstack: Stack) -> None:
    """A replacement (after a timeout) is a container the runner makes itself, with the code unpacked in."""
    deploy(fstack, "slowpoke", timeout="1s")
    r = fstack.invoke("slowpoke", {"sleep": 30})
    assert r.status_code == 504 and "1 s timeout" in r.json()["error"]["message"], r.text
    after = wait_for(lambda: (r := fstack.invoke("slowpoke", {"n": 1})).status_code == 200 and r.json(), 30,
                     what="a replacement container")
    assert after["me"] == "slowpoke" and after["calls"] == 1 and "sub" in after["files"]
    replacements = runner_containers(fstack, "slowpoke")
    assert replacements and all(mounts_besides_link(c)[0]["Type"] == "volume" for c in replacements)
    assert not group_images(namespace(fstack), "nuclide.group=g-slowpoke")
    assert fstack.client.delete("/slowpoke").status_code == 204


def test_functions_with_dependencies_keep_the_image_path(fstack: Stack) -> None:
    deploy(fstack, "withdeps", runtime="depsrt")
    body = fstack.invoke("withdeps", {"n": 1}).json()
    assert body["deps"] == "built" and body["me"] == "withdeps"
    [container] = runner_containers(fstack, "withdeps")
    assert not mounts_besides_link(container) and not pool_instances(fstack, "withdeps")
    assert group_images(namespace(fstack), "nuclide.group=g-withdeps"), "its image is built"
    assert fstack.client.delete("/withdeps").status_code == 204


# ----- fallback, adoption, settings ---------------------------------------------------------------

# loaded by every service of the stack (PYTHONPATH): the Engine refuses archive uploads, as an engine
# that cannot write into a container's volume would
REFUSE_ARCHIVES = """
import docker.api.container
import docker.errors

def put_archive(self, container, path, data):
    raise docker.errors.APIError("injected: archive uploads are refused")

docker.api.container.ContainerApiMixin.put_archive = put_archive
"""


def test_a_failing_fast_path_falls_back_to_the_image(require_docker: None, tmp_path: Path) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(REFUSE_ARCHIVES)
    with own_docker_stack(tmp_path / "var", {"PYTHONPATH": f"{inject}:{ROOT}"}) as s:
        assert s.client.put("/runtimes/fastrt", json=RUNTIME).status_code == 201
        deploy(s, "fallback")
        body = s.invoke("fallback", {"n": 1}).json()
        assert body["me"] == "fallback" and body["stdin"] == {"n": 1}
        assert "building its image instead" in s.service_log("deployer")
        ns = namespace(s)
        assert group_images(ns, "nuclide.group=g-fallback"), "the image path built its image"
        [container] = runner_containers(s, "fallback")
        assert not mounts_besides_link(container)
        assert not taken(s), "no pool container is held after the failed attempt"


def test_deployer_restart_adopts_runners_and_removes_idle_pool_containers(require_docker: None,
                                                                           tmp_path: Path) -> None:
    with own_docker_stack(tmp_path / "var") as s:
        assert s.client.put("/runtimes/fastrt", json=RUNTIME).status_code == 201
        idle = warm_the_pool(s)
        deploy(s, "adoptee")
        assert s.invoke("adoptee", {}).json()["calls"] == 1
        [before] = pool_instances(s, "adoptee")
        deploy(s, "orphan")
        [orphaned] = pool_instances(s, "orphan")
        idle = full_pool(s)
        s.stop_service("deployer", signal.SIGKILL)
        assert s.invoke("adoptee", {}).json()["calls"] == 2, "the runner outlives its deployer"
        # a runner that dies while no deployer watches leaves its container: the next deployer removes it
        [orphan_pid] = [rec["pid"] for rec in records(s).values() if "orphan" in rec["functions"]]
        os.kill(orphan_pid, signal.SIGKILL)
        s.start_service("deployer")
        s.wait_healthy()
        wait_for(lambda: "adopted running instances" in s.service_log("deployer"), 15, what="the adoption")
        ns = namespace(s)
        wait_for(lambda: orphaned.id not in [c.id for c in containers(ns)], 15,
                 what="the dead runner's container to be removed")
        r = s.invoke("orphan", {})
        assert r.json().get("me") == "orphan", ("the reconciler starts it again", r.status_code, r.text)
        wait_for(lambda: not [c for c in containers(ns, POOL_LABEL) if c.id in idle], 15,
                 what="the old deployer's idle pool containers to be removed")
        new_idle = full_pool(s)  # the adopted runner's shape is kept warm
        assert not set(new_idle) & set(idle)
        time.sleep(2)  # give a duplicate runner (the bug this guards against) time to appear
        assert [c.id for c in pool_instances(s, "adoptee")] == [before.id]
        assert not runner_containers(s, "adoptee")
        assert s.invoke("adoptee", {}).json()["calls"] == 3, "the same warm container"
        assert s.client.delete("/adoptee").status_code == 204
        wait_for(lambda: before.id not in [c.id for c in containers(ns)], 30, what="the adopted container to go")
        s.stop_service("deployer")
        assert not containers(ns), "a deployer that stops removes its idle pool containers"


def test_pool_size_zero_builds_the_image(require_docker: None, tmp_path: Path) -> None:
    with own_docker_stack(tmp_path / "var", {"NUCLIDE_DOCKER_RUNTIME_POOL_SIZE": "0"}) as s:
        assert s.client.put("/runtimes/fastrt", json=RUNTIME).status_code == 201
        deploy(s, "nopool")
        assert s.invoke("nopool", {}).json()["me"] == "nopool"
        ns = namespace(s)
        assert group_images(ns, "nuclide.group=g-nopool")
        [container] = runner_containers(s, "nopool")
        assert not mounts_besides_link(container)
        assert not containers(ns, POOL_LABEL), "no runtime pool container with docker_runtime_pool_size 0"


@pytest.mark.parametrize("value, words", [
    ("-1", "docker_runtime_pool_size -1 is out of range 0-16"),
    ("17", "docker_runtime_pool_size 17 is out of range 0-16"),
    ("two", "NUCLIDE_DOCKER_RUNTIME_POOL_SIZE has an invalid value 'two'"),
])
def test_a_bad_runtime_pool_size_is_a_clear_config_error(tmp_path: Path, value: str, words: str) -> None:
    env = {**os.environ, "NUCLIDE_VAR_DIR": str(tmp_path), "NUCLIDE_BACKEND": "docker",
           "NUCLIDE_DOCKER_RUNTIME_POOL_SIZE": value}
    out = subprocess.run([sys.executable, "-m", "services.deployer"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and words in out.stderr, out.stderr
