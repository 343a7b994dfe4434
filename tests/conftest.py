"""Shared fixtures: a real stack per test session, and fresh stacks for tests that break things."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from tests.stack import Stack, sandbox_problem


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack shared by the tests that only deploy and invoke."""
    # callback tests listen on loopback, which the platform refuses by default (callback_allow)
    s = Stack(tmp_path_factory.mktemp("stack") / "var", {"NUCLIDE_CALLBACK_ALLOW": "127.0.0.0/8"})
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture
def fresh_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of this test's own, for tests that restart or kill services."""
    s = Stack(tmp_path / "var")
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture
def require_bwrap() -> None:
    problem = sandbox_problem()
    if problem:
        if os.environ.get("NUCLIDE_REQUIRE_BWRAP") == "1":
            pytest.fail(f"the sandbox is required here (NUCLIDE_REQUIRE_BWRAP=1) but {problem}")
        pytest.skip(problem)
