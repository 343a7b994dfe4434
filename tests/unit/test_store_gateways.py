"""The store's registry of live gateways and its async-call claim rules, on a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.store.blobs import open_blobs
from services.store.durable_calls import CallStore
from services.store.state import StoreState
from shared.errors import InvalidRequest

TTL_S = 3.0


def record(gid: str, **kw: str) -> dict[str, str]:
    return {"id": gid, "name": "", "host": "h", "router": f"tcp://127.0.0.1:1{len(gid)}", "link": "", "pub": "",
            "http": "", **kw}


@pytest.fixture
def db(open_store_db):
    return open_store_db()


@pytest.fixture
def st(tmp_path: Path, db) -> StoreState:
    return StoreState(db, open_blobs(db, tmp_path))


def silence(db, gid: str, for_s: float) -> None:
    """As if gateway ``gid`` last beat ``for_s`` ago (its row's seen_at moved back)."""
    with db.tx():
        db.execute("UPDATE gateways SET seen_at = seen_at - ? WHERE id=?", (for_s, gid))


def test_a_new_gateway_is_announced_once_and_listed(st: StoreState) -> None:
    result, events = st.announce_gateway(record("a"), TTL_S)
    assert [k for k, _ in events] == ["gateway.changed"] and events[0][1]["gateway"]["id"] == "a"
    assert [g["id"] for g in result["gateways"]] == ["a"]
    _, again = st.announce_gateway(record("a"), TTL_S)
    assert again == [], "a beat of a known gateway changes nothing others need to hear"
    _, moved = st.announce_gateway(record("a", http="http://127.0.0.1:9"), TTL_S)
    assert [k for k, _ in moved] == ["gateway.changed"], "a changed record is announced"
    result, _ = st.announce_gateway(record("b"), TTL_S)
    assert [g["id"] for g in result["gateways"]] == ["a", "b"]
    assert [g["id"] for g in st.snapshot()["gateways"]] == ["a", "b"]
    seqs = [d["seq"] for _, d in events + moved]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_a_silent_gateway_is_gone_and_a_bye_removes_one_at_once(st: StoreState, db) -> None:
    st.announce_gateway(record("a"), TTL_S)
    st.announce_gateway(record("b"), TTL_S)
    silence(db, "a", TTL_S + 1)
    assert [g["id"] for g in st.live_gateways(TTL_S)] == ["b"]
    result, events = st.announce_gateway(record("b"), TTL_S)
    assert [(k, d["id"]) for k, d in events] == [("gateway.gone", "a")]
    assert [g["id"] for g in result["gateways"]] == ["b"]
    result, events = st.gateway_bye("b")
    assert result == {"removed": True}
    assert [(k, d["id"], d["reason"]) for k, d in events] == [("gateway.gone", "b", "stopped")]
    assert st.gateway_bye("b") == ({"removed": False}, [])
    assert st.live_gateways(TTL_S) == []


@pytest.mark.parametrize("bad", [{}, {"id": ""}, {"id": 7}, {"id": "a", "router": 5}])
def test_a_bad_gateway_record_is_refused_and_changes_nothing(st: StoreState, bad: dict) -> None:
    with pytest.raises(InvalidRequest, match="gateway record"):
        st.announce_gateway(bad, TTL_S)
    assert st.live_gateways(TTL_S) == []


def _claimed(calls: CallStore, owner: str) -> list[str]:
    metas, _ = calls.claim(owner, 100, TTL_S)
    return sorted(m["id"] for m in metas)


def test_a_claim_leaves_the_calls_of_live_gateways_and_takes_the_rest(st: StoreState, db) -> None:
    calls = CallStore(db)
    st.announce_gateway(record("a"), TTL_S)
    st.announce_gateway(record("b"), TTL_S)
    calls.submit([{"id": "a1", "function": "f", "owner": "a"}, {"id": "a2", "function": "f", "owner": "a"},
                  {"id": "b1", "function": "f", "owner": "b"}, {"id": "free", "function": "f", "owner": None},
                  {"id": "old", "function": "f", "owner": "a-previous-boot"}], (b"p",) * 5)
    calls.update([{"id": "a2", "status": "RUNNING", "attempts": 1}], ())
    assert _claimed(calls, "b") == ["free", "old"], "a live gateway's calls stay its own"
    assert _claimed(calls, "b") == [], "nor does a gateway claim its own calls again"
    assert _claimed(calls, "a") == [], "b owns what it claimed, and b is live"

    silence(db, "a", TTL_S + 1)  # a was killed: its beats stopped
    metas, payloads = calls.claim("b", 100, TTL_S)
    assert sorted(m["id"] for m in metas) == ["a1", "a2"] and payloads == [b"p", b"p"]
    assert {m["id"]: m["was_running"] for m in metas} == {"a1": False, "a2": True}, "a retry shows it ran before"
    assert calls.get("a2")["status"] == "PENDING" and calls.get("a2")["attempts"] == 1

    calls.submit([{"id": "b2", "function": "f", "owner": "b"}], (b"p",))
    st.gateway_bye("b")  # b stops in order: a gateway started after it takes its calls at once
    st.announce_gateway(record("c"), TTL_S)
    assert _claimed(calls, "c") == ["a1", "a2", "b1", "b2", "free", "old"]


def test_finished_calls_are_never_claimed(st: StoreState, db) -> None:
    calls = CallStore(db)
    calls.submit([{"id": "done", "function": "f", "owner": "dead"}, {"id": "dead", "function": "f", "owner": "dead"}],
                 (b"", b""))
    calls.update([{"id": "done", "status": "DONE"}, {"id": "dead", "status": "DEAD"}], ())
    assert _claimed(calls, "b") == []


def test_a_gateway_writes_and_calls_back_only_calls_it_still_owns(st: StoreState, db) -> None:
    """A stalled gateway whose call another one claimed: its late result is not recorded, its callback not taken."""
    calls = CallStore(db)
    st.announce_gateway(record("a"), TTL_S)
    calls.submit([{"id": "x", "function": "f", "owner": "a", "callback_url": "http://cb.example/hook"}], (b"p",))
    assert calls.update([{"id": "x", "status": "RUNNING", "attempts": 1, "if_owner": "a"}], ()) == 1
    silence(db, "a", TTL_S + 1)
    st.announce_gateway(record("b"), TTL_S)
    assert _claimed(calls, "b") == ["x"]
    assert calls.update([{"id": "x", "status": "RUNNING", "attempts": 2, "if_owner": "b"}], ()) == 1

    # a resumes and reports its attempt: refused, the call stays b's
    stale = [{"id": "x", "status": "DONE", "attempts": 1, "result_status": 200, "has_result": True, "if_owner": "a"}]
    assert calls.update(stale, (b"a's result",)) == 0
    assert calls.take_callback("x", "a") is False
    assert (calls.get("x")["status"], calls.get("x")["attempts"]) == ("RUNNING", 2)

    done = [{"id": "x", "status": "DONE", "attempts": 2, "result_status": 200, "has_result": True, "if_owner": "b"}]
    assert calls.update(done, (b"b's result",)) == 1
    assert calls.take_callback("x", "b") is True
    assert calls.take_callback("x", "b") is False, "a callback is taken once"
    assert calls.take_callback("x", "a") is False
    rec, body = calls.result("x")
    assert (rec["status"], body, rec["callback"]["state"]) == ("DONE", b"b's result", "sending")


def test_a_gateway_back_from_a_stall_learns_which_calls_are_still_its_own(st: StoreState, db) -> None:
    calls = CallStore(db)
    calls.submit([{"id": i, "function": "f", "owner": "a"} for i in ("kept", "taken", "done")], (b"",) * 3)
    calls.update([{"id": "done", "status": "DONE"}], ())
    calls.update([{"id": "taken", "owner": "b"}], ())
    assert calls.owned("a", ["kept", "taken", "done", "unknown"]) == ["kept"]
    assert calls.owned("a", []) == []
