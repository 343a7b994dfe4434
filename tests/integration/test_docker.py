"""The docker backend against a real Docker Engine: images, containers, limits, redeploys, adoption, cleanup.

These stacks run without the warm pool (``docker_pool_size`` 0), so every Python function takes
the image path (an image per group version, a container of it) that functions with dependencies
always take; ``test_docker_pool.py`` covers the pool.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from shared.procs import descendants

from tests.docker_util import (  # noqa: F401 (fixtures)
    DOCKER_HOST, containers, docker_client, docker_problem, group_images, namespace, need, own_docker_stack,
    memory_limit_checks, redeploy_under_steady_calls, remove_namespace, require_docker, shared_docker_stack,
    PROBE_SPEC, assert_probe_container_locked_down, lockdown_probe,
)
from tests.follow import Follower
from tests.stack import Stack, function_yaml, wait_for
from tests.tasks import TASK_A, TASK_B

pytestmark = pytest.mark.integration

HELLO = "def handler(context, event):\n    print('hello was called', flush=True)\n    return 'hello'\n"
NO_POOL = {"NUCLIDE_DOCKER_POOL_SIZE": "0"}


@pytest.fixture(scope="module")
def dstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One docker-backend stack shared by the tests that deploy and invoke; no unused image is cached."""
    with shared_docker_stack(tmp_path_factory.mktemp("dstack") / "var", NO_POOL) as s:
        yield s


@pytest.fixture
def fresh_docker_stack(require_docker: None, tmp_path: Path) -> Iterator[Stack]:
    """A docker-backend stack of this test's own, without the warm pool."""
    with own_docker_stack(tmp_path / "var", NO_POOL) as s:
        yield s


def running(ns: str, function: str) -> list:
    """The function's running containers."""
    return containers(ns, f"nuclide.function={function}", all_states=False)


def test_deploy_invoke_logs_in_a_locked_down_container(dstack: Stack) -> None:
    probe = lockdown_probe()
    r = dstack.deploy("probe", {"function.yaml": function_yaml("probe", **PROBE_SPEC), "main.py": probe})
    assert r.json()["state"] == "ready"
    out = dstack.invoke("probe").json()
    assert out == {"uid": 65534, "caps": "0000000000000000", "tmp": "ok", "root": "OSError", "code": "ok",
                   "socket": False, "env": "hi"}, out
    [container] = running(namespace(dstack), "probe")
    labels = container.labels
    assert labels["nuclide.managed"] == "true" and labels["nuclide.group"] == "g-probe"
    assert labels["nuclide.functions"] == "probe" and labels["nuclide.instance"].startswith("g-probe-v")
    assert int(labels["nuclide.group_version"]) >= 1
    assert_probe_container_locked_down(container)
    wait_for(lambda: "probe was called" in dstack.client.get("/functions/probe/logs").text, 10,
             what="the call's print in the function's log")


def test_code_only_redeploy_reuses_the_dependency_layer(dstack: Stack) -> None:
    marker = os.urandom(4).hex()  # a fresh dependency image, not one from an earlier run
    spec = {"build": {"commands": [f"echo 'VALUE = \"{marker}\"' > $PIP_TARGET/marker.py"]}}
    code = "import marker\n\ndef handler(context, event):\n    return marker.VALUE + ':{}'\n"
    ns = namespace(dstack)
    dstack.deploy("layered", {"function.yaml": function_yaml("layered", **spec), "main.py": code.format("v1")})
    assert dstack.invoke("layered").text == f"{marker}:v1"
    [image] = group_images(ns, "nuclide.group=g-layered")
    key = image.labels["nuclide.envs"]
    client = docker_client()
    try:
        def env_images() -> list:
            return [i for i in client.images.list(filters={"label": "nuclide.kind=env"})
                    if f"nuclide-env:{key}" in i.tags]

        [env_image] = env_images()
        dstack.deploy("layered", {"function.yaml": function_yaml("layered", **spec), "main.py": code.format("v2")})
        assert dstack.invoke("layered").text == f"{marker}:v2"
        wait_for(lambda: len(running(ns, "layered")) == 1, 30, what="the old version's container to stop")
        [container] = running(ns, "layered")
        assert container.image.labels["nuclide.envs"] == key
        assert [i.id for i in env_images()] == [env_image.id], \
            "a code-only change must not rebuild the dependency image"
        parents = [layer["Id"] for layer in client.api.history(container.image.id)]
        assert env_image.id in parents, "the new version's image must build on the dependency image"
    finally:
        client.close()


def test_requirements_installed_in_the_image(dstack: Stack) -> None:
    code = "import tabulate\n\ndef handler(context, event):\n    return tabulate.tabulate([[1, 2]], tablefmt='plain')\n"
    # a comment makes the requirements, so the image, new: pip runs in the build (through the CA it is given)
    requirements = f"# {os.urandom(4).hex()}\ntabulate==0.9.0\n"
    r = dstack.deploy("dockerdeps", {"function.yaml": function_yaml("dockerdeps"), "main.py": code,
                                     "requirements.txt": requirements})
    assert r.json()["state"] == "ready"
    assert dstack.invoke("dockerdeps").text.split() == ["1", "2"]


def test_fusionizer_task_a_builds_with_the_image_python_whatever_path_holds(dstack: Stack) -> None:
    # the first step puts a failing pip where PATH used to look first (the environment's own bin);
    # TaskA's own step must still reach the interpreter the container runs
    broken = "mkdir -p $PIP_TARGET/bin && printf '#!/bin/sh\\nexit 1\\n' > $PIP_TARGET/bin/pip && chmod +x $PIP_TARGET/bin/pip"
    spec = {"build": {"commands": [broken, "pip install requests", "pip3 --version",
                                   "python -c 'import requests' && python3 -c 'import requests'"]}}
    dstack.deploy("TaskB", {"function.yaml": function_yaml("TaskB"), "main.py": TASK_B})
    dstack.deploy("TaskA", {"function.yaml": function_yaml("TaskA", **spec), "main.py": TASK_A})
    r = dstack.invoke("TaskA", {})
    assert (r.status_code, r.text) == (200, "8"), r.text


def test_failed_build_is_a_422_and_the_previous_version_keeps_serving(dstack: Stack) -> None:
    dstack.deploy("buildfail", {"function.yaml": function_yaml("buildfail"), "main.py": HELLO})
    spec = {"build": {"commands": ["echo broken-build-marker; exit 7"]}}
    r = dstack.deploy("buildfail", {"function.yaml": function_yaml("buildfail", **spec), "main.py": HELLO}, expect=422)
    assert "broken-build-marker" in r.text and "exited with code 7" in r.text
    for _ in range(5):
        assert dstack.invoke("buildfail").text == "hello"
    assert len(running(namespace(dstack), "buildfail")) == 1


def test_container_that_exits_at_start_marks_the_function_failed(dstack: Stack) -> None:
    bad = "raise RuntimeError('boom-at-import')\n\ndef handler(context, event):\n    return 'never'\n"
    r = dstack.deploy("exitstart", {"function.yaml": function_yaml("exitstart"), "main.py": bad}, expect=422)
    assert "boom-at-import" in r.text and "exit code 3" in r.text
    desc = dstack.client.get("/exitstart").json()
    assert desc["state"] == "failed" and "boom-at-import" in desc["last_error"]
    wait_for(lambda: not containers(namespace(dstack), "nuclide.function=exitstart"), 15,
             what="the exited container to be removed")


def test_memory_limit_refused_allocation_and_oom_kill(dstack: Stack) -> None:
    memory_limit_checks(dstack, lambda: running(namespace(dstack), "hog"))


def test_redeploy_under_a_steady_stream_of_calls_fails_none(dstack: Stack) -> None:
    redeploy_under_steady_calls(dstack, lambda: len(running(namespace(dstack), "steady")))


def test_scaled_to_zero_keeps_its_image_and_wakes(dstack: Stack) -> None:
    spec = {"minReplicas": 0, "maxReplicas": 1, "scaleToZero": {"idleTimeout": "1s"}}
    dstack.deploy("sleeper", {"function.yaml": function_yaml("sleeper", **spec), "main.py": HELLO})
    ns = namespace(dstack)
    assert dstack.invoke("sleeper").text == "hello"
    wait_for(lambda: dstack.client.get("/sleeper").json()["state"] == "scaledToZero", 20, what="scale to zero")
    wait_for(lambda: not containers(ns, "nuclide.function=sleeper"), 20, what="the container to go")
    [image] = group_images(ns, "nuclide.group=g-sleeper")
    r = dstack.invoke("sleeper")
    assert r.status_code == 200 and r.text == "hello" and r.headers.get("x-nuclide-cold-start") == "true"
    [container] = running(ns, "sleeper")
    assert container.image.id == image.id, "the wake-up must not rebuild the image"


def test_delete_removes_containers_and_images(dstack: Stack) -> None:
    marker = os.urandom(4).hex()
    spec = {"build": {"commands": [f"echo '# {marker}' > $PIP_TARGET/marker.py"]}}
    dstack.deploy("doomed", {"function.yaml": function_yaml("doomed", **spec), "main.py": HELLO})
    ns = namespace(dstack)
    assert running(ns, "doomed") and group_images(ns, "nuclide.group=g-doomed")
    client = docker_client()
    try:
        env_keys = {k for i in group_images(ns, "nuclide.group=g-doomed")
                    for k in i.labels["nuclide.envs"].split(",") if k}
        assert env_keys
        assert dstack.client.delete("/doomed").status_code == 204
        wait_for(lambda: not containers(ns, "nuclide.function=doomed"), 30, what="the containers to be removed")
        wait_for(lambda: not group_images(ns, "nuclide.group=g-doomed"), 30, what="the function's images to go")
        # this stack caches no unused dependency image (docker_image_cache=0)
        wait_for(lambda: not [i for i in client.images.list(filters={"label": "nuclide.kind=env"})
                              if i.labels.get("nuclide.env") in env_keys], 30, what="the dependency image to go")
    finally:
        client.close()


def test_deployer_restart_adopts_containers(fresh_docker_stack: Stack) -> None:
    s = fresh_docker_stack
    s.deploy("adoptee", {"function.yaml": function_yaml("adoptee", minReplicas=2, maxReplicas=2), "main.py": HELLO})
    ns = namespace(s)
    wait_for(lambda: len(running(ns, "adoptee")) == 2, 30, what="two containers")
    before = sorted(c.id for c in running(ns, "adoptee"))
    s.stop_service("deployer", signal.SIGKILL)
    for _ in range(10):
        assert s.invoke("adoptee").text == "hello"
    s.start_service("deployer")
    s.wait_healthy()
    wait_for(lambda: "adopted running instances" in s.service_log("deployer"), 15, what="the adoption")
    time.sleep(2)  # give a duplicate (the bug this guards against) time to appear
    assert sorted(c.id for c in containers(ns, "nuclide.function=adoptee")) == before
    assert s.invoke("adoptee").text == "hello"
    # the adopted containers are still managed: their logs, and a delete removes them
    assert "hello was called" in s.client.get("/functions/adoptee/logs").text
    assert s.client.delete("/adoptee").status_code == 204
    wait_for(lambda: not containers(ns, "nuclide.function=adoptee"), 30, what="the adopted containers to go")


def test_engine_down_is_one_line_and_process_functions_keep_serving(tmp_path: Path, fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("local", {"function.yaml": function_yaml("local"), "main.py": HELLO})
    pids = s.instance_pids()
    socket_path = tmp_path / "engine.sock"  # nothing listens here yet
    try:
        s.stop_service("deployer", signal.SIGKILL)  # process instances outlive it
        s.start_service("deployer", {"NUCLIDE_BACKEND": "docker", "NUCLIDE_DOCKER_HOST": f"unix://{socket_path}"})
        s.wait_healthy()
        wait_for(lambda: "Docker Engine not reachable" in s.service_log("deployer"), 15, what="the engine report")
        for _ in range(20):
            assert s.invoke("local").text == "hello"
        time.sleep(5)  # the deployer retries every 2 s: long enough to repeat itself if it did
        lines = [line for line in s.service_log("deployer").splitlines() if "Docker Engine" in line]
        assert len(lines) == 1 and str(socket_path) in lines[0], lines
        assert s.anon.get("/healthz").status_code == 200
        if docker_problem() is not None and os.environ.get("NUCLIDE_REQUIRE_DOCKER") != "1":
            return  # the rest needs a real engine to come back
        need(docker_problem())
        assert DOCKER_HOST.startswith("unix://"), "this part needs the engine on a unix socket"
        os.symlink(DOCKER_HOST[len("unix://"):], socket_path)  # the engine "starts"
        wait_for(lambda: "Docker Engine reachable again" in s.service_log("deployer"), 15, what="the engine to be seen")
        s.deploy("boxed", {"function.yaml": function_yaml("boxed"), "main.py": HELLO})
        assert s.invoke("boxed").text == "hello" and s.invoke("local").text == "hello"
    finally:
        s.stop_service("deployer")
        for pid in pids:  # the process instance the docker deployer does not manage: bwrap and what runs in it
            for victim in [*descendants(pid), pid]:
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if (s.var_dir / "docker-namespace").exists() and docker_problem() is None:
            remove_namespace(namespace(s))


# the lines it prints ("build step 1", "build step 2") are not in the command's own text, which the log shows too;
# {nonce} makes each run's command new, so no dependencies image of an earlier run is reused (nothing would build)
SLOW_BUILD = ("python3 -c \"import time; '{nonce}'; print('build step', 0 + 1, flush=True); time.sleep(8);"
              " print('build step', 1 + 1, flush=True)\"")


def test_a_follower_sees_the_image_build_as_it_runs(dstack: Stack) -> None:
    """The env image's build steps reach the function's log while the build runs, not once it is over."""
    name = f"slowbuild{os.urandom(3).hex()}"
    spec = {"build": {"commands": [SLOW_BUILD.format(nonce=os.urandom(8).hex())]}}
    r = dstack.deploy(name, {"function.yaml": function_yaml(name, **spec), "main.py": HELLO}, expect=202,
                      headers={"X-Nuclide-Async": "true"})
    assert r.json()["latest_version_state"] not in ("ready", "failed"), r.text
    follower = Follower(dstack, name, since="1h")
    try:
        wait_for(lambda: "build step 1" in follower.text, 60, what="the first build step's line in the follower")
        seen_at = follower.text
        state = dstack.client.get(f"/functions/{name}").json()["latest_version_state"]
        assert "build step 2" not in seen_at and state not in ("ready", "failed"), (state, seen_at[-500:])
        wait_for(lambda: "build step 2" in follower.text, 60, what="the second build step's line")
        wait_for(lambda: dstack.client.get(f"/functions/{name}").json()["state"] == "ready", 120, what="ready")
        assert dstack.invoke(name).text == "hello"
    finally:
        follower.close()
        dstack.client.delete(f"/{name}")
