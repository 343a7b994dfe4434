"""The docker backend's warm pool against a real Docker Engine: specialisation, limits, isolation, adoption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.docker_util import (  # noqa: F401 (fixtures)
    containers, docker_client, group_images, idle_pool, namespace, own_docker_stack, pool_records as records,
    memory_limit_checks, redeploy_under_steady_calls, require_docker, shared_docker_stack,
    PROBE_SPEC, assert_probe_container_locked_down, lockdown_probe,
)
from tests.stack import ROOT, Stack, function_yaml, wait_for

pytestmark = pytest.mark.integration

POOL_SIZE = 2
HELLO = "def handler(context, event):\n    print('hello was called', flush=True)\n    return 'hello'\n"


@pytest.fixture(scope="module")
def pstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One docker-backend stack with a warm pool of two, shared by the tests that deploy and invoke."""
    with shared_docker_stack(tmp_path_factory.mktemp("pstack") / "var",
                             {"NUCLIDE_DOCKER_POOL_SIZE": str(POOL_SIZE)}) as s:
        yield s


def pool_instances(stack: Stack, function: str) -> list[Any]:
    """Running pool containers specialised as an instance of ``function``."""
    mine = {cid for cid, rec in records(stack).items()
            if rec.get("state") == "sent" and rec["labels"].get("nuclide.function") == function}
    return [c for c in containers(namespace(stack), "nuclide.pool=true", all_states=False) if c.id in mine]


def image_instances(stack: Stack, function: str) -> list[Any]:
    return containers(namespace(stack), f"nuclide.function={function}", all_states=False)


def full_pool(stack: Stack) -> list[str]:
    return wait_for(lambda: (idle := idle_pool(stack)) and len(idle) == POOL_SIZE and idle, 60,
                    what=f"{POOL_SIZE} idle pool containers")


def test_a_function_is_served_by_a_pool_container_in_the_same_lockdown(pstack: Stack) -> None:
    probe = lockdown_probe(', "cwd": os.getcwd(), "stdin": sys.stdin.read()')
    idle_before = full_pool(pstack)
    r = pstack.deploy("probe", {"function.yaml": function_yaml("probe", **PROBE_SPEC), "main.py": probe})
    assert r.json()["state"] == "ready"
    out = pstack.invoke("probe").json()
    # the code directory is writable scratch, as on the process backend
    assert out == {"uid": 65534, "caps": "0000000000000000", "tmp": "ok", "root": "OSError",
                   "code": "ok", "socket": False, "env": "hi", "cwd": "/nuclide/functions/probe/1",
                   "stdin": ""}, out
    [container] = pool_instances(pstack, "probe")
    assert container.id in idle_before, "the instance must be one of the pool's idle containers"
    assert not image_instances(pstack, "probe") and not group_images(namespace(pstack), "nuclide.group=g-probe"), \
        "a pool instance needs no image of its own"
    record = records(pstack)[container.id]["labels"]
    assert record["nuclide.group"] == "g-probe" and record["nuclide.instance"].startswith("g-probe-v")
    wait_for(lambda: docker_client().containers.get(container.id).name
             == f"nuclide-{namespace(pstack)}-{record['nuclide.instance']}", 10, what="the instance's name")
    assert_probe_container_locked_down(container)
    assert container.attrs["HostConfig"]["PidsLimit"] == 512
    wait_for(lambda: "probe was called" in pstack.client.get("/functions/probe/logs").text, 10,
             what="the call's print in the function's log")


def test_the_pool_refills_after_use(pstack: Stack) -> None:
    before = full_pool(pstack)
    pstack.deploy("refill", {"function.yaml": function_yaml("refill"), "main.py": HELLO})
    assert pstack.invoke("refill").text == "hello"
    [used] = pool_instances(pstack, "refill")
    assert used.id in before
    after = full_pool(pstack)
    assert used.id not in after and len(set(after) - set(before)) >= 1, "a new container replaces the one taken"


def test_two_functions_never_share_a_container(pstack: Stack) -> None:
    code = ("import os\n\ndef handler(context, event):\n"
            "    return {'seen': sorted(os.listdir('/nuclide/functions')), 'version': '%s'}\n")
    for name in ("twin-a", "twin-b"):
        pstack.deploy(name, {"function.yaml": function_yaml(name), "main.py": code % "v1"})
    assert pstack.invoke("twin-a").json() == {"seen": ["twin-a"], "version": "v1"}
    assert pstack.invoke("twin-b").json() == {"seen": ["twin-b"], "version": "v1"}
    [a] = pool_instances(pstack, "twin-a")
    [b] = pool_instances(pstack, "twin-b")
    assert a.id != b.id
    # a new version gets a fresh container; the old one is removed, never handed back to the pool
    pstack.deploy("twin-a", {"function.yaml": function_yaml("twin-a"), "main.py": code % "v2"})
    assert pstack.invoke("twin-a").json() == {"seen": ["twin-a"], "version": "v2"}
    wait_for(lambda: a.id not in [c.id for c in containers(namespace(pstack))], 30,
             what="the old version's container to go")
    [a2] = pool_instances(pstack, "twin-a")
    assert a2.id not in (a.id, b.id) and a.id not in idle_pool(pstack)
    assert a.id not in records(pstack), "the removed container's record goes with it"


def test_memory_limit_refused_allocation_and_oom_kill(pstack: Stack) -> None:
    memory_limit_checks(pstack, lambda: pool_instances(pstack, "hog"))


def test_function_that_fails_to_load_is_reported(pstack: Stack) -> None:
    bad = "raise RuntimeError('boom-at-import')\n\ndef handler(context, event):\n    return 'never'\n"
    r = pstack.deploy("exitstart", {"function.yaml": function_yaml("exitstart"), "main.py": bad}, expect=422)
    assert "boom-at-import" in r.text and "exit code 3" in r.text
    desc = pstack.client.get("/exitstart").json()
    assert desc["state"] == "failed" and "boom-at-import" in desc["last_error"]
    wait_for(lambda: not [rec for rec in records(pstack).values()
                          if rec["labels"].get("nuclide.function") == "exitstart"], 15,
             what="the exited container and its record to be removed")


def test_redeploy_under_a_steady_stream_of_calls_fails_none(pstack: Stack) -> None:
    redeploy_under_steady_calls(pstack, lambda: len(pool_instances(pstack, "steady")))


def test_scale_from_zero_takes_a_pool_container(pstack: Stack) -> None:
    spec = {"minReplicas": 0, "maxReplicas": 1, "scaleToZero": {"idleTimeout": "1s"}}
    pstack.deploy("sleeper", {"function.yaml": function_yaml("sleeper", **spec), "main.py": HELLO})
    assert pstack.invoke("sleeper").text == "hello"
    wait_for(lambda: pstack.client.get("/sleeper").json()["state"] == "scaledToZero", 20, what="scale to zero")
    wait_for(lambda: not pool_instances(pstack, "sleeper"), 20, what="the container to go")
    idle = full_pool(pstack)
    r = pstack.invoke("sleeper")
    assert r.status_code == 200 and r.text == "hello" and r.headers.get("x-nuclide-cold-start") == "true"
    [container] = pool_instances(pstack, "sleeper")
    assert container.id in idle


def test_functions_with_requirements_take_the_image_path(pstack: Stack) -> None:
    code = "import tabulate\n\ndef handler(context, event):\n    return tabulate.tabulate([[1, 2]], tablefmt='plain')\n"
    pstack.deploy("withreqs", {"function.yaml": function_yaml("withreqs"), "main.py": code,
                               "requirements.txt": "tabulate==0.9.0\n"})
    assert pstack.invoke("withreqs").text.split() == ["1", "2"]
    [container] = image_instances(pstack, "withreqs")
    assert "nuclide.pool" not in container.labels and container.image.labels["nuclide.group"] == "g-withreqs"
    assert not pool_instances(pstack, "withreqs")


def test_deployer_restart_adopts_pool_instances_and_removes_idle_ones(require_docker: None, tmp_path: Path) -> None:
    with own_docker_stack(tmp_path / "var", {"NUCLIDE_DOCKER_POOL_SIZE": str(POOL_SIZE)}) as s:
        s.deploy("adoptee", {"function.yaml": function_yaml("adoptee", minReplicas=2, maxReplicas=2),
                             "main.py": HELLO})
        wait_for(lambda: len(pool_instances(s, "adoptee")) == 2, 30, what="two pool instances")
        before = sorted(c.id for c in pool_instances(s, "adoptee"))
        idle = full_pool(s)
        s.stop_service("deployer", signal.SIGKILL)
        for _ in range(10):
            assert s.invoke("adoptee").text == "hello"
        s.start_service("deployer")
        s.wait_healthy()
        wait_for(lambda: "adopted running instances" in s.service_log("deployer"), 15, what="the adoption")
        ns = namespace(s)
        wait_for(lambda: not [c for c in containers(ns, "nuclide.pool=true") if c.id in idle], 15,
                 what="the old deployer's idle pool containers to be removed")
        new_idle = full_pool(s)
        assert not set(new_idle) & set(idle)
        time.sleep(2)  # give a duplicate instance (the bug this guards against) time to appear
        assert sorted(c.id for c in pool_instances(s, "adoptee")) == before
        assert s.invoke("adoptee").text == "hello"
        assert "hello was called" in s.client.get("/functions/adoptee/logs").text
        assert s.client.delete("/adoptee").status_code == 204
        wait_for(lambda: not [c for c in containers(ns, "nuclide.pool=true") if c.id in before], 30,
                 what="the adopted containers to go")
        s.stop_service("deployer")
        assert not containers(ns), "a deployer that stops removes its idle pool containers"


def test_pool_size_zero_disables_the_pool(require_docker: None, tmp_path: Path) -> None:
    with own_docker_stack(tmp_path / "var", {"NUCLIDE_DOCKER_POOL_SIZE": "0"}) as s:
        s.deploy("nopool", {"function.yaml": function_yaml("nopool"), "main.py": HELLO})
        assert s.invoke("nopool").text == "hello"
        ns = namespace(s)
        [container] = image_instances(s, "nopool")
        assert container.image.labels["nuclide.group"] == "g-nopool"
        assert not containers(ns, "nuclide.pool=true"), "no pool container with docker_pool_size 0"


def test_a_bad_pool_size_is_a_clear_config_error(tmp_path: Path) -> None:
    env = {**os.environ, "NUCLIDE_VAR_DIR": str(tmp_path), "NUCLIDE_BACKEND": "docker",
           "NUCLIDE_DOCKER_POOL_SIZE": "-1"}
    out = subprocess.run([sys.executable, "-m", "services.deployer"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2
    assert "docker_pool_size -1 is out of range 0-64" in out.stderr and "0 disables the pool" in out.stderr
