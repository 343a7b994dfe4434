"""The store on PostgreSQL: a bad database_url at start, a standby taking over from a killed leader, a server restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.async_load import WORK, Load, wait_all_done
from tests.pg_util import PgCluster
from tests.stack import ROOT, Stack, free_port, function_yaml, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TOTAL = 600  # async calls per test: enough that the fault lands mid-load on this machine


@pytest.fixture
def pg_stack(tmp_path: Path, postgres_cluster: PgCluster) -> Iterator[Stack]:
    s = Stack(tmp_path / "var", {"NUCLIDE_DATABASE_URL": postgres_cluster.new_database()})
    try:
        yield s.start()
    finally:
        s.stop()


def _store_alone(tmp_path: Path, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NUCLIDE_VAR_DIR": str(tmp_path / "var"), "NUCLIDE_DATABASE_URL": url,
           "NUCLIDE_STORE_RPC": f"tcp://127.0.0.1:{free_port()}", "NUCLIDE_STORE_PUB": f"tcp://127.0.0.1:{free_port()}"}
    return subprocess.run([sys.executable, "-m", "services.store"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_an_unreachable_or_wrong_database_url_fails_at_start_with_one_line(tmp_path: Path,
                                                                          postgres_cluster: PgCluster) -> None:
    nobody = free_port()  # nothing listens there
    proc = _store_alone(tmp_path, f"postgresql://nuclide:s3cret@127.0.0.1:{nobody}/nuclide")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{nobody}" in lines[0] and "check that PostgreSQL runs there" in lines[0], lines[0]
    assert "s3cret" not in proc.stderr + proc.stdout

    missing = f"{postgres_cluster.url_base.replace('postgres@', 'postgres:s3cret@')}/no_such_db"
    proc = _store_alone(tmp_path, missing)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{postgres_cluster.port}" in lines[0] and "createdb no_such_db" in lines[0], lines[0]
    assert "s3cret" not in proc.stderr + proc.stdout

    proc = _store_alone(tmp_path, "mysql://root:s3cret@127.0.0.1/x")
    assert proc.returncode == 2 and "postgresql://user:password@host:port/database" in proc.stderr
    assert "s3cret" not in proc.stderr


def _deploy_and_load(s: Stack) -> Load:
    s.deploy("work", {"function.yaml": function_yaml("work", retry={"maxAttempts": 5, "backoff": {"initial": "100ms"}}),
                      "main.py": WORK})
    return Load(s.url, TOTAL).start()


def _all_accepted_finish(s: Stack, load: Load) -> None:
    load.join()
    assert len(load.accepted) == TOTAL, f"only {len(load.accepted)} accepted"
    ids = set(load.accepted.values())
    assert len(ids) == TOTAL, "every idempotency key maps to exactly one call"
    wait_all_done(s, ids)


def test_a_standby_store_takes_over_when_the_leader_is_killed_under_async_load(pg_stack: Stack) -> None:
    s = pg_stack
    s.start_service("store", key="store-standby")
    wait_for(lambda: "standing by" in s.service_log("store-standby"), 30, what="the second store to stand by")
    assert s.procs["store-standby"].poll() is None
    load = _deploy_and_load(s)
    wait_for(lambda: len(load.accepted) >= TOTAL // 3, 90, what=f"{TOTAL // 3} accepted calls")
    s.stop_service("store", signal.SIGKILL)  # the leader dies mid-load; nothing restarts it
    wait_for(lambda: "taking over as the leading store" in s.service_log("store-standby"), 30,
             what="the standby to take over")
    _all_accepted_finish(s, load)
    assert s.procs["store-standby"].poll() is None
    # the old leader, started again, stands by in its turn rather than writing beside the new one
    s.start_service("store")
    wait_for(lambda: "standing by" in s.service_log("store"), 30, what="the old leader to stand by")


def test_postgresql_restarted_under_async_load_loses_no_accepted_call(pg_stack: Stack,
                                                                     postgres_cluster: PgCluster) -> None:
    s = pg_stack
    load = _deploy_and_load(s)
    wait_for(lambda: len(load.accepted) >= TOTAL // 3, 90, what=f"{TOTAL // 3} accepted calls")
    postgres_cluster.restart()  # every connection is cut; the server is back when this returns
    accepted_before = len(load.accepted)
    _all_accepted_finish(s, load)
    assert accepted_before < TOTAL, "calls were accepted after the restart too"
    assert s.procs["store"].poll() is None, "the store reconnected rather than exiting:\n" + s.service_log("store")[-2000:]
    assert "database error" in s.service_log("store"), "the restart was seen (and retried) by the store"
