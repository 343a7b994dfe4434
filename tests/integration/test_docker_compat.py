"""What test_compat.py checks on the process backend, where it depends on the instance: on the docker backend.

The code directory is writable scratch on both backends (pool containers, image-built ones and per-call
containers alike); nuclio events, Lambda shapes and context.platform.call_function work in the container's
runtime; another python:3.X runs in its own runtime image, or falls back with a warning.
"""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

from tests.docker_util import shared_docker_stack
from tests.integration.test_compat import call_function_checks
from tests.stack import Stack, function_yaml

pytestmark = pytest.mark.integration

SCRATCH = """
import os

def handler(context, event):
    with open("scratch.txt", "a") as fh:  # next to the code, as on the process backend
        fh.write("x")
    with open("scratch.txt") as fh:
        return {"cwd": os.getcwd(), "scratch": fh.read(), "id": event.id, "path": event.path}
"""

LAMBDA = """
import json

def handler(event, context):
    return {"event": json.loads(json.dumps(event)), "request_id": context.aws_request_id,
            "memory_mb": context.memory_limit_in_mb}
"""


@pytest.fixture(scope="module")
def dstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with shared_docker_stack(tmp_path_factory.mktemp("dcompat") / "var") as s:
        yield s


@pytest.mark.parametrize("kind,spec", [
    ("pool", {}),
    ("image", {"build": {"commands": ["echo 'X = 1' > $PIP_TARGET/built.py"]}}),
    ("percall", {"warmStart": "none"}),
])
def test_the_code_directory_is_writable_scratch(dstack: Stack, kind: str, spec: dict) -> None:
    name = f"scratch-{kind}"
    dstack.deploy(name, {"function.yaml": function_yaml(name, **spec), "main.py": SCRATCH})
    r = dstack.anon.post(f"/{name}/a/b", content=b"x")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["scratch"].startswith("x") and out["path"] == "/a/b" and str(uuid.UUID(out["id"])) == out["id"]
    if kind != "percall":  # a warm instance keeps its scratch between calls; a per-call container starts afresh
        assert dstack.anon.post(f"/{name}").json()["scratch"] == "xx"
    else:
        assert dstack.anon.post(f"/{name}").json()["scratch"] == "x"


def test_lambda_shapes_in_a_container(dstack: Stack) -> None:
    spec = {"resources": {"limits": {"memory": "96Mi"}}}
    dstack.deploy("dlam", {"function.yaml": function_yaml("dlam", **spec), "main.py": LAMBDA})
    out = dstack.anon.post("/dlam", json={"a": 1}).json()
    assert out["event"] == {"a": 1} and out["memory_mb"] == 96 and uuid.UUID(out["request_id"])
    event = dstack.anon.post("/dlam/x?q=1", content=b"hi").json()["event"]
    assert (event["rawPath"], event["body"], event["queryStringParameters"]) == ("/x", "hi", {"q": "1"})


def test_another_python_falls_back_with_a_warning(dstack: Stack) -> None:
    code = "def handler(context, event):\n    import sys\n    return '%d.%d' % sys.version_info[:2]\n"
    desc = dstack.deploy("dpy", {"function.yaml": function_yaml("dpy", runtime="python:3.4"), "main.py": code}).json()
    [warning] = [w for w in desc["warnings"] if "spec.runtime" in w]
    assert "python:3.4" in warning and desc["runtime"] in warning and "docker backend" in warning, warning
    assert dstack.invoke("dpy").text == desc["runtime"].partition(":")[2]


PYTHON_TO_TRY = "3.13"  # what NUCLIDE_IMAGE_PYTHONS=3.13 make images builds (Debian trixie)


def test_another_python_runs_in_its_runtime_image(dstack: Stack) -> None:
    from tests.docker_util import RUNTIME_IMAGE, docker_problem, need

    image = f"{RUNTIME_IMAGE}-py{PYTHON_TO_TRY}"
    if docker_problem((image,)) is not None:
        need(f"no {image} in the engine: build it with NUCLIDE_IMAGE_PYTHONS={PYTHON_TO_TRY} make images"
             " (a debootstrap of the Debian release that ships that Python; CI does)")
    code = ("import sys, built\n\ndef handler(context, event):\n"
            "    return '%d.%d' % sys.version_info[:2] + ':' + built.BY\n")
    build = {"commands": ["python -c \"import os, sys; open(os.environ['PIP_TARGET'] + '/built.py', 'w')"
                          ".write('BY = %r' % ('%d.%d' % sys.version_info[:2]))\""]}
    for name, spec in (("py-plain", {}), ("py-image", {"build": build})):
        files = {"function.yaml": function_yaml(name, runtime=f"python:{PYTHON_TO_TRY}", **spec),
                 "main.py": code if spec else code.replace("import sys, built", "import sys").replace(
                     " + ':' + built.BY", "")}
        desc = dstack.deploy(name, files).json()
        assert desc["runtime"] == f"python:{PYTHON_TO_TRY}" and not [w for w in desc["warnings"] if "runtime" in w]
        expected = PYTHON_TO_TRY + (f":{PYTHON_TO_TRY}" if spec else "")
        assert dstack.invoke(name).text == expected


@pytest.mark.parametrize("fused", [False, True])
def test_platform_call_function_between_containers_and_within_one(dstack: Stack, fused: bool) -> None:
    call_function_checks(dstack, f"dcf-caller-{int(fused)}", f"dcf-callee-{int(fused)}", fused)
