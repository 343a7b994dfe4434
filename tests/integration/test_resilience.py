"""Sandboxing, restarts and failures of each service, and `nuclide up` itself."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from shared.procs import alive as _alive
from tests.tasks import PROBE_HELPERS
from tests.stack import ROOT, Stack, free_port, function_yaml, wait_for

pytestmark = pytest.mark.integration

HELLO = "def handler(context, event):\n    return 'hello'\n"


@pytest.fixture
def stack_outside_tmp(require_bwrap: None) -> Iterator[Stack]:
    """A stack whose state is not below /tmp: the sandbox's private /tmp would hide it anyway, proving nothing."""
    var = Path(tempfile.mkdtemp(prefix="nuclide-sandbox-", dir="/var/tmp"))
    s = Stack(var / "var")
    try:
        yield s.start()
    finally:
        s.stop()
        shutil.rmtree(var, ignore_errors=True)


def test_sandbox_confines_function_code(stack_outside_tmp: Stack) -> None:
    stack = stack_outside_tmp
    stack.deploy("victim", {"function.yaml": function_yaml("victim"), "main.py": "SECRET = 'victim-code'\n" + HELLO})
    victim_code = next((stack.var_dir.resolve() / "functions" / "victim").glob("1-*/code/main.py"))
    # the token file `nuclide up` keeps (this stack passes its token in the environment, so write the same file)
    token_file = stack.var_dir.resolve() / "token"
    if not token_file.exists():
        token_file.write_text(stack.token + "\n")
        token_file.chmod(0o600)
    assert token_file.read_text().strip() == stack.token
    probe = PROBE_HELPERS + f"""

def handler(context, event):
    return {{
        "own_dir": attempt(lambda: write("scratch.txt")),
        "tmp": attempt(lambda: write("/tmp/scratch.txt")),
        "etc": attempt(lambda: write("/etc/nuclide-escape")),
        "repo": attempt(lambda: write({str(ROOT / "escape.txt")!r})),
        "read_other": attempt(lambda: open({str(victim_code)!r}).read()),
        "read_token": attempt(lambda: open({str(token_file)!r}).read()),
        "token_in_env": any({stack.token!r} in v for v in os.environ.values()),
        "read_state": attempt(lambda: open({str(stack.var_dir.resolve() / "state.db")!r}, "rb").read(1)),
        "list_functions": attempt(lambda: os.listdir({str(stack.var_dir.resolve() / "functions" / "victim")!r})),
        "pid": os.getpid(),
    }}
"""
    stack.deploy("prober", {"function.yaml": function_yaml("prober"), "main.py": probe})
    out = stack.invoke("prober").json()
    assert out["own_dir"] == "ok" and out["tmp"] == "ok"
    assert out["etc"] in ("OSError", "PermissionError")
    assert out["repo"] in ("OSError", "PermissionError")
    assert out["read_other"] == "FileNotFoundError", "a function must not read another function's code"
    assert out["read_token"] == "FileNotFoundError", "a function must not read the API token"
    assert out["token_in_env"] is False, "a function must not find the API token in its environment"
    assert out["read_state"] == "FileNotFoundError", "a function must not read nuclide's state"
    assert out["list_functions"] == "FileNotFoundError"
    assert out["pid"] < 10, "instances run in their own PID namespace"
    assert not (ROOT / "escape.txt").exists()


def test_state_survives_a_full_restart(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("durable", {"function.yaml": function_yaml("durable"), "main.py": HELLO})
    s.stop()
    assert not [p for p in s.instance_pids() if _alive(p)], "instances must stop with the stack"
    again = Stack(s.var_dir)
    again.procs, again.logs = {}, {}
    again.env, again.url, again.endpoints, again.token = s.env, s.url, s.endpoints, s.token
    again.client = httpx.Client(base_url=s.url, timeout=60, headers={"Authorization": f"Bearer {s.token}"})
    again.anon = httpx.Client(base_url=s.url, timeout=60)
    again.start()
    try:
        r = again.invoke("durable")
        assert r.status_code == 200 and r.text == "hello"
        assert again.client.get("/durable").json()["state"] == "ready"
    finally:
        again.stop()


def test_deployer_crash_does_not_stop_invocations_and_instances_are_adopted(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("steady", {"function.yaml": function_yaml("steady"), "main.py": HELLO})
    pids_before = s.instance_pids()
    assert len(pids_before) == 1
    s.stop_service("deployer", signal.SIGKILL)
    for _ in range(20):
        assert s.invoke("steady").text == "hello"
    wait_for(lambda: s.anon.get("/healthz").status_code == 503, 10, what="health to report the deployer down")
    s.start_service("deployer")
    s.wait_healthy()
    time.sleep(1.5)  # give a duplicate (the bug this guards against) time to appear
    assert s.instance_pids() == pids_before, "the restarted deployer must adopt, not duplicate"
    assert s.invoke("steady").text == "hello"
    # adopted instances are still managed: deleting the function stops them
    assert s.client.delete("/steady").status_code == 204
    wait_for(lambda: not _alive(pids_before[0]), 15, what="the adopted instance to stop")


def test_gateway_restart_instances_reconnect(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("reconnect", {"function.yaml": function_yaml("reconnect"), "main.py": HELLO})
    s.stop_service("gateway", signal.SIGKILL)
    s.start_service("gateway")
    s.wait_healthy()
    r = s.invoke("reconnect")
    assert r.status_code == 200 and r.text == "hello"


def test_store_crash_does_not_stop_invocations(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("nostore", {"function.yaml": function_yaml("nostore"), "main.py": HELLO})
    s.stop_service("store", signal.SIGKILL)
    for _ in range(20):
        assert s.invoke("nostore").text == "hello"
    s.start_service("store")
    s.wait_healthy()
    s.deploy("afterstore", {"function.yaml": function_yaml("afterstore"), "main.py": HELLO})
    assert s.invoke("afterstore").text == "hello"


def test_nuclide_up_runs_and_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ)
    env.update({
        "NUCLIDE_VAR_DIR": str(tmp_path / "var"), "NUCLIDE_HTTP_PORT": str(port), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
        **{f"NUCLIDE_{k}": f"tcp://127.0.0.1:{free_port()}" for k in
           ("STORE_RPC", "STORE_PUB", "DEPLOYER_RPC", "GATEWAY_ROUTER", "GATEWAY_PULL", "GATEWAY_SUB", "GATEWAY_PUB")},
    })
    env.pop("NUCLIDE_TOKEN", None)

    def up() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "services.cli.main", "up"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    proc = up()
    try:
        lines: list[str] = []
        wait_for(lambda: (lines.append(proc.stdout.readline()) or "Press Ctrl-C" in lines[-1]), 60,
                 what="the nuclide up banner")
        banner = "".join(lines)
        token = next(line.split()[-1] for line in lines if "token:" in line)
        assert f"http://127.0.0.1:{port}" in banner
        assert (tmp_path / "var" / "token").stat().st_mode & 0o777 == 0o600
        # the README: the CLI's credentials file, written by `nuclide up`, mode 0600 (it holds the token)
        for cli_json in (tmp_path / "cfg" / "nuclide" / "cli.json",):
            assert cli_json.stat().st_mode & 0o777 == 0o600, f"{cli_json} is {cli_json.stat().st_mode & 0o777:o}"
            assert token in cli_json.read_text()
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=60)
        from tests.stack import make_zip

        r = client.put("/uptest", content=make_zip({"function.yaml": function_yaml("uptest"), "main.py": HELLO}),
                       headers={"content-type": "application/zip"})
        assert r.status_code == 200, r.text
        pids = [int(p.read_text().split('"pid": ')[1].split(",")[0])
                for p in (tmp_path / "var" / "instances").glob("*/instance.json")]
        assert pids and all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert not [p for p in pids if _alive(p)], "Ctrl-C must stop the instances too"
        with pytest.raises(httpx.ConnectError):
            client.get("/healthz")
        # the same token and functions come back after a restart, without redeploying
        proc = up()
        lines = []
        wait_for(lambda: (lines.append(proc.stdout.readline()) or "Press Ctrl-C" in lines[-1]), 60,
                 what="the second banner")
        assert token in "".join(lines)
        assert wait_for(lambda: client.post("/uptest").text == "hello", 30, what="the function after restart")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)


def test_up_refuses_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, NUCLIDE_VAR_DIR=str(tmp_path / "var"), NUCLIDE_HTTP_PORT=str(port))
        out = subprocess.run([sys.executable, "-m", "services.cli.main", "up"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert f"port {port} (http_port) is in use" in out.stderr
    assert "NUCLIDE_PORT_BASE=N or `nuclide up --port-base N`" in out.stderr, "the one setting that moves a stack"
