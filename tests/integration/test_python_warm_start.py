"""Python functions under spec.warmStart none and runtime on a real Docker Engine answer as warm instances do."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from tests.docker_util import (  # noqa: F401 (fixtures)
    containers, mounts_besides_link, namespace, require_docker, shared_docker_stack,
)
from tests.stack import Stack, function_yaml, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

POLICIES = ("none", "runtime", "function")

HANDLER = '''
import os
import time

CALLS = 0  # module state: kept between calls only by a warm instance (warmStart function)


def handler(context, event):
    global CALLS
    CALLS += 1
    kind = event.headers.get("X-Kind", "")
    if kind == "str":
        return "hello " + event.method
    if kind == "dict":
        return {"a": 1, "b": [1, 2], "s": "x"}
    if kind == "response":
        return context.Response(body="made", headers={"X-Made": "yes"}, content_type="text/x-made", status_code=201)
    if kind == "tuple":
        return 202, {"accepted": True}
    if kind == "raise":
        raise ValueError("broken on purpose")
    if kind == "sleep":
        time.sleep(30)
    if kind == "state":
        seen = os.path.exists("/tmp/seen")
        with open("/tmp/seen", "w") as fh:
            fh.write("x")
        return {"calls": CALLS, "tmp_seen": seen}
    print("print() goes to the logs")
    context.logger.info("logged", kind=kind)
    body = event.body
    return {"method": event.method, "body": body.decode() if isinstance(body, bytes) else body,
            "x_a": event.headers.get("X-A"), "query": event.fields.get("q"), "ctype": event.content_type,
            "env": os.environ.get("GREETING"), "uid": os.getuid(), "files": sorted(os.listdir("."))}
'''


def deploy(stack: Stack, name: str, policy: str, expect: int = 200, source: str = HANDLER, **spec: Any) -> Any:
    yaml = function_yaml(name, warmStart=policy, env=[{"name": "GREETING", "value": "hi"}], **spec)
    return stack.deploy(name, {"function.yaml": yaml, "main.py": source}, expect=expect)


@pytest.fixture(scope="module")
def pstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A docker-backend stack with the same function deployed under each policy (py-none, py-runtime, py-function)."""
    with shared_docker_stack(tmp_path_factory.mktemp("pystack") / "var") as s:
        for policy in POLICIES:
            r = deploy(s, f"py-{policy}", policy)
            assert r.json()["spec"]["warm_start"] == policy and r.json()["state"] == "ready", r.text
        yield s


def _seen(r: Any) -> tuple[int, str, str, bytes]:
    return r.status_code, r.headers.get("content-type", ""), r.headers.get("x-made", ""), r.content


@pytest.mark.parametrize("kind", ["str", "dict", "response", "tuple", "raise"])
def test_results_are_the_same_under_each_policy(pstack: Stack, kind: str) -> None:
    seen = {p: _seen(pstack.invoke(f"py-{p}", b"", headers={"X-Kind": kind})) for p in POLICIES}
    assert seen["none"] == seen["runtime"] == seen["function"], seen
    status, ctype, made, body = seen["function"]
    expected = {"str": (200, "text/plain", b"hello POST"), "dict": (200, "application/json", b'"a":1'),
                "response": (201, "text/x-made", b"made"), "tuple": (202, "application/json", b"accepted"),
                "raise": (500, "text/plain", b"broken on purpose")}[kind]
    assert status == expected[0] and ctype.startswith(expected[1]) and expected[2] in body, seen
    assert made == ("yes" if kind == "response" else "")


def test_event_body_headers_method_query_and_env_pass_through(pstack: Stack) -> None:
    answers = {}
    for p in POLICIES:
        r = pstack.anon.post(f"/py-{p}?q=42", json={"n": [1, "two"]}, headers={"X-A": "from the caller"})
        assert r.status_code == 200, r.text
        answers[p] = r.json()
    assert answers["none"] == answers["runtime"] == answers["function"], answers
    got = answers["none"]
    assert got["method"] == "POST" and got["body"] == {"n": [1, "two"]} and got["x_a"] == "from the caller"
    assert got["query"] == "42" and got["ctype"].startswith("application/json") and got["env"] == "hi"
    assert got["uid"] == 65534 and "main.py" in got["files"]
    raw = {p: pstack.invoke(f"py-{p}", b"\x00raw bytes").json()["body"] for p in POLICIES}
    assert set(raw.values()) == {"\x00raw bytes"}, raw
    log = pstack.client.get("/functions/py-none/logs").text
    assert "print() goes to the logs" in log and '"msg":"logged"' in log, log[-2000:]


@pytest.mark.parametrize("policy, kept, warm", [("none", False, 0), ("runtime", False, 1), ("function", True, 1)])
def test_what_a_call_leaves_for_the_next(pstack: Stack, policy: str, kept: bool, warm: int) -> None:
    name = f"py-{policy}"
    first = pstack.invoke(name, b"", headers={"X-Kind": "state"}).json()
    second = pstack.invoke(name, b"", headers={"X-Kind": "state"}).json()
    if kept:  # a warm instance: module state and /tmp stay
        assert second == {"calls": first["calls"] + 1, "tmp_seen": True}
    else:  # a fresh process, and a fresh /tmp (a fresh container, or one wiped for the call)
        assert first == second == {"calls": 1, "tmp_seen": False}
    ns = namespace(pstack)
    if policy == "function":  # a nuclide instance container, not a runner's
        return
    if policy == "none":  # each call's container is gone once it ran (the engine removes it)
        wait_for(lambda: not containers(ns, "nuclide.runner_function=" + name), 15, what="the call containers to go")
    running = containers(ns, "nuclide.runner_function=" + name, all_states=False)
    assert len(running) == warm, [c.name for c in running]
    for c in running:  # the runner's lockdown
        host = c.attrs["HostConfig"]
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"] and not mounts_besides_link(c)
        assert c.attrs["Config"]["User"] == "65534:65534"


def test_timeout_is_the_same_504(pstack: Stack) -> None:
    for policy in ("none", "runtime"):
        deploy(pstack, f"py-slow-{policy}", policy, timeout="2s")
    answers = {}
    for policy in ("none", "runtime"):
        r = pstack.invoke(f"py-slow-{policy}", b"", headers={"X-Kind": "sleep"})
        assert r.status_code == 504, r.text
        answers[policy] = r.json()["error"]["message"].replace(f"py-slow-{policy}", "X")
        assert pstack.invoke(f"py-slow-{policy}", b"", headers={"X-Kind": "str"}).text == "hello POST"
    assert answers["none"] == answers["runtime"] == "function 'X' did not finish within its 2 s timeout (spec.timeout)"
    for policy in ("none", "runtime"):
        assert pstack.client.delete(f"/py-slow-{policy}").status_code == 204


def test_a_function_that_fails_to_load_fails_the_deploy(pstack: Stack) -> None:
    r = deploy(pstack, "py-broken", "none", expect=422, source="raise RuntimeError('no config here')\n"
                                                               "def handler(context, event):\n    return 1\n")
    assert "no config here" in r.text, r.text[-2000:]
    assert pstack.client.delete("/py-broken").status_code == 204


def test_per_call_functions_cannot_be_fused(pstack: Stack) -> None:
    r = pstack.client.put("/groups", json=[["py-none", "py-function"]])
    assert r.status_code == 409 and "cannot be fused" in r.json()["error"]["message"], r.text


def test_unknown_policy_is_a_400(pstack: Stack) -> None:
    r = deploy(pstack, "py-lost", "sometimes", expect=400)
    assert "spec.warmStart must be one of none, runtime, function" in r.json()["error"]["message"]


def test_process_backend_refuses_per_call_policies(stack: Stack) -> None:
    for policy in ("none", "runtime"):
        r = deploy(stack, "py-proc", policy, expect=400)
        message = r.json()["error"]["message"]
        assert "docker backend" in message and f"'{policy}'" in message, message
    assert stack.client.get("/py-proc").status_code == 404
    assert stack.invoke("py-proc").status_code == 404
    deploy(stack, "py-proc", "function")  # the default still deploys there
    assert stack.invoke("py-proc", b"", headers={"X-Kind": "str"}).text == "hello POST"
    assert stack.client.delete("/py-proc").status_code == 204


@pytest.mark.parametrize("policy", ["none", "runtime"])
def test_a_per_call_container_makes_task_calls(pstack: Stack, policy: str) -> None:
    """Its container has a network of its own: its calls reach the gateway over the instance link."""
    callee = "def handler(context, event):\n    return {'callee got': event.body}\n"
    pstack.deploy("pw-callee", {"function.yaml": function_yaml("pw-callee"), "main.py": callee})
    caller = "def handler(context, event):\n    return context.call('pw-callee', {'n': 1})\n"
    deploy(pstack, f"pw-caller-{policy}", policy, source=caller)
    r = pstack.invoke(f"pw-caller-{policy}", {})
    assert r.status_code == 200 and r.json() == {"callee got": {"n": 1}}, r.text
