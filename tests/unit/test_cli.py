"""Unit tests for the CLI: config resolution, names, packaging, argument parsing and error formatting."""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.archive import make_zip
from services.cli import commands
from services.cli.client import DEFAULT_URL, Client, CliError, Target, error_from_response, normalise_url
from services.cli.stacks import StackEntry, read_stacks, record_stack, resolve_target, stacks_path
from services.cli.commands import (
    Streams, describe_table, format_table, function_name, guess_content_type, list_rows, metadata_name, package,
    parse_header, read_body, sanitise_name,
)
from services.cli.main import build_parser, main

MAIN_PY = b"def handler(context, event):\n    return 'ok'\n"


def zip_names(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return sorted(zf.namelist())


def fn_record(**over: Any) -> dict[str, Any]:
    record = {
        "name": "hello", "id": "hello", "version": 1, "latest_version": 1, "state": "ready",
        "runtime": "python:3.11", "handler": "main:handler", "description": "", "private": False,
        "timeout_s": 30.0, "group": {"id": "g-hello", "version": 1, "tasks": ["hello"]},
        "replicas": {"desired": 1, "ready": 1}, "warnings": [], "last_error": None,
        "created_at": "2024-01-01T00:00:00.000Z", "updated_at": "2024-01-01T00:00:00.000Z", "spec": {},
    }
    record.update(over)
    return record


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def streams(stdin: bytes | None = None, tty_stdin: bool = False) -> Streams:
    raw = None
    if stdin is not None or tty_stdin:
        raw = io.BytesIO(stdin or b"")
        if tty_stdin:
            raw.isatty = lambda: True  # type: ignore[method-assign]
    return Streams(io.StringIO(), io.StringIO(), raw)


# ----- config resolution -------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """No NUCLIDE_* variables, an empty cwd and an empty user config dir."""
    for var in ("NUCLIDE_URL", "NUCLIDE_TOKEN", "NUCLIDE_CLI_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def user_stacks(tmp_path: Path) -> Path:
    return tmp_path / "xdg" / "nuclide" / "cli.json"


def test_default_url_and_no_token(clean_env: dict[str, str]) -> None:
    target = resolve_target(environ=clean_env)
    assert target.url == DEFAULT_URL and target.token is None


def test_an_older_one_stack_file_is_read(clean_env: dict[str, str], tmp_path: Path) -> None:
    write_json(user_stacks(tmp_path), {"url": "http://user:1", "token": "user-tok"})
    target = resolve_target(environ=clean_env)
    assert (target.url, target.token) == ("http://user:1", "user-tok")


def test_a_cli_json_in_the_working_directory_is_not_read(clean_env: dict[str, str], tmp_path: Path) -> None:
    # What an earlier `make run` left in ./var/cli.json is stale once `make up` runs a stack at that URL.
    record_stack(StackEntry("http://127.0.0.1:8000", "compose-tok", "`make up`"), user_stacks(tmp_path))
    write_json(tmp_path / "cwd" / "var" / "cli.json", {"url": "http://127.0.0.1:8000", "token": "stale-tok"})
    target = resolve_target(environ=clean_env)
    assert (target.url, target.token) == ("http://127.0.0.1:8000", "compose-tok")


def test_nuclide_cli_config_names_the_stacks_file(clean_env: dict[str, str], tmp_path: Path) -> None:
    record_stack(StackEntry("http://user:1", "user-tok"), user_stacks(tmp_path))
    explicit = tmp_path / "elsewhere.json"
    record_stack(StackEntry("http://explicit:3/", "explicit-tok"), explicit)
    env = {**clean_env, "NUCLIDE_CLI_CONFIG": str(explicit)}
    target = resolve_target(environ=env)
    assert (target.url, target.token) == ("http://explicit:3", "explicit-tok")
    assert stacks_path(env) == explicit and stacks_path(clean_env) == user_stacks(tmp_path)


def test_env_beats_file_and_flags_beat_env(clean_env: dict[str, str], tmp_path: Path) -> None:
    record_stack(StackEntry("http://local:2", "local-tok"), user_stacks(tmp_path))
    env = {**clean_env, "NUCLIDE_URL": "http://env:4", "NUCLIDE_TOKEN": "env-tok"}
    target = resolve_target(environ=env)
    assert (target.url, target.token, target.token_from) == ("http://env:4", "env-tok", "in NUCLIDE_TOKEN")
    target = resolve_target("http://flag:5", "flag-tok", environ=env)
    assert (target.url, target.token, target.token_from) == ("http://flag:5", "flag-tok", "given by --token")


def test_file_fills_only_what_flags_and_env_leave_open(clean_env: dict[str, str], tmp_path: Path) -> None:
    record_stack(StackEntry("http://local:2", "local-tok"), user_stacks(tmp_path))
    target = resolve_target(None, "flag-tok", environ=clean_env)
    assert (target.url, target.token) == ("http://local:2", "flag-tok")
    target = resolve_target("http://local:2/", None, environ=clean_env)
    assert target.token == "local-tok"


def test_file_token_is_not_sent_to_another_url(clean_env: dict[str, str], tmp_path: Path) -> None:
    record_stack(StackEntry("http://local:2", "local-tok"), user_stacks(tmp_path))
    target = resolve_target("http://elsewhere:9", None, environ=clean_env)
    assert (target.url, target.token) == ("http://elsewhere:9", None)


def test_each_stack_keeps_its_token_and_the_newest_is_current(clean_env: dict[str, str], tmp_path: Path) -> None:
    path = user_stacks(tmp_path)
    record_stack(StackEntry("http://127.0.0.1:8000", "first-tok", "`nuclide up` (state in /a/var)"), path)
    record_stack(StackEntry("http://127.0.0.1:9000", "second-tok", "`nuclide up` (state in /b/var)"), path)
    assert (resolve_target(environ=clean_env).url, resolve_target(environ=clean_env).token) == (
        "http://127.0.0.1:9000", "second-tok")
    assert resolve_target("http://127.0.0.1:8000", environ=clean_env).token == "first-tok"
    # the first stack started again: its entry is replaced, the second's stays
    record_stack(StackEntry("http://127.0.0.1:8000/", "restarted-tok"), path)
    stacks = read_stacks(path)
    assert stacks.current == "http://127.0.0.1:8000"
    assert {url: e.token for url, e in stacks.entries.items()} == {
        "http://127.0.0.1:8000": "restarted-tok", "http://127.0.0.1:9000": "second-tok"}


def test_the_stacks_file_is_0600_in_a_0700_dir_and_converts_an_older_one(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "nuclide" / "cli.json"
    record_stack(StackEntry("http://a:1", "a-tok"), path)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    write_json(path, {"url": "http://old:1", "token": "old-tok"})
    record_stack(StackEntry("http://new:2", "new-tok"), path)
    assert path.stat().st_mode & 0o777 == 0o600
    data = json.loads(path.read_text())
    assert data["current"] == "http://new:2"
    assert {url: e["token"] for url, e in data["stacks"].items()} == {"http://old:1": "old-tok", "http://new:2": "new-tok"}
    assert data["stacks"]["http://new:2"]["recorded_at"].endswith("Z")


def test_stacks_recorded_at_once_are_all_kept(tmp_path: Path) -> None:
    path = tmp_path / "cli.json"
    urls = [f"http://127.0.0.1:{9000 + i}" for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        list(pool.map(lambda url: record_stack(StackEntry(url, "tok"), path), urls))
    assert sorted(read_stacks(path).entries) == sorted(urls)


def test_a_missing_stacks_file_means_no_token_and_says_where_it_looked(clean_env: dict[str, str], tmp_path: Path) -> None:
    nope = tmp_path / "nope.json"
    target = resolve_target(environ={**clean_env, "NUCLIDE_CLI_CONFIG": str(nope)})
    assert target.token is None and str(nope) in target.token_help
    # Flags and env make the file unnecessary, so it is not even read.
    assert resolve_target("http://a:1", "t", environ={**clean_env, "NUCLIDE_CLI_CONFIG": str(tmp_path)})


def test_broken_stacks_file_is_one_line(clean_env: dict[str, str], tmp_path: Path) -> None:
    bad = user_stacks(tmp_path)
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(CliError, match="not valid JSON") as info:
        resolve_target(environ=clean_env)
    assert "\n" not in info.value.message and str(bad) in info.value.message
    write_json(bad, ["a list"])
    with pytest.raises(CliError, match="JSON object"):
        resolve_target(environ=clean_env)


@pytest.mark.parametrize("raw, expected", [
    ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
    ("localhost:8000", "http://localhost:8000"),
    ("https://x.example", "https://x.example"),
])
def test_normalise_url(raw: str, expected: str) -> None:
    assert normalise_url(raw) == expected


# ----- names and packaging -------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("hello", "hello"),
    ("my func!", "my-func"),
    ("__init__", "init"),
    ("Résumé v2", "R-sum-v2"),
    ("a" * 80, "a" * 63),
    ("...", ""),
])
def test_sanitise_name(raw: str, expected: str) -> None:
    assert sanitise_name(raw) == expected


def test_name_prefers_flag_then_metadata_then_path() -> None:
    with_yaml = make_zip({"main.py": MAIN_PY, "function.yaml": b"metadata:\n  name: from-yaml\n"})
    assert function_name("flag", with_yaml, "dir") == "flag"
    assert function_name(None, with_yaml, "dir") == "from-yaml"
    assert function_name(None, make_zip({"main.py": MAIN_PY}), "my dir") == "my-dir"
    with pytest.raises(CliError, match="--name"):
        function_name(None, make_zip({"main.py": MAIN_PY}), "___")


def test_metadata_name_in_a_nested_zip_and_bad_yaml() -> None:
    nested = make_zip({"pkg/main.py": MAIN_PY, "pkg/function.yml": b"metadata: {name: nested}\n"})
    assert metadata_name(nested) == "nested"
    assert metadata_name(make_zip({"function.yaml": b"metadata: [unclosed\n"})) is None
    assert metadata_name(make_zip({"function.yaml": b"spec: {}\n"})) is None
    assert metadata_name(b"not a zip") is None


def test_package_directory_skips_caches(tmp_path: Path) -> None:
    folder = tmp_path / "my-func"
    (folder / "__pycache__").mkdir(parents=True)
    (folder / "main.py").write_bytes(MAIN_PY)
    (folder / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"x")
    (folder / "lib").mkdir()
    (folder / "lib" / "util.py").write_text("X = 1\n")
    data, stem = package(folder)
    assert stem == "my-func"
    assert zip_names(data) == ["lib/util.py", "main.py"]


def test_package_single_py_file(tmp_path: Path) -> None:
    (tmp_path / "hello.py").write_bytes(MAIN_PY)
    data, stem = package(tmp_path / "hello.py")
    assert (stem, zip_names(data)) == ("hello", ["hello.py"])
    # A stem that is no module name would stop the server from finding the handler.
    (tmp_path / "my-func.py").write_bytes(MAIN_PY)
    data, stem = package(tmp_path / "my-func.py")
    assert (stem, zip_names(data)) == ("my-func", ["main.py"])


def test_package_zip_is_sent_as_is(tmp_path: Path) -> None:
    original = make_zip({"main.py": MAIN_PY})
    (tmp_path / "pkg.zip").write_bytes(original)
    assert package(tmp_path / "pkg.zip") == (original, "pkg")


def test_package_refuses_missing_and_other_files(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="does not exist"):
        package(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CliError, match="not a folder, a .zip or a .py file"):
        package(tmp_path / "notes.txt")


def test_package_reports_symlinks_outside_as_cli_error(tmp_path: Path) -> None:
    folder = tmp_path / "fn"
    folder.mkdir()
    (folder / "main.py").write_bytes(MAIN_PY)
    (tmp_path / "secret").write_text("s")
    (folder / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(CliError, match="symlinks pointing outside"):
        package(folder)


# ----- argument parsing ------------------------------------------------------------------


def test_global_flags_before_or_after_the_subcommand() -> None:
    parser = build_parser()
    before = parser.parse_args(["--url", "http://a", "--token", "t", "list"])
    after = parser.parse_args(["list", "--url", "http://a", "--token", "t"])
    assert (before.url, before.token) == (after.url, after.token) == ("http://a", "t")
    neither = parser.parse_args(["get", "f"])
    assert (neither.url, neither.token) == (None, None)
    # A flag only before the subcommand is not wiped by the subcommand's own (absent) flag.
    assert parser.parse_args(["--url", "http://a", "get", "f"]).url == "http://a"


def test_deploy_and_invoke_arguments() -> None:
    parser = build_parser()
    opts = parser.parse_args(["deploy", "./fn", "--name", "x", "--async", "--timeout", "5"])
    assert (opts.path, opts.name, opts.async_, opts.timeout) == ("./fn", "x", True, 5.0)
    opts = parser.parse_args(["invoke", "f", "-d", "@body.json", "-H", "a=1", "-H", "b: 2", "-X", "put",
                              "--content-type", "text/csv", "-i"])
    assert (opts.name, opts.data, opts.header, opts.method, opts.content_type, opts.include) == (
        "f", "@body.json", ["a=1", "b: 2"], "put", "text/csv", True)
    assert parser.parse_args(["invoke", "f"]).method == "POST"
    assert parser.parse_args(["logs", "f", "--tail", "7"]).tail == 7
    assert parser.parse_args(["get", "f", "-o", "yaml"]).output == "yaml"
    assert parser.parse_args(["up"]).command == "up"


def test_up_port_base(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NUCLIDE_CONFIG", raising=False)
    for key in ("PORT_BASE", "HTTP_PORT", "STORE_RPC", "STORE_PUB", "DEPLOYER_RPC", "GATEWAY_ROUTER", "GATEWAY_PULL",
                "GATEWAY_SUB", "GATEWAY_PUB"):
        monkeypatch.delenv(f"NUCLIDE_{key}", raising=False)
        monkeypatch.delenv(f"NUCLIDE_UP_{key}", raising=False)
    assert build_parser().parse_args(["up", "--port-base", "9000"]).port_base == 9000
    assert main(["up", "--port-base", "9000", "--print-ports"]) == 0
    assert capsys.readouterr().out.split() == [
        "http_port", "9000", "store_rpc", "9001", "store_pub", "9002", "deployer_rpc", "9003", "gateway_router", "9004",
        "gateway_pull", "9005", "gateway_sub", "9006", "gateway_pub", "9007"]
    assert main(["up", "--port-base", "65529", "--print-ports"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nuclide: port_base 65529 is out of range 1-65528") and "--port-base" in err
    with pytest.raises(SystemExit):
        main(["up", "--port-base", "nine"])
    err = capsys.readouterr().err
    assert "--port-base: 'nine' is not a whole number" in err


def test_busy_ports_name_the_base_setting() -> None:
    import socket

    from services.cli.up import busy_message, busy_ports
    from shared.config import load_settings

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings("up", environ={"NUCLIDE_PORT_BASE": str(port - 3)})
        busy = busy_ports(settings)
    assert f"port {port} (deployer_rpc) is in use" in busy
    message = busy_message(busy, settings)
    assert f"port_base is {port - 3}" in message and "NUCLIDE_PORT_BASE=N" in message and "--port-base N" in message
    assert "\n" not in message


@pytest.mark.parametrize("argv", [
    ["list", "-o", "yaml"], ["logs", "f", "--tail", "0"], ["deploy", "x", "--timeout", "-1"], ["frobnicate"], [],
])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2


# ----- invoke helpers ------------------------------------------------------------------------


def test_parse_header() -> None:
    assert parse_header("X-A=1") == ("X-A", "1")
    assert parse_header("Authorization: Bearer a=b") == ("Authorization", "Bearer a=b")
    assert parse_header("X-Empty=") == ("X-Empty", "")
    for bad in ("novalue", "=v", "two words=x"):
        with pytest.raises(CliError, match="NAME=VALUE"):
            parse_header(bad)


def test_read_body_sources(tmp_path: Path) -> None:
    (tmp_path / "b.bin").write_bytes(b"\x00\x01")
    assert read_body("text", streams()) == b"text"
    assert read_body(f"@{tmp_path / 'b.bin'}", streams()) == b"\x00\x01"
    assert read_body("@-", streams(b"from stdin")) == b"from stdin"
    assert read_body(None, streams(b"piped")) == b"piped"
    assert read_body(None, streams(b"typed", tty_stdin=True)) == b""
    assert read_body(None, streams()) == b""
    with pytest.raises(CliError, match="cannot read body file"):
        read_body(f"@{tmp_path / 'missing'}", streams())


@pytest.mark.parametrize("body, expected", [
    (b"", None), (b'{"a": 1}', "application/json"), (b"hello", "text/plain; charset=utf-8"),
    (b"\xff\xfe", "application/octet-stream"),
])
def test_guess_content_type(body: bytes, expected: str | None) -> None:
    assert guess_content_type(body) == expected


# ----- error formatting and the client -----------------------------------------------------


def response(status: int, body: Any = None, text: str | None = None) -> httpx.Response:
    if text is not None:
        return httpx.Response(status, text=text)
    return httpx.Response(status, json=body)


def test_error_from_server_error_body() -> None:
    exc = error_from_response(response(404, {"error": {"code": "not_found", "message": "function 'x' not found"}}),
                              Target("http://h", "t"))
    assert (exc.message, exc.status, exc.code) == ("function 'x' not found", 404, "not_found")
    exc = error_from_response(response(422, {"error": {"code": "build_failed", "message": "m",
                                                       "details": {"log_tail": "Traceback"}}}), Target("http://h", "t"))
    assert exc.details == {"log_tail": "Traceback"}


def test_error_for_401_says_how_to_pass_a_token() -> None:
    body = {"error": {"code": "unauthorized", "message": "missing token"}}
    missing = error_from_response(response(401, body), Target("http://h", None)).message
    wrong = error_from_response(response(401, body), Target("http://h", "bad")).message
    assert missing.startswith("unauthorized: no token") and "--token" in missing and "NUCLIDE_TOKEN" in missing
    assert wrong.startswith("unauthorized: nuclide at http://h rejected the token")


UNAUTHORIZED = {"error": {"code": "unauthorized", "message": "invalid token"}}


def rejected(target: Target) -> str:
    return error_from_response(response(401, UNAUTHORIZED), target).message


def test_a_rejected_recorded_token_says_where_it_came_from_and_how_to_get_the_right_one(
        clean_env: dict[str, str], tmp_path: Path) -> None:
    # `make run` recorded its stack; then `make up` started another at the same URL without recording it.
    path = user_stacks(tmp_path)
    record_stack(StackEntry("http://127.0.0.1:8000", "s3cret-run-tok", "`nuclide up` (state in /repo/var)",
                            "`cat /repo/var/token`", "2024-05-06T07:08:09Z"), path)
    message = rejected(resolve_target(environ=clean_env))
    assert message == (
        f"unauthorized: nuclide at http://127.0.0.1:8000 rejected the token recorded for it in {path} by `nuclide up`"
        " (state in /repo/var) at 2024-05-06 07:08:09 UTC; `cat /repo/var/token` prints that stack's token; if"
        " something else started a stack at http://127.0.0.1:8000 since, record the token it printed with"
        " `nuclide login --url http://127.0.0.1:8000`")
    assert "s3cret" not in message


def test_a_rejected_flag_or_env_token_is_named_as_such(clean_env: dict[str, str], tmp_path: Path) -> None:
    record_stack(StackEntry("http://127.0.0.1:8000", "s3cret-recorded", "`make up` (docker-compose project p)"),
                 user_stacks(tmp_path))
    by_flag = rejected(resolve_target(None, "s3cret-flag", environ=clean_env))
    assert by_flag.startswith("unauthorized: nuclide at http://127.0.0.1:8000 rejected the token given by --token;")
    by_env = rejected(resolve_target(environ={**clean_env, "NUCLIDE_TOKEN": "s3cret-env"}))
    assert by_env.startswith("unauthorized: nuclide at http://127.0.0.1:8000 rejected the token in NUCLIDE_TOKEN;")
    for message in (by_flag, by_env):
        assert "`nuclide up`, `make up`" in message and "nuclide login --url http://127.0.0.1:8000" in message
        assert "s3cret" not in message and "\n" not in message


def test_no_token_names_the_stacks_file_it_looked_in(clean_env: dict[str, str], tmp_path: Path) -> None:
    record_stack(StackEntry("http://127.0.0.1:8000", "tok"), user_stacks(tmp_path))
    message = rejected(resolve_target("http://127.0.0.1:9000", environ=clean_env))
    assert message.startswith(f"unauthorized: no token was sent; none is recorded for http://127.0.0.1:9000 in"
                              f" {user_stacks(tmp_path)};")
    assert "--token" in message and "NUCLIDE_TOKEN" in message and "nuclide login" in message


def test_an_unreachable_recorded_stack_names_what_started_it(clean_env: dict[str, str], tmp_path: Path) -> None:
    record_stack(StackEntry("http://nuclide.test", "tok", "`make up` (docker-compose project p)"), user_stacks(tmp_path))

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    target = resolve_target(environ=clean_env)
    with Client(target=target, transport=httpx.MockTransport(handler)) as client, pytest.raises(CliError) as info:
        client.list_functions()
    assert info.value.message == ("cannot reach nuclide at http://nuclide.test, which `make up` (docker-compose"
                                  " project p) started: is it still running?")


def test_error_from_a_non_nuclide_body_is_one_line() -> None:
    exc = error_from_response(response(502, text="<html>\n<h1>Bad Gateway</h1>\n</html>"), Target("http://h", None))
    assert exc.message == "HTTP 502 from http://h: <html> <h1>Bad Gateway</h1> </html>"


def mock_client(handler: Any, token: str | None = "tok") -> Client:
    return Client("http://nuclide.test", token, transport=httpx.MockTransport(handler))


def test_client_deploy_sends_multipart_zip_and_async_header() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json=fn_record(state="deploying"))

    with mock_client(handler) as client:
        assert client.deploy("hello", b"PK-zip", wait=False)["state"] == "deploying"
        client.deploy("hello", b"PK-zip")
    first, second = seen
    assert (first.method, first.url.path) == ("PUT", "/functions/hello")
    assert first.headers["authorization"] == "Bearer tok"
    assert first.headers["x-nuclide-async"] == "true" and "x-nuclide-async" not in second.headers
    assert first.headers["content-type"].startswith("multipart/form-data")
    assert b'name="zip_file"' in first.read() and b"PK-zip" in first.read()


def test_client_raises_cli_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/logs"):
            assert request.url.params["tail"] == "5"
            return httpx.Response(200, text="line\n")
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "function 'x' not found"}})

    with mock_client(handler) as client:
        assert client.logs("x", 5) == "line\n"
        with pytest.raises(CliError, match="not found"):
            client.get_function("x")
        with pytest.raises(CliError, match="not found"):
            client.delete_function("x")


def test_client_connection_refused_is_one_line() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with mock_client(handler) as client, pytest.raises(CliError) as info:
        client.list_functions()
    assert info.value.message == "cannot reach nuclide at http://nuclide.test: is `nuclide up` running?"


def test_client_quotes_names_in_paths() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.raw_path == b"/functions/a%2Fb%3Fc"
        return httpx.Response(200, json=fn_record())

    with mock_client(handler) as client:
        client.get_function("a/b?c")


def test_invoke_sends_the_token_only_when_the_gateway_asks() -> None:
    auth_seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization")
        auth_seen.append(auth)
        if request.url.path == "/private" and auth != "Bearer tok":
            return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "missing token"}})
        if request.url.path == "/own401":
            return httpx.Response(401, text="the function says no")
        return httpx.Response(200, content=b"ok")

    with mock_client(handler) as client:
        assert client.invoke("public").content == b"ok"
        assert auth_seen == [None]
        auth_seen.clear()
        assert client.invoke("private").status_code == 200
        assert auth_seen == [None, "Bearer tok"]
        auth_seen.clear()
        # The function's own 401 is its answer: no second call.
        assert client.invoke("own401").status_code == 401
        assert auth_seen == [None]


def test_invoke_with_another_method_never_hits_the_api_routes() -> None:
    paths: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append((request.method, request.url.path))
        return httpx.Response(405, json={"detail": "Method Not Allowed"})

    with mock_client(handler) as client:
        client.invoke("f", method="DELETE")
    assert paths == [("DELETE", "/functions/f/invoke")]


# ----- commands with a fake client ------------------------------------------------------


class FakeClient:
    """Answers from a script of function records; raises what it is told to."""

    url = "http://fake"
    token = "tok"

    def __init__(self, records: list[dict[str, Any]] | None = None, deploy_result: Any = None) -> None:
        self.records = list(records or [])
        self.deploy_result = deploy_result
        self.deploys: list[tuple[str, bool]] = []

    def deploy(self, name: str, zip_bytes: bytes, *, wait: bool = True, timeout_s: float | None = None) -> dict:
        self.deploys.append((name, wait))
        if isinstance(self.deploy_result, Exception):
            raise self.deploy_result
        return self.deploy_result

    def get_function(self, name: str) -> dict[str, Any]:
        return self.records.pop(0) if len(self.records) > 1 else self.records[0]


def deploy_opts(path: Path, **over: Any) -> argparse.Namespace:
    values = {"path": str(path), "name": None, "async_": False, "timeout": None}
    values.update(over)
    return argparse.Namespace(**values)


@pytest.fixture
def fn_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "hello"
    folder.mkdir()
    (folder / "main.py").write_bytes(MAIN_PY)
    return folder


def test_deploy_prints_summary_and_warnings(fn_dir: Path) -> None:
    client = FakeClient(deploy_result=fn_record(warnings=["function.yaml: unknown field 'spec.x' is ignored"]))
    s = streams()
    assert commands.cmd_deploy(client, deploy_opts(fn_dir), s) == 0  # type: ignore[arg-type]
    assert client.deploys == [("hello", True)]
    out = s.out.getvalue()
    assert "name:     hello" in out and "version:  1" in out and "state:    ready" in out and "1/1" in out
    err = s.err.getvalue()
    assert "building hello..." in err
    assert "warning: function.yaml: unknown field 'spec.x' is ignored" in err


def test_deploy_422_shows_message_and_indented_log_tail(fn_dir: Path) -> None:
    failure = CliError("deploying 'hello' version 1 failed: the function failed to load",
                       {"log_tail": "Traceback (most recent call last):\nRuntimeError: boom\n"}, status=422)
    with pytest.raises(CliError) as info:
        commands.cmd_deploy(FakeClient(deploy_result=failure), deploy_opts(fn_dir), streams())  # type: ignore[arg-type]
    assert info.value.message == ("deploying 'hello' version 1 failed: the function failed to load\n"
                                  "    Traceback (most recent call last):\n    RuntimeError: boom")


def test_async_deploy_polls_until_ready(fn_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands.time, "sleep", lambda _s: None)
    client = FakeClient(
        records=[fn_record(state="deploying", version=0), fn_record(state="deploying", version=0), fn_record()],
        deploy_result=fn_record(state="deploying", version=0, latest_version=1),
    )
    s = streams()
    assert commands.cmd_deploy(client, deploy_opts(fn_dir, async_=True), s) == 0  # type: ignore[arg-type]
    assert client.deploys == [("hello", False)]
    assert "hello: deploying (version 1)..." in s.err.getvalue()
    assert "state:    ready" in s.out.getvalue()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def poll(records: list[dict[str, Any]], target: int = 2, timeout_s: float = 10.0) -> dict[str, Any]:
    clock = FakeClock()
    return commands._poll_until_settled(FakeClient(records), "hello", target, timeout_s,  # type: ignore[arg-type]
                                        commands.Progress(streams()), clock, clock.sleep)


def test_poll_reports_a_failed_first_deploy_with_its_log() -> None:
    failed = fn_record(state="failed", version=0, latest_version=2, last_error="failed to load\nTraceback\nboom")
    with pytest.raises(CliError) as info:
        poll([failed])
    assert info.value.message == "deploying 'hello' version 2 failed: failed to load\n    Traceback\n    boom"


def test_poll_sees_a_rolled_back_redeploy_as_failed() -> None:
    rolled_back = fn_record(state="ready", version=1, latest_version=2, last_error="import error")
    with pytest.raises(CliError, match="version 2 failed: import error"):
        poll([fn_record(state="deploying", version=1, latest_version=2), rolled_back])


def test_poll_times_out_and_says_where_to_look() -> None:
    with pytest.raises(CliError, match=r"still deploying after 2 s.*nuclide get hello"):
        poll([fn_record(state="deploying", version=1, latest_version=2)], timeout_s=2)


def test_poll_notices_a_newer_deploy() -> None:
    with pytest.raises(CliError, match="superseded by version 3"):
        poll([fn_record(state="deploying", version=1, latest_version=3)])


def test_tables() -> None:
    rows = list_rows([fn_record(), fn_record(name="other", version=1, latest_version=2, state="deploying",
                                            replicas={"desired": 2, "ready": 1})])
    table = format_table(["NAME", "VERSION", "STATE", "READY/DESIRED", "RUNTIME", "HANDLER", "GROUP"], rows)
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "STATE", "READY/DESIRED", "RUNTIME", "HANDLER", "GROUP"]
    assert lines[1].split() == ["hello", "1", "ready", "1/1", "python:3.11", "main:handler", "g-hello"]
    assert lines[2].split()[:5] == ["other", "1", "(latest", "2)", "deploying"]
    described = describe_table(fn_record(state="failed", last_error="boom\ntrace", warnings=["w1"]))
    assert "state:       failed" in described and "warning:     w1" in described
    assert described.endswith("last error:\n    boom\n    trace")


def test_invoke_writes_raw_body_and_fails_on_4xx(monkeypatch: pytest.MonkeyPatch) -> None:
    class Client_:
        url, token = "http://fake", "tok"

        def invoke(self, name: str, body: bytes, **kw: Any) -> httpx.Response:
            self.kw = kw
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "function 'f' not found"}},
                                  headers={"x-call-id": "c1"})

    client = Client_()
    opts = argparse.Namespace(name="f", data='{"a": 1}', header=["X-A=1"], method="POST", content_type=None,
                              include=False, timeout=None)
    s = streams()
    assert commands.cmd_invoke(client, opts, s) == 1  # type: ignore[arg-type]
    assert client.kw["headers"] == {"X-A": "1", "Content-Type": "application/json"}
    assert s.out.getvalue() == '{"error":{"code":"not_found","message":"function \'f\' not found"}}'
    assert s.err.getvalue() == "error: POST /f answered HTTP 404 (call c1): function 'f' not found\n"


# ----- main() ---------------------------------------------------------------------------


def test_main_prints_one_line_when_nothing_listens(clean_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    from tests.stack import free_port

    url = f"http://127.0.0.1:{free_port()}"
    assert main(["list", "--url", url]) == 1
    err = capsys.readouterr().err
    assert err == f"error: cannot reach nuclide at {url}: is `nuclide up` running?\n"


def test_main_reports_a_missing_deploy_path(clean_env: dict[str, str], capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    assert main(["deploy", str(tmp_path / "nope"), "--url", "http://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1


def test_sync_deploy_client_timeout_says_where_to_look(fn_dir: Path) -> None:
    late = CliError("nuclide at http://fake did not answer in time", code="client_timeout")
    with pytest.raises(CliError, match=r"'hello' was not ready after 5 s; .*nuclide get hello"):
        commands.cmd_deploy(FakeClient(deploy_result=late), deploy_opts(fn_dir, timeout=5.0), streams())  # type: ignore[arg-type]


# ----- calls and async invoke ---------------------------------------------------------------


def call_record(**over: Any) -> dict[str, Any]:
    record = {
        "id": "c0ffee0000000001", "function": "hello", "status": "DONE", "kind": "async", "source": "http",
        "attempts": 1, "max_attempts": 3, "parent_id": None, "cold_start": False,
        "timings": {"queued": "2024-05-06T07:08:09.123Z", "started": "2024-05-06T07:08:09.125Z",
                    "finished": "2024-05-06T07:08:09.130Z", "next_attempt": None},
        "duration_s": 0.005, "error": None, "result_status": 200,
    }
    record.update(over)
    return record


def test_calls_arguments() -> None:
    parser = build_parser()
    opts = parser.parse_args(["calls"])
    assert (opts.command, opts.calls_command, opts.function, opts.status, opts.limit, opts.output) == (
        "calls", None, None, None, 100, "table")
    opts = parser.parse_args(["calls", "--function", "f", "--status", "dead", "--limit", "5", "-o", "json"])
    assert (opts.function, opts.status, opts.limit, opts.output) == ("f", "DEAD", 5, "json")
    opts = parser.parse_args(["calls", "get", "abc", "-o", "yaml", "--url", "http://a"])
    assert (opts.calls_command, opts.id, opts.output, opts.url) == ("get", "abc", "yaml", "http://a")
    assert parser.parse_args(["calls", "get", "abc"]).output == "json"
    assert parser.parse_args(["calls", "result", "abc"]).calls_command == "result"
    assert parser.parse_args(["calls", "redrive", "abc"]).id == "abc"
    opts = parser.parse_args(["calls", "purge", "--status", "dead", "--function", "f"])
    assert (opts.calls_command, opts.status, opts.function) == ("purge", "DEAD", "f")
    # --function given before the action still scopes the purge
    assert parser.parse_args(["calls", "--function", "f", "purge", "--status", "DEAD"]).function == "f"
    assert parser.parse_args(["calls", "purge", "--status", "DEAD"]).function is None


def test_async_invoke_arguments() -> None:
    opts = build_parser().parse_args(["invoke", "f", "--async", "--callback", "http://127.0.0.1:9/hook",
                                      "--idempotency-key", "order-7", "--wait", "--timeout", "9"])
    assert (opts.async_, opts.callback, opts.idempotency_key, opts.wait, opts.timeout) == (
        True, "http://127.0.0.1:9/hook", "order-7", True, 9.0)
    plain = build_parser().parse_args(["invoke", "f"])
    assert (plain.async_, plain.callback, plain.idempotency_key, plain.wait) == (False, None, None, False)


@pytest.mark.parametrize("argv", [
    ["calls", "purge"], ["calls", "purge", "--status", "RUNNING"], ["calls", "--status", "LOST"],
    ["calls", "--limit", "0"], ["calls", "get"], ["calls", "frobnicate"], ["calls", "get", "x", "-o", "table"],
])
def test_bad_calls_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2


@pytest.mark.parametrize("flag", [["--wait"], ["--callback", "http://h/x"], ["--idempotency-key", "k"]])
def test_async_only_flags_need_async(flag: list[str]) -> None:
    opts = build_parser().parse_args(["invoke", "f", *flag])
    with pytest.raises(CliError, match=f"{flag[0]} goes with --async"):
        commands.async_options(opts)


def test_call_formatting() -> None:
    assert commands.format_duration(None) == "-"
    assert commands.format_duration(0.0123) == "12.3ms"
    assert commands.format_duration(2.5) == "2.50s"
    assert commands.format_duration(90) == "1.5m"
    assert commands.format_time("2024-05-06T07:08:09.123Z") == "2024-05-06 07:08:09"
    assert commands.format_time(None) == "-"
    assert commands.first_line("\n  boom:   it\tbroke \nTraceback...") == "boom: it broke"
    assert commands.first_line("x" * 100, 10) == "xxxxxxx..."
    assert commands.first_line(None) == ""
    assert commands.short_error("failed 3 time(s); last error: boom\ntrace") == "boom"
    assert commands.short_error("function 'x' not found") == "function 'x' not found"
    assert commands.short_error(None) == "-"


def test_calls_table() -> None:
    rows = commands.call_rows([call_record(), call_record(
        id="c2", status="DEAD", kind="async", source="zmq", attempts=3, duration_s=None,
        error="failed 3 time(s); last error: " + "a very long message " * 5 + "\nTraceback")])
    table = format_table(commands.CALL_HEADERS, rows).splitlines()
    assert table[0].split() == ["ID", "FUNCTION", "STATUS", "KIND", "SOURCE", "ATTEMPTS", "QUEUED", "DURATION", "ERROR"]
    assert table[1].split() == ["c0ffee0000000001", "hello", "DONE", "async", "http", "1/3", "2024-05-06",
                                "07:08:09", "5.0ms", "-"]
    dead = table[2].split()
    assert dead[:6] == ["c2", "hello", "DEAD", "async", "zmq", "3/3"] and dead[8] == "-"
    assert table[2].endswith("  a very long message a very long message a ver...") and "Traceback" not in table[2]
    assert len(rows[1][-1]) == commands.ERROR_WIDTH


class FakeCallsClient:
    """Scripted answers for the calls commands."""

    url, token = "http://fake", "tok"

    def __init__(self, calls: list[dict[str, Any]] | None = None, result: httpx.Response | None = None,
                 polls: list[dict[str, Any]] | None = None, invoke: httpx.Response | None = None) -> None:
        self.calls = calls or []
        self.result = result
        self.polls = list(polls or [])
        self.invoke_response = invoke
        self.seen: list[tuple[Any, ...]] = []

    def list_calls(self, function: str | None = None, status: str | None = None, limit: int = 100) -> list:
        self.seen.append(("list", function, status, limit))
        return self.calls

    def get_call(self, call_id: str) -> dict[str, Any]:
        self.seen.append(("get", call_id))
        if self.polls:
            return self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]
        return next(c for c in self.calls if c["id"] == call_id)

    def call_result(self, call_id: str) -> httpx.Response:
        self.seen.append(("result", call_id))
        assert self.result is not None
        return self.result

    def redrive_call(self, call_id: str) -> dict[str, Any]:
        self.seen.append(("redrive", call_id))
        return call_record(id=call_id, status="PENDING", attempts=0)

    def purge_calls(self, status: str, function: str | None = None) -> int:
        self.seen.append(("purge", status, function))
        return 2

    def invoke(self, name: str, body: bytes, **kw: Any) -> httpx.Response:
        self.seen.append(("invoke", name, kw["headers"]))
        assert self.invoke_response is not None
        return self.invoke_response


def calls_opts(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["calls", *argv])


def test_calls_list_table_json_and_empty() -> None:
    client = FakeCallsClient([call_record()])
    s = streams()
    assert commands.cmd_calls(client, calls_opts(["--function", "hello", "--status", "done"]), s) == 0  # type: ignore[arg-type]
    assert client.seen == [("list", "hello", "DONE", 100)]
    assert s.out.getvalue().splitlines()[0].startswith("ID ")
    s = streams()
    commands.cmd_calls(client, calls_opts(["-o", "json"]), s)  # type: ignore[arg-type]
    assert json.loads(s.out.getvalue()) == [call_record()]
    s = streams()
    commands.cmd_calls(FakeCallsClient([]), calls_opts(["--status", "DEAD", "--function", "f"]), s)  # type: ignore[arg-type]
    assert s.out.getvalue() == "" and s.err.getvalue() == "no DEAD calls of f recorded\n"


def test_calls_get_redrive_purge() -> None:
    client = FakeCallsClient([call_record()])
    s = streams()
    commands.cmd_calls(client, calls_opts(["get", "c0ffee0000000001", "-o", "yaml"]), s)  # type: ignore[arg-type]
    assert "status: DONE" in s.out.getvalue() and "queued: '2024-05-06T07:08:09.123Z'" in s.out.getvalue()
    s = streams()
    commands.cmd_calls(client, calls_opts(["redrive", "c9"]), s)  # type: ignore[arg-type]
    assert s.out.getvalue() == "redriven c9: PENDING, attempts start again from 0\n"
    s = streams()
    commands.cmd_calls(client, calls_opts(["purge", "--status", "dead", "--function", "f"]), s)  # type: ignore[arg-type]
    assert s.out.getvalue() == "purged 2 DEAD calls of f\n"
    assert client.seen[-1] == ("purge", "DEAD", "f")


def result_response(status: int, body: bytes, call_status: str | None) -> httpx.Response:
    headers = {"x-call-status": call_status} if call_status else {}
    return httpx.Response(status, content=body, headers=headers)


def test_calls_result_writes_the_raw_body() -> None:
    s = streams()
    client = FakeCallsClient(result=result_response(200, b'{"x":1}', "DONE"))
    assert commands.cmd_calls(client, calls_opts(["result", "c1"]), s) == 0  # type: ignore[arg-type]
    assert (s.out.getvalue(), s.err.getvalue()) == ('{"x":1}', "")


def test_calls_result_of_a_dead_call_says_why() -> None:
    client = FakeCallsClient([call_record(id="c1", status="DEAD", error="failed 3 time(s); last error: boom\ntrace")],
                             result=result_response(500, b"boom", "DEAD"))
    s = streams()
    assert commands.cmd_calls(client, calls_opts(["result", "c1"]), s) == 1  # type: ignore[arg-type]
    assert s.out.getvalue() == "boom"
    assert s.err.getvalue() == "error: call c1 is DEAD: failed 3 time(s); last error: boom\n"
    s = streams()
    client = FakeCallsClient(result=result_response(404, b"nope", "DONE"))
    assert commands.cmd_calls(client, calls_opts(["result", "c1"]), s) == 1  # type: ignore[arg-type]
    assert s.err.getvalue() == "error: call c1 is DONE, but the function answered HTTP 404\n"


def test_calls_result_of_an_unfinished_call_is_an_error() -> None:
    client = FakeCallsClient(result=httpx.Response(202, json={"id": "c1", "status": "RUNNING"}))
    with pytest.raises(CliError, match=r"call c1 is RUNNING and has no result yet"):
        commands.cmd_calls(client, calls_opts(["result", "c1"]), streams())  # type: ignore[arg-type]


def test_client_calls_routes() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if request.method == "DELETE":
            return httpx.Response(200, json={"purged": 3})
        if path == "/calls":
            return httpx.Response(200, json=[call_record()])
        if path.endswith("/redrive"):
            return httpx.Response(409, json={"error": {"code": "conflict", "message":
                                                       "call 'c1' is DONE, not DEAD; only dead calls can be redriven"}})
        if path == "/calls/gone/result":
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "call 'gone' not found"}})
        if path.endswith("/result"):
            return httpx.Response(500, content=b"boom", headers={"x-call-status": "DEAD"})
        return httpx.Response(200, json=call_record(id=path.rsplit("/", 1)[1]))

    with mock_client(handler) as client:
        assert client.list_calls("f", "DEAD", 7) == [call_record()]
        assert dict(seen[-1].url.params) == {"function": "f", "status": "DEAD", "limit": "7"}
        assert client.list_calls()[0]["id"] == "c0ffee0000000001"
        assert dict(seen[-1].url.params) == {"limit": "100"}
        client.get_call("a/b")
        assert seen[-1].url.raw_path == b"/calls/a%2Fb"
        assert client.purge_calls("DEAD", "f") == 3
        assert (seen[-1].method, dict(seen[-1].url.params)) == ("DELETE", {"status": "DEAD", "function": "f"})
        assert client.call_result("c1").content == b"boom"  # the function's own 500 is its result
        with pytest.raises(CliError, match="call 'gone' not found"):
            client.call_result("gone")
        with pytest.raises(CliError) as info:
            client.redrive_call("c1")
        assert info.value.status == 409 and info.value.message.endswith("only dead calls can be redriven")
    assert all(r.headers["authorization"] == "Bearer tok" for r in seen)


def invoke_opts(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["invoke", *argv])


def test_async_invoke_prints_the_call_id_and_sends_the_headers() -> None:
    client = FakeCallsClient(invoke=httpx.Response(202, json={"call_id": "c7", "duplicate": False}))
    s = streams()
    opts = invoke_opts(["f", "--async", "-d", '{"a": 1}', "--callback", "http://127.0.0.1:1/h",
                        "--idempotency-key", "k1"])
    assert commands.cmd_invoke(client, opts, s) == 0  # type: ignore[arg-type]
    assert s.out.getvalue() == "c7\n" and s.err.getvalue() == ""
    headers = client.seen[0][2]
    assert headers == {"Content-Type": "application/json", "X-Nuclide-Async": "true",
                       "X-Callback-Url": "http://127.0.0.1:1/h", "X-Idempotency-Key": "k1"}


def test_async_invoke_duplicate_and_refusal() -> None:
    client = FakeCallsClient(invoke=httpx.Response(202, json={"call_id": "c7", "duplicate": True}))
    s = streams()
    commands.cmd_invoke(client, invoke_opts(["f", "--async", "--idempotency-key", "k1"]), s)  # type: ignore[arg-type]
    assert s.out.getvalue() == "c7\n" and "idempotency key 'k1' was used before" in s.err.getvalue()
    refused = FakeCallsClient(invoke=httpx.Response(
        404, json={"error": {"code": "not_found", "message": "function 'f' not found"}}, headers={"x-call-id": "c8"}))
    with pytest.raises(CliError, match=r"^POST /f answered HTTP 404 \(call c8\): function 'f' not found$"):
        commands.cmd_invoke(refused, invoke_opts(["f", "--async"]), streams())  # type: ignore[arg-type]


def test_async_invoke_wait_polls_then_prints_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(commands.time, "sleep", sleeps.append)
    client = FakeCallsClient(invoke=httpx.Response(202, json={"call_id": "c7"}),
                             polls=[call_record(id="c7", status="PENDING"), call_record(id="c7", status="RUNNING"),
                                    call_record(id="c7", status="DONE")],
                             result=result_response(200, b"the answer", "DONE"))
    s = streams()
    assert commands.cmd_invoke(client, invoke_opts(["f", "--async", "--wait"]), s) == 0  # type: ignore[arg-type]
    assert s.out.getvalue() == "the answer" and s.err.getvalue() == "call c7\n"
    assert [e[0] for e in client.seen] == ["invoke", "get", "get", "get", "result"]
    assert sleeps == pytest.approx([0.1, 0.15])


def test_wait_final_gives_up_after_the_timeout() -> None:
    clock = FakeClock()
    client = FakeCallsClient(polls=[call_record(id="c7", status="RUNNING")])
    with pytest.raises(CliError, match=r"call c7 is still RUNNING after 3 s; check `nuclide calls get c7`"):
        commands.wait_final(client, "c7", 3.0, clock, clock.sleep)  # type: ignore[arg-type]
    assert clock.now >= 3.0


@pytest.mark.parametrize("value,needle", [
    ("0", "--gateways: '0' must be at least 1"),
    ("-2", "--gateways: '-2' must be at least 1"),
    ("two", "--gateways: 'two' is not a whole number"),
    ("1.5", "--gateways: '1.5' is not a whole number"),
])
def test_up_gateways_refuses_a_count_that_is_not_positive(capsys: pytest.CaptureFixture[str], value: str,
                                                          needle: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["up", f"--gateways={value}", "--print-ports"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert needle in captured.err and captured.out == "", "nothing starts and no port is printed"


def test_up_gateways_each_on_ports_of_its_own(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NUCLIDE_CONFIG", raising=False)
    for key in ("PORT_BASE", "HTTP_PORT", "STORE_RPC", "STORE_PUB", "DEPLOYER_RPC", "GATEWAY_ROUTER", "GATEWAY_PULL",
                "GATEWAY_SUB", "GATEWAY_PUB", "GATEWAYS", "GATEWAY_NAME"):
        monkeypatch.delenv(f"NUCLIDE_{key}", raising=False)
        monkeypatch.delenv(f"NUCLIDE_UP_{key}", raising=False)
    assert main(["up", "--port-base", "9000", "--gateways", "3", "--print-ports"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    ports = {name: int(port) for name, port in lines}
    assert len(ports) == len(lines) == 8 + 2 * 5, "each further gateway: HTTP, ROUTER, PULL, SUB, PUB"
    assert len(set(ports.values())) == len(ports), "no port is shared"
    assert [ports[f"gateway{i}_{k}"] for i in (1, 2) for k in ("http", "router", "pull", "sub", "pub")] == [
        9010, 9014, 9015, 9016, 9017, 9020, 9024, 9025, 9026, 9027]
    assert main(["up", "--port-base", "65500", "--gateways", "16", "--print-ports"]) == 2
    err = capsys.readouterr().err
    assert "gateways 16 would need port 65657, past 65535" in err and "--port-base N" in err
    assert main(["up", "--gateways", "17", "--print-ports"]) == 2
    assert "gateways 17 is out of range 1-16" in capsys.readouterr().err
    monkeypatch.setenv("NUCLIDE_GATEWAYS", "0")
    assert main(["up", "--print-ports"]) == 2
    err = capsys.readouterr().err
    assert "gateways 0 is out of range 1-16" in err and "NUCLIDE_GATEWAYS=N" in err


# ----- deploy file, aliases, completion ------------------------------------------------------------


def deploy_file(tmp_path: Path, text: str, folders: tuple[str, ...] = ("hello",)) -> Path:
    for folder in folders:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "main.py").write_text("def handler(context, event):\n    return 'hi'\n")
    path = tmp_path / "stack.yml"
    path.write_text(text)
    return path


def test_a_deploy_file_lists_functions_in_order_and_warns_of_what_it_ignores(tmp_path: Path) -> None:
    from services.cli import deployfile

    path = deploy_file(tmp_path, "version: 1.0\nprovider:\n  name: openfaas\nfunctions:\n  hello:\n"
                                 "    lang: python3\n    handler: ./hello\n  second:\n    handler: hello\n")
    entries, warnings = deployfile.read(path)
    assert [(e.name, e.handler, e.line) for e in entries] == [("hello", tmp_path / "hello", 7),
                                                              ("second", tmp_path / "hello", 9)]
    assert warnings == [f"{path} line 2: 'provider' is ignored (the CLI's --url picks the stack)",
                        f"{path} line 6: functions.hello.lang is ignored"]


@pytest.mark.parametrize("text, expected", [
    ("functions:\n  hello:\n    handler: [./hello\n", "line 4: not valid YAML"),
    ("- hello\n", "a deploy file is a mapping with a 'functions' key"),
    ("version: 1\n", "no 'functions' key"),
    ("functions: []\n", "line 1: 'functions' must map each function's name"),
    ("functions:\n  Bad Name:\n    handler: ./hello\n", "line 2: functions.Bad Name: function name 'Bad Name' is invalid"),
    ("functions:\n  docs:\n    handler: ./hello\n", "line 2: functions.docs: function name 'docs' is reserved"),
    ("functions:\n  hello: ./hello\n", "line 2: functions.hello must be a mapping with a 'handler'"),
    ("functions:\n  hello:\n    lang: python3\n", "line 3: functions.hello.handler is missing"),
    ("functions:\n  hello:\n    handler: 3\n", "line 3: functions.hello.handler must be a path"),
    ("functions:\n  hello:\n    handler: ./nope\n", "line 3: functions.hello.handler: ./nope does not exist"),
    ("functions:\n  hello:\n    handler: ./hello\n  hello:\n    handler: ./hello\n",
     "line 4: functions.hello is listed twice"),
])
def test_a_bad_deploy_file_names_the_line_and_the_field(tmp_path: Path, text: str, expected: str) -> None:
    from services.cli import deployfile

    path = deploy_file(tmp_path, text)
    with pytest.raises(CliError) as info:
        deployfile.read(path)
    assert expected in info.value.message and str(path) in info.value.message


def test_a_missing_deploy_file_says_so(tmp_path: Path) -> None:
    from services.cli import deployfile

    with pytest.raises(CliError, match="cannot read the deploy file .*nope.yml"):
        deployfile.read(tmp_path / "nope.yml")


@pytest.mark.parametrize("alias, command", [("describe", "get"), ("rm", "delete"), ("remove", "delete"),
                                            ("ls", "list")])
def test_faas_cli_aliases_parse_as_their_command(alias: str, command: str) -> None:
    args = [alias] if alias == "ls" else [alias, "fn"]
    opts = build_parser().parse_args(args)
    from services.cli.main import ALIASES

    assert ALIASES[opts.command] == command


def test_deploy_takes_a_path_or_a_file_not_both(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["deploy"], ["deploy", "x", "-f", "stack.yml"]):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
        assert "deploy takes a PATH or -f FILE" in capsys.readouterr().err


def test_version_client_only(capsys: pytest.CaptureFixture[str]) -> None:
    from shared.version import VERSION

    assert main(["version", "--client"]) == 0
    assert capsys.readouterr().out == f"nuclide {VERSION}\n"


def complete(script: str, words: list[str], program: str = "nuclide") -> list[str]:
    """What bash completes for ``words`` (the last one being typed) with the script sourced."""
    import shlex
    import subprocess

    line = " ".join(shlex.quote(w) for w in [program, *words])
    code = (f"source /dev/stdin; COMP_WORDS=({line}); COMP_CWORD={len(words)}; _nuclide;"
            ' printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", code], input=script, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [w for w in out.stdout.splitlines() if w]


def test_bash_completion_of_commands_flags_and_choices(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert complete(script, ["de"]) == ["deploy", "describe", "delete"]
    assert complete(script, ["--url", "http://x", "ver"]) == ["version"]
    assert "--follow" in complete(script, ["logs", "--"]) and "--since" in complete(script, ["logs", "--"])
    assert complete(script, ["get", "fn", "-o", ""]) == ["table", "json", "yaml"]
    assert complete(script, ["logs", "--since", ""]) == []  # a value to type, not a name
    (tmp_path / "stack.yml").write_text("")
    assert complete(script, ["deploy", str(tmp_path / "sta")]) == [str(tmp_path / "stack.yml")]
