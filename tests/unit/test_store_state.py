"""The store's state machine, called directly on a real database: SQLite and PostgreSQL (see conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.store.blobs import open_blobs
from services.store.state import StoreState
from shared.errors import InvalidRequest, NotFound

SPEC = {"handler": "main:handler", "runtime": "python:3.11", "min_replicas": 1}

# no gateway beats in these tests: every owner other than the claimer counts as gone
TTL_S = 30.0


@pytest.fixture
def st(tmp_path: Path, open_store_db) -> StoreState:
    db = open_store_db()
    return StoreState(db, open_blobs(db, tmp_path))


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


def test_instances_found_gone_stop_counting_and_exits_already_reported_are_kept(st: StoreState) -> None:
    st.put_function("f", SPEC, [], b"v1")
    for inst in ("old", "crashed", "new"):
        st.instance_started(inst, "g-f", 1, "process", 100)
        st.instance_ready(inst, "g-f", 1, {"f": 1})
    st.instance_exited("crashed", 9, "segfault")
    assert st.get_function("f")["replicas"]["ready"] == 2
    result, events = st.instances_gone(["old", "crashed", "unknown"], "no longer running")
    assert result == {"exited": ["old"]} and kinds(events) == ["instance.changed", "group.changed"]
    assert st.get_function("f")["replicas"]["ready"] == 1
    rows = {r["id"]: r for r in st.instances_of("g-f")}
    assert rows["old"]["state"] == "exited" and rows["old"]["error"] == "no longer running"
    assert (rows["crashed"]["exit_code"], rows["crashed"]["error"]) == (9, "segfault")
    assert st.instances_gone(["old"], "again") == ({"exited": []}, [])


def test_delete_removes_function_and_group(st: StoreState) -> None:
    st.put_function("f", SPEC, [], b"v1")
    _, events = st.delete_function("f")
    assert kinds(events) == ["function.deleted", "group.deleted"]
    with pytest.raises(NotFound, match="function 'f' not found"):
        st.get_function("f")
    assert st.snapshot()["groups"] == []


def test_sequence_numbers_are_contiguous_and_persist(tmp_path: Path, open_store_db) -> None:
    db = open_store_db()
    st = StoreState(db, open_blobs(db, tmp_path))
    all_seqs = []
    _, ev = st.put_function("a", SPEC, [], b"1")
    all_seqs += seqs(ev)
    all_seqs += seqs(st.instance_started("i", "g-a", 1, "process", 123))
    all_seqs += seqs(st.instance_ready("i", "g-a", 1, {"a": 1}))
    all_seqs += seqs(st.instance_exited("i", 0, None))
    assert all_seqs == list(range(1, len(all_seqs) + 1))
    st.db.close()
    db = open_store_db()
    again = StoreState(db, open_blobs(db, tmp_path))
    assert again.seq() == all_seqs[-1]
    assert again.get_function("a")["version"] == 1


def test_bad_names_and_empty_zips(st: StoreState) -> None:
    with pytest.raises(InvalidRequest):
        st.put_function("../x", SPEC, [], b"z")
    with pytest.raises(InvalidRequest):
        st.put_function("ok", SPEC, [], b"")
    with pytest.raises(InvalidRequest):
        st.blobs.get("../../etc/passwd")


def test_migrations_are_idempotent(open_store_db) -> None:
    from services.store.db import MIGRATIONS

    db = open_store_db()
    assert db.migrate() == 0
    assert db.one("SELECT COUNT(*) FROM schema_migrations")[0] == len(MIGRATIONS)


def _deploy_ready(st: StoreState, name: str, spec: dict | None = None) -> None:
    res, _ = st.put_function(name, spec or SPEC, [], name.encode())
    st.instance_ready(f"i-{name}", res["group_id"], res["group_version"], {name: res["version"]})


def _serve(st: StoreState, group: dict) -> list:
    """An instance of a (proposed) group says READY."""
    return st.instance_ready(f"i-{group['id']}-{group['version']}", group["id"], group["version"], group.get("members")
                             or {})


def _proposed(st: StoreState, regroup: dict) -> list[dict]:
    return [g for g in st.snapshot()["groups"] if g["regroup"] == regroup["id"]]


def test_regroup_takes_over_only_once_every_proposed_group_serves(st: StoreState) -> None:
    for n in ("a", "b", "c"):
        _deploy_ready(st, n)
    before = st.list_groups()
    result, events = st.set_groups([["a", "b"]])
    regroup = result["regroup"]
    assert regroup["state"] == "deploying" and regroup["setup"] == [["a", "b"]]
    assert [g["tasks"] for g in regroup["groups"]] == [["a", "b"]]
    assert result["setup"] == before["setup"] == [["a"], ["b"], ["c"]], "the setup in force is reported"
    assert kinds(events) == ["group.changed", "regroup.changed"]
    assert st.get_function("a")["group"]["id"] == "g-a" and st.get_function("a")["replicas"] == {"desired": 1,
                                                                                                  "ready": 1}
    # the same setup again joins the regroup under way
    again, events = st.set_groups([["a", "b"]])
    assert again["regroup"]["id"] == regroup["id"] and events == []
    [fused] = _proposed(st, regroup)
    events = _serve(st, fused)
    assert {"group.deleted", "regroup.changed"} <= set(kinds(events))
    assert sorted(st.list_groups()["setup"]) == [["a", "b"], ["c"]]
    assert st.get_function("a")["group"]["id"] == fused["id"] and st.get_function("b")["state"] == "ready"
    assert st.get_regroup(regroup["id"])["state"] == "done"
    # the setup in force again: nothing to do
    result, events = st.set_groups([["a", "b"]])
    assert result["regroup"] is None and events == []


def test_splitting_a_fused_group_proposes_the_rest_too(st: StoreState) -> None:
    for n in ("a", "b", "c"):
        _deploy_ready(st, n)
    result, _ = st.set_groups([["a", "b", "c"]])
    _serve(st, _proposed(st, result["regroup"])[0])
    result, _ = st.set_groups([["b"]])
    assert sorted(g["tasks"] for g in result["regroup"]["groups"]) == [["a", "c"], ["b"]]
    assert result["setup"] == [["a", "b", "c"]]
    for group in _proposed(st, result["regroup"]):
        _serve(st, group)
    assert sorted(st.list_groups()["setup"]) == [["a", "c"], ["b"]]


def test_a_failed_regroup_keeps_the_setup_in_force_and_names_the_task(st: StoreState) -> None:
    for n in ("hello", "other", "badreq"):
        _deploy_ready(st, n)
    before = st.list_groups()
    result, _ = st.set_groups([["hello", "badreq"], ["other"]])
    [fused] = _proposed(st, result["regroup"])
    events = st.deploy_failed(fused["id"], fused["version"], "build step 'pip install' exited with code 1",
                              "ERROR: no such package", ["badreq"])
    assert kinds(events) == ["deploy.failed", "group.deleted", "regroup.changed"]
    regroup = st.get_regroup(result["regroup"]["id"])
    assert regroup["state"] == "failed" and regroup["failed_tasks"] == ["badreq"] and regroup["groups"] == []
    assert regroup["error"] == ("task 'badreq' failed (fused with 'hello'): build step 'pip install' exited with"
                                " code 1") and regroup["log_tail"] == "ERROR: no such package"
    after = st.list_groups()
    assert (after["setup"], after["groups"]) == (before["setup"], before["groups"])
    hello = st.get_function("hello")
    assert hello["state"] == "ready" and hello["last_error"] is None and hello["replicas"] == {"desired": 1, "ready": 1}
    # the failed regroup leaves nothing behind that a later one trips over
    result, _ = st.set_groups([["hello", "other"]])
    _serve(st, _proposed(st, result["regroup"])[0])
    assert sorted(st.list_groups()["setup"]) == [["badreq"], ["hello", "other"]]


def test_a_newer_setup_supersedes_and_a_redeploy_or_delete_cancels(st: StoreState) -> None:
    for n in ("a", "b", "c"):
        _deploy_ready(st, n)
    first, _ = st.set_groups([["a", "b"], ["c"]])
    ab = _proposed(st, first["regroup"])[0]
    second, events = st.set_groups([["a", "b", "c"]])
    assert st.get_regroup(first["regroup"]["id"])["state"] == "superseded"
    assert "group.deleted" in kinds(events) and ab["id"] not in {g["id"] for g in st.snapshot()["groups"]}
    # a proposal still needed is kept, not built again
    third, _ = st.set_groups([["a", "b"]])
    fourth, events = st.set_groups([["a", "b"], ["c"]])
    assert [g["id"] for g in fourth["regroup"]["groups"]] == [g["id"] for g in third["regroup"]["groups"]]
    assert "group.deleted" not in kinds(events)
    st.put_function("a", SPEC, [], b"a2")
    assert st.get_regroup(fourth["regroup"]["id"])["state"] == "cancelled"
    assert "redeployed" in st.get_regroup(fourth["regroup"]["id"])["error"]
    fifth, _ = st.set_groups([["b", "c"]])
    _, events = st.delete_function("c")
    assert st.get_regroup(fifth["regroup"]["id"])["state"] == "cancelled" and "group.deleted" in kinds(events)
    assert st.list_groups()["setup"] == [["a"], ["b"]]
    assert [d["seq"] for _, d in events] == list(range(events[0][1]["seq"], events[0][1]["seq"] + len(events)))


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


def test_sync_call_rows_are_recorded_and_bad_rows_refused(open_store_db) -> None:
    from services.store.durable_calls import CallStore

    calls = CallStore(open_store_db())
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


def test_sync_call_rows_of_task_calls_keep_their_parent_and_source(open_store_db) -> None:
    from services.store.durable_calls import CallStore

    calls = CallStore(open_store_db())
    row = ["c1.1", "callee", "FAILED", 1000.0, 1000.2, 500, "ValueError: kaboom", False, "c1", "call"]
    assert calls.record_sync_rows([row]) == 1
    got = calls.get("c1.1")
    assert (got["parent_id"], got["source"], got["error"], got["kind"]) == ("c1", "call", "ValueError: kaboom", "sync")
    for bad in (row[:9], [*row[:8], 7, "call"], [*row[:9], None]):
        with pytest.raises(InvalidRequest, match="sync call row"):
            calls.record_sync_rows([bad])


def _schema(db) -> dict[str, list]:
    """Tables -> [(column, not null, primary key)] in order, and index names: what both dialects must agree on."""
    if db.dialect == "sqlite":
        tables = [r[0] for r in db.all("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        out: dict[str, list] = {t: [(c["name"], bool(c["notnull"]) or bool(c["pk"]), bool(c["pk"]))
                                    for c in db.all(f"PRAGMA table_info({t})")] for t in tables}
        out["indexes"] = [r[0] for r in db.all("SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL"
                                               " ORDER BY name")]
        return out
    tables = [r[0] for r in db.all("SELECT table_name FROM information_schema.tables WHERE table_schema='public'"
                                   " ORDER BY table_name")]
    out = {}
    for t in tables:
        keys = {r[0] for r in db.all(
            "SELECT k.column_name FROM information_schema.table_constraints c JOIN information_schema.key_column_usage k"
            " ON k.constraint_name=c.constraint_name WHERE c.table_name=? AND c.constraint_type='PRIMARY KEY'", (t,))}
        out[t] = [(r[0], r[1] == "NO", r[0] in keys) for r in db.all(
            "SELECT column_name, is_nullable FROM information_schema.columns WHERE table_name=? AND"
            " table_schema='public' ORDER BY ordinal_position", (t,))]
    out["indexes"] = [r[0] for r in db.all("SELECT indexname FROM pg_indexes WHERE schemaname='public' AND"
                                           " indexname NOT LIKE '%_pkey' ORDER BY indexname")]
    return out


def test_the_migrations_make_one_schema_on_sqlite_and_postgresql(tmp_path: Path, postgres_cluster) -> None:
    from services.store.db import Database
    from services.store.pg import PgDatabase

    lite = Database(tmp_path / "state.db")
    pg = PgDatabase(postgres_cluster.new_database())
    assert pg.lead()
    try:
        lite_schema, pg_schema = _schema(lite), _schema(pg)
        assert "calls" in pg_schema and "blob_data" in pg_schema and "calls_idempotency" in pg_schema["indexes"]
        assert pg_schema == lite_schema
    finally:
        lite.close()
        pg.close()


def test_zips_live_in_postgresql_where_every_store_replica_reads_them(tmp_path: Path, postgres_cluster) -> None:
    from services.store.pg import PgDatabase

    url = postgres_cluster.new_database()
    leader = PgDatabase(url)
    assert leader.lead()
    st = StoreState(leader, open_blobs(leader, tmp_path / "a"))
    res, _ = st.put_function("f", SPEC, [], b"the zip")
    digest = st.get_version("f", res["version"])["digest"]
    assert not (tmp_path / "a" / "blobs").exists(), "no blob file: a replica elsewhere could not read it"
    replica = PgDatabase(url)  # another store's connection, on another machine as far as it knows
    try:
        assert not replica.lead(), "one leader at a time"
        assert open_blobs(replica, tmp_path / "b").get(digest) == b"the zip"
    finally:
        replica.close()
        leader.close()


def test_a_claim_fits_in_one_reply_and_claims_continue_until_none_is_left(open_store_db) -> None:
    from services.store.durable_calls import CallStore
    from shared import protocol

    calls = CallStore(open_store_db())
    n = protocol.MAX_FRAMES + 100  # more than one reply could carry
    calls.submit([{"id": f"c{i}", "function": "fn", "owner": "old-boot"} for i in range(n)], (b"payload",) * n)
    claimed: list[str] = []
    while True:
        metas, payloads = calls.claim("new-boot", 5000, TTL_S)
        if not metas:
            break
        # what the store's RPC server sends back: the gateway must be able to read it
        msg = protocol.decode(protocol.reply(1, metas, *payloads))
        assert len(msg.bodies) == len(metas) <= protocol.MAX_BATCH
        claimed += [m["id"] for m in metas]
    assert sorted(claimed) == sorted(f"c{i}" for i in range(n))


def test_a_replica_override_holds_within_the_functions_bounds_until_given_back(st: StoreState) -> None:
    st.put_function("f", {**SPEC, "max_replicas": 4}, [], b"v1")
    st.instance_ready("i1", "g-f", 1, {"f": 1})
    result, events = st.set_replicas_override("f", 3)
    assert result == {"function": "f", "group_id": "g-f", "override": 3, "replicas": 3}
    assert "group.changed" in kinds(events)
    fn = st.get_function("f")
    assert fn["replicas"]["desired"] == 3 and fn["scaling"]["override"] == 3
    assert fn["scaling"] == {"min_replicas": 1, "max_replicas": 4, "target_concurrency": 1, "override": 3}
    assert st.list_groups()["groups"][0]["scaling"]["override"] == 3
    for bad in (0, 5):
        with pytest.raises(InvalidRequest, match=r"out of range for function 'f': use 1-4"):
            st.set_replicas_override("f", bad)
    assert st.get_function("f")["scaling"]["override"] == 3  # a refused override changes nothing
    with pytest.raises(NotFound, match="function 'nope' not found"):
        st.set_replicas_override("nope", 1)
    result, _ = st.set_replicas_override("f", None)
    assert result["override"] is None and st.get_function("f")["scaling"]["override"] is None
    assert st.get_function("f")["replicas"]["desired"] == 3  # the autoscaler takes it from here
    st.set_replicas_override("f", 2)
    st.delete_function("f")
    assert st.replicas_overrides() == {}


def test_scaling_a_group_stays_within_its_maxreplicas(st: StoreState) -> None:
    st.put_function("f", {**SPEC, "max_replicas": 3}, [], b"v1")
    result, _ = st.scale_group("g-f", 10)
    assert result["replicas"] == 3
    group = st.list_groups()["groups"][0]
    assert group["scaling"] == {"min_replicas": 1, "max_replicas": 3, "target_concurrency": 1, "override": None}


def test_a_regroup_starts_its_groups_at_the_replicas_their_members_run_now(st: StoreState) -> None:
    for n in ("a", "b", "c"):
        _deploy_ready(st, n, {**SPEC, "max_replicas": 4})
    st.scale_group("g-a", 3)
    st.scale_group("g-b", 2)
    result, _ = st.set_groups([["a", "b"]])
    [fused] = _proposed(st, result["regroup"])
    assert fused["replicas_desired"] == 4  # 3 + 2 wanted, within the members' maxReplicas
    _serve(st, fused)
    result, _ = st.set_groups([["a"], ["b"]])
    split = {tuple(g["tasks"]): g["replicas_desired"] for g in _proposed(st, result["regroup"])}
    assert split == {("a",): 2, ("b",): 2}  # each takes its half of the fused group's 4
    result, _ = st.set_groups([["c"]])
    assert result["regroup"] is None  # c alone already: nothing to start


def test_a_redeploy_keeps_the_replicas_its_load_needs_within_the_new_bounds(st: StoreState) -> None:
    _deploy_ready(st, "f", {**SPEC, "max_replicas": 4})
    st.scale_group("g-f", 3)
    st.put_function("f", {**SPEC, "max_replicas": 4}, [], b"v2")
    assert st.get_function("f")["replicas"]["desired"] == 3  # not back to 1 under load
    st.put_function("f", {**SPEC, "max_replicas": 2}, [], b"v3")
    assert st.get_function("f")["replicas"]["desired"] == 2  # the new maxReplicas
    st.put_function("f", {**SPEC, "min_replicas": 3, "max_replicas": 5}, [], b"v4")
    assert st.get_function("f")["replicas"]["desired"] == 3  # the new minReplicas
