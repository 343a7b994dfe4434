"""Instances forked from a warm zygote: waking from zero, confinement, zygote restarts and stops, adoption."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from shared.procs import alive
from tests.stack import Stack, function_yaml, make_zip, wait_for
from tests.tasks import PROBE_HELPERS

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_bwrap")]

HELLO = "def handler(context, event):\n    return 'awake'\n"


def instances(s: Stack, name: str) -> list[dict[str, Any]]:
    out = []
    for meta in (s.var_dir / "instances").glob(f"g-{name}-*/instance.json"):
        try:
            out.append(json.loads(meta.read_text()))
        except (OSError, ValueError):
            pass  # being written or removed
    return out


def forked_instance(s: Stack, name: str) -> dict[str, Any]:
    inst = wait_for(lambda: instances(s, name), 10, what=f"an instance of {name}")[0]
    assert inst.get("forked") is True, f"{name} was not forked from a zygote: {inst}\n{s.service_log('deployer')[-2000:]}"
    return inst


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def deployer_events(s: Stack, event: str) -> list[dict[str, Any]]:
    found = []
    for line in s.service_log("deployer").splitlines():
        if event in line:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") == event:
                found.append(rec)
    return found


def test_a_scaled_to_zero_function_wakes_through_the_zygote(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("napper", {"function.yaml": function_yaml("napper", minReplicas=0, scaleToZero={"idleTimeout": "1s"}),
                        "main.py": HELLO})
    first = forked_instance(s, "napper")
    wait_for(lambda: s.client.get("/napper").json()["state"] == "scaledToZero", 20, what="scale to zero")
    wait_for(lambda: not alive(first["pid"]), 15, what="the instance to stop")

    started = time.monotonic()
    r = s.invoke("napper")
    took_ms = (time.monotonic() - started) * 1000
    assert r.status_code == 200 and r.text == "awake"
    assert r.headers.get("x-nuclide-cold-start") == "true"
    print(f"\nscale-from-zero through the zygote: {took_ms:.1f} ms")
    woken = forked_instance(s, "napper")
    assert woken["pid"] != first["pid"]
    assert woken["zygote_pid"] == first["zygote_pid"], "the same warm zygote forks every instance of the env"
    assert "services.runtime.zygote" in cmdline(woken["zygote_pid"])
    # the zygote's go-between exits at once: the deployer (a child subreaper) is the instance's parent
    assert ppid(woken["pid"]) == s.procs["deployer"].pid


def test_forked_instances_are_confined(stack: Stack) -> None:
    # test_resilience.py's sandbox probe (writes, another function's code, the state) runs forked too,
    # as every instance on this stack; this one checks what forking adds to keep up
    var = stack.var_dir.resolve()
    probe = PROBE_HELPERS + f"""
import resource

def status(key):
    return next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":"))

def handler(context, event):
    mounts = [line.split()[4] for line in open("/proc/self/mountinfo")]
    return {{
        "var": attempt(lambda: write({str(var / "planted")!r})),
        "functions": os.listdir({str(var / "functions")!r}),
        "pid": os.getpid(),
        "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "caps": [status(k) for k in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")],
        "no_new_privs": status("NoNewPrivs"),
        "data_limit": resource.getrlimit(resource.RLIMIT_DATA)[0],
        "staged": [m for m in mounts if m in ({str(var / "functions")!r}, {str(var / "envs")!r})],
    }}
"""
    spec = function_yaml("prober2", resources={"limits": {"memory": "200Mi"}})
    stack.deploy("prober2", {"function.yaml": spec, "main.py": probe})
    forked_instance(stack, "prober2")
    out = stack.invoke("prober2").json()
    assert out["var"] in ("OSError", "PermissionError") and not (var / "planted").exists()
    assert out["functions"] == ["prober2"], "only its own code is in its view of the state directory"
    assert out["pid"] == 2 and out["processes"] == [1, 2], "a PID namespace of its own: its init and the runtime"
    assert out["caps"] == ["0000000000000000"] * 5, "no capability is left, in any set"
    assert out["no_new_privs"] == "1"
    assert out["data_limit"] == 200 * 1024 * 1024, "the memory limit applies to forked instances"
    assert out["staged"] == [], "the zygote's view of every function is detached in the instance"


def test_import_failure_in_a_forked_instance_fails_the_deploy_with_its_log(stack: Stack) -> None:
    code = "raise RuntimeError('no config in the forked child')\n\ndef handler(context, event):\n    return 1\n"
    archive = make_zip({"function.yaml": function_yaml("forkfail"), "main.py": code})
    resp = stack.client.put("/forkfail", files={"zip_file": ("f.zip", archive, "application/zip")})
    assert resp.status_code == 422, resp.text
    assert "no config in the forked child" in resp.json()["error"]["details"]["log_tail"]
    assert any(e["instance"].startswith("g-forkfail-") for e in deployer_events(stack, "instance forked"))
    assert "no config in the forked child" in stack.client.get("/forkfail").json()["last_error"]


def test_the_zygote_is_restarted_after_kill_9(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("steady", {"function.yaml": function_yaml("steady"), "main.py": HELLO})
    inst = forked_instance(s, "steady")
    old = inst["zygote_pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: len(deployer_events(s, "zygote ready")) >= 2, 20, what="a new zygote")
    assert s.invoke("steady").text == "awake", "instances outlive the zygote that forked them"
    s.deploy("after", {"function.yaml": function_yaml("after"), "main.py": HELLO})
    again = forked_instance(s, "after")
    assert again["zygote_pid"] != old and alive(again["zygote_pid"])
    assert s.invoke("after").text == "awake"


def test_deleting_every_function_of_an_environment_stops_its_zygote(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("one", {"function.yaml": function_yaml("one"), "main.py": HELLO})
    s.deploy("two", {"function.yaml": function_yaml("two", minReplicas=0), "main.py": HELLO})
    zygote = forked_instance(s, "one")["zygote_pid"]
    assert s.client.delete("/one").status_code == 204
    time.sleep(1.5)  # a negative check: "two" (scaled to zero or not) still needs it
    assert alive(zygote), "the zygote must stay while a function of its environment exists"
    assert s.client.delete("/two").status_code == 204
    wait_for(lambda: not alive(zygote), 30, what="the zygote to stop (it lingers 10 s)")
    assert deployer_events(s, "stopping zygote: no function uses its environment")


def test_a_restarted_deployer_adopts_forked_instances_and_forks_again(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.deploy("kept", {"function.yaml": function_yaml("kept"), "main.py": HELLO})
    inst = forked_instance(s, "kept")
    s.stop_service("deployer", signal.SIGKILL)
    assert s.invoke("kept").text == "awake"
    s.start_service("deployer")  # appends to the same log
    s.wait_healthy()
    wait_for(lambda: len(deployer_events(s, "zygote ready")) >= 2, 20, what="the adopted environment's zygote")
    assert [i["pid"] for i in instances(s, "kept")] == [inst["pid"]], "adopted, not duplicated"
    s.deploy("fresh", {"function.yaml": function_yaml("fresh"), "main.py": HELLO})
    assert forked_instance(s, "fresh")["zygote_pid"] != inst["zygote_pid"]
    assert s.client.delete("/kept").status_code == 204
    wait_for(lambda: not alive(inst["pid"]), 15, what="the adopted forked instance to stop")


def test_without_zygotes_instances_start_cold(tmp_path: Path) -> None:
    s = Stack(tmp_path / "var", env={"NUCLIDE_ZYGOTE": "false"})
    try:
        s.start()
        s.deploy("plain", {"function.yaml": function_yaml("plain"), "main.py": HELLO})
        assert s.invoke("plain").text == "awake"
        inst = instances(s, "plain")[0]
        # started by a zygote of its own (--once), confined by the same code as a forked one
        assert inst.get("forked") and not inst.get("zygote_pid")
        assert deployer_events(s, "no zygotes: every instance starts a zygote of its own (about 0.2 s slower to wake)")
    finally:
        s.stop()



def test_orphans_are_reaped_and_subprocess_exit_codes_kept(stack: Stack) -> None:
    # what a handler starts and leaves behind is re-parented to the namespace's init, which reaps it
    code = """
import os, subprocess, time

def state(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"

def handler(context, event):
    if event.body == b"spawn":
        subprocess.run(["sh", "-c", "sleep 0.2 & echo $!"], capture_output=True)  # sh exits, sleep is orphaned
        return {"exit": subprocess.run(["sh", "-c", "exit 3"]).returncode}
    zombies = [p for p in os.listdir("/proc") if p.isdigit() and state(p) == "Z"]
    return {"zombies": zombies, "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
"""
    stack.deploy("orphans", {"function.yaml": function_yaml("orphans"), "main.py": code})
    forked_instance(stack, "orphans")
    assert stack.invoke("orphans", b"spawn").json() == {"exit": 3}, "the runtime still reaps its own children"
    # the orphaned sleep ends after 0.2 s; without a reaper it would stay a zombie for good
    wait_for(lambda: (out := stack.invoke("orphans", b"look").json())["zombies"] == [] and out["pids"] == [1, 2],
             10, interval_s=0.1, what="the orphan to exit and be reaped")


def test_sigterm_reaches_the_runtime_through_the_init(stack: Stack) -> None:
    stack.deploy("drains", {"function.yaml": function_yaml("drains"), "main.py": HELLO})
    inst = forked_instance(stack, "drains")
    assert stack.invoke("drains").text == "awake"
    assert stack.client.delete("/drains").status_code == 204
    wait_for(lambda: not alive(inst["pid"]), 15, what="the instance to stop")

    def said_bye() -> bool:  # the runtime drains on SIGTERM and says BYE; a SIGKILLed one cannot
        for line in stack.service_log("gateway").splitlines():
            if inst["id"] in line and "said BYE" in line:
                return True
        return False

    assert said_bye(), "the runtime got the SIGTERM its init was sent"
