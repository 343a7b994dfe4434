"""The store's state machine, called directly on a real SQLite database."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.store.db import Database
from services.store.state import BlobStore, StoreState
from shared.errors import InvalidRequest, NotFound

SPEC = {"handler": "main:handler", "runtime": "python:3.11", "min_replicas": 1}


@pytest.fixture
def st(tmp_path: Path) -> StoreState:
    return StoreState(Database(tmp_path / "state.db"), BlobStore(tmp_path / "blobs"))


def kinds(events) -> list[str]:
    return [k for k, _ in events]


def seqs(events) -> list[int]:
    return [d["seq"] for _, d in events]


def test_put_creates_function_version_group_and_events(st: StoreState) -> None:
    result, events = st.put_function("f", SPEC, ["w"], b"zipbytes")
    assert result["version"] == 1 and result["group_id"] == "g-f" and result["group_version"] == 1
    assert kinds(events) == ["function.changed", "group.changed"] and seqs(events) == [1, 2]
    fn = st.get_function("f")
    assert fn["state"] == "deploying" and fn["version"] == 0 and fn["latest_version"] == 1
    assert fn["warnings"] == ["w"]
    digest = st.get_version("f", 1)["digest"]
    assert st.blobs.get(digest) == b"zipbytes"


def test_ready_promotes_and_redeploy_keeps_serving_version(st: StoreState) -> None:
    st.put_function("f", SPEC, [], b"v1")
    events = st.instance_ready("i1", "g-f", 1, {"f": 1})
    assert "function.changed" in kinds(events)
    fn = st.get_function("f")
    assert fn["state"] == "ready" and fn["version"] == 1 and fn["replicas"] == {"desired": 1, "ready": 1}
    st.put_function("f", SPEC, [], b"v2")
    fn = st.get_function("f")
    assert fn["version"] == 1 and fn["latest_version"] == 2 and fn["state"] == "deploying"
    st.instance_ready("i2", "g-f", 2, {"f": 2})
    assert st.get_function("f")["version"] == 2
    assert st.get_version("f", 1)["state"] == "superseded"


def test_failed_redeploy_falls_back_to_the_ready_version(st: StoreState) -> None:
    st.put_function("f", SPEC, [], b"v1")
    st.instance_ready("i1", "g-f", 1, {"f": 1})
    st.put_function("f", SPEC, [], b"v2")
    events = st.deploy_failed("g-f", 2, "boom", "Traceback...")
    assert kinds(events)[0] == "deploy.failed"
    fn = st.get_function("f")
    assert fn["state"] == "ready" and fn["version"] == 1 and "boom" in fn["last_error"]
    group = st.snapshot()["groups"][0]
    assert group["version"] == 1 and group["members"] == {"f": 1}
    assert st.get_version("f", 2)["state"] == "failed"
    # a later deploy gets a fresh group version, never reusing 2
    res, _ = st.put_function("f", SPEC, [], b"v3")
    assert res["group_version"] == 3


def test_first_deploy_failure_marks_failed(st: StoreState) -> None:
    st.put_function("f", SPEC, [], b"v1")
    st.deploy_failed("g-f", 1, "import error", "tail")
    fn = st.get_function("f")
    assert fn["state"] == "failed" and "import error" in fn["last_error"]
    assert st.deploy_failed("g-f", 99, "stale", "") == []


def test_crash_loop_of_the_serving_version_marks_failed_and_recovery_clears_it(st: StoreState) -> None:
    st.put_function("f", SPEC, [], b"v1")
    st.instance_ready("i1", "g-f", 1, {"f": 1})
    st.deploy_failed("g-f", 1, "keeps crashing", "segfault")
    assert st.get_function("f")["state"] == "failed"
    st.instance_ready("i2", "g-f", 1, {"f": 1})
    assert st.get_function("f")["state"] == "ready" and st.get_function("f")["last_error"] is None


def test_delete_removes_function_and_group(st: StoreState) -> None:
    st.put_function("f", SPEC, [], b"v1")
    _, events = st.delete_function("f")
    assert kinds(events) == ["function.deleted", "group.deleted"]
    with pytest.raises(NotFound, match="function 'f' not found"):
        st.get_function("f")
    assert st.snapshot()["groups"] == []


def test_sequence_numbers_are_contiguous_and_persist(tmp_path: Path) -> None:
    st = StoreState(Database(tmp_path / "s.db"), BlobStore(tmp_path / "b"))
    all_seqs = []
    _, ev = st.put_function("a", SPEC, [], b"1")
    all_seqs += seqs(ev)
    all_seqs += seqs(st.instance_started("i", "g-a", 1, "process", 123))
    all_seqs += seqs(st.instance_ready("i", "g-a", 1, {"a": 1}))
    all_seqs += seqs(st.instance_exited("i", 0, None))
    assert all_seqs == list(range(1, len(all_seqs) + 1))
    st.db.close()
    again = StoreState(Database(tmp_path / "s.db"), BlobStore(tmp_path / "b"))
    assert again.seq() == all_seqs[-1]
    assert again.get_function("a")["version"] == 1


def test_bad_names_and_empty_zips(st: StoreState) -> None:
    with pytest.raises(InvalidRequest):
        st.put_function("../x", SPEC, [], b"z")
    with pytest.raises(InvalidRequest):
        st.put_function("ok", SPEC, [], b"")
    with pytest.raises(InvalidRequest):
        st.blobs.get("../../etc/passwd")


def test_migrations_are_idempotent(tmp_path: Path) -> None:
    from services.store.db import MIGRATIONS

    db = Database(tmp_path / "m.db")
    assert db.migrate() == 0
    assert db.one("SELECT COUNT(*) FROM schema_migrations")[0] == len(MIGRATIONS)


def _deploy_ready(st: StoreState, name: str, spec: dict | None = None) -> None:
    res, _ = st.put_function(name, spec or SPEC, [], name.encode())
    st.instance_ready(f"i-{name}", res["group_id"], res["group_version"], {name: res["version"]})


def test_regroup_moves_tasks_and_keeps_the_rest(st: StoreState) -> None:
    for n in ("a", "b", "c"):
        _deploy_ready(st, n)
    result, events = st.set_groups([["a", "b"]])
    assert sorted(result["setup"]) == [["a", "b"], ["c"]]
    assert "group.deleted" in kinds(events)  # g-a and g-b are emptied
    fused = next(g for g in result["groups"] if g["tasks"] == ["a", "b"])
    assert fused["state"] == "deploying"
    assert st.get_function("a")["group"]["id"] == fused["id"]
    assert st.get_function("a")["state"] == "ready", "a keeps serving from its old instance meanwhile"
    # the same setup again changes nothing
    _, again = st.set_groups([["a", "b"]])
    assert [k for k in kinds(again) if k.startswith("group")] == []
    # splitting a task out of a fused group redeploys the rest under a newer version
    v_before = fused["version"]
    result, _ = st.set_groups([["b"]])
    rest = next(g for g in result["groups"] if g["tasks"] == ["a"])
    assert rest["version"] > v_before


def test_group_versions_are_globally_increasing(st: StoreState) -> None:
    r1, _ = st.put_function("a", SPEC, [], b"1")
    r2, _ = st.put_function("b", SPEC, [], b"2")
    r3, _ = st.put_function("a", SPEC, [], b"3")
    assert r1["group_version"] < r2["group_version"] < r3["group_version"]


@pytest.mark.parametrize("setup,needle", [
    ([["a", "zz"]], "unknown tasks: zz"),
    ([["a"], ["a", "b"]], "more than one group: a"),
    ([[]], "empty"),
    ("nope", "non-empty JSON list"),
])
def test_bad_setups_change_nothing(st: StoreState, setup, needle: str) -> None:
    for n in ("a", "b"):
        _deploy_ready(st, n)
    before = st.list_groups()
    with pytest.raises(InvalidRequest, match=needle):
        st.set_groups(setup)
    assert st.list_groups() == before


def test_conflicting_requirements_refuse_the_fusion(st: StoreState) -> None:
    from shared.errors import Conflict

    _deploy_ready(st, "a", {**SPEC, "requirements": "requests==2.31.0\n"})
    _deploy_ready(st, "b", {**SPEC, "requirements": "requests==2.28.0\n"})
    before = st.list_groups()
    with pytest.raises(Conflict) as info:
        st.set_groups([["a", "b"]])
    assert "'a'" in info.value.message and "'b'" in info.value.message and "requests" in info.value.message
    assert st.list_groups() == before


def test_sync_call_rows_are_recorded_and_bad_rows_refused(tmp_path: Path) -> None:
    from services.store.calls import CallStore

    calls = CallStore(Database(tmp_path / "state.db"))
    row = ["c1", "fn", "DONE", 1000.0, 1000.5, 200, None, True]
    assert calls.record_sync_rows([row, ["c2", "fn", "FAILED", 1001.0, 1001.1, 500, "boom", False]]) == 2
    got = calls.get("c1")
    assert (got["function"], got["status"], got["kind"], got["result_status"], got["cold_start"]) == (
        "fn", "DONE", "sync", 200, True)
    assert calls.get("c2")["error"] == "boom"
    for bad in (["c3", "fn"], {"id": "c3"}, [1, "fn", "DONE", 0, 0, 200, None, False]):
        with pytest.raises(InvalidRequest, match="sync call row"):
            calls.record_sync_rows([bad])
    with pytest.raises(NotFound):
        calls.get("c3")


def test_a_claim_fits_in_one_reply_and_claims_continue_until_none_is_left(tmp_path: Path) -> None:
    from services.store.calls import CallStore
    from shared import protocol

    calls = CallStore(Database(tmp_path / "state.db"))
    n = protocol.MAX_FRAMES + 100  # more than one reply could carry
    calls.submit([{"id": f"c{i}", "function": "fn", "owner": "old-boot"} for i in range(n)], (b"payload",) * n)
    claimed: list[str] = []
    while True:
        metas, payloads = calls.claim("new-boot", 5000)
        if not metas:
            break
        # what the store's RPC server sends back: the gateway must be able to read it
        msg = protocol.decode(protocol.reply(1, metas, *payloads))
        assert len(msg.bodies) == len(metas) <= protocol.MAX_BATCH
        claimed += [m["id"] for m in metas]
    assert sorted(claimed) == sorted(f"c{i}" for i in range(n))
