"""The deployer reaps every child: no zombies pile up under it, however many deploys it runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.procs import children, zombie
from tests.stack import Stack, function_yaml, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_bwrap")]

DEPLOYS = 8


def zombies(pid: int) -> list[str]:
    """The zombie children of ``pid``, as "pid (name)"."""
    found = []
    for child in children(pid):
        if zombie(child):
            try:
                name = Path(f"/proc/{child}/comm").read_text().strip()
            except OSError:
                name = "?"
            found.append(f"{child} ({name})")
    return found


@pytest.mark.parametrize("instances", ["forked", "cold"])
def test_no_zombies_after_many_deploys(tmp_path: Path, instances: str) -> None:
    # each version has a build step of its own (a sandboxed build) and replaces the last one's instance
    s = Stack(tmp_path / "var", env={"NUCLIDE_ZYGOTE": "true" if instances == "forked" else "false"})
    try:
        s.start()
        deployer = s.procs["deployer"].pid
        for i in range(DEPLOYS):
            s.deploy("churn", {"function.yaml": function_yaml("churn", build={"commands": [f"echo build {i}"]}),
                               "main.py": f"def handler(context, event):\n    return 'v{i}'\n"})
            assert s.invoke("churn").text == f"v{i}"
        assert s.client.delete("/churn").status_code == 204
        wait_for(lambda: not list((s.var_dir / "instances").glob("*/instance.json")), 30,
                 what="the last instance to stop")
        left: list[str] = []

        def reaped() -> bool:
            left[:] = zombies(deployer)
            return not left

        try:
            wait_for(reaped, 10, what="the deployer's zombie children to be reaped")
        except AssertionError:
            raise AssertionError(f"zombie children of the deployer after {DEPLOYS} deploys: {left}") from None
        assert s.procs["deployer"].poll() is None
    finally:
        s.stop()
