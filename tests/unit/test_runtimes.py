"""Registered runtimes, pure parts: definitions, specs that name them, the store's records, the runner's result mapping."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import msgpack
import pytest

from services.deployer.backends.docker.images import registered_dockerfile
from services.deployer.backends.docker.runner.results import (
    Outcome, input_json, parse_driver_output, python_result, to_result,
)
from services.store.blobs import open_blobs
from services.store.state import StoreState
from shared.oncewire import decode_invoke, decode_result, encode_invoke, encode_result
from shared.archive import read_archive
from shared.errors import Conflict, InvalidRequest, NotFound
from shared.fusion import merge_specs
from shared.runtimes import parse_argv, parse_runtime, parse_warm_start, warm_start_problem
from shared.spec import HOST_RUNTIME, FunctionSpec, parse_function

RT = {"image": "myrt:1", "path": "/ws", "dependencies": "pip3 install -r requirements.txt", "run": ["python3", "t.py"]}


def test_a_definition_is_normalised() -> None:
    rt = parse_runtime("pyrt", RT)
    assert rt == {"name": "pyrt", "image": "myrt:1", "path": "/ws",
                  "dependencies": ["pip3", "install", "-r", "requirements.txt"], "run": ["python3", "t.py"]}
    assert parse_runtime("x", {**RT, "path": "/ws/./app/", "dependencies": None})["path"] == "/ws/app"
    assert parse_runtime("x", {**RT, "dependencies": []})["dependencies"] == []


def test_strings_are_split_never_interpreted() -> None:
    assert parse_argv("sh -c 'echo $HOME; rm -rf /'", "run", required=True) == ["sh", "-c", "echo $HOME; rm -rf /"]
    assert parse_argv(["a b", "$(x)"], "run", required=True) == ["a b", "$(x)"]


@pytest.mark.parametrize("name, body, words", [
    ("python", RT, "built-in Python"),
    ("Python3", RT, "built-in Python"),
    ("functions", RT, "reserved"),
    ("a b", RT, "runtime name 'a b' is invalid"),
    ("x", {**RT, "image": ""}, "image"),
    ("x", {**RT, "image": "UPPER:1"}, "image"),
    ("x", {**RT, "path": "relative"}, "absolute"),
    ("x", {**RT, "path": "/ws/$HOME"}, "absolute"),
    ("x", {**RT, "path": "/"}, "system directory"),
    ("x", {**RT, "path": "/usr"}, "system directory"),
    ("x", {**RT, "path": "/tmp/a"}, "system directory"),
    ("x", {**RT, "run": None}, "run is required"),
    ("x", {**RT, "run": ["ok", 3]}, "list of strings"),
    ("x", {**RT, "run": [""]}, "program"),
    ("x", {**RT, "run": ["a\x00b"]}, "NUL"),
    ("x", {**RT, "dependencies": "pip 'open"}, "cannot be split"),
    ("x", {**RT, "cmd": "x"}, "unknown runtime fields: cmd"),
    ("x", "not a dict", "JSON object"),
])
def test_bad_definitions_say_what_to_fix(name: str, body: object, words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_runtime(name, body)
    assert words in info.value.message


def test_warm_start_values() -> None:
    assert [parse_warm_start(v, "w") for v in ("none", "Runtime", " function ")] == ["none", "runtime", "function"]
    with pytest.raises(InvalidRequest, match="must be one of none, runtime, function"):
        parse_warm_start("always", "spec.warmStart")


# ----- function specs that name a runtime -------------------------------------------------------


def archive(yaml_text: str, files: dict[str, str] | None = None):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("function.yaml", yaml_text)
        for name, text in (files or {"t.py": "print(1)"}).items():
            zf.writestr(name, text)
    return read_archive(buf.getvalue())


REGISTERED = {"pyrt": {**parse_runtime("pyrt", RT), "image_id": "sha256:" + "a" * 64}}


def test_a_spec_naming_a_registered_runtime_carries_its_definition() -> None:
    spec, warnings = parse_function(archive("spec: {runtime: pyrt, warmStart: none, handler: x:y}",
                                            {"requirements.txt": "--index-url http://evil\n"}), runtimes=REGISTERED)
    assert spec.runtime == "pyrt" and spec.warm_start == "none" and spec.handler == "" and spec.requirements == ""
    assert spec.registered_runtime == {k: REGISTERED["pyrt"][k] for k in ("image", "image_id", "path", "dependencies", "run")}
    assert any("spec.handler is ignored" in w for w in warnings)


def test_unknown_runtime_lists_the_registered_ones() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_function(archive("spec: {runtime: nodejs}"), runtimes=REGISTERED)
    assert info.value.message == (f"function.yaml: spec.runtime 'nodejs' is not available here; use 'python' or"
                                  f" '{HOST_RUNTIME}', or a registered runtime: pyrt")


def test_python_functions_keep_their_policy_and_parse_as_before() -> None:
    spec, _ = parse_function(archive("spec: {handler: main:handler, runtime: python}", {"main.py": "def handler(c, e): pass"}),
                             runtimes=REGISTERED)
    assert spec.runtime == HOST_RUNTIME and spec.registered_runtime is None and spec.warm_start == "function"
    for policy in ("none", "runtime"):  # per-call containers on the docker backend
        spec, _ = parse_function(archive(f"spec: {{handler: main:handler, warmStart: {policy}}}", {"main.py": ""}))
        assert spec.warm_start == policy and spec.registered_runtime is None


def test_per_call_policies_need_the_docker_backend() -> None:
    assert warm_start_problem("docker", "none") is None and warm_start_problem("process", "function") is None
    message = warm_start_problem("process", "runtime")
    assert message is not None and "'runtime'" in message and "docker backend" in message
    assert "'process'" in message and "NUCLIDE_BACKEND=docker" in message


def test_runtime_functions_are_never_fused() -> None:
    registered = {"runtime": "pyrt", "registered_runtime": {"image": "myrt:1"}}
    assert merge_specs({"a": registered})["min_replicas"] == 1
    with pytest.raises(Conflict, match="cannot be fused"):
        merge_specs({"a": registered, "b": {"handler": "main:handler"}})
    per_call = {"handler": "main:handler", "warm_start": "none"}
    assert merge_specs({"a": per_call})["min_replicas"] == 1
    with pytest.raises(Conflict, match="warmStart 'none'.*cannot be fused"):
        merge_specs({"a": per_call, "b": {"handler": "main:handler", "warm_start": "function"}})


# ----- a Python function's call in a process of its own ----------------------------------------


def test_once_framing_round_trips_and_refuses_anything_else() -> None:
    header = {"call_id": "c1", "function": "f", "headers": [["X-A", "1"]], "deadline_ms": 123}
    assert decode_invoke(encode_invoke(header, b"\x00body")) == (header, b"\x00body")
    result = {"call_id": "c1", "status": 201, "headers": [["X-B", "2"]], "content_type": "text/x"}
    data = encode_result(result, b"out")
    assert decode_result(data) == (result, b"out")
    for bad in (b"", data[:-1], data + b"\x00", b"not msgpack", encode_invoke({}, b"")[:1]):
        with pytest.raises(ValueError, match="the result"):
            decode_result(bad)
    with pytest.raises(ValueError, match=r"\[map, bin\]"):
        decode_invoke(msgpack.packb(["x", b""], use_bin_type=True))


def test_python_result_answers_as_a_warm_instance() -> None:
    result = {"call_id": "c1", "status": 201, "headers": [["X-B", "2"]], "content_type": "text/x", "edges": [1]}
    assert python_result("f", encode_result(result, b"made"), b"log line", False, 30, 1 << 27) == (result, b"made")
    header, body = python_result("f", b"", b"", True, 2.0, 1 << 27)
    assert header["status"] == 504 and json.loads(body)["error"] == {
        "code": "deadline_exceeded", "message": "function 'f' did not finish within its 2 s timeout (spec.timeout)",
        "details": {"function": "f", "timeout_s": 2.0}}
    header, body = python_result("f", b"", b"nuclide: function failed to load: boom at import\nTraceback", False,
                                 30, 1 << 27)
    assert header["status"] == 500 and json.loads(body)["error"]["message"] == "function 'f' failed to load: boom at import"
    header, body = python_result("f", encode_result(result, b"x")[:-2], b"Killed", False, 30, 1 << 27)
    message = json.loads(body)["error"]["message"]
    assert header["status"] == 500 and "128 MiB" in message and message.endswith(": Killed")


# ----- the store -------------------------------------------------------------------------------


@pytest.fixture
def st(tmp_path: Path, open_store_db) -> StoreState:
    db = open_store_db()
    return StoreState(db, open_blobs(db, tmp_path))


def test_store_keeps_runtimes_with_events_and_refuses_deleting_one_in_use(st: StoreState) -> None:
    rec, events = st.put_runtime({"name": "pyrt", **RT}, "sha256:abc")
    assert rec["created"] and rec["run"] == ["python3", "t.py"] and [k for k, _ in events] == ["runtime.changed"]
    rec, _ = st.put_runtime({"name": "pyrt", **RT, "run": "python3 u.py"}, "sha256:abc")
    assert not rec["created"] and st.get_runtime("pyrt")["run"] == ["python3", "u.py"]
    assert [r["name"] for r in st.snapshot()["runtimes"]] == ["pyrt"]
    st.put_function("fn", {"runtime": "pyrt", "registered_runtime": {"image": "myrt:1"}}, [], b"zip")
    with pytest.raises(Conflict, match="'fn'"):
        st.delete_runtime("pyrt")
    st.delete_function("fn")
    _, events = st.delete_runtime("pyrt")
    assert [k for k, _ in events] == ["runtime.deleted"]
    with pytest.raises(NotFound, match="registered: none"):
        st.get_runtime("pyrt")
    with pytest.raises(InvalidRequest, match="not registered"):
        st.put_function("fn", {"runtime": "pyrt", "registered_runtime": {"image": "myrt:1"}}, [], b"zip")


def test_a_spec_stored_under_the_old_key_reads_as_a_registered_runtime(st: StoreState) -> None:
    """Specs written before the field had its name keep their runtime: the store and FunctionSpec rename the key."""
    definition = {"image": "myrt:1", "path": "/opt/f", "run": ["python3", "t.py"]}
    assert FunctionSpec.from_dict({"runtime": "pyrt", "shell": definition}).registered_runtime == definition
    st.put_runtime({"name": "pyrt", **RT}, "sha256:abc")
    st.put_function("old", {"runtime": "pyrt", "registered_runtime": definition}, [], b"zip")
    st.db.execute("UPDATE function_versions SET spec=? WHERE name='old'",
                  (json.dumps({"runtime": "pyrt", "shell": definition}),))
    stored = st.get_version("old", 1)["spec"]
    assert stored["registered_runtime"] == definition and "shell" not in stored
    with pytest.raises(Conflict, match="cannot be fused"):
        merge_specs({"old": stored, "b": {"handler": "main:handler"}})


# ----- the runner's mapping ----------------------------------------------------------------------


def test_input_is_json_as_sent_or_a_json_string() -> None:
    assert input_json(b'{"a": 1}') == b'{"a": 1}'
    assert json.loads(input_json(b"$(rm -rf /)")) == "$(rm -rf /)"
    assert input_json(b"") == b"null"


def test_driver_output_parsing() -> None:
    assert parse_driver_output(b"0 S\nhello", b"") == Outcome(0, "S", b"hello", b"")
    assert parse_driver_output(b"3 J\n{}", b"e") == Outcome(3, "J", b"{}", b"e")
    assert parse_driver_output(b"garbage", b"x").exit_code is None


@pytest.mark.parametrize("outcome, status, ctype, body", [
    (Outcome(0, "S", b'{"a": 1}', b""), 200, "application/json", b'{"a": 1}'),
    (Outcome(0, "S", b"plain", b""), 200, "text/plain; charset=utf-8", b"plain"),
    (Outcome(0, "J", b'{"output": {"b": 2}}', b""), 200, "application/json", b'{"b": 2}'),
    (Outcome(0, "J", b'{"output": "text"}', b""), 200, "text/plain; charset=utf-8", b"text"),
])
def test_results(outcome: Outcome, status: int, ctype: str, body: bytes) -> None:
    assert to_result("f", "python3", outcome, 30, 1 << 30) == (status, ctype, body)


@pytest.mark.parametrize("outcome, status, words", [
    (Outcome(2, "S", b"", b"Traceback: boom"), 500, "`python3` exited with code 2: Traceback: boom"),
    (Outcome(137, "S", b"", b""), 500, "memory limit of 1024 MiB"),
    (Outcome(None, "", b"", b""), 500, "ended before"),
    (Outcome(0, "J", b"{bad", b""), 500, "output.json is not JSON"),
    (Outcome(0, "J", b"[1]", b""), 500, '"output" field'),
    (Outcome(None, "", b"", b"", timed_out=True), 504, "did not finish within its 30 s timeout"),
])
def test_failures_name_the_cause(outcome: Outcome, status: int, words: str) -> None:
    got_status, _, body = to_result("f", "python3", outcome, 30, 1 << 30)
    assert got_status == status and words in json.loads(body)["error"]["message"]


def test_image_build_has_no_shell_of_ours() -> None:
    text = registered_dockerfile("myrt:1", "/ws", ["pip3", "install", "-r", "req's.txt"], "LABEL a=\"b\"", False)
    assert 'RUN ["pip3", "install", "-r", "req\'s.txt"]' in text
    assert text.splitlines()[0] == "FROM myrt:1 AS build" and "COPY --from=build /ws/ /nuclide/src/" in text
