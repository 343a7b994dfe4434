"""Shared fixtures: a real stack per test session, and fresh stacks for tests that break things."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

from tests.stack import Stack, sandbox_problem

if TYPE_CHECKING:
    from tests.pg_util import PgCluster

# the store's databases: every store test and async-call guarantee runs on each (tests/pg_util.py)
DATABASES = ("sqlite", "postgresql")


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
def short_tmp_path() -> Iterator[Path]:
    """A fresh directory with a short path (pytest's are deep): a unix socket's path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="nt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def callback_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of this test's own whose callbacks may reach loopback, where the test's hook listens."""
    s = Stack(tmp_path / "var", {"NUCLIDE_CALLBACK_ALLOW": "127.0.0.0/8"})
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


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator["PgCluster"]:
    """One throw-away PostgreSQL server for the session (skips without one, fails under NUCLIDE_REQUIRE_POSTGRES=1)."""
    from tests.pg_util import REQUIRE_ENV, PgCluster, missing_reason

    reason = missing_reason()
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"PostgreSQL is required here ({REQUIRE_ENV}=1) but {reason}")
        pytest.skip(reason)
    cluster = PgCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def database_url(request: pytest.FixtureRequest, kind: str) -> str:
    """The database_url of a fresh database of ``kind``: empty for SQLite (in the stack's var_dir)."""
    if kind == "sqlite":
        return ""
    return request.getfixturevalue("postgres_cluster").new_database()


@pytest.fixture(params=DATABASES)
def any_database_url(request: pytest.FixtureRequest) -> str:
    """A fresh database for this test, once per kind in DATABASES."""
    return database_url(request, request.param)


@pytest.fixture(scope="module", params=DATABASES)
def module_database_url(request: pytest.FixtureRequest) -> str:
    """A fresh database shared by a module's tests, once per kind in DATABASES."""
    return database_url(request, request.param)


@pytest.fixture
def open_store_db(tmp_path: Path, any_database_url: str) -> Iterator:
    """Opens the store's database for this test (SQLite in tmp_path, or a fresh PostgreSQL one), led and migrated."""
    opened = []

    def open_db():
        from services.store.db import Database

        if not any_database_url:
            db = Database(tmp_path / "state.db")
        else:
            from services.store.pg import PgDatabase

            db = PgDatabase(any_database_url)
            assert db.lead(), "no other store uses a fresh database"
        opened.append(db)
        return db

    yield open_db
    for db in opened:
        try:
            db.close()
        except Exception:
            pass


@pytest.fixture(scope="module")
def stack_on_each_database(tmp_path_factory: pytest.TempPathFactory, module_database_url: str) -> Iterator[Stack]:
    """Like ``stack``, for one module, once on SQLite and once on PostgreSQL."""
    s = Stack(tmp_path_factory.mktemp("stack") / "var", {"NUCLIDE_CALLBACK_ALLOW": "127.0.0.0/8",
                                                         "NUCLIDE_DATABASE_URL": module_database_url})
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture
def fresh_stack_on_each_database(tmp_path: Path, any_database_url: str) -> Iterator[Stack]:
    """Like ``fresh_stack``, once on SQLite and once on a fresh PostgreSQL database."""
    s = Stack(tmp_path / "var", {"NUCLIDE_DATABASE_URL": any_database_url})
    try:
        yield s.start()
    finally:
        s.stop()
