"""Deploy real functions on a real stack and invoke them over HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tests.stack import ROOT, Stack, function_yaml, make_zip, wait_for
from tests.tasks import TASK_A, TASK_B
from tests.wheels import make_wheel, wheel_dir

pytestmark = pytest.mark.integration

ECHO = """
def handler(context, event):
    context.logger.info("echo called", size=len(event.raw_body))
    body = event.body.decode() if isinstance(event.body, bytes) else event.body
    return {"body": body, "method": event.method, "path": event.path,
            "fields": event.fields, "ctype": event.content_type,
            "hdr": event.headers.get("X-Test"), "fusionizer": event.headers["Fusionizer-Server-Address"]}
"""


def test_deploy_describe_invoke_delete(stack: Stack) -> None:
    resp = stack.deploy("echo", {"function.yaml": function_yaml("echo", description="says it back"), "main.py": ECHO})
    desc = resp.json()
    assert desc["name"] == "echo" and desc["state"] == "ready" and desc["version"] == 1
    assert desc["replicas"] == {"desired": 1, "ready": 1}
    assert desc["handler"] == "main:handler" and desc["runtime"].startswith("python:3.")
    assert desc["group"]["tasks"] == ["echo"] and desc["description"] == "says it back"

    r = stack.anon.post("/echo?x=1&y=two", json={"a": 1}, headers={"X-Test": "yes"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-call-id"]
    out = r.json()
    assert out["body"] == {"a": 1} and out["method"] == "POST" and out["path"] == "/"
    assert out["fields"] == {"x": "1", "y": "two"} and out["hdr"] == "yes"
    assert out["fusionizer"] == "127.0.0.1"

    # the same operations under /functions
    assert stack.client.get("/functions/echo").json()["version"] == 1
    assert any(f["name"] == "echo" for f in stack.client.get("/functions").json())
    r2 = stack.anon.post("/functions/echo/invoke", content=b"raw bytes")
    assert r2.json()["body"] == "raw bytes"

    logs = stack.client.get("/functions/echo/logs").text
    assert "echo called" in logs and r.headers["x-call-id"] in logs

    assert stack.client.delete("/echo").status_code == 204
    assert stack.client.get("/echo").status_code == 404
    gone = stack.invoke("echo", b"x")
    assert gone.status_code == 404 and "function 'echo' not found" in gone.json()["error"]["message"]
    wait_for(lambda: not any("g-echo-" in p for p in _instance_dirs(stack)), 15, what="echo's instance to stop")


def _instance_dirs(stack: Stack) -> list[str]:
    d = stack.var_dir / "instances"
    return [p.name for p in d.iterdir()] if d.exists() else []


def test_raw_zip_body_and_redeploy(stack: Stack) -> None:
    v1 = make_zip({"function.yaml": function_yaml("redeploy"), "main.py": "def handler(context, event):\n    return 'one'\n"})
    r = stack.client.put("/functions/redeploy", content=v1, headers={"content-type": "application/zip"})
    assert r.status_code == 200, r.text
    assert stack.invoke("redeploy").text == "one"

    stop = threading.Event()
    results: list[int] = []

    def hammer() -> None:
        import httpx

        with httpx.Client(base_url=stack.url, timeout=30) as c:
            while not stop.is_set():
                results.append(c.post("/redeploy").status_code)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        wait_for(lambda: len(results) > 20, 10, what="calls before the redeploy")
        r = stack.deploy("redeploy", {"function.yaml": function_yaml("redeploy"),
                                      "main.py": "def handler(context, event):\n    return 'two'\n"})
        assert r.json()["version"] == 2
        wait_for(lambda: stack.invoke("redeploy").text == "two", 10, what="version 2 to serve")
        n = len(results)
        wait_for(lambda: len(results) > n + 20, 10, what="calls after the redeploy")
    finally:
        stop.set()
        t.join()
    assert results and set(results) == {200}, f"failed calls during redeploy: {[s for s in results if s != 200][:5]}"


def test_handler_forms_and_return_mapping(stack: Stack) -> None:
    code = """
import asyncio

COUNT = {"init": 0}

def init_context(context):
    COUNT["init"] += 1
    context.user_data.greeting = "hi"

def nuclio(context, event):
    return context.user_data.greeting + " " + str(COUNT["init"])

def lam(event, context):
    return {"lambda": event}

def handle(payload: str):
    return payload.upper()

async def coro(context, event):
    await asyncio.sleep(0)
    return ("201", "bad")  if False else (201, {"created": True})

def text(context, event):
    return "plain"

def raw(context, event):
    return b"\\x00\\x01"

def resp(context, event):
    return context.Response(body="teapot", headers={"X-Extra": "1"}, content_type="text/x-tea", status_code=418)

def boom(context, event):
    raise ValueError("bad input: value1 is missing")
"""
    for name, handler in [("f-nuclio", "nuclio"), ("f-lambda", "lam"), ("f-payload", "handle"), ("f-async", "coro"),
                          ("f-text", "text"), ("f-raw", "raw"), ("f-resp", "resp"), ("f-boom", "boom")]:
        stack.deploy(name, {"function.yaml": function_yaml(name, f"funcs:{handler}"), "funcs.py": code})
    assert stack.invoke("f-nuclio").text == "hi 1"
    assert stack.invoke("f-nuclio").text == "hi 1", "init_context must run once per instance"
    assert stack.invoke("f-lambda", {"k": 2}).json() == {"lambda": {"k": 2}}
    assert stack.invoke("f-payload", b"shout").text == "SHOUT"
    r = stack.invoke("f-async")
    assert r.status_code == 201 and r.json() == {"created": True}
    r = stack.invoke("f-text")
    assert r.text == "plain" and r.headers["content-type"].startswith("text/plain")
    r = stack.invoke("f-raw")
    assert r.content == b"\x00\x01" and r.headers["content-type"] == "application/octet-stream"
    r = stack.invoke("f-resp")
    assert r.status_code == 418 and r.text == "teapot" and r.headers["x-extra"] == "1"
    assert r.headers["content-type"] == "text/x-tea"
    r = stack.invoke("f-boom")
    assert r.status_code == 500 and "bad input: value1 is missing" in r.text
    assert "Traceback" not in r.text
    assert "Traceback" in stack.client.get("/functions/f-boom/logs").text


def test_single_file_deploy_service_faas_style(stack: Stack) -> None:
    source = b"""
import json

def handle(payload: str):
    try:
        return {"processed_data": json.loads(payload), "status": "processed_as_json"}
    except json.JSONDecodeError:
        return {"original_data": payload, "status": "processed_as_string"}
"""
    r = stack.client.post("/functions", files={"python_file": ("handler.py", source)}, data={"function_name": "handle"})
    assert r.status_code == 201, r.text
    fid = r.json()["id"]
    r = stack.anon.post(f"/functions/{fid}/execute", json={"payload": '{"key": "some value"}'})
    assert r.status_code == 200, r.text
    assert r.json() == {"result": {"processed_data": {"key": "some value"}, "status": "processed_as_json"}}
    r = stack.anon.post(f"/functions/{fid}/execute", json={"payload": "plain"})
    assert r.json()["result"]["status"] == "processed_as_string"
    assert fid in [f["id"] for f in stack.client.get("/functions").json()]
    bad = stack.anon.post(f"/functions/{fid}/execute", content=b"not json")
    assert bad.status_code == 400 and "payload" in bad.json()["error"]["message"]
    assert stack.client.delete(f"/functions/{fid}").status_code == 204
    assert stack.anon.post(f"/functions/{fid}/execute", json={"payload": "x"}).status_code == 404


def test_zip_without_function_yaml(stack: Stack) -> None:
    stack.deploy("noyaml", {"app.py": "def handler(context, event):\n    return 'inferred'\n"})
    assert stack.invoke("noyaml").text == "inferred"


def test_requirements_installed_from_the_package_index(stack: Stack) -> None:
    code = "import tabulate\n\ndef handler(context, event):\n    return tabulate.tabulate([[1, 2]], tablefmt='plain')\n"
    r = stack.deploy("withdeps", {"function.yaml": function_yaml("withdeps"), "main.py": code,
                                  "requirements.txt": "tabulate==0.9.0\n"})
    assert r.json()["state"] == "ready"
    assert stack.invoke("withdeps").text.split() == ["1", "2"]


@pytest.fixture(scope="module")
def wheels() -> Iterator[Path]:
    """A local wheel directory with nuclidetiny 1.0 and 2.0 (each answers its version)."""
    path = wheel_dir()
    for version in ("1.0", "2.0"):
        make_wheel(path, "nuclidetiny", version, f"VERSION = {version!r}\n")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


TINY = "import nuclidetiny\n\ndef handler(context, event):\n    return nuclidetiny.VERSION\n"


def test_requirements_installed_from_the_operators_wheel_directory(tmp_path: Path, wheels: Path) -> None:
    # an upload may not name where packages come from (no direct URLs); the operator's pip settings may,
    # and the directories they name are in the builds' view
    stack = Stack(tmp_path / "var", {"PIP_FIND_LINKS": str(wheels), "PIP_NO_INDEX": "1"}).start()
    try:
        stack.deploy("tinyreq", {"function.yaml": function_yaml("tinyreq"), "main.py": TINY,
                                 "requirements.txt": "nuclidetiny==1.0\n"})
        assert stack.invoke("tinyreq").text == "1.0"
        build = {"commands": [f"pip install --no-index --find-links {wheels} nuclidetiny==2.0"]}
        stack.deploy("tinybuild", {"function.yaml": function_yaml("tinybuild", build=build), "main.py": TINY})
        assert stack.invoke("tinybuild").text == "2.0"
    finally:
        stack.stop()


def test_a_build_sees_no_host_directory_the_operator_did_not_name(stack: Stack, wheels: Path,
                                                                   require_bwrap: None) -> None:
    build = {"commands": [f"pip install --no-index --find-links {wheels} nuclidetiny==2.0"]}
    resp = stack.deploy("tinyhost", {"function.yaml": function_yaml("tinyhost", build=build), "main.py": TINY},
                        expect=422)
    assert "is either a non-existing path" in resp.json()["error"]["details"]["log_tail"], resp.text[:2000]


def test_fusionizer_task_pair_through_the_gateway(stack: Stack) -> None:
    stack.deploy("TaskB", {"function.yaml": function_yaml("TaskB"), "main.py": TASK_B})
    stack.deploy("TaskA", {"function.yaml": function_yaml("TaskA"), "main.py": TASK_A})
    r = stack.invoke("TaskA", {})
    assert r.status_code == 200, r.text
    assert r.json() == 8
    assert stack.invoke("TaskB", {"value1": 4, "value2": 8}).json() == 12


def test_env_from_spec(stack: Stack) -> None:
    code = "import os\n\ndef handler(context, event):\n    return os.environ.get('GREETING', '') + '|' + os.environ.get('NUCLIDE_TOKEN', 'none')\n"
    stack.deploy("envfn", {"function.yaml": function_yaml("envfn", env=[{"name": "GREETING", "value": "hola"}]),
                           "main.py": code})
    assert stack.invoke("envfn").text == "hola|none", "spec env applies and nuclide's own secrets do not leak"


def test_private_function_needs_the_token(stack: Stack) -> None:
    code = "def handler(context, event):\n    return 'classified ' + str(event.get_header('Authorization'))\n"
    stack.deploy("secret", {"function.yaml": function_yaml("secret", private=True), "main.py": code})
    assert stack.invoke("secret").status_code == 401
    assert stack.anon.post("/secret", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = stack.client.post("/secret")
    assert r.status_code == 200
    assert r.text == "classified None", "the caller's token must never reach the function"


def test_any_method_through_the_invoke_route(stack: Stack) -> None:
    code = "def handler(context, event):\n    return event.method\n"
    stack.deploy("methods", {"function.yaml": function_yaml("methods"), "main.py": code})
    for method in ("GET", "PUT", "DELETE", "PATCH", "POST"):
        r = stack.anon.request(method, "/functions/methods/invoke")
        assert r.status_code == 200 and r.text == method
    # GET /{name} stays the control plane (describe), as in the Fusionizer
    assert stack.client.get("/methods").json()["name"] == "methods"


def test_healthz_is_public_and_reports_parts(stack: Stack) -> None:
    r = stack.anon.get("/healthz")
    assert r.status_code == 200
    assert r.json()["store"] is True and r.json()["deployer"] is True
    assert stack.anon.get("/openapi.json").status_code == 200


def test_crashing_instance_is_restarted_then_marked_failed(stack: Stack) -> None:
    code = """
import os

def handler(context, event):
    if event.body == b"crash":
        print("about to crash", flush=True)
        os._exit(7)
    return "alive"
"""
    stack.deploy("crashy", {"function.yaml": function_yaml("crashy"), "main.py": code})
    r = stack.invoke("crashy", b"crash")
    assert r.status_code == 502 and "crashy" in r.json()["error"]["message"]
    wait_for(lambda: stack.invoke("crashy", b"ok").text == "alive", 20, what="a replacement instance")
    def live_or_failed() -> str | None:
        if stack.client.get("/crashy").json()["state"] == "failed":
            return "failed"
        # a call that meets the instance just crashed fails without a crash of its own: ask again
        return "live" if stack.invoke("crashy", b"ok").text == "alive" else None

    for _ in range(3):
        if wait_for(live_or_failed, 20, what="an instance to be back") == "failed":
            break
        stack.invoke("crashy", b"crash")
    desc = wait_for(lambda: (d := stack.client.get("/crashy").json())["state"] == "failed" and d, 30,
                    what="the function to be marked failed")
    assert "about to crash" in desc["last_error"] and "crash" in desc["last_error"]
    # it keeps being restarted with backoff and recovers
    wait_for(lambda: stack.invoke("crashy", b"ok").text == "alive", 40, what="recovery after backoff")
    assert json.loads(stack.client.get("/crashy").text)["state"] == "ready"


def test_memory_limit_is_enforced_and_named(stack: Stack) -> None:
    code = """
def handler(context, event):
    size = int(event.body or b"1")
    block = bytearray(size * 1024 * 1024)
    return str(len(block) // (1024 * 1024))
"""
    stack.deploy("hungry", {"function.yaml": function_yaml("hungry", resources={"limits": {"memory": "128Mi"}}),
                            "main.py": code})
    assert stack.invoke("hungry", b"8").text == "8"
    r = stack.invoke("hungry", b"512")
    assert r.status_code == 500
    assert "128 MiB" in r.json()["error"]["message"] and "hungry" in r.json()["error"]["message"]
    assert stack.invoke("hungry", b"8").text == "8", "the instance keeps serving after a refused allocation"


def test_build_commands_and_replicas(stack: Stack) -> None:
    code = """
import uuid

INSTANCE = uuid.uuid4().hex

def handler(context, event):
    import marker
    return marker.VALUE + ":" + INSTANCE
"""
    spec = {"build": {"commands": ["mkdir -p $PIP_TARGET && echo 'VALUE = \"built\"' > $PIP_TARGET/marker.py"]},
            "minReplicas": 2, "maxReplicas": 2}
    r = stack.deploy("replicated", {"function.yaml": function_yaml("replicated", **spec), "main.py": code})
    assert r.json()["replicas"]["desired"] == 2
    wait_for(lambda: stack.client.get("/replicated").json()["replicas"]["ready"] == 2, 20, what="two ready replicas")
    seen = {stack.invoke("replicated").text for _ in range(40)}
    assert all(v.startswith("built:") for v in seen)
    assert len(seen) == 2, f"calls should spread over both replicas, saw {seen}"


def test_delete_then_redeploy_serves_the_new_code(stack: Stack) -> None:
    stack.deploy("reborn", {"function.yaml": function_yaml("reborn"), "main.py": "def handler(context, event):\n    return 'old'\n"})
    assert stack.invoke("reborn").text == "old"
    assert stack.client.delete("/reborn").status_code == 204
    stack.deploy("reborn", {"function.yaml": function_yaml("reborn"), "main.py": "def handler(context, event):\n    return 'new'\n"})
    assert stack.invoke("reborn").text == "new"


# Each call waits (up to WAIT_S) for more calls to run beside it than the cap allows, then answers the
# most it saw at once: under a cap of N that is exactly N when enough calls are sent, and never more.
OVERLAP = """
import os, threading, time

lock = threading.Lock()
active = peak = 0
BEYOND = int(os.environ["BEYOND"])
WAIT_S = float(os.environ["WAIT_S"])

def handler(context, event):
    global active, peak
    with lock:
        active += 1
        peak = max(peak, active)
    deadline = time.monotonic() + WAIT_S
    while active < BEYOND and time.monotonic() < deadline:
        time.sleep(0.01)
    with lock:
        seen = peak
        active -= 1
    return str(seen)
"""


def _peak_of(stack: Stack, name: str, calls: int) -> int:
    with concurrent.futures.ThreadPoolExecutor(calls) as pool:
        answers = list(pool.map(lambda _: stack.invoke(name), range(calls)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    return max(int(r.text) for r in answers)


@pytest.mark.parametrize("spec,cap", [({"maxConcurrency": 4}, 4), ({}, 1)], ids=["maxConcurrency-4", "default"])
def test_max_concurrency_is_the_most_calls_an_instance_runs_at_once(stack: Stack, spec: dict, cap: int) -> None:
    name = f"overlap-{cap}"
    env = [{"name": "BEYOND", "value": str(cap + 1)}, {"name": "WAIT_S", "value": "1.5"}]
    stack.deploy(name, {"function.yaml": function_yaml(name, env=env, **spec), "main.py": OVERLAP})
    # twice the cap at once: a cap of N fills up to N calls, and the rest wait their turn
    assert _peak_of(stack, name, 2 * cap + 1) == cap


def readme_quick_start() -> tuple[dict[str, str], list[tuple[dict[str, str], str, str]]]:
    """The quick start's files and its example calls (headers, body, the answer promised), from README.md."""
    text = (ROOT / "README.md").read_text()
    main = re.search(r"cat > hello/main\.py <<'EOF'\n(.*?\n)EOF\n", text, re.S)
    yaml_text = re.search(r"printf '([^']*)' > hello/function\.yaml", text)
    examples = []
    for flags, body, promised in re.findall(r"curl -X POST localhost:8000/hello((?: -H '[^']*')*) -d '([^']*)'\n# (.*)\n",
                                            text):
        # curl sends -d data as a form unless told otherwise
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        headers.update(h.split(": ", 1) for h in re.findall(r"-H '([^']*)'", flags))
        examples.append((headers, body, promised))
    assert main and yaml_text and examples, "the README's quick start changed shape: update this test with it"
    return {"main.py": main.group(1), "function.yaml": yaml_text.group(1).replace("\\n", "\n")}, examples


def test_the_readme_quick_start_answers_json_text_and_empty_bodies(stack: Stack) -> None:
    files, examples = readme_quick_start()
    stack.deploy("hello", files)
    for headers, body, promised in examples:
        r = stack.anon.post("/hello", content=body, headers=headers)
        assert (r.status_code, r.text) == (200, promised)
    for content, ctype, expected in [(b"world", "text/plain", "world"), (b'"world"', "application/json", '"world"'),
                                     (b"", None, ""), ("Zo\u00eb".encode(), "text/plain", "Zo\u00eb")]:
        r = stack.anon.post("/hello", content=content, headers={"Content-Type": ctype} if ctype else {})
        assert (r.status_code, r.json()) == (200, {"hello": expected}), r.text


def test_bytes_inside_a_returned_dict_are_a_500_that_says_what_to_do(stack: Stack) -> None:
    stack.deploy("rawdict", {"function.yaml": function_yaml("rawdict"),
                             "main.py": "def handler(context, event):\n    return {'hello': event.body}\n"})
    r = stack.invoke("rawdict", b"world")
    assert r.status_code == 500
    assert r.text == ('handler result: result["hello"] is bytes, which JSON cannot hold; decode it to str'
                      " (e.g. event.body.decode()) or return bytes alone, not inside a dict or list")


TRACED = """
import json

def parse(raw):
    return json.loads(raw)

def check(doc):
    if "name" not in doc:
        raise ValueError("kaboom: name is missing")

def handler(context, event):
    check(parse(event.raw_body))
    return "ok"
"""


def handler_raised(s: Stack, name: str, call_id: str) -> dict:
    for line in s.client.get(f"/functions/{name}/logs").text.splitlines():
        if call_id in line and '"handler raised"' in line:
            return json.loads(line[line.index("{"):])
    return {}


def instances_forked(s: Stack, name: str) -> list[bool | None]:
    return [json.loads(p.read_text()).get("forked") for p in (s.var_dir / "instances").glob(f"g-{name}-*/instance.json")]


def check_user_frames_only(s: Stack, name: str) -> None:
    s.deploy(name, {"function.yaml": function_yaml(name), "main.py": TRACED})
    r = s.invoke(name, {"other": 1})
    assert (r.status_code, r.text) == (500, "kaboom: name is missing"), "the caller sees the message alone"
    line = wait_for(lambda: handler_raised(s, name, r.headers["x-call-id"]), 10, what="the handler's error in its log")
    tb = line["traceback"]
    files = re.findall(r'File "([^"]+)"', tb)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["main.py", "main.py"], tb
    assert tb.startswith("Traceback (most recent call last):\n") and tb.rstrip().endswith(
        "ValueError: kaboom: name is missing")
    for own in ("executor.py", "handlers.py", "services/runtime", "shared/"):
        assert own not in tb, tb


@pytest.mark.usefixtures("require_bwrap")
def test_handler_tracebacks_hold_the_users_frames_only_on_a_forked_instance(stack: Stack) -> None:
    check_user_frames_only(stack, "traced")
    assert instances_forked(stack, "traced") == [True], "the instance was not forked from a zygote"


def test_handler_tracebacks_hold_the_users_frames_only_on_a_cold_instance(tmp_path: Path) -> None:
    # the one way left to a fresh `python -m services.runtime`: sandboxed instances are all forked by a
    # zygote (a one-shot one when zygotes are off)
    s = Stack(tmp_path / "var", env={"NUCLIDE_ZYGOTE": "false", "NUCLIDE_SANDBOX": "none"})
    try:
        s.start()
        check_user_frames_only(s, "traced-cold")
        assert instances_forked(s, "traced-cold") == [None], "the instance started as a fresh interpreter"
    finally:
        s.stop()
