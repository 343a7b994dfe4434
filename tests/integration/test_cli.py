"""The real `nuclide` CLI as a subprocess against a real stack: deploy, invoke, get, list, logs, delete, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.stack import ROOT, Stack, function_yaml, make_zip, wait_for

pytestmark = pytest.mark.integration

HANDLER = textwrap.dedent("""\
    def handler(context, event):
        context.logger.info("cli-test handled a call")
        body = event.body
        return {"echo": body if isinstance(body, (dict, list)) else body.decode()}
    """)


def cli(stack: Stack, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m services.cli.main ARGS`; stdin is empty unless given, so no test waits on a terminal."""
    run_env = {k: v for k, v in stack.env.items() if k != "NUCLIDE_CLI_CONFIG"}
    run_env.update({"NUCLIDE_URL": stack.url, "NUCLIDE_TOKEN": stack.token})
    run_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "services.cli.main", *args], cwd=ROOT, env=run_env,
                          input=stdin if stdin is not None else b"", capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr


def make_function_dir(tmp_path: Path, name: str, source: str = HANDLER) -> Path:
    folder = tmp_path / "src" / name
    folder.mkdir(parents=True)
    (folder / "function.yaml").write_text(function_yaml(name))
    (folder / "main.py").write_text(source)
    return folder


@pytest.fixture(scope="module")
def deployed(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A function deployed once from a folder by the CLI, shared by the read-only tests."""
    folder = make_function_dir(tmp_path_factory.mktemp("cli"), "cli-basic")
    result = cli(stack, "deploy", str(folder))
    assert result.returncode == 0, result.stderr
    return "cli-basic"


def test_deploy_folder_makes_it_ready(deployed: str, stack: Stack) -> None:
    fn = stack.client.get(f"/functions/{deployed}").json()
    assert fn["state"] == "ready" and fn["version"] == 1


def test_deploy_summary_lines(stack: Stack, tmp_path: Path) -> None:
    folder = make_function_dir(tmp_path, "cli-summary")
    (folder / "function.yaml").write_text(function_yaml("cli-summary") + "bogusTopLevel: 1\n")
    result = cli(stack, "deploy", str(folder))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["name:     cli-summary", "version:  1", "state:    ready",
                                          "replicas: 1/1 ready"]
    assert "warning: function.yaml: unknown field 'bogusTopLevel' is ignored" in result.stderr.splitlines()


def test_invoke_with_data_and_with_stdin(deployed: str, stack: Stack) -> None:
    result = cli(stack, "invoke", deployed, "-d", '{"n": 1}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"echo": {"n": 1}}
    piped = cli(stack, "invoke", deployed, stdin=b"from stdin")
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout) == {"echo": "from stdin"}


def test_invoke_include_prints_status_and_call_id(deployed: str, stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "body.txt").write_text("from a file")
    result = cli(stack, "invoke", deployed, "-d", f"@{tmp_path / 'body.txt'}", "-i")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"echo": "from a file"}
    lines = result.stderr.splitlines()
    assert lines[0] == "HTTP/1.1 200 OK"
    assert lines[1].startswith("x-call-id: ")
    assert "content-type: application/json" in lines


def test_invoke_unknown_function_exits_1_with_the_body(stack: Stack) -> None:
    result = cli(stack, "invoke", "cli-no-such-function", "-d", "x")
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["code"] == "not_found"
    assert "HTTP 404" in result.stderr and "not found" in result.stderr
    no_traceback(result)


def test_get_json_and_table(deployed: str, stack: Stack) -> None:
    result = cli(stack, "get", deployed, "-o", "json")
    assert result.returncode == 0, result.stderr
    fn = json.loads(result.stdout)
    assert (fn["name"], fn["state"], fn["handler"]) == (deployed, "ready", "main:handler")
    table = cli(stack, "get", deployed)
    assert table.returncode == 0 and "state:       ready" in table.stdout


def test_list_shows_the_function(deployed: str, stack: Stack) -> None:
    result = cli(stack, "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "STATE", "READY/DESIRED", "RUNTIME", "HANDLER", "GROUP"]
    row = next(line.split() for line in lines[1:] if line.split()[0] == deployed)
    assert row[1:4] == ["1", "ready", "1/1"] and row[5] == "main:handler"
    as_json = cli(stack, "list", "-o", "json")
    assert deployed in {fn["name"] for fn in json.loads(as_json.stdout)}


def test_logs_show_what_the_handler_logged(deployed: str, stack: Stack) -> None:
    assert cli(stack, "invoke", deployed, "-d", "log me").returncode == 0

    def logged() -> str | None:
        result = cli(stack, "logs", deployed, "--tail", "50")
        assert result.returncode == 0, result.stderr
        return result.stdout if "cli-test handled a call" in result.stdout else None

    wait_for(logged, timeout_s=10, interval_s=0.2, what="the handler's log line in `nuclide logs`")


def test_delete_then_get_is_not_found(stack: Stack, tmp_path: Path) -> None:
    folder = make_function_dir(tmp_path, "cli-delete")
    assert cli(stack, "deploy", str(folder)).returncode == 0
    deleted = cli(stack, "delete", "cli-delete")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == "deleted cli-delete"
    result = cli(stack, "get", "cli-delete")
    assert result.returncode != 0
    assert "not found" in result.stderr and result.stderr.count("\n") == 1
    no_traceback(result)


def test_deploy_single_py_file(stack: Stack, tmp_path: Path) -> None:
    source = tmp_path / "cli_single.py"
    source.write_text("def handle(context, event):\n    return 'single file ok'\n")
    result = cli(stack, "deploy", str(source), "--name", "cli-single")
    assert result.returncode == 0, result.stderr
    assert "state:    ready" in result.stdout
    invoked = cli(stack, "invoke", "cli-single")
    assert (invoked.returncode, invoked.stdout) == (0, "single file ok")
    assert stack.client.get("/functions/cli-single").json()["handler"] == "cli_single:handle"


def test_deploy_zip_uses_metadata_name(stack: Stack, tmp_path: Path) -> None:
    package = tmp_path / "whatever.zip"
    package.write_bytes(make_zip({"function.yaml": function_yaml("cli-zipped"), "main.py": HANDLER}))
    result = cli(stack, "deploy", str(package))
    assert result.returncode == 0, result.stderr
    assert "name:     cli-zipped" in result.stdout


def test_async_deploy_polls_until_ready(stack: Stack, tmp_path: Path) -> None:
    folder = make_function_dir(tmp_path, "cli-async")
    result = cli(stack, "deploy", str(folder), "--async", "--timeout", "30")
    assert result.returncode == 0, result.stderr
    assert "state:    ready" in result.stdout


def test_broken_deploy_prints_the_traceback_tail(stack: Stack, tmp_path: Path) -> None:
    folder = make_function_dir(tmp_path, "cli-broken",
                               "raise RuntimeError('cli-broken fails at import')\n\ndef handler(context, event):\n"
                               "    return 1\n")
    result = cli(stack, "deploy", str(folder))
    assert result.returncode == 1
    assert result.stderr.splitlines()[:2] == [
        "building cli-broken...", "error: deploying 'cli-broken' version 1 failed: the function failed to load (exit code 3)"]
    assert "    RuntimeError: cli-broken fails at import" in result.stderr.splitlines()
    assert result.stdout == ""


def test_broken_async_redeploy_fails_and_keeps_the_old_version(stack: Stack, tmp_path: Path) -> None:
    folder = make_function_dir(tmp_path, "cli-redeploy")
    assert cli(stack, "deploy", str(folder)).returncode == 0
    (folder / "main.py").write_text("raise RuntimeError('redeploy breaks')\n\ndef handler(context, event):\n    return 1\n")
    result = cli(stack, "deploy", str(folder), "--async", "--timeout", "30")
    assert result.returncode == 1
    assert "version 2 failed" in result.stderr and "RuntimeError: redeploy breaks" in result.stderr
    assert cli(stack, "invoke", "cli-redeploy", "-d", "still up").stdout == '{"echo":"still up"}'


def test_invalid_package_is_one_line(stack: Stack, tmp_path: Path) -> None:
    folder = tmp_path / "cli-nohandler"
    folder.mkdir()
    (folder / "util.py").write_text("X = 1\n")
    result = cli(stack, "deploy", str(folder))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("error: no handler found")
    no_traceback(result)


def test_wrong_token_is_an_unauthorized_one_liner(stack: Stack) -> None:
    result = cli(stack, "list", "--token", "not-the-token")
    assert result.returncode != 0
    assert result.stderr.startswith("error: unauthorized:") and result.stderr.count("\n") == 1
    assert "--token" in result.stderr
    no_traceback(result)


def test_token_from_config_file(stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "cli.json"
    config.write_text(json.dumps({"url": stack.url, "token": stack.token}))
    result = cli(stack, "list", "-o", "json", env={"NUCLIDE_URL": "", "NUCLIDE_TOKEN": "",
                                                    "NUCLIDE_CLI_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)


def test_a_rejected_recorded_token_says_where_it_came_from_and_login_fixes_it(stack: Stack, tmp_path: Path) -> None:
    # What `make up` records, when the stack now at that URL is another one (its token differs).
    stacks = tmp_path / "cli.json"
    stacks.write_text(json.dumps({"current": stack.url, "stacks": {stack.url: {
        "token": "s3cret-of-another-stack", "started_by": "`make up` (docker-compose project demo)",
        "token_hint": "`docker-compose -p demo exec -T gateway cat /var/lib/nuclide/token`",
        "recorded_at": "2024-05-06T07:08:09Z"}}}))
    env = {"NUCLIDE_URL": "", "NUCLIDE_TOKEN": "", "NUCLIDE_CLI_CONFIG": str(stacks)}
    result = cli(stack, "list", env=env)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: unauthorized: nuclide at {stack.url} rejected the token recorded for it"
                                    f" in {stacks} by `make up` (docker-compose project demo) at 2024-05-06 07:08:09 UTC;")
    assert "; `docker-compose -p demo exec -T gateway cat /var/lib/nuclide/token` prints that stack's token;" in result.stderr
    assert f"`nuclide login --url {stack.url}`" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout

    refused = cli(stack, "login", "--url", stack.url, stdin=b"not-the-token\n", env=env)
    assert refused.returncode == 1
    assert refused.stderr == f"error: nuclide at {stack.url} rejected this token, so nothing was recorded; the command" \
                             " that started it prints its token (`nuclide up`, `make up`)\n"
    login = cli(stack, "login", "--url", stack.url, stdin=stack.token.encode() + b"\n", env=env)
    assert login.returncode == 0, login.stderr
    assert login.stdout == f"recorded {stack.url} in {stacks}; it is the current stack\n"
    assert stacks.stat().st_mode & 0o777 == 0o600
    listed = cli(stack, "list", "-o", "json", env=env)
    assert listed.returncode == 0, listed.stderr


def test_unreachable_url_is_a_one_liner(stack: Stack) -> None:
    from tests.stack import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = cli(stack, "get", "anything", "--url", url)
    assert result.returncode != 0
    assert result.stderr == f"error: cannot reach nuclide at {url}: is `nuclide up` running?\n"


# ----- calls and async invoke ----------------------------------------------------------------

# Always fails, except that a body 'heal:<tag>' fails only on its first run (so a redrive of its dead call succeeds).
DEAD_HANDLER = """
import os

def handler(context, event):
    body = event.body.decode() if isinstance(event.body, bytes) else str(event.body)
    if body.startswith("heal:"):
        seen = open("healing.txt").read().split() if os.path.exists("healing.txt") else []
        with open("healing.txt", "a") as fh:
            fh.write(body + "\\n")
        if body in seen:
            return "healed " + body
    raise RuntimeError("cli-dead fails on purpose")
"""


@pytest.fixture(scope="module")
def async_fns(stack: Stack) -> tuple[str, str]:
    """An echo function and one that always fails after a single attempt (so its calls go DEAD at once)."""
    stack.deploy("cli-calls", {"function.yaml": function_yaml("cli-calls"), "main.py": HANDLER})
    stack.deploy("cli-dead", {"function.yaml": function_yaml("cli-dead", retry={"maxAttempts": 1}),
                              "main.py": DEAD_HANDLER})
    return "cli-calls", "cli-dead"


def final_record(stack: Stack, call_id: str) -> dict:
    return wait_for(lambda: (r := stack.client.get(f"/calls/{call_id}")).status_code == 200
                    and r.json()["status"] in ("DONE", "FAILED", "DEAD") and r.json(), 30, what=f"call {call_id}")


def test_invoke_async_prints_the_call_id_and_wait_prints_the_result(async_fns: tuple[str, str], stack: Stack) -> None:
    echo, _ = async_fns
    queued = cli(stack, "invoke", echo, "--async", "-d", '{"n": 1}')
    assert queued.returncode == 0, queued.stderr
    call_id = queued.stdout.strip()
    assert call_id and "\n" not in call_id
    assert final_record(stack, call_id)["result"] == {"echo": {"n": 1}}

    waited = cli(stack, "invoke", echo, "--async", "--wait", "-d", "waited for")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout) == {"echo": "waited for"}
    assert waited.stderr.startswith("call ") and waited.stderr.count("\n") == 1


def test_invoke_async_idempotency_key_returns_the_first_call(async_fns: tuple[str, str], stack: Stack) -> None:
    key = f"cli-key-{time.time_ns()}"
    first = cli(stack, "invoke", async_fns[0], "--async", "--idempotency-key", key, "-d", "one")
    second = cli(stack, "invoke", async_fns[0], "--async", "--idempotency-key", key, "-d", "two")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout and "was used before" in second.stderr


def test_invoke_async_wait_on_a_failing_function_exits_1(async_fns: tuple[str, str], stack: Stack) -> None:
    result = cli(stack, "invoke", async_fns[1], "--async", "--wait", "--timeout", "30")
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: call ") and " is DEAD: " in last and "cli-dead fails on purpose" in last
    no_traceback(result)


def test_calls_list_get_and_result(async_fns: tuple[str, str], stack: Stack) -> None:
    echo, _ = async_fns
    call_id = cli(stack, "invoke", echo, "--async", "-d", '{"listed": true}').stdout.strip()
    final_record(stack, call_id)

    table = cli(stack, "calls", "--function", echo, "--limit", "50")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "FUNCTION", "STATUS", "KIND", "SOURCE", "ATTEMPTS", "QUEUED", "DURATION", "ERROR"]
    row = next(line.split() for line in lines[1:] if line.split()[0] == call_id)
    assert row[1:6] == [echo, "DONE", "async", "http", "1/3"] and row[-1] == "-"

    as_json = cli(stack, "calls", "--function", echo, "--status", "done", "-o", "json")
    assert as_json.returncode == 0, as_json.stderr
    listed = json.loads(as_json.stdout)
    assert call_id in [c["id"] for c in listed] and {c["status"] for c in listed} == {"DONE"}

    got = cli(stack, "calls", "get", call_id)
    assert got.returncode == 0, got.stderr
    rec = json.loads(got.stdout)
    assert (rec["id"], rec["status"], rec["result"]) == (call_id, "DONE", {"echo": {"listed": True}})
    as_yaml = cli(stack, "calls", "get", call_id, "-o", "yaml")
    doc = yaml.safe_load(as_yaml.stdout)  # an all-digit id is quoted in YAML, so compare parsed
    assert (doc["id"], doc["status"]) == (call_id, "DONE")

    raw = cli(stack, "calls", "result", call_id)
    assert (raw.returncode, raw.stdout) == (0, '{"echo":{"listed":true}}')


def test_calls_errors_are_one_line(async_fns: tuple[str, str], stack: Stack) -> None:
    missing = cli(stack, "calls", "get", "cli-no-such-call")
    assert missing.returncode == 1 and missing.stderr == "error: call 'cli-no-such-call' not found\n"
    bad_status = cli(stack, "calls", "purge", "--status", "RUNNING")
    assert bad_status.returncode == 2 and "invalid choice" in bad_status.stderr
    no_traceback(missing)


def test_calls_show_why_a_sync_call_failed(async_fns: tuple[str, str], stack: Stack) -> None:
    _, failing = async_fns
    call_id = stack.invoke(failing, b"x").headers["x-call-id"]
    wait_for(lambda: stack.client.get(f"/calls/{call_id}").status_code == 200, 10, what="the sync call record")
    table = cli(stack, "calls", "--function", failing, "--limit", "50")
    row = next(line for line in table.stdout.splitlines() if line.startswith(call_id))
    assert row.split()[1:5] == [failing, "FAILED", "sync", "http"]
    assert row.endswith("RuntimeError: cli-dead fails on purpose")
    got = cli(stack, "calls", "get", call_id)
    assert json.loads(got.stdout)["error"] == "RuntimeError: cli-dead fails on purpose"


def test_redrive_of_a_call_that_is_not_dead_is_409(async_fns: tuple[str, str], stack: Stack) -> None:
    call_id = cli(stack, "invoke", async_fns[0], "--async", "-d", "x").stdout.strip()
    final_record(stack, call_id)
    result = cli(stack, "calls", "redrive", call_id)
    assert result.returncode == 1
    assert result.stderr == f"error: call '{call_id}' is DONE, not DEAD; only dead calls can be redriven\n"
    no_traceback(result)


def test_dead_call_result_redrive_and_purge(async_fns: tuple[str, str], stack: Stack) -> None:
    _, dead_fn = async_fns
    tag = f"heal:{time.time_ns()}"
    call_id = cli(stack, "invoke", dead_fn, "--async", "-d", tag).stdout.strip()
    assert final_record(stack, call_id)["status"] == "DEAD"

    dead_list = cli(stack, "calls", "--status", "DEAD", "--function", dead_fn)
    row = next(line for line in dead_list.stdout.splitlines() if line.startswith(call_id))
    assert "DEAD" in row.split() and "cli-dead fails on purpose" in row

    result = cli(stack, "calls", "result", call_id)
    assert result.returncode == 1 and "cli-dead fails on purpose" in result.stdout
    assert result.stderr.startswith(f"error: call {call_id} is DEAD: failed 1 time(s)")

    redriven = cli(stack, "calls", "redrive", call_id)
    assert redriven.returncode == 0, redriven.stderr
    assert redriven.stdout.startswith(f"redriven {call_id}: ")
    # the redrive ran it again, and this run succeeds
    assert final_record(stack, call_id)["status"] == "DONE"
    healed = cli(stack, "calls", "result", call_id)
    assert (healed.returncode, healed.stdout) == (0, f"healed {tag}"), healed.stderr

    call_id = cli(stack, "invoke", dead_fn, "--async").stdout.strip()
    assert final_record(stack, call_id)["status"] == "DEAD"
    purged = cli(stack, "calls", "purge", "--status", "dead", "--function", dead_fn)
    assert purged.returncode == 0, purged.stderr
    n = int(purged.stdout.split()[1])
    assert n >= 1 and purged.stdout == f"purged {n} DEAD call{'' if n == 1 else 's'} of {dead_fn}\n"
    assert stack.client.get(f"/calls/{call_id}").status_code == 404
    assert cli(stack, "calls", "--status", "DEAD", "--function", dead_fn, "-o", "json").stdout.strip() == "[]"


def test_describe_and_rm_are_get_and_delete(stack: Stack, tmp_path: Path) -> None:
    folder = make_function_dir(tmp_path, "cli-alias")
    assert cli(stack, "deploy", str(folder)).returncode == 0
    described = cli(stack, "describe", "cli-alias", "-o", "json")
    assert described.returncode == 0, described.stderr
    assert json.loads(described.stdout)["name"] == "cli-alias"
    removed = cli(stack, "rm", "cli-alias")
    assert removed.returncode == 0 and removed.stdout.strip() == "deleted cli-alias", removed.stderr
    assert stack.client.get("/functions/cli-alias").status_code == 404
    assert cli(stack, "describe", "cli-alias").returncode == 1


def test_version_names_the_cli_and_the_gateway(stack: Stack) -> None:
    from shared.version import VERSION

    result = cli(stack, "version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"nuclide {VERSION}", f"gateway {VERSION} at {stack.url}"]
    down = cli(stack, "version", env={"NUCLIDE_URL": "http://127.0.0.1:9"})
    assert down.returncode == 1 and "cannot reach nuclide at http://127.0.0.1:9" in down.stderr
    assert down.stdout == f"nuclide {VERSION}\n"


def test_deploy_file_deploys_each_function(stack: Stack, tmp_path: Path) -> None:
    make_function_dir(tmp_path, "cli-stack-a")
    (tmp_path / "b.py").write_text("def handle(payload):\n    return 'b:' + payload\n")
    stack_file = tmp_path / "stack.yml"
    stack_file.write_text("version: 1.0\nprovider:\n  name: openfaas\nfunctions:\n"
                          "  cli-stack-a:\n    lang: python3\n    handler: ./src/cli-stack-a\n"
                          "  cli-stack-b:\n    handler: b.py\n")
    result = cli(stack, "deploy", "-f", str(stack_file))
    assert result.returncode == 0, result.stderr
    assert [ln for ln in result.stdout.splitlines() if ln.startswith("name:")] == \
        ["name:     cli-stack-a", "name:     cli-stack-b"]
    assert f"warning: {stack_file} line 6: functions.cli-stack-a.lang is ignored" in result.stderr
    for name in ("cli-stack-a", "cli-stack-b"):
        assert stack.client.get(f"/functions/{name}").json()["state"] == "ready"
    assert json.loads(cli(stack, "invoke", "cli-stack-a", "-d", "x").stdout) == {"echo": "x"}


def test_a_bad_deploy_file_deploys_nothing(stack: Stack, tmp_path: Path) -> None:
    make_function_dir(tmp_path, "cli-stack-ok")
    stack_file = tmp_path / "stack.yml"
    stack_file.write_text("functions:\n  cli-stack-ok:\n    handler: ./src/cli-stack-ok\n"
                          "  cli-stack-bad:\n    handler: ./src/missing\n")
    result = cli(stack, "deploy", "-f", str(stack_file))
    assert result.returncode == 1
    assert f"error: {stack_file} line 5: functions.cli-stack-bad.handler: ./src/missing does not exist" in result.stderr
    no_traceback(result)
    assert stack.client.get("/functions/cli-stack-ok").status_code == 404, "nothing was deployed"


def test_bash_completion_offers_the_stacks_function_names(deployed: str, stack: Stack, tmp_path: Path) -> None:
    program = tmp_path / "nuclide"  # what the user typed: the completion asks it for the names
    program.write_text(f"#!/bin/sh\nexec {sys.executable} -m services.cli.main \"$@\"\n")
    program.chmod(0o755)
    script = cli(stack, "completion", "bash").stdout
    env_prefix = f"export NUCLIDE_URL={stack.url} NUCLIDE_TOKEN={stack.token}; cd {ROOT};"
    code = (f"{env_prefix} source /dev/stdin; COMP_WORDS=({program} logs cli-bas); COMP_CWORD=2; _nuclide;"
            ' printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", code], input=script, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [deployed], out.stderr


def test_deploy_prints_the_build_output_as_it_runs(stack: Stack, tmp_path: Path) -> None:
    marker = f"build-step-{time.monotonic_ns()}"
    folder = make_function_dir(tmp_path, "cli-build-out")
    # the step prints, then waits for a file only this test writes once it saw the line: so the line came
    # while the deploy still ran, not with its answer
    gate = stack.var_dir.resolve() / "cache" / "pip" / f"{marker}.gate"  # a folder a build step may see
    (folder / "function.yaml").write_text(function_yaml("cli-build-out", build={"commands": [
        f"echo {marker}; i=0; while [ ! -e {gate} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done"]}))
    env = {k: v for k, v in stack.env.items() if k != "NUCLIDE_CLI_CONFIG"}
    env.update({"NUCLIDE_URL": stack.url, "NUCLIDE_TOKEN": stack.token})
    proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "deploy", str(folder)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(marker in ln for ln in err), 60, what="the build step's line while the deploy runs")
        assert proc.poll() is None, "the deploy was still waiting for its build"
    finally:
        gate.touch()  # the build finishes (or the test's failure does not leave it hanging)
    out = proc.communicate(timeout=120)[0]
    reader.join(10)
    assert proc.returncode == 0, "".join(err)
    assert "state:    ready" in out
    assert sum(marker in ln and "echo" not in ln for ln in err) == 1, "the line is printed once"
    quiet = cli(stack, "deploy", "-q", str(folder))
    assert quiet.returncode == 0 and marker not in quiet.stderr


def test_scale_holds_replicas_and_auto_gives_them_back(stack: Stack) -> None:
    stack.deploy("cliscale", {"function.yaml": function_yaml("cliscale", minReplicas=1, maxReplicas=2),
                              "main.py": "def handler(context, event):\n    return 'ok'\n"})
    held = cli(stack, "scale", "cliscale", "2")
    no_traceback(held)
    assert held.returncode == 0 and "held at 2 replicas" in held.stdout, held.stdout + held.stderr
    wait_for(lambda: stack.client.get("/functions/cliscale").json()["replicas"] == {"desired": 2, "ready": 2}, 30,
             what="two ready replicas")
    refused = cli(stack, "scale", "cliscale", "3")
    assert refused.returncode == 1 and "use 1-2" in refused.stderr, refused.stderr
    back = cli(stack, "scale", "cliscale", "auto")
    assert back.returncode == 0 and "back to the autoscaler" in back.stdout
    assert stack.client.get("/functions/cliscale").json()["scaling"]["override"] is None
    missing = cli(stack, "scale", "nosuchfn", "1")
    assert missing.returncode == 1 and "function 'nosuchfn' not found" in missing.stderr
