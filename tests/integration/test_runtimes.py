"""Registered runtimes on a real Docker Engine: the /runtimes API, shell functions and the three warm-start policies."""

from __future__ import annotations

import io
import json
import signal
import tarfile
import time
from typing import Any, Iterator

import pytest
import yaml

from tests.docker_util import (  # noqa: F401 (fixtures)
    RUNTIME_IMAGE, containers, docker_client, docker_problem, docker_stack_at, fresh_docker_stack,
    mounts_besides_link, namespace, need, require_docker, shared_docker_stack,
)
from tests.stack import Stack, wait_for

pytestmark = pytest.mark.integration

# a user's runtime: nuclide-runtime has python3, sh and coreutils; nothing of nuclide's is used from it
RUNTIME = {"image": RUNTIME_IMAGE, "path": "/ws",
           "dependencies": ["python3", "-c", "open('deps.txt', 'w').write('installed at build time')"],
           "run": ["python3", "main.py", "$(echo not-expanded);|&"]}
NO_CP_IMAGE = "nuclide-test-no-cp:latest"

ECHO = """
import json, os, sys
data = json.load(sys.stdin)
with open("input.json") as fh:
    from_file = json.load(fh)
with open("state.txt", "a") as fh:  # what a call leaves behind: kept only by the function policy
    fh.write("x")
with open("state.txt") as fh:
    calls_seen = len(fh.read())
result = {"stdin": data, "file": from_file, "argv": sys.argv[1:], "deps": open("deps.txt").read(),
          "calls_seen": calls_seen, "uid": os.getuid(), "env": os.environ.get("GREETING")}
if isinstance(data, dict) and data.get("via") == "file":
    with open("output.json", "w") as fh:
        json.dump({"output": result}, fh)
    print("this stdout goes to the logs")
elif isinstance(data, dict) and data.get("fail"):
    print("something broke: " + data["fail"], file=sys.stderr)
    sys.exit(3)
elif isinstance(data, dict) and data.get("sleep"):
    import time
    time.sleep(data["sleep"])
elif isinstance(data, dict) and data.get("text"):
    print("plain text, not JSON")
else:
    print(json.dumps(result))
"""


def shell_yaml(name: str, runtime: str = "shellrt", **spec: Any) -> str:
    return yaml.safe_dump({"metadata": {"name": name}, "spec": {"runtime": runtime, **spec}})


@pytest.fixture(scope="module")
def rstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A docker-backend stack with the runtime 'shellrt' registered."""
    with shared_docker_stack(tmp_path_factory.mktemp("rstack") / "var") as s:
        r = s.client.put("/runtimes/shellrt", json=RUNTIME)
        assert r.status_code == 201, r.text
        yield s


def deploy(stack: Stack, name: str, expect: int = 200, **spec: Any) -> Any:
    return stack.deploy(name, {"function.yaml": shell_yaml(name, **spec), "main.py": ECHO}, expect=expect)


# ----- the /runtimes API -------------------------------------------------------------------------


def test_register_list_get_replace_delete(rstack: Stack) -> None:
    listed = rstack.client.get("/runtimes").json()
    assert [r["name"] for r in listed] == ["shellrt"]
    got = rstack.client.get("/runtimes/shellrt").json()
    assert got["image"] == RUNTIME_IMAGE and got["path"] == "/ws" and got["run"] == RUNTIME["run"]
    assert got["image_id"].startswith("sha256:")
    # a command string is split like a shell would, and never run by one
    r = rstack.client.put("/runtimes/other", json={**RUNTIME, "run": "python3 main.py 'two words'"})
    assert r.status_code == 201, r.text
    assert r.json()["run"] == ["python3", "main.py", "two words"]
    assert rstack.client.put("/runtimes/other", json=RUNTIME).status_code == 200  # replaced
    assert rstack.client.delete("/runtimes/other").status_code == 204
    assert rstack.client.get("/runtimes/other").status_code == 404
    assert rstack.anon.get("/runtimes").status_code == 401


def test_missing_image_is_a_400_naming_it_and_nothing_is_registered(rstack: Stack) -> None:
    r = rstack.client.put("/runtimes/ghost", json={**RUNTIME, "image": "nuclide-no-such-image:1"})
    assert r.status_code == 400, r.text
    assert "nuclide-no-such-image:1" in r.json()["error"]["message"]
    assert "ghost" not in [x["name"] for x in rstack.client.get("/runtimes").json()]
    assert rstack.client.get("/runtimes/ghost").status_code == 404


@pytest.mark.parametrize("body, words", [
    ({**RUNTIME, "path": "ws"}, "path"),
    ({**RUNTIME, "path": "/proc/x"}, "system directory"),
    ({**RUNTIME, "run": [1, 2]}, "run"),
    ({**RUNTIME, "run": []}, "run is required"),
    ({**RUNTIME, "run": "python3 'unclosed"}, "cannot be split"),
    ({**RUNTIME, "image": "Bad Image"}, "image"),
    ({**RUNTIME, "extra": 1}, "unknown runtime fields: extra"),
    ([1, 2], "JSON object"),
])
def test_bad_runtime_fields_are_400s(rstack: Stack, body: Any, words: str) -> None:
    r = rstack.client.put("/runtimes/badrt", json=body)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]
    assert rstack.client.get("/runtimes/badrt").status_code == 404


def test_bad_runtime_names_are_400s(rstack: Stack) -> None:
    assert "built-in Python" in rstack.client.put("/runtimes/python3", json=RUNTIME).json()["error"]["message"]
    assert rstack.client.put("/runtimes/-x", json=RUNTIME).status_code == 400


def test_unknown_runtime_or_policy_in_a_spec_is_a_400(rstack: Stack) -> None:
    r = deploy(rstack, "lost", expect=400, runtime="nodejs-nope")
    message = r.json()["error"]["message"]
    assert "'nodejs-nope' is not available here" in message and "shellrt" in message
    r = deploy(rstack, "lost", expect=400, warmStart="sometimes")
    assert "spec.warmStart must be one of none, runtime, function" in r.json()["error"]["message"]
    assert rstack.client.get("/lost").status_code == 404


def test_delete_of_a_runtime_in_use_is_a_409_naming_the_functions(rstack: Stack) -> None:
    deploy(rstack, "user1")
    r = rstack.client.delete("/runtimes/shellrt")
    assert r.status_code == 409 and "'user1'" in r.json()["error"]["message"], r.text
    assert rstack.client.delete("/user1").status_code == 204


# ----- shell functions ---------------------------------------------------------------------------


def test_sync_and_async_calls_via_stdout_and_output_json(rstack: Stack) -> None:
    r = deploy(rstack, "echo", env=[{"name": "GREETING", "value": "hi"}])
    assert r.json()["runtime"] == "shellrt" and r.json()["state"] == "ready"
    hostile = "'; rm -rf / ; $(touch /tmp/pwned) `id` && echo \"$HOME\" | cat"
    out = rstack.invoke("echo", {"name": hostile})
    assert out.status_code == 200 and out.headers["content-type"].startswith("application/json"), out.text
    body = out.json()
    # input on stdin and in input.json, shell metacharacters untouched, argv as registered, never expanded
    assert body["stdin"] == body["file"] == {"name": hostile}
    assert body["argv"] == ["$(echo not-expanded);|&"]
    assert body["deps"] == "installed at build time" and body["uid"] == 65534 and body["env"] == "hi"
    via_file = rstack.invoke("echo", {"via": "file"})
    assert via_file.status_code == 200 and via_file.json()["stdin"] == {"via": "file"}
    text = rstack.invoke("echo", {"text": 1})
    assert text.text.strip() == "plain text, not JSON" and text.headers["content-type"].startswith("text/plain")
    raw = rstack.invoke("echo", b"not json at all")
    assert raw.json()["stdin"] == "not json at all"
    # async: durable, run by the same instance, result kept
    accepted = rstack.anon.post("/echo", json={"via": "file", "n": 7}, headers={"X-Nuclide-Async": "true"})
    assert accepted.status_code == 202
    call_id = accepted.json()["call_id"]
    rec = wait_for(lambda: (c := rstack.client.get(f"/calls/{call_id}").json())["status"] == "DONE" and c,
                   60, what="the async call to finish")
    result = rstack.client.get(f"/calls/{call_id}/result")
    assert result.json()["stdin"] == {"via": "file", "n": 7}, rec
    assert "this stdout goes to the logs" in rstack.client.get("/functions/echo/logs").text


def test_a_failing_command_fails_the_call_with_its_stderr(rstack: Stack) -> None:
    deploy(rstack, "failer")
    r = rstack.invoke("failer", {"fail": "disk on fire"})
    assert r.status_code == 500, r.text
    message = r.json()["error"]["message"]
    assert "exited with code 3" in message and "something broke: disk on fire" in message
    assert rstack.invoke("failer", {"ok": 1}).status_code == 200  # the instance lives on


@pytest.mark.parametrize("policy, second_call_sees", [("none", 1), ("runtime", 1), ("function", 2)])
def test_each_warm_start_policy(rstack: Stack, policy: str, second_call_sees: int) -> None:
    name = f"pol-{policy}"
    r = deploy(rstack, name, warmStart=policy)
    assert r.json()["spec"]["warm_start"] == policy
    first, second = rstack.invoke(name, {"n": 1}).json(), rstack.invoke(name, {"n": 2}).json()
    assert first["calls_seen"] == 1 and second["calls_seen"] == second_call_sees
    assert second["stdin"] == {"n": 2} and second["deps"] == "installed at build time"
    ns = namespace(rstack)
    if policy == "none":  # each call's container is gone once it ran (the engine removes it)
        wait_for(lambda: not containers(ns, "nuclide.runner_function=" + name), 15, what="the call containers to go")
    warm = [c for c in containers(ns, "nuclide.runner_function=" + name, all_states=False)]
    assert len(warm) == (0 if policy == "none" else 1), [c.name for c in warm]
    if warm:
        host = warm[0].attrs["HostConfig"]
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"] and not mounts_besides_link(warm[0])
        assert warm[0].attrs["Config"]["User"] == "65534:65534"
    assert rstack.client.delete(f"/{name}").status_code == 204
    wait_for(lambda: not containers(ns, "nuclide.runner_function=" + name), 30, what="its containers to go")


@pytest.mark.parametrize("policy", ["none", "function"])
def test_timeout_is_enforced_per_call(rstack: Stack, policy: str) -> None:
    name = f"slow-{policy}"
    deploy(rstack, name, warmStart=policy, timeout="1s")
    r = rstack.invoke(name, {"sleep": 30})
    assert r.status_code == 504 and "1 s timeout" in r.json()["error"]["message"], r.text
    assert rstack.invoke(name, {"n": 1}).status_code == 200  # a replacement container serves the next call


def test_failed_build_is_a_422_and_the_previous_version_keeps_serving(rstack: Stack) -> None:
    deploy(rstack, "rebuild")
    assert rstack.client.put("/runtimes/brokenrt", json={**RUNTIME, "dependencies": [
        "python3", "-c", "import sys; print('dependency step failed loudly'); sys.exit(7)"]}).status_code == 201
    r = deploy(rstack, "rebuild", expect=422, runtime="brokenrt")
    assert "dependency step failed loudly" in r.text, r.text
    assert rstack.invoke("rebuild", {"n": 1}).json()["stdin"] == {"n": 1}
    assert rstack.client.delete("/rebuild").status_code == 204
    assert rstack.client.delete("/runtimes/brokenrt").status_code == 204


def _build_image_without_cp() -> None:
    client = docker_client()
    try:
        dockerfile = f'FROM {RUNTIME_IMAGE}\nUSER 0:0\nRUN ["rm", "-f", "/usr/bin/cp", "/bin/cp"]\n'.encode()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(dockerfile)
            tar.addfile(info, io.BytesIO(dockerfile))
        client.images.build(fileobj=io.BytesIO(buf.getvalue()), custom_context=True, tag=NO_CP_IMAGE,
                            network_mode="host", rm=True)
    finally:
        client.close()


def test_container_that_fails_at_start_marks_the_function_failed(rstack: Stack) -> None:
    _build_image_without_cp()
    try:
        assert rstack.client.put("/runtimes/nocp", json={**RUNTIME, "image": NO_CP_IMAGE}).status_code == 201
        r = deploy(rstack, "nocp-fn", expect=422, runtime="nocp")
        assert "the image needs sh and cp" in r.text, r.text
        desc = rstack.client.get("/nocp-fn").json()
        assert desc["state"] == "failed" and "cp" in desc["last_error"]
        assert rstack.client.delete("/nocp-fn").status_code == 204
        assert rstack.client.delete("/runtimes/nocp").status_code == 204
    finally:
        client = docker_client()
        try:
            client.images.remove(NO_CP_IMAGE, force=True)
        except Exception:  # a container of it may still be going away
            pass
        finally:
            client.close()


def test_runtime_functions_cannot_be_fused(rstack: Stack) -> None:
    deploy(rstack, "loner")
    rstack.deploy("pyfn", {"function.yaml": yaml.safe_dump({"metadata": {"name": "pyfn"},
                                                            "spec": {"handler": "main:handler"}}),
                           "main.py": "def handler(context, event):\n    return 'py'\n"})
    r = rstack.client.put("/groups", json=[["loner", "pyfn"]])
    assert r.status_code == 409 and "cannot be fused" in r.json()["error"]["message"], r.text
    assert rstack.invoke("pyfn").text == "py"
    for name in ("loner", "pyfn"):
        assert rstack.client.delete(f"/{name}").status_code == 204


def test_deployer_restart_adopts_runners(fresh_docker_stack: Stack) -> None:
    s = fresh_docker_stack
    assert s.client.put("/runtimes/shellrt", json=RUNTIME).status_code == 201
    deploy(s, "adoptee")
    ns = namespace(s)
    before = [c.id for c in containers(ns, "nuclide.runner_function=adoptee", all_states=False)]
    assert len(before) == 1
    s.stop_service("deployer", signal.SIGKILL)
    assert s.invoke("adoptee", {"n": 1}).json()["calls_seen"] == 1  # the runner outlives its deployer
    s.start_service("deployer")
    s.wait_healthy()
    wait_for(lambda: "adopted running instances" in s.service_log("deployer"), 15, what="the adoption")
    time.sleep(2)  # give a duplicate runner (the bug this guards against) time to appear
    assert [c.id for c in containers(ns, "nuclide.runner_function=adoptee")] == before
    assert s.invoke("adoptee", {"n": 2}).json()["calls_seen"] == 2  # the same warm container
    assert s.client.delete("/adoptee").status_code == 204
    wait_for(lambda: not containers(ns, "nuclide.runner_function=adoptee"), 30, what="its containers to go")


def test_registering_needs_the_engine(tmp_path: Any) -> None:
    """Engine down: a 503 saying so, nothing registered (the process backend answers the same way: 400)."""
    need(docker_problem())
    s = docker_stack_at(tmp_path / "var", {"NUCLIDE_DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    try:
        s.start()
        r = s.client.put("/runtimes/shellrt", json=RUNTIME)
        assert r.status_code == 503 and "Docker Engine" in r.json()["error"]["message"], r.text
        assert s.client.get("/runtimes").json() == []
    finally:
        s.stop()


def test_process_backend_refuses_runtimes(stack: Stack) -> None:
    r = stack.client.put("/runtimes/shellrt", json=RUNTIME)
    assert r.status_code == 400 and "docker backend" in r.json()["error"]["message"], r.text
    assert stack.client.get("/runtimes").json() == []
    assert json.loads(stack.client.get("/runtimes").text) == []
