"""Schemathesis against the gateway's own /openapi.json: no generated request gets a 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stack import Stack, function_yaml

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 60
SEED = 20261205  # fixed, so a failure reproduces; a new seed is one edit away


def test_no_request_the_schema_allows_gets_a_server_error(fresh_stack: Stack, tmp_path: Path) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli, "schemathesis is installed with the test extras (pip install -e '.[test]')"
    # something to find, so the routes that take a name reach more than their 404
    fresh_stack.deploy("fuzzed", {"function.yaml": function_yaml("fuzzed"),
                                  "main.py": "def handler(context, event):\n    return 'ok'\n"})
    run = subprocess.run(
        [cli, "run", f"{fresh_stack.url}/openapi.json", "-H", f"Authorization: Bearer {fresh_stack.token}",
         "--checks", "not_a_server_error", "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", str(SEED),
         "--request-timeout", "60", "--workers", "1",
         # a log follower streams until its client leaves: each request with follow on would hold the run
         # for the whole request timeout; the logs route is tested on its own (test_logs_follow.py)
         "--exclude-path", "/functions/{name}/logs"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    out = run.stdout + run.stderr
    assert "ST101" not in out and run.returncode == 0, out[-6000:]
    assert " passed" in out and "generated" in out, out[-2000:]
    fresh_stack.wait_healthy()
