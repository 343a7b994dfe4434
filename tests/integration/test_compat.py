"""Functions written for nuclio, AWS Lambda and the Fusionizer run unchanged: what their own tests expect."""

from __future__ import annotations

import json
import os
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

from tests.stack import Stack, function_yaml, make_zip, wait_for
from tests.tasks import NUCLIO_CALLEE, NUCLIO_CALLER, TASK_A, TASK_B

pytestmark = pytest.mark.integration

# what nuclio's own "event returner" test function reports of its event
EVENT_RETURNER = """
import json

def handler(context, event):
    body = event.body if isinstance(event.body, dict) else event.body.decode()
    return json.dumps({
        "id": event.id, "call_id": event.call_id, "path": event.path, "url": event.url, "method": event.method,
        "headers": dict(event.headers), "lookup": event.headers.get("testheaderkey1"),
        "timestamp": event.timestamp.isoformat("T") + "Z", "trigger": event.trigger.kind, "body": body,
    })
"""

OUTPUTTER = """
def handler(context, event):
    what = event.body.decode()
    if what == "dict":
        return {"a": "dict", "b": "foo"}
    if what == "status_and_string":
        return 201, "a string after status"
    if what == "list":
        return [1, 2]
    if what == "raise":
        raise ValueError("some error")
    return "a string"
"""


@pytest.fixture(scope="module")
def nuclio_fns(stack: Stack) -> Stack:
    stack.deploy("evt", {"function.yaml": function_yaml("evt"), "main.py": EVENT_RETURNER})
    stack.deploy("outputter", {"function.yaml": function_yaml("outputter"), "main.py": OUTPUTTER})
    return stack


def test_event_as_nuclio_gives_it(nuclio_fns: Stack) -> None:
    s = nuclio_fns
    headers = {"Testheaderkey1": "testHeaderValue1", "X-Mixed-Case": "v"}
    before = datetime.now(timezone.utc).replace(tzinfo=None)
    r = s.anon.post("/evt/path/to/nowhere?x=1&y=2", content=b"testBody", headers=headers)
    assert r.status_code == 200, r.text
    doc = json.loads(r.text)
    assert str(uuid.UUID(doc["id"])) == doc["id"], "event.id is a UUID string"
    assert doc["call_id"] == r.headers["x-call-id"] and doc["id"] != doc["call_id"]
    assert doc["path"] == "/path/to/nowhere" and doc["url"] == "/path/to/nowhere?x=1&y=2"
    assert doc["method"] == "POST" and doc["body"] == "testBody" and doc["trigger"] == "http"
    assert doc["headers"]["Testheaderkey1"] == "testHeaderValue1", "header names keep the caller's case"
    assert doc["headers"]["X-Mixed-Case"] == "v" and "x-mixed-case" not in doc["headers"]
    assert doc["lookup"] == "testHeaderValue1", "lookups ignore case"
    stamp = datetime.fromisoformat(doc["timestamp"].removesuffix("Z"))  # naive UTC, as nuclio's SDK makes it
    assert stamp.tzinfo is None and abs(stamp - before) < timedelta(minutes=1)
    # the function's own root, and the same below /functions/{name}/invoke with any method
    assert json.loads(s.anon.post("/evt", content=b"x").text)["path"] == "/"
    doc = json.loads(s.anon.get("/functions/evt/invoke/a/b", params={"q": "1"}).text)
    assert (doc["path"], doc["url"], doc["method"]) == ("/a/b", "/a/b?q=1", "GET")
    # retries of one call keep their event id; another call gets another
    assert json.loads(s.anon.post("/evt", content=b"x").text)["id"] != json.loads(
        s.anon.post("/evt", content=b"x").text)["id"]


def test_response_content_types_as_nuclio_sets_them(nuclio_fns: Stack) -> None:
    s = nuclio_fns
    r = s.invoke("outputter", b"string")
    assert (r.status_code, r.headers["content-type"], r.text) == (200, "text/plain", "a string")
    r = s.invoke("outputter", b"status_and_string")
    assert (r.status_code, r.headers["content-type"], r.text) == (201, "text/plain", "a string after status")
    r = s.invoke("outputter", b"dict")
    assert (r.headers["content-type"], r.json()) == ("application/json", {"a": "dict", "b": "foo"})
    assert s.invoke("outputter", b"list").headers["content-type"] == "application/json"
    r = s.invoke("outputter", b"raise")
    assert (r.status_code, r.headers["content-type"]) == (500, "text/plain") and "some error" in r.text


MiB = 1024 * 1024
SIZE = "def handler(context, event):\n    return str(len(event.raw_body))\n"


def _http_trigger(size: object) -> dict:
    return {"triggers": {"web": {"kind": "http", "attributes": {"maxRequestBodySize": size}}}}


def test_max_request_body_size_is_honoured_up_to_the_platform_ceiling(stack: Stack) -> None:
    stack.deploy("bigbody", {"function.yaml": function_yaml("bigbody", **_http_trigger(10 * MiB)), "main.py": SIZE})
    stack.deploy("smallbody", {"function.yaml": function_yaml("smallbody"), "main.py": SIZE})
    r = stack.invoke("bigbody", b"x" * (8 * MiB))
    assert (r.status_code, r.text) == (200, str(8 * MiB)), r.text[:300]
    async_call = stack.anon.post("/bigbody", content=b"y" * (8 * MiB), headers={"X-Nuclide-Async": "true"})
    assert async_call.status_code == 202, async_call.text[:300]
    r = stack.invoke("bigbody", b"x" * (10 * MiB + 1))
    assert r.status_code == 413
    message = r.json()["error"]["message"]
    assert "10485760 byte limit of function 'bigbody'" in message and "maxRequestBodySize" in message
    assert "max_body_ceiling_bytes" in message, "the 413 names the platform ceiling"
    # without the attribute: the platform's default, and how to raise it
    r = stack.invoke("smallbody", b"x" * (7 * MiB))
    assert r.status_code == 413
    message = r.json()["error"]["message"]
    assert "max_body_bytes" in message and "maxRequestBodySize" in message and "max_body_ceiling_bytes" in message


@pytest.mark.parametrize("size,expected", [
    (1024 * MiB, "over the platform's ceiling"),
    ("8Mi", "positive integer"),
    (0, "positive integer"),
    (True, "positive integer"),
])
def test_a_bad_max_request_body_size_fails_the_deploy(stack: Stack, size: object, expected: str) -> None:
    r = stack.client.put("/badbody", files={"zip_file": ("t.zip", make_zip(
        {"function.yaml": function_yaml("badbody", **_http_trigger(size)), "main.py": SIZE}), "application/zip")})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "spec.triggers.web.attributes.maxRequestBodySize" in message and expected in message, message


def call_function_checks(stack: Stack, caller: str, callee: str, fused: bool) -> None:
    """nuclio's call_function test, and its error answers, between two functions (fused into one group or not)."""
    stack.deploy(callee, {"function.yaml": function_yaml(callee), "main.py": NUCLIO_CALLEE})
    stack.deploy(caller, {"function.yaml": function_yaml(caller), "main.py": NUCLIO_CALLER})
    if fused:
        r = stack.client.put("/groups?wait=true", json=[[caller, callee]])
        assert r.status_code == 200, r.text
    r = stack.anon.post(f"/{caller}", json={"callee_name": callee})
    assert r.status_code == 201, r.text
    assert r.headers["x-callee-received-header"] == "caller_header"
    assert r.json() == {"callee_received_body": "caller_body", "callee_received_header": "caller_header",
                        "callee_received_method": "PUT", "callee_received_path": "/caller/path"}
    # an error answer comes back as a Response too (nuclio's call_function does not raise)
    r = stack.anon.post(f"/{caller}", json={"callee_name": callee, "fail": True})
    assert r.status_code == 500 and "callee failed on purpose" in r.text
    r = stack.anon.post(f"/{caller}", json={"callee_name": "no-such-function"})
    assert r.status_code == 404 and "function 'no-such-function' not found" in r.text


@pytest.mark.parametrize("fused", [False, True])
def test_platform_call_function_as_in_nuclio(stack: Stack, fused: bool) -> None:
    call_function_checks(stack, f"cf-caller-{int(fused)}", f"cf-callee-{int(fused)}", fused)


LAMBDA = """
import base64
import json

def handler(event, context):
    if isinstance(event, dict) and event.get("want") == "response":
        return {"statusCode": 201, "headers": {"X-From": "lambda", "Content-Type": "text/plain"}, "body": "made",
                "cookies": ["a=1", "b=2"]}
    if isinstance(event, dict) and event.get("want") == "binary":
        return {"statusCode": 200, "headers": {"content-type": "image/png"},
                "body": base64.b64encode(b"\\x89PNG").decode(), "isBase64Encoded": True}
    if isinstance(event, dict) and event.get("want") == "string":
        return "just a string"
    return {"event": json.loads(json.dumps(event)), "function_name": context.function_name,
            "request_id": context.aws_request_id, "left_ms": context.get_remaining_time_in_millis(),
            "memory_mb": context.memory_limit_in_mb}
"""


@pytest.fixture(scope="module")
def lambda_fns(stack: Stack) -> Stack:
    spec = {"resources": {"limits": {"memory": "128Mi"}}, "timeout": "20s"}
    stack.deploy("lam", {"function.yaml": function_yaml("lam", **spec), "main.py": LAMBDA})
    stack.deploy("lam-http", {"function.yaml": function_yaml("lam-http", lambdaEvent="apigateway"), "main.py": LAMBDA})
    return stack


def test_lambda_handler_gets_the_json_payload_and_a_lambda_context(lambda_fns: Stack) -> None:
    r = lambda_fns.anon.post("/lam", json={"a": 1, "b": [True, None]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["event"] == {"a": 1, "b": [True, None]}, "the decoded body, as aws lambda invoke --payload gives it"
    assert out["function_name"] == "lam" and str(uuid.UUID(out["request_id"])) == out["request_id"]
    assert 0 < out["left_ms"] <= 20_000 and out["memory_mb"] == 128


def test_lambda_handler_gets_api_gateway_http_events_for_other_requests(lambda_fns: Stack) -> None:
    s = lambda_fns
    r = s.anon.post("/lam/orders/7?x=1&x=2&y=", content=b"hello", headers={"X-Trace": "t1", "Cookie": "c=1; d=2"})
    assert r.status_code == 200, r.text
    event = r.json()["event"]
    assert event["version"] == "2.0" and event["routeKey"] == "$default"
    assert event["rawPath"] == "/orders/7" and event["rawQueryString"] == "x=1&x=2&y="
    assert event["queryStringParameters"] == {"x": "1,2", "y": ""}
    assert event["headers"]["x-trace"] == "t1" and event["cookies"] == ["c=1", "d=2"]
    assert event["body"] == "hello" and event["isBase64Encoded"] is False
    assert event["requestContext"]["http"]["method"] == "POST"
    assert event["requestContext"]["http"]["path"] == "/orders/7"
    binary = s.anon.post("/lam", content=b"\xff\x00", headers={"Content-Type": "application/octet-stream"})
    event = binary.json()["event"]
    assert event["isBase64Encoded"] is True and event["body"] == "/wA="
    event = s.anon.get("/functions/lam/invoke").json()["event"]
    assert event["requestContext"]["http"]["method"] == "GET" and "body" not in event
    # chosen per function: spec.lambdaEvent apigateway gives the HTTP shape even for a JSON body
    event = s.anon.post("/lam-http", json={"a": 1}).json()["event"]
    assert json.loads(event["body"]) == {"a": 1} and event["headers"]["content-type"] == "application/json"


def test_lambda_results_map_to_http_as_api_gateway_does(lambda_fns: Stack) -> None:
    s = lambda_fns
    r = s.anon.post("/lam", json={"want": "response"})
    assert (r.status_code, r.text, r.headers["content-type"], r.headers["x-from"]) == (201, "made", "text/plain", "lambda")
    assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]
    r = s.anon.post("/lam", json={"want": "binary"})
    assert (r.status_code, r.content, r.headers["content-type"]) == (200, b"\x89PNG", "image/png")
    r = s.anon.post("/lam", json={"want": "string"})
    assert (r.headers["content-type"], r.json()) == ("application/json", "just a string"), "any other value is JSON"


def test_service_faas_add_function_as_its_api_gives_it(stack: Stack) -> None:
    source = b"def handle(payload: str):\n    return payload.upper()\n"
    r = stack.client.post("/functions", files={"python_file": ("handler.py", source)})
    assert r.status_code == 400, r.text
    assert "function_name" in r.json()["error"]["message"], "the missing field is named"
    r = stack.client.post("/functions", files={"python_file": ("handler.py", source)}, data={"function_name": "handle"})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["function_name"] == "handle" and created["status"] == "running" and created["id"]
    r = stack.anon.post(f"/functions/{created['id']}/execute", json={"payload": "shout"})
    assert r.json() == {"result": "SHOUT"}
    r = stack.client.post("/functions", files={"python_file": ("handler.py", source)}, data={"function_name": "handle"},
                          headers={"X-Nuclide-Async": "true"})
    assert r.status_code == 202 and r.json()["status"] == "creating" and r.json()["function_name"] == "handle"


def _curl(*args: str) -> str:
    import subprocess

    return subprocess.run(["curl", "-s", *args], capture_output=True, text=True, timeout=60, check=True).stdout


def _zip_dir(tmp: Path, name: str, files: dict[str, str]) -> Path:
    path = tmp / f"{name}.zip"
    path.write_bytes(make_zip(files))
    return path


@pytest.fixture
def fusionizer_stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path / "var", env={"NUCLIDE_FUSIONIZER_MODE": "true"})
    try:
        yield s.start()
    finally:
        s.stop()


def test_fusionizer_scripts_run_unchanged_in_fusionizer_mode(fusionizer_stack: Stack, tmp_path: Path) -> None:
    """What the Fusionizer's tests/run_tests and bench/run_bench do, with curl and no token."""
    s = fusionizer_stack
    url = s.url
    health = s.anon.get("/healthz").json()
    assert health["fusionizer_mode"] is True and "no token" in health["warning"]
    assert "FUSIONIZER MODE" in s.service_log("gateway")
    task_a = TASK_A.replace("/TaskB", "/taskb")
    for name, code in (("taska", task_a), ("taskb", TASK_B)):
        archive = _zip_dir(tmp_path, name, {"function.yaml": function_yaml(name), "main.py": code})
        out = _curl("-X", "PUT", f"{url}/{name}", "-H", "Content-Type: multipart/form-data",
                    "-F", f"zip_file=@{archive}", "-w", "\n%{http_code}")
        assert out == f"Successfully deployed Task '{name}'\n200", out
    info = _curl(f"{url}/taska")
    assert info == (f"Task 'taska':\nCurrently deployed with other Tasks: None\nStatus: ready\n"
                    f"HTTP port: {s.http_port}"), info
    assert _curl("-X", "PUT", f"{url}/groups?wait=true", "-d", '[["taska", "taskb"]]', "-w", "%{http_code}"
                 ).endswith("200"), "the control API takes calls without a token"
    info = wait_for(lambda: (t := _curl(f"{url}/taska")) and "Currently deployed with other Tasks: None" not in t
                    and t, 30, what="taska to be fused")
    assert "Currently deployed with other Tasks: ['taska', 'taskb']" in info
    assert _curl("-X", "POST", f"{url}/taska") == "8"
    # failures answer as the Fusionizer does: 422 and the reason as text
    broken = _zip_dir(tmp_path, "broken", {"function.yaml": function_yaml("broken"), "main.py": "def handler(:\n"})
    out = _curl("-X", "PUT", f"{url}/broken", "-F", f"zip_file=@{broken}", "-w", "\n%{http_code}")
    assert out.endswith("\n422") and "invalid syntax" in out and not out.startswith("{"), out
    assert _curl("-X", "POST", f"{url}/taskb", "-w", "\n%{http_code}").endswith("\n422"), "a task that fails"
    assert _curl(f"{url}/nothere", "-w", "\n%{http_code}") == "No Task 'nothere' could be found\n422"
    assert _curl("-X", "DELETE", f"{url}/taska", "-w", "\n%{http_code}") == "Successfully deleted Task 'taska'\n200"
    later = _zip_dir(tmp_path, "later", {"function.yaml": function_yaml("later"), "main.py": TASK_B})
    out = _curl("-X", "PUT", f"{url}/later?async=true", "-F", f"zip_file=@{later}", "-w", "\n%{http_code}")
    assert out == "Deploying Task 'later'\n202", out
    # JSON for a client that asks for it
    assert s.anon.get("/taskb", headers={"Accept": "application/json"}).json()["name"] == "taskb"


def test_plain_text_answers_for_clients_that_ask_outside_fusionizer_mode(stack: Stack) -> None:
    stack.deploy("plain", {"function.yaml": function_yaml("plain"), "main.py": TASK_B})
    text = stack.client.get("/plain", headers={"Accept": "text/plain"})
    assert text.headers["content-type"].startswith("text/plain")
    assert text.text.startswith("Task 'plain':\nCurrently deployed with other Tasks: None\nStatus: ready")
    assert stack.client.get("/plain").json()["name"] == "plain", "JSON stays the default (curl's */* included)"
    assert stack.anon.get("/plain", headers={"Accept": "text/plain"}).status_code == 401, "the token is still needed"
    failed = stack.anon.post("/plain", json={}, headers={"Accept": "text/plain"})
    assert failed.status_code == 422 and failed.headers["content-type"].startswith("text/plain"), failed.text
    assert "value1" in failed.text
    assert stack.anon.post("/plain", json={}).status_code == 500, "other clients see the function's own status"


CRON_ECHO = """
def handler(context, event):
    return {"body": event.body.decode(), "source": event.headers.get("x-source"), "trigger": event.headers.get(
        "x-nuclide-trigger")}
"""


def test_cron_trigger_in_nuclio_shape(stack: Stack) -> None:
    trigger = {"kind": "cron", "attributes": {"schedule": "*/1 * * * * ?", "timezone": "Asia/Tokyo",
                                              "event": {"body": "tick", "headers": {"X-Source": "cron"}}}}
    stack.deploy("nuclio-cron", {"function.yaml": function_yaml("nuclio-cron", triggers={"every-second": trigger}),
                                 "main.py": CRON_ECHO})
    try:
        def done() -> list:
            calls = stack.client.get("/calls", params={"function": "nuclio-cron", "status": "DONE"}).json()
            return len(calls) >= 2 and calls

        calls = wait_for(done, 15, what="two cron calls")
        result = stack.client.get(f"/calls/{calls[0]['id']}").json()
        assert calls[0]["source"] == "cron"
        assert result["result"] == {"body": "tick", "source": "cron", "trigger": "every-second"}
    finally:
        stack.client.delete("/nuclio-cron")
    bad = {"kind": "cron", "attributes": {"schedule": "0 9 * * *", "timezone": "Mars/Olympus"}}
    r = stack.client.put("/badtz", files={"zip_file": ("t.zip", make_zip(
        {"function.yaml": function_yaml("badtz", triggers={"t": bad}), "main.py": CRON_ECHO}), "application/zip")})
    assert r.status_code == 400 and "unknown time zone 'Mars/Olympus'" in r.json()["error"]["message"]


PY_VERSION = "def handler(context, event):\n    import sys\n    return '%d.%d' % sys.version_info[:2]\n"
HOST_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def test_another_python_3_falls_back_to_the_platforms_with_a_warning(stack: Stack) -> None:
    missing = "3.4"  # no host of ours has it, nor could it run the runtime
    r = stack.deploy("oldpy", {"function.yaml": function_yaml("oldpy", runtime=f"python:{missing}"), "main.py": PY_VERSION})
    desc = r.json()
    assert desc["runtime"] == f"python:{HOST_PYTHON}"
    [warning] = [w for w in desc["warnings"] if "spec.runtime" in w]
    assert f"python:{missing}" in warning and f"python:{HOST_PYTHON}" in warning, warning
    assert stack.invoke("oldpy").text == HOST_PYTHON
    r = stack.client.put("/py2", files={"zip_file": ("t.zip", make_zip(
        {"function.yaml": function_yaml("py2", runtime="python:2.7"), "main.py": PY_VERSION}), "application/zip")})
    assert r.status_code == 400 and "Python 2" in r.json()["error"]["message"]


def _other_python() -> str | None:
    """A python3.X on this host, other than the platform's, that can import nuclide's runtime."""
    import shutil
    import subprocess

    from tests.stack import ROOT

    for minor in range(8, 20):
        version = f"3.{minor}"
        path = shutil.which(f"python{version}")
        if version == HOST_PYTHON or path is None:
            continue
        probe = subprocess.run([path, "-c", "import zmq, msgpack, services.runtime.loop"], cwd=ROOT,
                               env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True)
        if probe.returncode == 0:
            return version
    return None


def test_another_python_3_runs_on_that_interpreter_when_the_host_has_it(stack: Stack) -> None:
    version = _other_python()
    if version is None:
        pytest.skip(f"no python3.X other than {HOST_PYTHON} on this host that can import zmq, msgpack and nuclide's"
                    " runtime (install e.g. python3.12 with pyzmq and msgpack to run this test)")
    r = stack.deploy("otherpy", {"function.yaml": function_yaml("otherpy", runtime=f"python:{version}"),
                                 "main.py": PY_VERSION})
    assert r.json()["runtime"] == f"python:{version}" and not [w for w in r.json()["warnings"] if "spec.runtime" in w]
    assert stack.invoke("otherpy").text == version


def test_another_python_3_starts_on_the_interpreter_the_host_names(tmp_path: Path) -> None:
    """The exact-interpreter path with a stand-in: python3.97 on the deployer's PATH is a script that marks
    the process and runs this venv's Python, so the test sees the instance (and its build) start on it."""
    import shutil
    import tempfile

    # outside /tmp, which the sandbox gives each build and instance a private one of
    bin_dir = Path(tempfile.mkdtemp(prefix="nuclide-test-bin-", dir="/var/tmp"))
    stand_in = bin_dir / "python3.97"
    stand_in.write_text(f"#!/bin/sh\nexport STAND_IN=python3.97\nexec {sys.executable} \"$@\"\n")
    stand_in.chmod(0o755)
    s = Stack(tmp_path / "var", env={"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"})
    try:
        s.start()
        code = "import os, marker\n\ndef handler(context, event):\n    return os.environ.get('STAND_IN', '') + ':' + marker.BUILT_BY\n"
        build = {"commands": ["python -c \"import os; open(os.environ['PIP_TARGET'] + '/marker.py', 'w')"
                              ".write('BUILT_BY = %r' % os.environ.get('STAND_IN'))\""]}
        r = s.deploy("standin", {"function.yaml": function_yaml("standin", runtime="python:3.97", build=build),
                                 "main.py": code})
        assert r.json()["runtime"] == "python:3.97", r.json()["warnings"]
        assert s.invoke("standin").text == "python3.97:python3.97"
        # a task on the platform's Python is not fused with it
        s.deploy("hostpy", {"function.yaml": function_yaml("hostpy"), "main.py": PY_VERSION})
        r = s.client.put("/groups", json=[["standin", "hostpy"]])
        assert r.status_code == 409 and "different Pythons" in r.json()["error"]["message"]
    finally:
        s.stop()
        shutil.rmtree(bin_dir, ignore_errors=True)


def test_a_body_over_the_upload_limits_but_within_the_ceiling_crosses_every_socket(tmp_path: Path) -> None:
    """Services drop a ZeroMQ peer whose frame is over the limits; a function's maxRequestBodySize is one."""
    limits = {"NUCLIDE_MAX_ZIP_BYTES": str(MiB), "NUCLIDE_MAX_BODY_BYTES": str(MiB),
              "NUCLIDE_MAX_BODY_CEILING_BYTES": str(4 * MiB)}
    s = Stack(tmp_path / "var", env=limits)
    try:
        s.start()
        s.deploy("wide", {"function.yaml": function_yaml("wide", **_http_trigger(3 * MiB)), "main.py": SIZE})
        assert s.invoke("wide", b"x" * (2 * MiB)).text == str(2 * MiB)
        r = s.anon.post("/wide", content=b"y" * (2 * MiB), headers={"X-Nuclide-Async": "true"})
        assert r.status_code == 202, r.text
        call_id = r.json()["call_id"]
        done = wait_for(lambda: (c := s.client.get(f"/calls/{call_id}").json())["status"] in ("DONE", "FAILED") and c,
                        30, what="the async call to finish")
        assert done["status"] == "DONE" and done["result"] == str(2 * MiB), done
    finally:
        s.stop()
