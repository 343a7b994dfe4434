"""No silent fallback: the process backend refuses to run functions unsandboxed unless the operator says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stack import Stack, function_yaml

pytestmark = pytest.mark.integration

WHOAMI = "import os\n\ndef handler(context, event):\n    return str(os.getuid())\n"


def test_without_bubblewrap_no_instance_starts_and_the_deploy_says_why(tmp_path: Path) -> None:
    # a PATH without bwrap or slirp4netns: a host where the sandbox's tools are not installed
    s = Stack(tmp_path / "var", env={"PATH": str(tmp_path / "empty-bin"), "NUCLIDE_SANDBOX": "auto"})
    try:
        s.start()
        resp = s.deploy("exposed", {"function.yaml": function_yaml("exposed"), "main.py": WHOAMI}, expect=422)
        message = resp.json()["error"]["message"]
        assert "bubblewrap" in message and "NUCLIDE_SANDBOX=none" in message, message
        assert s.invoke("exposed").status_code != 200, "nothing runs the function"
        assert "the process backend will refuse to start instances" in s.service_log("deployer")
    finally:
        s.stop()


def test_sandbox_none_runs_unsandboxed_and_says_so_everywhere(tmp_path: Path) -> None:
    s = Stack(tmp_path / "var", env={"NUCLIDE_SANDBOX": "none"})
    try:
        s.start()
        health = s.anon.get("/healthz").json()
        assert any("sandbox is 'none'" in w for w in health.get("warnings", [])), health
        resp = s.deploy("trusted", {"function.yaml": function_yaml("trusted"), "main.py": WHOAMI})
        assert any("sandbox is 'none'" in w for w in resp.json()["warnings"]), resp.json()
        assert s.invoke("trusted").text == str(__import__("os").getuid()), "the deployer's own user: no sandbox"
        assert "sandbox is 'none'" in s.service_log("deployer")
    finally:
        s.stop()
