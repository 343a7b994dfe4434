"""Build commands run with the function's own Python, whatever the host's PATH holds.

The Nuclio Fusionizer's TaskA declares ``build: commands: [pip install requests]``. The host's first
``pip`` may be a shim that fails in the read-only sandbox (pyenv's does), belong to another Python,
or be missing; the build must still install into the function's environment with the interpreter
the function runs on.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.stack import Stack, function_yaml
from tests.tasks import TASK_A, TASK_B

pytestmark = pytest.mark.integration

TOOLS = ("python", "python3", "pip", "pip3")
# what the sandboxed build and the deployer need from PATH when no Python tool may be on it
BASICS = ("sh", "bwrap", "slirp4netns", "mkdir", "cat", "echo", "ls", "rm", "cp", "env", "id")

# a build step that records what each tool name runs; the handler reads the record back
WHICH = ("for t in python python3; do echo \"$t $($t -c 'import sys; print(sys.executable)')\"; done"
         " > $PIP_TARGET/which.txt; for t in pip pip3; do echo \"$t $($t --version)\"; done >> $PIP_TARGET/which.txt")
WHICH_HANDLER = """
import os, sys

def handler(context, event):
    here = [p for p in sys.path if os.path.exists(os.path.join(p, "which.txt"))]
    with open(os.path.join(here[0], "which.txt")) as fh:
        return fh.read()
"""


def broken_shims(folder: Path) -> Path:
    """Every Python tool name as a shim that fails the way pyenv's does in a read-only sandbox."""
    folder.mkdir(parents=True)
    for name in TOOLS:
        shim = folder / name
        shim.write_text("#!/bin/sh\necho 'broken shim: cannot rehash' >&2\nexit 1\n")
        shim.chmod(0o755)
    return folder


def basics_only(folder: Path) -> Path:
    """A PATH directory with a few basic commands and no Python tool at all."""
    folder.mkdir(parents=True)
    for name in BASICS:
        found = shutil.which(name)
        if found:
            (folder / name).symlink_to(found)
    return folder


@pytest.fixture(params=["broken-shims-first", "no-python-tools"])
def odd_path_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    if request.param == "broken-shims-first":
        path = f"{broken_shims(tmp_path / 'shims')}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    else:
        path = str(basics_only(tmp_path / 'basics'))
    s = Stack(tmp_path / "var", {"PATH": path})
    try:
        yield s.start()
    finally:
        s.stop()


def test_fusionizer_task_a_builds_with_its_own_pip(odd_path_stack: Stack) -> None:
    stack = odd_path_stack
    stack.deploy("TaskB", {"function.yaml": function_yaml("TaskB"), "main.py": TASK_B})
    spec = {"build": {"commands": ["pip install requests"]}}
    stack.deploy("TaskA", {"function.yaml": function_yaml("TaskA", **spec), "main.py": TASK_A})
    r = stack.invoke("TaskA", {})
    assert (r.status_code, r.text) == (200, "8"), r.text


def test_every_tool_name_runs_the_function_interpreter(odd_path_stack: Stack) -> None:
    stack = odd_path_stack
    spec = {"build": {"commands": [WHICH]}}
    stack.deploy("which", {"function.yaml": function_yaml("which", **spec), "main.py": WHICH_HANDLER})
    lines = dict(line.split(" ", 1) for line in stack.invoke("which").text.splitlines())
    import pip

    pip_dir = os.path.dirname(pip.__file__)
    assert lines["python"] == lines["python3"] == sys.executable, lines
    for name in ("pip", "pip3"):
        assert f" from {pip_dir} (python {sys.version_info.major}.{sys.version_info.minor})" in lines[name], lines


def test_failing_build_step_is_422_with_its_log_and_the_old_version_serves(odd_path_stack: Stack) -> None:
    stack = odd_path_stack
    hello = "def handler(context, event):\n    return 'v1'\n"
    stack.deploy("keeps", {"function.yaml": function_yaml("keeps"), "main.py": hello})
    spec = {"build": {"commands": ["pip install --no-index nuclide-no-such-package"]}}
    r = stack.deploy("keeps", {"function.yaml": function_yaml("keeps", **spec), "main.py": hello}, expect=422)
    assert "build step 'pip install --no-index nuclide-no-such-package' exited with code 1" in r.text, r.text
    assert "nuclide-no-such-package" in r.json()["error"]["details"]["log_tail"], r.text
    assert "broken shim" not in r.text
    assert stack.invoke("keeps").text == "v1"
