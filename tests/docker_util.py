"""Helpers for tests against a real Docker Engine: availability, stacks on the docker backend, cleanup.

Tests that need Docker take the ``require_docker`` fixture (import it into the test module). It
skips with the reason when no engine is reachable or the images are missing, and fails instead
when ``NUCLIDE_REQUIRE_DOCKER=1`` (CI sets it after ``make images``), so CI never passes by
skipping them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.stack import ROOT, Stack, function_yaml, wait_for
from tests.tasks import PROBE_HELPERS

DOCKER_HOST = os.environ.get("NUCLIDE_TEST_DOCKER_HOST", "unix:///var/run/docker.sock")
IMAGE_TAG = os.environ.get("NUCLIDE_IMAGE_TAG", "latest")
RUNTIME_IMAGE = f"nuclide-runtime:{IMAGE_TAG}"
SERVICES_IMAGE = f"nuclide-services:{IMAGE_TAG}"
COMPOSE_FILE = ROOT / "docker-compose.yml"


def docker_client() -> Any:
    import docker

    return docker.DockerClient(base_url=DOCKER_HOST, version="auto", timeout=30)


def docker_problem(images: tuple[str, ...] = (RUNTIME_IMAGE,)) -> str | None:
    """Why Docker tests cannot run here, or None when they can."""
    try:
        import docker
    except ImportError:
        return "the docker SDK is not installed (pip install docker)"
    try:
        client = docker_client()
        client.ping()
    except Exception as exc:  # any failure to reach the engine is a reason to skip
        return f"no Docker Engine reachable at {DOCKER_HOST} ({type(exc).__name__}): start dockerd"
    try:
        for image in images:
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                return f"image {image} is missing: run 'make images'"
    finally:
        client.close()
    return None


def need(problem: str | None) -> None:
    if problem is None:
        return
    if os.environ.get("NUCLIDE_REQUIRE_DOCKER") == "1":
        pytest.fail(f"Docker is required here (NUCLIDE_REQUIRE_DOCKER=1): {problem}")
    pytest.skip(problem)


@pytest.fixture
def require_docker() -> None:
    need(docker_problem())


@pytest.fixture
def require_compose() -> None:
    need(docker_problem((RUNTIME_IMAGE, SERVICES_IMAGE)))
    if shutil.which("docker-compose") is None:
        need("docker-compose is not installed (apt-get install docker-compose)")


def namespace(stack: Stack) -> str:
    """The label value that marks this stack's containers and images."""
    return (stack.var_dir / "docker-namespace").read_text().strip()


def containers(ns: str, *labels: str, all_states: bool = True) -> list[Any]:
    client = docker_client()
    try:
        return client.containers.list(all=all_states, filters={"label": [f"nuclide.namespace={ns}", *labels]})
    finally:
        client.close()


def function_containers(ns: str, function: str, all_states: bool = True) -> list[Any]:
    """A single-function group's instance containers: image-built ones by their labels, warm pool ones
    (generic labels) by the name they get once specialised, ``nuclide-<namespace>-g-<function>-v...``."""
    pooled = [c for c in containers(ns, "nuclide.pool=true", all_states=all_states)
              if c.name.startswith(f"nuclide-{ns}-g-{function}-v")]
    return containers(ns, f"nuclide.function={function}", all_states=all_states) + pooled


def json_records(directory: Path, skip_suffix: str = "") -> dict[str, dict[str, Any]]:
    """The deployer's ``<id>.json`` records in ``directory`` (names ending in ``skip_suffix`` left out)."""
    import json

    found = {}
    for path in directory.glob("*.json"):
        if skip_suffix and path.name.endswith(skip_suffix):
            continue
        try:
            found[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # replaced while read
    return found


def pool_records(stack: Stack) -> dict[str, dict[str, Any]]:
    """The deployer's warm pool records: container id -> what it became (``state``, instance ``labels``)."""
    return json_records(stack.var_dir / "docker" / "pool")


def idle_pool(stack: Stack) -> list[str]:
    """Running warm pool containers no instance was made of (no record)."""
    taken = pool_records(stack)
    return sorted(c.id for c in containers(namespace(stack), "nuclide.pool=true", all_states=False)
                  if c.id not in taken)


def group_images(ns: str, *labels: str) -> list[Any]:
    client = docker_client()
    try:
        return client.images.list(filters={"label": ["nuclide.kind=group", f"nuclide.namespace={ns}", *labels]})
    finally:
        client.close()


def remove_namespace(ns: str) -> None:
    """Remove every container and image a test stack left behind (the tests assert there are none)."""
    client = docker_client()
    try:
        for c in client.containers.list(all=True, filters={"label": f"nuclide.namespace={ns}"}):
            c.remove(force=True)
        for image in client.images.list(filters={"label": f"nuclide.namespace={ns}"}):
            try:
                client.images.remove(image.id, force=True)
            except Exception:  # shared layers or already gone
                pass
    finally:
        client.close()


def docker_stack_at(var_dir: Path, env: dict[str, str] | None = None) -> Stack:
    return Stack(var_dir, env={"NUCLIDE_BACKEND": "docker", "NUCLIDE_DOCKER_HOST": DOCKER_HOST,
                               "NUCLIDE_RUNTIME_IMAGE": RUNTIME_IMAGE, **(env or {})})


@contextlib.contextmanager
def own_docker_stack(var_dir: Path, env: dict[str, str] | None = None) -> Iterator[Stack]:
    """A started docker-backend stack; its containers and images are removed afterwards."""
    s = docker_stack_at(var_dir, env)
    try:
        yield s.start()
    finally:
        s.stop()
        if (s.var_dir / "docker-namespace").exists():
            remove_namespace(namespace(s))


@pytest.fixture
def fresh_docker_stack(require_docker: None, tmp_path: Path) -> Iterator[Stack]:
    """A docker-backend stack of this test's own; its containers and images are removed afterwards."""
    with own_docker_stack(tmp_path / "var") as s:
        yield s


@contextlib.contextmanager
def shared_docker_stack(var_dir: Path, env: dict[str, str] | None = None) -> Iterator[Stack]:
    """A started docker-backend stack for a module's tests (no unused image is cached); afterwards its
    deployer must have removed every container, and whatever is left of its namespace goes."""
    need(docker_problem())
    s = docker_stack_at(var_dir, {"NUCLIDE_DOCKER_IMAGE_CACHE": "0", **(env or {})})
    try:
        yield s.start()
    finally:
        s.stop()
        if (s.var_dir / "docker-namespace").exists():
            ns = namespace(s)
            left = containers(ns)
            remove_namespace(ns)
            assert not left, f"containers left after the deployer stopped: {[c.name for c in left]}"


def redeploy_under_steady_calls(stack: Stack, serving: Callable[[], int]) -> None:
    """Redeploy a function twice while a client calls it every 10 ms: no call may fail, and after each
    version serves, ``serving()`` (its containers) must come back to 1 as the old one stops."""
    code = "def handler(context, event):\n    return '{}'\n"
    stack.deploy("steady", {"function.yaml": function_yaml("steady"), "main.py": code.format("v1")})
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def caller() -> None:
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            while not stop.is_set():
                r = client.post("/steady")
                results.append((r.status_code, r.text))
                time.sleep(0.01)  # the pace of the steady stream of calls, not a wait

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(results) > 20, 10, what="calls to flow")
        for version in ("v2", "v3"):
            stack.deploy("steady", {"function.yaml": function_yaml("steady"), "main.py": code.format(version)})
            wait_for(lambda: results and results[-1][1] == version, 20, what=f"{version} to serve")
            # the old version's container goes once the new one is ready
            wait_for(lambda: serving() == 1, 30, what="the old container to stop")
        count = len(results)
        wait_for(lambda: len(results) > count + 20, 10, what="more calls after the last redeploy")
    finally:
        stop.set()
        thread.join(10)
    failed = [r for r in results if r[0] != 200]
    assert not failed, f"{len(failed)} of {len(results)} calls failed during redeploys: {failed[:3]}"
    assert {"v1", "v2", "v3"} <= {text for _, text in results}


HOG = """
import mmap

def handler(context, event):
    kind, size = event.body.decode().split()
    if kind == "heap":
        return str(len(bytearray(int(size) * 1024 * 1024)) // (1024 * 1024))
    shared = mmap.mmap(-1, int(size) * 1024 * 1024)  # shared memory: not in RLIMIT_DATA, only the cgroup stops it
    chunk = b"x" * (1024 * 1024)
    for i in range(int(size)):
        shared[i * len(chunk):(i + 1) * len(chunk)] = chunk
    return "survived"
"""


def memory_limit_checks(stack: Stack, running: Callable[[], list[Any]]) -> None:
    """A 128 MiB function: a big allocation is refused with the limit's name and the instance keeps
    serving; shared memory past the limit meets the OOM killer, which the logs name, and a new
    container (``running()``: the function's containers) replaces the killed one."""
    spec = {"resources": {"limits": {"memory": "128Mi"}}}
    stack.deploy("hog", {"function.yaml": function_yaml("hog", **spec), "main.py": HOG})
    assert stack.invoke("hog", b"heap 8").text == "8"
    r = stack.invoke("hog", b"heap 512")
    assert r.status_code == 500 and "128 MiB" in r.json()["error"]["message"], r.text
    assert stack.invoke("hog", b"heap 8").text == "8", "the instance keeps serving after a refused allocation"
    [first] = running()
    r = stack.invoke("hog", b"shared 512")
    assert r.status_code >= 500 and "hog" in r.text, r.text
    logs = wait_for(lambda: (t := stack.client.get("/functions/hog/logs").text) and "killed" in t and t, 15,
                    what="the OOM kill in the logs")
    assert "memory limit of 128 MiB" in logs
    replacement = wait_for(lambda: [c for c in running() if c.id != first.id], 30, what="a replacement container")
    assert replacement and wait_for(lambda: stack.invoke("hog", b"heap 8").text == "8", 30, what="the replacement")


# A function that reports its container's lockdown from inside: user, capabilities, which writes
# work, the Docker socket, its env; ``extra`` adds entries to the dict it returns (Python source).
PROBE_SPEC = {"env": [{"name": "GREETING", "value": "hi"}], "resources": {"limits": {"memory": "96Mi", "cpu": "500m"}}}


def lockdown_probe(extra: str = "") -> str:
    return PROBE_HELPERS + f"""
import sys

def handler(context, event):
    print("probe was called", flush=True)
    with open("/proc/self/status") as fh:
        caps = [line.split()[1] for line in fh if line.startswith("CapEff")][0]
    return {{"uid": os.getuid(), "caps": caps, "tmp": attempt(lambda: write("/tmp/x")),
            "root": attempt(lambda: write("/x")), "code": attempt(lambda: write("scratch.txt")),
            "socket": os.path.exists("/var/run/docker.sock"), "env": os.environ.get("GREETING"){extra}}}
"""


def assert_probe_container_locked_down(container: Any) -> None:
    """What the engine says of a :func:`lockdown_probe` instance's container (PROBE_SPEC's limits)."""
    host = container.attrs["HostConfig"]
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True, "a network of its own (slirp4netns)"
    assert host["CapDrop"] == ["ALL"] and any("no-new-privileges" in o for o in host["SecurityOpt"])
    assert host["Memory"] == 96 * 1024 * 1024 and host["NanoCpus"] == 500_000_000, "the function's limits"
    assert "/tmp" in host["Tmpfs"]
    # one mount: the instance link's directory, read-only (no Docker socket, nothing else of the host)
    assert [(m["Destination"], m["RW"]) for m in container.attrs["Mounts"]] == [("/run/nuclide/link", False)]
    assert container.attrs["Config"]["User"] == "65534:65534"


LINK_DIR = "/run/nuclide/link"  # where a function container finds the instance link (runner/usernet.py)


def mounts_besides_link(container: Any) -> list[dict[str, Any]]:
    """A container's mounts other than the instance link's directory, which must be read-only."""
    mounts = container.attrs["Mounts"]
    for m in mounts:
        if m["Destination"] == LINK_DIR:
            assert m["RW"] is False, f"the link's directory is bound read-only: {m}"
    return [m for m in mounts if m["Destination"] != LINK_DIR]


def remove_overlay_plumbing(client: Any) -> None:
    """Remove the networks swarm mode makes (``ingress``, ``docker_gwbridge``): overlay plumbing on private
    ranges that nothing of nuclide uses (its services and tasks run on the host network)."""
    for name in ("ingress", "docker_gwbridge"):
        for net in client.networks.list(names=[name]):
            if net.name == name:
                with contextlib.suppress(Exception):
                    net.remove()


def swarm_state(client: Any) -> str:
    return (client.info().get("Swarm") or {}).get("LocalNodeState") or "inactive"


@contextlib.contextmanager
def one_node_swarm() -> Iterator[None]:
    """This engine as a one-node swarm manager for the block: made (and left afterwards) only when it is not
    one already; the overlay networks go at once and again after leaving (the engine may remake them)."""
    need(docker_problem())
    client = docker_client()
    made = False
    try:
        if swarm_state(client) != "active":
            client.swarm.init(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")
            made = True
        remove_overlay_plumbing(client)
        yield
    finally:
        if made:
            client.swarm.leave(force=True)
            remove_overlay_plumbing(client)
        client.close()

