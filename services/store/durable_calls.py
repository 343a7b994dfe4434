"""Durable calls: async calls stored before they are acknowledged, and a record of sync calls.

Status moves PENDING -> RUNNING -> DONE | FAILED, with failed attempts going back
to PENDING (``next_attempt_at`` set by the retry policy) until they are exhausted
and become DEAD. Each non-final call has an ``owner``: the boot id of the gateway
dispatching it; a gateway claims the non-final calls no live gateway owns (one that
said BYE or stopped beating, see shared/gateways.py, or none), so calls RUNNING on a
gateway (or instance) that died are retried by another, and the retry shows in
``attempts``, while the calls of the other live gateways stay theirs. Writes come in batches: one transaction each.
"""

from __future__ import annotations

import json
import time
from typing import Any

from shared import protocol
from shared.tracecontext import span_id
from shared.errors import Conflict, InvalidRequest, NotFound
from services.store.db import SqlDatabase

# the compact form of calls.record_sync: one array per sync call, in this order; the first 8 are required,
# a task call's row adds parent_id and source (an entry call's parent is None and its source "http"), and a
# traced call's the last three (its W3C trace id, the caller's span when it came from outside, fused or not)
SYNC_ROW_FIELDS = ("id", "function", "status", "queued_at", "finished_at", "result_status", "error", "cold_start",
                   "parent_id", "source", "trace_id", "parent_span", "fused")
_ENTRY_ROW_LEN = 8
_TASK_ROW_LEN = 10
_ROW_LENS = (_ENTRY_ROW_LEN, _TASK_ROW_LEN, len(SYNC_ROW_FIELDS))

FINAL = ("DONE", "FAILED", "DEAD")
STATUSES = ("PENDING", "RUNNING", "DONE", "FAILED", "DEAD")
MAX_LIST = 1000
# calls one claim hands out: each payload is a frame of the reply, and a reply past protocol.MAX_FRAMES is
# dropped by its reader, which would leave the claimed calls owned by a gateway that never got them
MAX_CLAIM = protocol.MAX_BATCH


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def record(row: Any, with_result: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row["id"], "function": row["function"], "status": row["status"], "kind": row["kind"],
        "source": row["source"], "attempts": row["attempts"], "max_attempts": row["max_attempts"],
        "parent_id": row["parent_id"], "cold_start": bool(row["cold_start"]),
        "timings": {"queued": _iso(row["queued_at"]), "started": _iso(row["started_at"]),
                    "finished": _iso(row["finished_at"]), "next_attempt": _iso(row["next_attempt_at"])},
        "queued_ts": row["queued_at"],
        "duration_s": (round(row["finished_at"] - row["started_at"], 6)
                       if row["finished_at"] and row["started_at"] else None),
        "error": row["error"],
        "result_status": row["result_status"],
        "trace_id": row["trace_id"],
        "fused": bool(row["fused"]),
    }
    if row["idempotency_key"]:
        out["idempotency_key"] = row["idempotency_key"]
    if row["callback_url"]:
        out["callback"] = {"url": row["callback_url"], "state": row["callback_state"]}
    if with_result and row["result"] is not None:
        ctype = row["result_content_type"] or ""
        data = bytes(row["result"])
        if ctype.startswith("application/json"):
            try:
                out["result"] = json.loads(data)
            except ValueError:
                out["result"] = data.decode("utf-8", "replace")
        elif ctype.startswith("text/") or not ctype:
            out["result"] = data.decode("utf-8", "replace")
        else:
            out["result"] = {"content_type": ctype, "size": len(data)}
        out["result_content_type"] = ctype
    return out


# the columns a submitted call is stored with, and how many calls one INSERT statement carries (22
# values each: within SQLite's and PostgreSQL's limits on a statement's parameters)
_INSERT = ("INSERT INTO calls (id, function, status, kind, source, attempts, max_attempts, idempotency_key,"
           " callback_url, callback_state, owner, payload, content_type, headers, error, parent_id, queued_at,"
           " finished_at, next_attempt_at, trace_id, parent_span, trace_flags, tracestate) VALUES ")
_INSERT_ROW = "(?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
INSERT_ROWS = 500
# what an update may set, in the order its statement names them
_UPDATE_FIELDS = ("status", "attempts", "started_at", "finished_at", "next_attempt_at", "result_status",
                  "result_content_type", "error", "owner", "callback_state", "cold_start")

MAX_TEXT_FIELD = 2048  # ids, keys, URLs and content types are short; anything longer is refused
_TEXT_FIELDS = ("id", "function", "kind", "source", "status", "idempotency_key", "callback_url", "owner",
                "content_type", "parent_id", "trace_id", "parent_span", "tracestate")
_NUMBER_FIELDS = ("max_attempts", "queued_at", "next_attempt_at", "trace_flags")
MAX_TRACE = 1000  # calls one calls.trace answers: a trace past it is cut (and says so)


def call_problem(call: Any) -> str | None:
    """Why a submitted call cannot be stored (a field of the wrong type or size), or None."""
    if not isinstance(call, dict):
        return f"a call must be a map, not {type(call).__name__}"
    for key in ("id", "function"):
        if not isinstance(call.get(key), str) or not call[key]:
            return f"call field {key!r} must be a non-empty string"
    for key in _TEXT_FIELDS:
        value = call.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT_FIELD):
            return f"call field {key!r} must be a string of at most {MAX_TEXT_FIELD} characters"
    for key in _NUMBER_FIELDS:
        value = call.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"call field {key!r} must be a number"
    if call.get("status", "PENDING") not in STATUSES:
        return f"call status must be one of {', '.join(STATUSES)}"
    error = call.get("error")
    if error is not None and not isinstance(error, str):
        return "call field 'error' must be a string"
    headers = call.get("headers") or []
    if not isinstance(headers, list) or not all(
            isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in headers):
        return "call field 'headers' must be a list of [name, value] string pairs"
    return None


def _sync_row(row: Any) -> tuple:
    """A row of the gateway's (SYNC_ROW_FIELDS) as the columns _insert_sync writes; InvalidRequest if it is not one."""
    size = len(row) if isinstance(row, (list, tuple)) else 0
    if size in _ROW_LENS and all(isinstance(v, str) for v in row[:3]):
        call_id, function, status, queued_at, finished_at, result_status, error, cold = row[:_ENTRY_ROW_LEN]
        parent_id, source = row[_ENTRY_ROW_LEN:_TASK_ROW_LEN] or (None, "http")
        trace_id, parent_span, fused = row[_TASK_ROW_LEN:] or (None, None, False)
        if (isinstance(parent_id, (str, type(None))) and isinstance(source, str)
                and isinstance(trace_id, (str, type(None))) and isinstance(parent_span, (str, type(None)))):
            return (call_id, function, status, source, queued_at, queued_at, finished_at, result_status, error,
                    parent_id, int(bool(cold)), trace_id, parent_span, int(bool(fused)))
    raise InvalidRequest(f"a sync call row must be [{', '.join(SYNC_ROW_FIELDS)}] (the first 8, 10, or all)")


class CallStore:
    def __init__(self, db: SqlDatabase) -> None:
        self.db = db

    def submit(self, calls: list[dict[str, Any]], payloads: tuple[bytes, ...]) -> list[dict[str, Any]]:
        """Insert calls as PENDING (owned by their gateway); a repeated idempotency key returns the first id."""
        if len(payloads) != len(calls):
            raise InvalidRequest(f"calls.submit got {len(calls)} calls but {len(payloads)} payloads")
        out: list[dict[str, Any] | None] = [None] * len(calls)
        now = time.time()
        rows: list[tuple[int, dict[str, Any], tuple]] = []  # (position, call, the row's values)
        for i, (call, payload) in enumerate(zip(calls, payloads)):
            problem = call_problem(call)
            if problem is not None:
                # one bad call fails alone; the rest of its batch is stored as usual
                out[i] = {"id": call.get("id") if isinstance(call, dict) else None, "duplicate": False,
                          "status": "REFUSED", "error": problem}
                continue
            status = call.get("status", "PENDING")
            rows.append((i, call, (
                call["id"], call["function"], status, call.get("kind", "async"), call.get("source", "http"),
                int(call.get("max_attempts", 1)), call.get("idempotency_key"), call.get("callback_url"),
                "pending" if call.get("callback_url") else None, call.get("owner"), payload,
                call.get("content_type") or None, json.dumps(call.get("headers") or []), call.get("error"),
                call.get("parent_id"), float(call.get("queued_at") or now),
                now if status in FINAL else None, call.get("next_attempt_at"), call.get("trace_id"),
                call.get("parent_span"), call.get("trace_flags"), call.get("tracestate"))))
        with self.db.tx():
            for start in range(0, len(rows), INSERT_ROWS):
                chunk = rows[start:start + INSERT_ROWS]
                # one statement per chunk; the primary key and the idempotency index turn a repeat (of an
                # earlier call, or of one before it in the chunk) into a no-op, then we look up what it repeated
                inserted = {row[0] for row in self.db.all(
                    _INSERT + ", ".join([_INSERT_ROW] * len(chunk)) + " ON CONFLICT DO NOTHING RETURNING id",
                    tuple(v for _, _, values in chunk for v in values))}
                for i, call, values in chunk:
                    if call["id"] in inserted:
                        inserted.discard(call["id"])  # a second row with this id in the chunk is a repeat
                        out[i] = {"id": call["id"], "duplicate": False, "status": values[2]}
                        continue
                    row = self.db.one("SELECT id, status FROM calls WHERE id=?", (call["id"],))
                    key = call.get("idempotency_key")
                    if row is None and key:
                        row = self.db.one("SELECT id, status FROM calls WHERE function=? AND idempotency_key=?",
                                          (call["function"], key))
                    if row is None:
                        raise InvalidRequest(f"call {call['id']!r} could not be stored")
                    out[i] = {"id": row["id"], "duplicate": True, "status": row["status"]}
        return [o for o in out if o is not None]

    def update(self, updates: list[dict[str, Any]], results: tuple[bytes, ...]) -> int:
        """Apply a batch of state changes; a body is given for updates with ``has_result``.

        Updates with the same statement (the same fields, under the same conditions) go as one
        executemany (one round trip to PostgreSQL), and one call's updates still apply in their order."""
        results_iter = iter(results)
        groups: list[tuple[str, list[tuple]]] = []  # statements in the order they run, with their rows
        last_of_sql: dict[str, int] = {}  # statement -> its latest group
        last_of_call: dict[str, int] = {}  # call id -> the latest group that updates it
        for u in updates:
            fields: list[str] = []
            values: list[Any] = []
            for key in _UPDATE_FIELDS:
                if key in u:
                    fields.append(f"{key}=?")
                    values.append(u[key])
            if u.get("has_result"):
                fields.append("result=?")
                values.append(next(results_iter, b""))
            if not fields:
                continue
            values.append(u["id"])
            sql = f"UPDATE calls SET {', '.join(fields)} WHERE id=?"
            if "status" in u:
                # a finished call is never reopened by a late, stale update (redrive is explicit)
                sql += " AND status NOT IN ('DONE', 'FAILED', 'DEAD')"
            if "if_owner" in u:
                # a gateway writes only the calls it still owns: one that stalled past its liveness lost them
                # to another gateway, whose attempt is the one recorded
                sql += " AND owner=?"
                values.append(u["if_owner"])
            at = last_of_sql.get(sql, -1)
            if at < 0 or at < last_of_call.get(u["id"], -1):  # joining it would run this before an earlier update
                at = last_of_sql[sql] = len(groups)
                groups.append((sql, []))
            groups[at][1].append(tuple(values))
            last_of_call[u["id"]] = at
        changed = 0
        with self.db.tx():
            for sql, rows in groups:
                changed += self.db.executemany(sql, rows) if len(rows) > 1 else self.db.execute(sql, rows[0]).rowcount
        return changed

    def record_sync(self, calls: list[dict[str, Any]]) -> int:
        """Record finished sync calls (no payload or result kept), one executemany per batch."""
        rows = [(c["id"], c["function"], c["status"], c.get("source", "http"), c["queued_at"], c.get("started_at"),
                 c.get("finished_at"), c.get("result_status"), c.get("error"), c.get("parent_id"),
                 int(bool(c.get("cold_start"))), c.get("trace_id"), c.get("parent_span"), int(bool(c.get("fused"))))
                for c in calls]
        return self._insert_sync(rows)

    def record_sync_rows(self, rows: list[Any]) -> int:
        """The gateway's compact form: one array per call, SYNC_ROW_FIELDS in order (no dict per call)."""
        return self._insert_sync([_sync_row(row) for row in rows])

    def _insert_sync(self, rows: list[tuple]) -> int:
        with self.db.tx():
            self.db.executemany(
                "INSERT INTO calls (id, function, status, kind, source, attempts, max_attempts, queued_at,"
                " started_at, finished_at, result_status, error, parent_id, cold_start, trace_id, parent_span, fused)"
                " VALUES (?, ?, ?, 'sync', ?, 1, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)
        return len(rows)

    def claim(self, owner: str, limit: int, gateway_ttl_s: float) -> tuple[list[dict[str, Any]], list[bytes]]:
        """Take non-final async calls that no live gateway owns (unowned ones, and those of a gateway boot that
        said BYE or was silent for ``gateway_ttl_s``), for ``owner``; the caller honours next_attempt_at.

        At most MAX_CLAIM at a time, whatever ``limit`` asks: the caller claims again while it gets full batches."""
        limit = max(0, min(limit, MAX_CLAIM))
        cutoff = time.time() - gateway_ttl_s
        with self.db.tx():
            rows = self.db.all(
                "SELECT * FROM calls WHERE status IN ('PENDING', 'RUNNING') AND kind='async' AND"
                " (owner IS NULL OR (owner != ? AND owner NOT IN (SELECT id FROM gateways WHERE seen_at >= ?)))"
                " ORDER BY queued_at LIMIT ?", (owner, cutoff, limit))
            if rows:  # one statement per call, sent in one go (PostgreSQL pipelines executemany)
                self.db.executemany("UPDATE calls SET owner=?, status='PENDING' WHERE id=?",
                                    [(owner, row["id"]) for row in rows])
        calls = [{"id": r["id"], "function": r["function"], "attempts": r["attempts"], "max_attempts": r["max_attempts"],
                  "content_type": r["content_type"] or "", "headers": json.loads(r["headers"] or "[]"),
                  "callback_url": r["callback_url"], "callback_state": r["callback_state"],
                  "was_running": r["status"] == "RUNNING", "queued_at": r["queued_at"],
                  "next_attempt_at": r["next_attempt_at"], "parent_id": r["parent_id"], "source": r["source"],
                  "trace_id": r["trace_id"], "parent_span": r["parent_span"], "trace_flags": r["trace_flags"] or 0,
                  "tracestate": r["tracestate"]}
                 for r in rows]
        return calls, [bytes(r["payload"] or b"") for r in rows]

    def owned(self, owner: str, ids: list[str]) -> list[str]:
        """Which of ``ids`` are unfinished calls ``owner`` still owns (a gateway back from a stall asks)."""
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        rows = self.db.all("SELECT id FROM calls WHERE owner=? AND status IN ('PENDING', 'RUNNING') AND"
                           f" id IN ({marks})", (owner, *ids))
        return [r["id"] for r in rows]

    def take_callback(self, call_id: str, owner: str) -> bool:
        """Whether ``owner`` (a gateway boot) is the one to POST the call's callback: only the call's owner, and
        once, whatever happens after (its state is 'sending' durably before the POST)."""
        with self.db.tx():
            taken = self.db.execute("UPDATE calls SET callback_state='sending' WHERE id=? AND owner=? AND"
                                    " callback_state='pending'", (call_id, owner)).rowcount
        return bool(taken)

    def pending_callbacks(self, owner: str, limit: int) -> list[dict[str, Any]]:
        rows = self.db.all("SELECT * FROM calls WHERE callback_state='pending' AND status IN ('DONE', 'FAILED', 'DEAD')"
                           " LIMIT ?", (limit,))
        return [dict(record(r, with_result=False), result_b=bytes(r["result"] or b"")) for r in rows]

    def get(self, call_id: str) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM calls WHERE id=?", (call_id,))
        if row is None:
            raise NotFound(f"call '{call_id}' not found")
        return record(row)

    def result(self, call_id: str) -> tuple[dict[str, Any], bytes]:
        row = self.db.one("SELECT * FROM calls WHERE id=?", (call_id,))
        if row is None:
            raise NotFound(f"call '{call_id}' not found")
        return record(row, with_result=False), bytes(row["result"] or b"")

    def list(self, function: str | None, status: str | None, limit: int, source: str | None = None,
             before: float | None = None) -> list[dict[str, Any]]:
        """Newest first; page with ``before`` = the oldest ``queued_ts`` of the previous page."""
        if status and status not in STATUSES:
            raise InvalidRequest(f"status {status!r} is not one of {', '.join(STATUSES)}")
        where, params = [], []
        if function:
            where.append("function=?")
            params.append(function)
        if status:
            where.append("status=?")
            params.append(status)
        if source:
            where.append("source=?")
            params.append(source)
        if before is not None:
            where.append("queued_at < ?")
            params.append(float(before))
        sql = "SELECT * FROM calls" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY queued_at DESC LIMIT ?"
        params.append(max(1, min(int(limit), MAX_LIST)))
        return [record(r, with_result=False) for r in self.db.all(sql, tuple(params))]

    def trace(self, trace_id: str) -> dict[str, Any]:
        """The calls of a trace, oldest first, at most MAX_TRACE (``truncated`` says when there were more): each
        with its span, its parent's call and span, its timings and whether it ran in-process."""
        rows = self.db.all("SELECT id, function, status, kind, source, parent_id, parent_span, fused, queued_at,"
                           " started_at, finished_at, result_status, error FROM calls WHERE trace_id=?"
                           " ORDER BY queued_at LIMIT ?", (trace_id, MAX_TRACE + 1))
        spans = []
        for r in rows[:MAX_TRACE]:
            started = r["started_at"] if r["started_at"] is not None else r["queued_at"]
            parent_span = r["parent_span"] or (span_id(r["parent_id"]) if r["parent_id"] else None)
            spans.append({
                "id": r["id"], "function": r["function"], "span_id": span_id(r["id"]), "parent_id": r["parent_id"],
                "parent_span": parent_span, "status": r["status"], "kind": r["kind"], "source": r["source"],
                "fused": bool(r["fused"]), "started_ts": started, "started": _iso(started),
                "duration_ms": (round((r["finished_at"] - started) * 1000, 3)
                                if r["finished_at"] is not None and started is not None else None),
                "result_status": r["result_status"], "error": r["error"]})
        return {"trace_id": trace_id, "calls": spans, "truncated": len(rows) > MAX_TRACE}

    def redrive(self, call_id: str) -> dict[str, Any]:
        with self.db.tx():
            row = self.db.one("SELECT status FROM calls WHERE id=?", (call_id,))
            if row is None:
                raise NotFound(f"call '{call_id}' not found")
            if row["status"] != "DEAD":
                raise Conflict(f"call '{call_id}' is {row['status']}, not DEAD; only dead calls can be redriven")
            self.db.execute("UPDATE calls SET status='PENDING', attempts=0, owner=NULL, error=NULL, finished_at=NULL,"
                            " next_attempt_at=NULL, callback_state=CASE WHEN callback_url IS NULL THEN NULL ELSE"
                            " 'pending' END WHERE id=?", (call_id,))
        return self.get(call_id)

    def purge(self, status: str, function: str | None = None) -> int:
        if status not in FINAL:
            raise InvalidRequest(f"only finished calls can be purged (status DONE, FAILED or DEAD), not {status!r}")
        with self.db.tx():
            if function:
                cur = self.db.execute("DELETE FROM calls WHERE status=? AND function=?", (status, function))
            else:
                cur = self.db.execute("DELETE FROM calls WHERE status=?", (status,))
        return cur.rowcount

    def expire(self, retention_s: float) -> int:
        with self.db.tx():
            cur = self.db.execute("DELETE FROM calls WHERE status IN ('DONE', 'FAILED') AND finished_at < ?",
                                  (time.time() - retention_s,))
        return cur.rowcount

    def counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.db.all("SELECT status, COUNT(*) FROM calls GROUP BY status")}
