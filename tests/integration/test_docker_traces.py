"""W3C Trace Context on the Docker backend: a container instance's handler and a registered runtime's command.

A container instance runs the runtime baked into the runtime image, so these need images built from
this tree (`make images`, or NUCLIDE_IMAGE_TAG=<tag> for both the build and the tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import yaml

from shared.tracecontext import span_id
from tests.docker_util import (  # noqa: F401 (fixtures)
    RUNTIME_IMAGE, docker_client, docker_problem, need, require_docker, shared_docker_stack,
)
from tests.stack import Stack, function_yaml

pytestmark = pytest.mark.integration

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACED = ("def handler(context, event):\n"
          "    return {'trace_id': context.trace_id, 'parent': context.parent_span_id, 'span_id': context.span_id}\n")
ENV = "import json, os\nprint(json.dumps({k: os.environ.get(k) for k in ('TRACEPARENT', 'TRACESTATE')}))\n"


@pytest.fixture(scope="module")
def tstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with shared_docker_stack(tmp_path_factory.mktemp("tstack") / "var") as s:
        r = s.client.put("/runtimes/tracert", json={"image": RUNTIME_IMAGE, "path": "/ws", "run": ["python3", "main.py"]})
        assert r.status_code == 201, r.text
        yield s


def test_a_container_instance_gets_the_trace(tstack: Stack) -> None:
    tstack.deploy("dtraced", {"function.yaml": function_yaml("dtraced"), "main.py": TRACED})
    r = tstack.invoke("dtraced", {}, headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
    assert r.status_code == 200, r.text
    assert r.json() == {"trace_id": TRACE, "parent": PARENT, "span_id": span_id(r.headers["x-call-id"])}


@pytest.mark.parametrize("policy", ["none", "function"])
def test_a_registered_runtime_gets_the_trace_in_its_environment(tstack: Stack, policy: str) -> None:
    name = f"envtrace-{policy}"
    spec = yaml.safe_dump({"metadata": {"name": name}, "spec": {"runtime": "tracert", "warmStart": policy}})
    tstack.deploy(name, {"function.yaml": spec, "main.py": ENV})
    r = tstack.invoke(name, {}, headers={"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "k=v"})
    assert r.status_code == 200, r.text
    assert r.json() == {"TRACEPARENT": f"00-{TRACE}-{span_id(r.headers['x-call-id'])}-01", "TRACESTATE": "k=v"}
    r = tstack.invoke(name, {})  # a call of its own trace: the variables are the call's, not the container's
    assert r.json() == {"TRACEPARENT": f"00-{r.headers['x-call-id']}-{span_id(r.headers['x-call-id'])}-00",
                        "TRACESTATE": None}
