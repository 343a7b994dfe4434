"""Restarts against real processes: after the stack or the deployer restarts, the API counts what runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.aiosock import sync_call
from shared.config import Settings
from shared.curve import Keys
from shared.procs import alive, start_time
from tests.stack import ROOT, Stack, free_port, function_yaml, make_zip, wait_for

pytestmark = pytest.mark.integration

HELLO = "def handler(context, event):\n    return 'hello'\n"
SETTLE_S = 45.0  # a restart, a build-free start per group and the gateway noticing dead instances (3 s)


def running_instances(var_dir: Path) -> dict[str, dict[str, Any]]:
    """The instance processes that exist, by instance id, from the deployer's registry checked against /proc."""
    found = {}
    for meta_path in (var_dir / "instances").glob("*/instance.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue  # being written or removed
        if alive(int(meta["pid"]), meta.get("start_time")):
            found[meta["id"]] = meta
    return found


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"/metrics has no {name}")


def mismatch(client: httpx.Client, store_rpc: str, var_dir: Path, names: list[str]) -> str:
    """What the API and the store report that the instance processes contradict; "" when they agree."""
    live = running_instances(var_dir)
    keys = Keys.load(Settings(var_dir=var_dir), "gateway")  # the store answers services only
    rows = [r for r in sync_call(store_rpc, "instances.list", keys=keys) if r["state"] != "exited"]
    functions = {f["name"]: f for f in client.get("/functions").json()}
    problems = []
    for name in names:
        fn = functions[name]
        processes = sum(1 for m in live.values() if m["group_id"] == fn["group"]["id"])
        if not fn["replicas"]["ready"] == fn["replicas"]["desired"] == processes:
            problems.append(f"{name}: ready/desired {fn['replicas']['ready']}/{fn['replicas']['desired']},"
                            f" {processes} processes")
    if {r["id"] for r in rows} != set(live) or any(r["state"] != "ready" for r in rows):
        problems.append(f"instance rows {sorted((r['id'], r['state'], r['pid']) for r in rows)}"
                        f" but processes {sorted((i, m['pid']) for i, m in live.items())}")
    if metric(client, "nuclide_instances") != len(live):
        problems.append(f"/metrics counts {metric(client, 'nuclide_instances'):g} instances, {len(live)} run")
    return "; ".join(problems)


def settled(client: httpx.Client, store_rpc: str, var_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Wait until the replica counts and instance rows match the processes; return those processes."""

    def agree() -> bool:
        problem = mismatch(client, store_rpc, var_dir, names)
        if problem:
            raise AssertionError(problem)  # wait_for reports the last one when it gives up
        return True

    wait_for(agree, SETTLE_S, interval_s=0.2, what="replica counts and instance rows to match the processes")
    return running_instances(var_dir)


def test_ctrl_c_and_up_again_counts_only_the_instances_that_run(tmp_path: Path) -> None:
    """The report: Ctrl-C `nuclide up`, start it again: every function showed READY/DESIRED 2/1."""
    var_dir = tmp_path / "var"
    port = free_port()
    endpoints = {k: f"tcp://127.0.0.1:{free_port()}" for k in
                 ("STORE_RPC", "STORE_PUB", "DEPLOYER_RPC", "GATEWAY_ROUTER", "GATEWAY_PULL", "GATEWAY_SUB", "GATEWAY_PUB")}
    token = "test-token-" + os.urandom(6).hex()
    env = dict(os.environ, NUCLIDE_VAR_DIR=str(var_dir), NUCLIDE_HTTP_PORT=str(port), NUCLIDE_TOKEN=token,
               XDG_CONFIG_HOME=str(tmp_path / "cfg"), **{f"NUCLIDE_{k}": v for k, v in endpoints.items()})
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                          timeout=60)

    def up() -> subprocess.Popen:
        # a session of its own, like a job in a terminal: Ctrl-C signals its whole process group
        proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "up"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            wait_for(lambda: "Press Ctrl-C" in proc.stdout.readline(), 60, what="the nuclide up banner")
        except AssertionError:
            ctrl_c(proc)
            raise
        return proc

    def ctrl_c(proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0

    names = ["one", "two"]
    proc = up()
    try:
        for name, replicas in (("one", 1), ("two", 2)):
            r = client.put(f"/{name}", content=make_zip({"function.yaml": function_yaml(name, minReplicas=replicas),
                                                         "main.py": HELLO}),
                           headers={"content-type": "application/zip"})
            assert r.status_code == 200, r.text
        first = settled(client, endpoints["STORE_RPC"], var_dir, names)
        assert len(first) == 3
        ctrl_c(proc)
        assert not [m for m in first.values() if alive(m["pid"], m.get("start_time"))], "Ctrl-C stops the instances"

        proc = up()
        second = settled(client, endpoints["STORE_RPC"], var_dir, names)
        assert len(second) == 3 and not set(second) & set(first)
        assert client.post("/one").text == "hello" and client.post("/two").text == "hello"
    finally:
        if proc.poll() is None:
            ctrl_c(proc)
        client.close()


def test_a_restarted_deployer_adopts_what_runs_and_reports_what_died_meanwhile(fresh_stack: Stack) -> None:
    s = fresh_stack
    names = ["kept", "lost"]
    for name in names:
        s.deploy(name, {"function.yaml": function_yaml(name), "main.py": HELLO})
    before = settled(s.client, s.endpoints["store_rpc"], s.var_dir, names)
    kept = next(i for i, m in before.items() if m["group_id"] == "g-kept")
    lost = next(i for i, m in before.items() if m["group_id"] == "g-lost")

    s.stop_service("deployer", signal.SIGKILL)  # instances outlive it ...
    os.kill(before[lost]["pid"], signal.SIGKILL)  # ... but one dies while no deployer watches
    # reaped too (init inherited it): a zombie would still be adopted, and its exit seen, by the next deployer
    wait_for(lambda: start_time(before[lost]["pid"]) is None, 30, what="the killed instance to be reaped")
    s.start_service("deployer")
    s.wait_healthy()

    after = settled(s.client, s.endpoints["store_rpc"], s.var_dir, names)
    assert after[kept]["pid"] == before[kept]["pid"], "the running instance is adopted, not replaced"
    assert lost not in after and any(m["group_id"] == "g-lost" for m in after.values()), "the dead one is replaced"
    rows = {r["id"]: r for r in sync_call(s.endpoints["store_rpc"], "instances.list", keys=s.keys())}
    assert rows[lost]["state"] == "exited"
    assert s.invoke("kept").text == "hello" and s.invoke("lost").text == "hello"


def test_a_deployer_stopped_with_its_instances_reports_their_exits(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("stopped", {"function.yaml": function_yaml("stopped"), "main.py": HELLO})
    before = settled(s.client, s.endpoints["store_rpc"], s.var_dir, ["stopped"])
    assert s.stop_service("deployer") == 0  # SIGTERM; the stack's deployer stops its instances on exit
    assert not running_instances(s.var_dir)
    rows = {r["id"]: r for r in sync_call(s.endpoints["store_rpc"], "instances.list", keys=s.keys())}
    assert all(rows[i]["state"] == "exited" for i in before), "the exits reach the store before the deployer exits"
    s.start_service("deployer")
    s.wait_healthy()
    settled(s.client, s.endpoints["store_rpc"], s.var_dir, ["stopped"])
    assert s.invoke("stopped").text == "hello"
