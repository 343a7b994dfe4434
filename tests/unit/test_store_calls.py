"""Durable calls (services/store/durable_calls.py) field by field, on a real database: SQLite and PostgreSQL.

The async guarantees (stored before 202, claimed once, retried, dead letters, idempotency keys) rest on
these statements; each test pins what a user would see change if one of them did something else.
"""

from __future__ import annotations

import json
import time

import pytest

from services.store.durable_calls import (
    INSERT_ROWS, MAX_CLAIM, MAX_LIST, MAX_TEXT_FIELD, CallStore, _iso, call_problem,
)
from shared.errors import Conflict, InvalidRequest, NotFound

# no gateway beats in these tests: every owner other than the claimer counts as gone
TTL_S = 30.0


@pytest.fixture
def calls(open_store_db) -> CallStore:
    return CallStore(open_store_db())


def submit_one(calls: CallStore, payload: bytes = b"p", **fields) -> dict:
    call = {"id": "c1", "function": "fn", **fields}
    (out,) = calls.submit([call], (payload,))
    return out


def test_iso_times_are_utc_with_milliseconds() -> None:
    assert _iso(None) is None
    assert _iso(0.5) == "1970-01-01T00:00:00.500Z"
    assert _iso(86400 + 3661.007) == "1970-01-02T01:01:01.007Z"


@pytest.mark.parametrize("call, needle", [
    ("not a map", "must be a map, not str"),
    ({"function": "fn"}, "'id' must be a non-empty string"),
    ({"id": "", "function": "fn"}, "'id' must be a non-empty string"),
    ({"id": "c", "function": 7}, "'function' must be a non-empty string"),
    ({"id": "c", "function": "fn", "owner": 3}, "'owner' must be a string of at most"),
    ({"id": "c", "function": "fn", "callback_url": "x" * (MAX_TEXT_FIELD + 1)}, "'callback_url' must be a string"),
    ({"id": "c", "function": "fn", "max_attempts": True}, "'max_attempts' must be a number"),
    ({"id": "c", "function": "fn", "queued_at": "now"}, "'queued_at' must be a number"),
    ({"id": "c", "function": "fn", "status": "LOST"}, "status must be one of PENDING"),
    ({"id": "c", "function": "fn", "error": 5}, "'error' must be a string"),
    ({"id": "c", "function": "fn", "headers": {"a": "b"}}, "'headers' must be a list of [name, value]"),
    ({"id": "c", "function": "fn", "headers": [["a"]]}, "'headers' must be a list of [name, value]"),
    ({"id": "c", "function": "fn", "headers": [["a", 1]]}, "'headers' must be a list of [name, value]"),
])
def test_a_call_of_the_wrong_shape_is_named(call, needle: str) -> None:
    problem = call_problem(call)
    assert problem is not None and needle in problem


def test_the_whole_message_of_a_refusal() -> None:
    assert call_problem({"id": "c", "function": "fn", "status": "LOST"}) == (
        "call status must be one of PENDING, RUNNING, DONE, FAILED, DEAD")
    assert call_problem({"id": "c", "function": "fn", "error": 5}) == "call field 'error' must be a string"
    assert call_problem({"id": "c", "function": "fn", "headers": 1}) == (
        "call field 'headers' must be a list of [name, value] string pairs")


@pytest.mark.parametrize("call", [
    {"id": "c", "function": "fn"},
    {"id": "c", "function": "fn", "owner": "x" * MAX_TEXT_FIELD, "max_attempts": 3, "queued_at": 1.5,
     "status": "DEAD", "error": "why", "headers": [["a", "b"], ("c", "d")], "next_attempt_at": 2},
])
def test_a_well_formed_call_has_no_problem(call) -> None:
    assert call_problem(call) is None


def test_submit_stores_every_field_and_a_new_call_is_pending(calls: CallStore) -> None:
    before = time.time()
    out = submit_one(calls, b"body", owner="boot-1", max_attempts=3, idempotency_key="k",
                     callback_url="https://example.com/cb", content_type="text/plain", headers=[["x-a", "1"]],
                     parent_id="p1", source="push", kind="async")
    assert out == {"id": "c1", "duplicate": False, "status": "PENDING"}
    got = calls.get("c1")
    assert (got["function"], got["status"], got["kind"], got["source"], got["attempts"], got["max_attempts"],
            got["parent_id"], got["idempotency_key"]) == ("fn", "PENDING", "async", "push", 0, 3, "p1", "k")
    assert got["callback"] == {"url": "https://example.com/cb", "state": "pending"}
    assert before <= got["queued_ts"] <= time.time()
    assert got["timings"]["finished"] is None and got["duration_s"] is None and "result" not in got
    metas, payloads = calls.claim("boot-2", 10, TTL_S)
    assert payloads == [b"body"]
    assert (metas[0]["content_type"], metas[0]["headers"], metas[0]["callback_url"], metas[0]["source"]) == (
        "text/plain", [["x-a", "1"]], "https://example.com/cb", "push")
    assert (metas[0]["callback_state"], metas[0]["parent_id"], metas[0]["max_attempts"]) == ("pending", "p1", 3)


def test_submit_defaults(calls: CallStore) -> None:
    submit_one(calls, b"", queued_at=1234.5)
    got = calls.get("c1")
    assert (got["kind"], got["source"], got["max_attempts"], got["queued_ts"]) == ("async", "http", 1, 1234.5)
    assert got["timings"]["queued"] == "1970-01-01T00:20:34.500Z"
    assert "idempotency_key" not in got and "callback" not in got
    (meta,), payloads = calls.claim("g", 1, TTL_S)
    assert payloads == [b""] and meta["content_type"] == "" and meta["headers"] == []


def test_submit_keeps_kind_and_next_attempt(calls: CallStore) -> None:
    submit_one(calls, kind="cron", next_attempt_at=86400.25)
    got = calls.get("c1")
    assert got["kind"] == "cron" and got["timings"]["next_attempt"] == "1970-01-02T00:00:00.250Z"
    assert calls.claim("g", 1, TTL_S) == ([], [])  # only async calls are claimed


def test_a_call_stored_final_is_finished_at_once(calls: CallStore) -> None:
    submit_one(calls, status="DEAD", error="refused at the door")
    got = calls.get("c1")
    assert got["status"] == "DEAD" and got["error"] == "refused at the door"
    assert got["timings"]["finished"] is not None


def test_a_repeated_id_or_idempotency_key_returns_the_first_call(calls: CallStore) -> None:
    first = calls.submit([{"id": "a", "function": "fn", "idempotency_key": "k"}], (b"1",))
    assert first == [{"id": "a", "duplicate": False, "status": "PENDING"}]
    calls.update([{"id": "a", "status": "RUNNING"}], ())
    again = calls.submit([{"id": "a", "function": "fn"}, {"id": "b", "function": "fn", "idempotency_key": "k"},
                          {"id": "c", "function": "other", "idempotency_key": "k"}], (b"2", b"3", b"4"))
    assert again == [{"id": "a", "duplicate": True, "status": "RUNNING"},
                     {"id": "a", "duplicate": True, "status": "RUNNING"},
                     {"id": "c", "duplicate": False, "status": "PENDING"}]
    with pytest.raises(NotFound):
        calls.get("b")
    # the same id again under another key is still the first call
    assert calls.submit([{"id": "a", "function": "fn", "idempotency_key": "k2"}], (b"5",)) == [
        {"id": "a", "duplicate": True, "status": "RUNNING"}]
    assert calls.result("a")[1] == b""  # the first payload stays; nothing of the repeat was written
    assert sorted(m["id"] for m in calls.claim("other-boot", 10, TTL_S)[0]) == ["a", "c"]


def test_repeats_within_one_batch_are_duplicates_of_the_first(calls: CallStore) -> None:
    out = calls.submit([{"id": "x", "function": "fn", "idempotency_key": "k"},
                        {"id": "x", "function": "fn"},
                        {"id": "y", "function": "fn", "idempotency_key": "k"},
                        {"id": "z", "function": "fn"}], (b"1", b"2", b"3", b"4"))
    assert out == [{"id": "x", "duplicate": False, "status": "PENDING"},
                   {"id": "x", "duplicate": True, "status": "PENDING"},
                   {"id": "x", "duplicate": True, "status": "PENDING"},
                   {"id": "z", "duplicate": False, "status": "PENDING"}]
    assert calls.result("x")[1] == b"" and calls.counts() == {"PENDING": 2}
    (meta, *_), payloads = calls.claim("other-boot", 1, TTL_S)
    assert meta["id"] == "x" and payloads == [b"1"]  # the first payload, not a repeat's


def test_a_batch_larger_than_one_insert_is_stored_whole_and_in_order(calls: CallStore) -> None:
    n = INSERT_ROWS * 2 + 7
    batch = [{"id": f"c{i:05d}", "function": "fn", "queued_at": float(i + 1)} for i in range(n)]
    batch[INSERT_ROWS + 3] = {"id": "c00000", "function": "fn"}  # a repeat of the first, in the second chunk
    out = calls.submit(batch, tuple(f"p{i}".encode() for i in range(n)))
    assert [o["id"] for o in out] == [c["id"] for c in batch]
    assert [o["duplicate"] for o in out].count(True) == 1 and out[INSERT_ROWS + 3]["duplicate"] is True
    assert calls.counts() == {"PENDING": n - 1}
    metas, payloads = calls.claim("other-boot", 3, TTL_S)  # oldest first
    assert [m["id"] for m in metas] == ["c00000", "c00001", "c00002"] and payloads == [b"p0", b"p1", b"p2"]


def test_one_calls_updates_apply_in_their_order_across_statements(calls: CallStore) -> None:
    calls.submit([{"id": i, "function": "fn"} for i in ("a", "b")], (b"", b""))
    # "a" alternates between two statements; "b" shares the first: grouping must not run a's third
    # update (attempts=2) before its second (attempts=5 with an error)
    assert calls.update([{"id": "a", "attempts": 1}, {"id": "a", "attempts": 5, "error": "e"},
                         {"id": "b", "attempts": 7}, {"id": "a", "attempts": 2},
                         {"id": "b", "status": "RUNNING"}, {"id": "b", "status": "DONE", "has_result": True},
                         {"id": "b", "status": "RUNNING"}], (b"done",)) == 6
    a, b = calls.get("a"), calls.get("b")
    assert (a["attempts"], a["error"]) == (2, "e")
    assert (b["attempts"], b["status"], b["result"]) == (7, "DONE", "done")


def test_a_bad_call_is_refused_alone_and_its_batch_is_stored(calls: CallStore) -> None:
    out = calls.submit([{"id": "g1", "function": "fn"}, {"id": "bad", "function": "fn", "status": "NOPE"},
                        "junk", {"id": "g2", "function": "fn"}], (b"a", b"b", b"c", b"d"))
    assert [o["status"] for o in out] == ["PENDING", "REFUSED", "REFUSED", "PENDING"]
    assert out[1]["id"] == "bad" and "status must be one of" in out[1]["error"] and out[2]["id"] is None
    assert out[1]["duplicate"] is False and out[2]["duplicate"] is False
    assert calls.counts() == {"PENDING": 2}


def test_payloads_must_match_calls(calls: CallStore) -> None:
    with pytest.raises(InvalidRequest, match="got 2 calls but 1 payloads"):
        calls.submit([{"id": "a", "function": "fn"}, {"id": "b", "function": "fn"}], (b"x",))
    assert calls.counts() == {}


def test_update_sets_each_field_and_results_in_order(calls: CallStore) -> None:
    calls.submit([{"id": i, "function": "fn"} for i in ("a", "b", "c")], (b"", b"", b""))
    changed = calls.update([
        {"id": "a"},  # nothing to change: skipped, not counted, and the rest still applies
        {"id": "a", "status": "DONE", "attempts": 2, "started_at": 10.0, "finished_at": 10.25, "result_status": 201,
         "result_content_type": "application/json", "owner": "boot-9", "cold_start": 1, "has_result": True},
        {"id": "b", "status": "FAILED", "error": "boom", "finished_at": 11.0, "started_at": 10.5},
        {"id": "c", "has_result": True, "result_content_type": "text/plain"},
    ], (b'{"ok": 1}', b"second body"))
    assert changed == 3
    a = calls.get("a")
    assert (a["status"], a["attempts"], a["result_status"], a["cold_start"], a["duration_s"], a["result"]) == (
        "DONE", 2, 201, True, 0.25, {"ok": 1})
    b = calls.get("b")
    assert (b["status"], b["error"], b["duration_s"], "result" in b) == ("FAILED", "boom", 0.5, False)
    assert calls.result("c")[1] == b"second body" and calls.get("c")["status"] == "PENDING"
    assert a["timings"]["started"] == "1970-01-01T00:00:10.000Z" and a["timings"]["finished"] == (
        "1970-01-01T00:00:10.250Z")


def test_update_moves_owner_and_next_attempt_and_a_missing_body_is_empty(calls: CallStore) -> None:
    submit_one(calls, owner="boot-1")
    assert calls.update([{"id": "c1", "owner": "boot-2", "next_attempt_at": 7.5, "has_result": True}], ()) == 1
    assert calls.claim("boot-2", 10, TTL_S) == ([], [])  # boot-2 owns it now: not its to claim again
    (meta,), _ = calls.claim("boot-3", 10, TTL_S)
    assert meta["next_attempt_at"] == 7.5
    assert calls.result("c1")[1] == b"" and calls.get("c1")["result"] == ""


def test_a_duration_keeps_microseconds(calls: CallStore) -> None:
    submit_one(calls)
    calls.update([{"id": "c1", "status": "DONE", "started_at": 100.0, "finished_at": 100.12345678}], ())
    assert calls.get("c1")["duration_s"] == 0.123457


def test_a_finished_call_is_never_reopened_by_a_late_update(calls: CallStore) -> None:
    submit_one(calls, callback_url="https://example.com/x")
    calls.update([{"id": "c1", "status": "DONE", "finished_at": 5.0}], ())
    for final in ("RUNNING", "PENDING", "FAILED"):
        assert calls.update([{"id": "c1", "status": final, "error": "late"}], ()) == 0
    assert calls.get("c1")["status"] == "DONE" and calls.get("c1")["error"] is None
    # what is not a status change still applies: the callback's progress after the call finished
    assert calls.update([{"id": "c1", "callback_state": "sent"}], ()) == 1
    assert calls.get("c1")["callback"]["state"] == "sent"


def test_a_write_fenced_by_owner_applies_only_while_the_writer_owns_the_call(calls: CallStore) -> None:
    calls.submit([{"id": "c1", "function": "fn", "owner": "boot-1"}, {"id": "c2", "function": "fn", "owner": "boot-1"}],
                 (b"", b""))
    # boot-1 stalled and boot-2 took c1 over: boot-1's late writes to it change nothing, to c2 they apply
    calls.update([{"id": "c1", "owner": "boot-2"}], ())
    assert calls.update([{"id": "c1", "status": "DONE", "error": "stale", "if_owner": "boot-1"}], ()) == 0
    assert calls.update([{"id": "c1", "attempts": 5, "if_owner": "boot-1"}], ()) == 0
    assert (calls.get("c1")["status"], calls.get("c1")["error"], calls.get("c1")["attempts"]) == ("PENDING", None, 0)
    assert calls.update([{"id": "c2", "status": "DONE", "has_result": True, "if_owner": "boot-1"}], (b"ok",)) == 1
    assert calls.update([{"id": "c1", "status": "RUNNING", "if_owner": "boot-2"}], ()) == 1
    assert (calls.get("c1")["status"], calls.get("c2")["status"], calls.result("c2")[1]) == ("RUNNING", "DONE", b"ok")


def test_owned_names_the_unfinished_calls_a_gateway_still_owns(calls: CallStore) -> None:
    calls.submit([{"id": i, "function": "fn", "owner": "me"} for i in ("run", "wait", "done", "gone")]
                 + [{"id": "theirs", "function": "fn", "owner": "other"}], (b"",) * 5)
    calls.update([{"id": "run", "status": "RUNNING"}, {"id": "done", "status": "DONE"},
                  {"id": "gone", "owner": "other"}], ())
    assert sorted(calls.owned("me", ["run", "wait", "done", "gone", "theirs", "unknown"])) == ["run", "wait"]
    assert calls.owned("me", ["wait"]) == ["wait"] and calls.owned("me", []) == []
    assert calls.owned("nobody", ["run"]) == []


def test_a_callback_is_taken_once_and_only_by_the_calls_owner(calls: CallStore) -> None:
    cb = "https://example.com/cb"
    calls.submit([{"id": "c1", "function": "fn", "owner": "me", "callback_url": cb},
                  {"id": "plain", "function": "fn", "owner": "me"}], (b"", b""))
    calls.update([{"id": "c1", "status": "DONE"}, {"id": "plain", "status": "DONE"}], ())
    assert calls.take_callback("c1", "other") is False, "not the owner"
    assert calls.get("c1")["callback"]["state"] == "pending"
    assert calls.take_callback("c1", "me") is True
    assert calls.get("c1")["callback"]["state"] == "sending"
    assert calls.take_callback("c1", "me") is False, "once: a second POST is never started"
    assert calls.take_callback("plain", "me") is False and calls.take_callback("unknown", "me") is False
    assert [c["id"] for c in calls.pending_callbacks("me", 10)] == []


def test_claim_takes_unfinished_async_calls_of_other_boots_oldest_first(calls: CallStore) -> None:
    calls.submit([{"id": "mine", "function": "fn", "owner": "me", "queued_at": 1.0},
                  {"id": "new", "function": "fn", "owner": "old", "queued_at": 3.0},
                  {"id": "old", "function": "fn", "owner": "old", "queued_at": 2.0},
                  {"id": "free", "function": "fn", "queued_at": 4.0},
                  {"id": "done", "function": "fn", "owner": "old", "queued_at": 0.5, "status": "DONE"},
                  {"id": "dead", "function": "fn", "owner": "old", "queued_at": 0.5, "status": "DEAD"}],
                 (b"",) * 6)
    calls.record_sync_rows([["s1", "fn", "DONE", 0.1, 0.2, 200, None, False]])
    calls.update([{"id": "old", "status": "RUNNING", "attempts": 1}], ())
    metas, _ = calls.claim("me", 2, TTL_S)
    assert [m["id"] for m in metas] == ["old", "new"]
    assert metas[0]["was_running"] is True and metas[1]["was_running"] is False
    assert metas[0]["attempts"] == 1 and metas[0]["queued_at"] == 2.0
    assert {k: metas[0][k] for k in ("function", "max_attempts", "callback_state", "parent_id", "source")} == {
        "function": "fn", "max_attempts": 1, "callback_state": None, "parent_id": None, "source": "http"}
    assert calls.get("old")["status"] == "PENDING"  # a claimed call waits for its new owner to run it
    assert [m["id"] for m in calls.claim("me", 10, TTL_S)[0]] == ["free"]
    assert calls.claim("me", 10, TTL_S) == ([], [])
    assert [m["id"] for m in calls.claim("someone-else", 10, TTL_S)[0]] == ["mine", "old", "new", "free"]


@pytest.mark.parametrize("limit, taken", [(0, 0), (-5, 0), (1, 1), (MAX_CLAIM + 50, MAX_CLAIM)])
def test_claim_limits(calls: CallStore, limit: int, taken: int) -> None:
    n = MAX_CLAIM + 10
    calls.submit([{"id": f"c{i}", "function": "fn", "queued_at": float(i)} for i in range(n)], (b"",) * n)
    assert len(calls.claim("me", limit, TTL_S)[0]) == taken


def test_pending_callbacks_are_those_of_finished_calls_not_yet_posted(calls: CallStore) -> None:
    cb = "https://example.com/cb"
    calls.submit([{"id": i, "function": "fn", "callback_url": cb} for i in ("run", "done", "dead", "sent")]
                 + [{"id": "nocb", "function": "fn"}], (b"",) * 5)
    calls.update([{"id": "done", "status": "DONE", "has_result": True, "result_content_type": "text/plain"},
                  {"id": "dead", "status": "DEAD", "error": "gave up"},
                  {"id": "sent", "status": "FAILED", "callback_state": "sent"},
                  {"id": "nocb", "status": "DONE"}], (b"the result",))
    pending = {c["id"]: c for c in calls.pending_callbacks("me", 10)}
    assert sorted(pending) == ["dead", "done"]
    assert pending["done"]["result_b"] == b"the result" and "result" not in pending["done"]
    assert pending["dead"]["error"] == "gave up" and pending["dead"]["result_b"] == b""
    assert len(calls.pending_callbacks("me", 1)) == 1


def test_get_and_result_of_an_unknown_call(calls: CallStore) -> None:
    for read in (calls.get, calls.result):
        with pytest.raises(NotFound, match="call 'nope' not found"):
            read("nope")


@pytest.mark.parametrize("ctype, body, shown", [
    ("application/json", b'{"a": [1]}', {"a": [1]}),
    ("application/json; charset=utf-8", b"[1, 2]", [1, 2]),
    ("application/json", b"not json", "not json"),
    ("text/plain", "h\u00e9".encode(), "h\u00e9"),
    ("text/plain", b"a\xffb", "a\ufffdb"),
    ("application/json", b"\xff{", "\ufffd{"),
    ("", b"raw", "raw"),
    ("image/png", b"\x89PNG....", {"content_type": "image/png", "size": 8}),
])
def test_a_result_is_shown_by_its_content_type(calls: CallStore, ctype: str, body: bytes, shown) -> None:
    submit_one(calls)
    calls.update([{"id": "c1", "status": "DONE", "result_content_type": ctype, "has_result": True}], (body,))
    got = calls.get("c1")
    assert got["result"] == shown and got["result_content_type"] == ctype
    meta, raw = calls.result("c1")
    assert raw == body and "result" not in meta


def test_list_is_newest_first_and_filters(calls: CallStore) -> None:
    calls.submit([{"id": "a", "function": "f", "queued_at": 1.0, "source": "http"},
                  {"id": "b", "function": "g", "queued_at": 2.0, "source": "push"},
                  {"id": "c", "function": "f", "queued_at": 3.0, "source": "push", "status": "DEAD"}], (b"",) * 3)
    calls.update([{"id": "a", "has_result": True, "result_content_type": "text/plain"}], (b"kept back",))
    assert all("result" not in r for r in calls.list(None, None, 10))  # a listing never carries results
    ids = lambda rows: [r["id"] for r in rows]  # noqa: E731
    assert ids(calls.list(None, None, 10)) == ["c", "b", "a"]
    assert ids(calls.list("f", None, 10)) == ["c", "a"]
    assert ids(calls.list(None, "PENDING", 10)) == ["b", "a"]
    assert ids(calls.list(None, None, 10, source="push")) == ["c", "b"]
    assert ids(calls.list(None, None, 10, before=3.0)) == ["b", "a"]
    assert ids(calls.list("f", "DEAD", 10, source="push", before=4)) == ["c"]
    assert ids(calls.list(None, None, 2)) == ["c", "b"]
    assert ids(calls.list(None, None, 0)) == ["c"]  # at least one
    with pytest.raises(InvalidRequest, match="'SOMETIMES' is not one of PENDING, RUNNING, DONE, FAILED, DEAD$"):
        calls.list(None, "SOMETIMES", 10)


def test_list_is_capped(calls: CallStore) -> None:
    n = MAX_LIST + 5
    calls.submit([{"id": f"c{i}", "function": "fn", "queued_at": float(i + 1)} for i in range(n)], (b"",) * n)
    rows = calls.list(None, None, 10**9)
    assert len(rows) == MAX_LIST and rows[0]["id"] == f"c{n - 1}"


def test_redrive_gives_a_dead_call_a_fresh_start(calls: CallStore) -> None:
    submit_one(calls, owner="boot-1", max_attempts=3, callback_url="https://example.com/cb")
    calls.update([{"id": "c1", "attempts": 3, "next_attempt_at": 99.0, "callback_state": "sent"}], ())
    calls.update([{"id": "c1", "status": "DEAD", "error": "gave up", "finished_at": 50.0}], ())
    got = calls.redrive("c1")
    assert (got["status"], got["attempts"], got["error"], got["timings"]["finished"],
            got["timings"]["next_attempt"], got["callback"]["state"]) == ("PENDING", 0, None, None, None, "pending")
    # no owner any more: the next claim of any gateway, its first one included, takes it
    assert [m["id"] for m in calls.claim("boot-1", 10, TTL_S)[0]] == ["c1"]


def test_redrive_without_a_callback_leaves_none(calls: CallStore) -> None:
    submit_one(calls, status="DEAD")
    assert "callback" not in calls.redrive("c1")


@pytest.mark.parametrize("status", ["PENDING", "RUNNING", "DONE", "FAILED"])
def test_only_a_dead_call_is_redriven(calls: CallStore, status: str) -> None:
    submit_one(calls, status=status)
    with pytest.raises(Conflict, match=f"call 'c1' is {status}, not DEAD"):
        calls.redrive("c1")
    assert calls.get("c1")["status"] == status
    with pytest.raises(NotFound, match="call 'nope' not found"):
        calls.redrive("nope")


def test_purge_removes_finished_calls_of_one_status(calls: CallStore) -> None:
    calls.submit([{"id": "d1", "function": "f", "status": "DEAD"}, {"id": "d2", "function": "g", "status": "DEAD"},
                  {"id": "ok", "function": "f", "status": "DONE"}, {"id": "p", "function": "f"}], (b"",) * 4)
    assert calls.purge("DEAD", "f") == 1
    assert calls.counts() == {"DEAD": 1, "DONE": 1, "PENDING": 1}
    assert calls.purge("DEAD") == 1
    for status in ("PENDING", "RUNNING", "ALL"):
        with pytest.raises(InvalidRequest, match="only finished calls can be purged"):
            calls.purge(status)
    assert calls.counts() == {"DONE": 1, "PENDING": 1}


def test_expire_forgets_old_finished_calls_and_keeps_dead_letters(calls: CallStore) -> None:
    now = time.time()
    calls.submit([{"id": i, "function": "f"} for i in ("old-done", "old-failed", "old-dead", "new-done", "open")],
                 (b"",) * 5)
    calls.update([{"id": "old-done", "status": "DONE", "finished_at": now - 100},
                  {"id": "old-failed", "status": "FAILED", "finished_at": now - 100},
                  {"id": "old-dead", "status": "DEAD", "finished_at": now - 100},
                  {"id": "new-done", "status": "DONE", "finished_at": now - 10}], ())
    assert calls.expire(50) == 2
    assert calls.counts() == {"DEAD": 1, "DONE": 1, "PENDING": 1}


def test_record_sync_keeps_no_payload(calls: CallStore) -> None:
    assert calls.record_sync([{"id": "s", "function": "f", "status": "DONE", "queued_at": 1.0, "started_at": 1.5,
                               "finished_at": 2.0, "result_status": 200, "cold_start": True, "parent_id": "p",
                               "source": "call"}]) == 1
    got = calls.get("s")
    assert (got["kind"], got["attempts"], got["duration_s"], got["cold_start"], got["parent_id"], got["source"]) == (
        "sync", 1, 0.5, True, "p", "call")
    assert calls.result("s")[1] == b"" and calls.claim("anyone", 10, TTL_S) == ([], [])
    # a sync record arriving twice (a resent batch) is kept once
    assert calls.record_sync([{"id": "s", "function": "f", "status": "FAILED", "queued_at": 1.0}]) == 1
    assert calls.get("s")["status"] == "DONE"
    calls.record_sync([{"id": "s2", "function": "f", "status": "FAILED", "queued_at": 1.0, "result_status": 500,
                        "error": "boom"}])
    got = calls.get("s2")
    assert (got["source"], got["result_status"], got["error"], got["cold_start"]) == ("http", 500, "boom", False)


def test_a_sync_row_of_eight_fields_is_an_http_entry_call(calls: CallStore) -> None:
    calls.record_sync_rows([["e", "f", "DONE", 1.0, 2.0, 200, None, False]])
    got = calls.get("e")
    assert (got["source"], got["parent_id"]) == ("http", None)
    with pytest.raises(InvalidRequest, match=r"a sync call row must be \[id, function, status, queued_at,"):
        calls.record_sync_rows(["abcdefgh"])  # a string of the right length is not a row


def test_a_trace_past_its_limit_is_cut_and_says_so(calls: CallStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.store import durable_calls

    monkeypatch.setattr(durable_calls, "MAX_TRACE", 3)
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    rows = [[f"c{i}", "a", "DONE", 10.0 + i, 10.5 + i, 200, None, False, None, "http", trace, None, False]
            for i in range(4)]
    calls.record_sync_rows(rows[:3])
    exactly = calls.trace(trace)
    assert [c["id"] for c in exactly["calls"]] == ["c0", "c1", "c2"] and exactly["truncated"] is False
    calls.record_sync_rows(rows[3:])
    past = calls.trace(trace)
    assert [c["id"] for c in past["calls"]] == ["c0", "c1", "c2"] and past["truncated"] is True


def test_counts_by_status(calls: CallStore) -> None:
    assert calls.counts() == {}
    calls.submit([{"id": "a", "function": "f"}, {"id": "b", "function": "f", "status": "DEAD"},
                  {"id": "c", "function": "f", "status": "DEAD"}], (b"",) * 3)
    assert calls.counts() == {"PENDING": 1, "DEAD": 2}


def test_headers_round_trip_as_json(calls: CallStore) -> None:
    submit_one(calls, headers=[["content-type", "a/b"], ["x-k", "v\u00e9"]])
    (meta,), _ = calls.claim("g", 1, TTL_S)
    assert meta["headers"] == [["content-type", "a/b"], ["x-k", "v\u00e9"]]
    assert json.loads(json.dumps(meta["headers"])) == meta["headers"]


def test_a_trace_is_read_by_its_id_with_spans_and_parents(calls: CallStore) -> None:
    from shared.tracecontext import span_id

    trace, other = "4bf92f3577b34da6a3ce929d0e0e4736", "5bf92f3577b34da6a3ce929d0e0e4736"
    calls.record_sync_rows([
        ["root", "a", "DONE", 10.0, 10.5, 200, None, False, None, "http", trace, "00f067aa0ba902b7", False],
        ["root.1", "b", "DONE", 10.1, 10.2, 200, None, False, "root", "call", trace, None, True],
        ["plain", "a", "DONE", 11.0, 11.1, 200, None, False],  # the gateway's older rows still go in
        ["elsewhere", "a", "DONE", 9.0, 9.1, 200, None, False, None, "http", other, None, False]])
    # an async call whose caller's span is not its parent call's (a remote parent): its own parent_span is kept
    submit_one(calls, id="async1", function="c", parent_id="root", trace_id=trace, parent_span="a1a2a3a4a5a6a7a8",
               trace_flags=1, tracestate="k=v", queued_at=10.3)
    calls.record_sync([{"id": "dict", "function": "d", "status": "FAILED", "queued_at": 10.4, "finished_at": 10.4001234,
                        "result_status": 500, "error": "boom", "source": "call", "parent_id": "root.1",
                        "trace_id": trace, "parent_span": "b1b2b3b4b5b6b7b8", "fused": True}])
    calls.record_sync_rows([["orphan", "e", "DONE", 10.6, 10.7, 200, None, False, None, "http", trace, None, False]])
    got = calls.trace(trace)
    assert got["trace_id"] == trace and not got["truncated"]
    assert [c["id"] for c in got["calls"]] == ["root", "root.1", "async1", "dict", "orphan"]
    root, fused, queued, from_dict, orphan = got["calls"]
    assert root == {"id": "root", "function": "a", "span_id": span_id("root"), "parent_id": None,
                    "parent_span": "00f067aa0ba902b7", "status": "DONE", "kind": "sync", "source": "http",
                    "fused": False, "started_ts": 10.0, "started": _iso(10.0), "duration_ms": 500.0,
                    "result_status": 200, "error": None}
    # no parent_span of its own: its parent call's span
    assert (fused["parent_span"], fused["fused"], fused["parent_id"]) == (span_id("root"), True, "root")
    assert (from_dict["parent_span"], from_dict["fused"], from_dict["source"], from_dict["duration_ms"],
            from_dict["status"], from_dict["result_status"], from_dict["error"]) == (
        "b1b2b3b4b5b6b7b8", True, "call", 0.123, "FAILED", 500, "boom")
    assert orphan["parent_span"] is None and orphan["parent_id"] is None and orphan["fused"] is False
    # not started yet: dated from its queueing, no duration
    assert (queued["kind"], queued["duration_ms"], queued["parent_span"], queued["started_ts"]) == (
        "async", None, "a1a2a3a4a5a6a7a8", 10.3)
    assert calls.get("root")["trace_id"] == trace and calls.get("plain")["trace_id"] is None
    assert (calls.get("root.1")["fused"], calls.get("plain")["fused"], calls.get("dict")["fused"]) == (True, False, True)
    assert calls.get("dict")["trace_id"] == trace
    submit_one(calls, id="untraced", function="c", queued_at=12.0)
    claimed, _ = calls.claim("gw1", 10, TTL_S)
    assert [(c["id"], c["trace_id"], c["parent_span"], c["trace_flags"], c["tracestate"]) for c in claimed] == [
        ("async1", trace, "a1a2a3a4a5a6a7a8", 1, "k=v"), ("untraced", None, None, 0, None)]
    # once it runs, it is dated from its start: 0.1234567 s of work
    calls.update([{"id": "async1", "status": "DONE", "started_at": 20.0, "finished_at": 20.1234567,
                   "result_status": 200}], ())
    queued = calls.trace(trace)["calls"][2]
    assert (queued["started_ts"], queued["started"], queued["duration_ms"]) == (20.0, _iso(20.0), 123.457)
    assert calls.trace("ffffffffffffffffffffffffffffffff")["calls"] == []
    with pytest.raises(InvalidRequest):
        calls.record_sync_rows([["x", "a", "DONE", 1.0, 1.1, 200, None, False, None, "http", 5, None, False]])
