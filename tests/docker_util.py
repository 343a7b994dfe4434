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
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.stack import ROOT, Stack

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


@pytest.fixture
def fresh_docker_stack(require_docker: None, tmp_path: Path) -> Iterator[Stack]:
    """A docker-backend stack of this test's own; its containers and images are removed afterwards."""
    s = docker_stack_at(tmp_path / "var")
    try:
        yield s.start()
    finally:
        s.stop()
        if (s.var_dir / "docker-namespace").exists():
            remove_namespace(namespace(s))


@contextlib.contextmanager
def shared_docker_stack(var_dir: Path) -> Iterator[Stack]:
    """A started docker-backend stack for a module's tests (no unused image is cached); afterwards its
    deployer must have removed every container, and whatever is left of its namespace goes."""
    need(docker_problem())
    s = docker_stack_at(var_dir, {"NUCLIDE_DOCKER_IMAGE_CACHE": "0"})
    try:
        yield s.start()
    finally:
        s.stop()
        if (s.var_dir / "docker-namespace").exists():
            ns = namespace(s)
            left = containers(ns)
            remove_namespace(ns)
            assert not left, f"containers left after the deployer stopped: {[c.name for c in left]}"
