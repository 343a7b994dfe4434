"""Stacks side by side on one machine: `nuclide up` with a port base, and the CLI sending each stack its own token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.stack import NuclideUp, free_port, free_port_base

pytestmark = pytest.mark.integration


def user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no NUCLIDE_* settings of the test run, and a config dir of this test's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUCLIDE_")}
    env.update({"XDG_CONFIG_HOME": str(tmp_path / "config"), "NUCLIDE_LOG_FORMAT": "json", **extra})
    return env


def nuclide(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], cwd=cwd, env=env, input="",
                          capture_output=True, text=True, timeout=120)


HELLO = "def handler(context, event):\n    return 'hello from the first stack'\n"


@pytest.mark.timeout(300)
def test_two_stacks_by_port_base_both_serve_and_the_cli_keeps_both_tokens(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    first = second = None
    try:
        base = free_port_base()
        first = NuclideUp(tmp_path / "first", env, "--port-base", str(base))
        other_base = free_port_base()
        second = NuclideUp(tmp_path / "second", {**env, "NUCLIDE_PORT_BASE": str(other_base)})
        assert (first.url, second.url) == (f"http://127.0.0.1:{base}", f"http://127.0.0.1:{other_base}")
        assert first.token != second.token
        for up in (first, second):
            assert httpx.get(f"{up.url}/healthz", timeout=5).status_code == 200
        # one file for the user, one entry per stack, 0600
        stacks_file = tmp_path / "config" / "nuclide" / "cli.json"
        assert stacks_file.stat().st_mode & 0o777 == 0o600
        stacks = json.loads(stacks_file.read_text())
        assert stacks["current"] == second.url
        assert {url: s["token"] for url, s in stacks["stacks"].items()} == {first.url: first.token,
                                                                            second.url: second.token}
        listing = nuclide(env, tmp_path / "elsewhere", "stacks")
        assert listing.returncode == 0, listing.stderr
        assert first.token not in listing.stdout and second.token not in listing.stdout
        [current] = [line for line in listing.stdout.splitlines() if line.startswith("*")]
        assert second.url in current and "`nuclide up`" in current

        # the newest stack by default, the other by --url, each with its own token
        (tmp_path / "fn").mkdir()
        (tmp_path / "fn" / "main.py").write_text(HELLO)
        deployed = nuclide(env, tmp_path / "elsewhere", "deploy", str(tmp_path / "fn"), "--name", "hi",
                           "--url", first.url)
        assert deployed.returncode == 0, deployed.stderr
        invoked = nuclide(env, tmp_path / "elsewhere", "invoke", "hi", "--url", first.url)
        assert (invoked.returncode, invoked.stdout) == (0, "hello from the first stack"), invoked.stderr
        on_second = nuclide(env, tmp_path / "elsewhere", "list", "-o", "json")
        assert on_second.returncode == 0, on_second.stderr
        assert json.loads(on_second.stdout) == []
        on_first = nuclide({**env, "NUCLIDE_URL": first.url}, tmp_path / "elsewhere", "list", "-o", "json")
        assert on_first.returncode == 0, on_first.stderr
        assert [fn["name"] for fn in json.loads(on_first.stdout)] == ["hi"]
    finally:
        for up in (second, first):
            if up is not None:
                up.stop()


@pytest.mark.timeout(300)
def test_busy_ports_name_the_base_setting_and_a_bad_base_is_one_line(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    first = None
    try:
        base = free_port_base()
        first = NuclideUp(tmp_path / "first", env, "--port-base", str(base))
        clash = nuclide({**env, "NUCLIDE_PORT_BASE": str(base)}, tmp_path / "second", "up")
        assert clash.returncode == 1
        assert clash.stderr.startswith(f"nuclide: port {base} (http_port) is in use; port {base + 1} (store_rpc)")
        assert f"port_base is {base}; use NUCLIDE_PORT_BASE=N or `nuclide up --port-base N`" in clash.stderr
        assert clash.stderr.count("\n") == 1
    finally:
        if first is not None:
            first.stop()
    bad = nuclide({**env, "NUCLIDE_PORT_BASE": "65530"}, tmp_path / "second", "up")
    assert bad.returncode == 2
    assert bad.stderr.startswith("nuclide: port_base 65530 is out of range 1-65528") and bad.stderr.count("\n") == 1


@pytest.mark.timeout(300)
def test_a_stack_started_where_another_was_gets_its_own_token(tmp_path: Path) -> None:
    """`make run`, stopped; another stack at the same URL (`make up`, here another `nuclide up`); `nuclide list`."""
    ports = {key: free_port() for key in ("STORE_RPC", "STORE_PUB", "DEPLOYER_RPC", "GATEWAY_ROUTER", "GATEWAY_PULL",
                                           "GATEWAY_SUB", "GATEWAY_PUB")}
    env = user_env(tmp_path, NUCLIDE_HTTP_PORT=str(free_port()),
                   **{f"NUCLIDE_{key}": f"tcp://127.0.0.1:{port}" for key, port in ports.items()})
    earlier = NuclideUp(tmp_path / "checkout", env)
    earlier.stop()
    later = NuclideUp(tmp_path / "elsewhere", env)
    try:
        assert later.url == earlier.url and later.token != earlier.token
        # from the directory the earlier stack ran in, where it left its state
        listed = nuclide(env, tmp_path / "checkout", "list", "-o", "json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []
    finally:
        later.stop()
