"""The store's database: one schema kept by numbered migrations, on SQLite (embedded) or PostgreSQL.

The migrations and every query are written once, in SQLite's dialect with ``?`` placeholders;
:mod:`services.store.pg` translates the few differences (column types, placeholders) for
PostgreSQL. :func:`services.store.databases.open_database` picks the dialect from ``database_url``: empty means
SQLite at ``<var_dir>/state.db``, ``postgresql://...`` a PostgreSQL server.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# Each migration runs once, in order, inside a transaction; never edit a released one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE blobs (digest TEXT PRIMARY KEY, size INTEGER NOT NULL, created_at REAL NOT NULL);
    CREATE TABLE functions (
        name TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        latest_version INTEGER NOT NULL,
        state TEXT NOT NULL,
        group_id TEXT NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE function_versions (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        digest TEXT NOT NULL,
        spec TEXT NOT NULL,
        warnings TEXT NOT NULL,
        state TEXT NOT NULL,
        error TEXT,
        created_at REAL NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE groups (
        id TEXT PRIMARY KEY,
        members TEXT NOT NULL,
        version INTEGER NOT NULL,
        version_counter INTEGER NOT NULL,
        ready_version INTEGER NOT NULL,
        ready_members TEXT NOT NULL,
        state TEXT NOT NULL,
        replicas_desired INTEGER NOT NULL,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        group_id TEXT NOT NULL,
        group_version INTEGER NOT NULL,
        backend TEXT NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER,
        exit_code INTEGER,
        error TEXT,
        started_at REAL,
        ready_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX instances_group ON instances (group_id, group_version);
    INSERT INTO meta (key, value) VALUES ('seq', '0');
    """,
    # group versions come from one counter, so a newer deployment of a task always
    # outranks an older one, whichever group each belongs to; kv holds small documents
    """
    INSERT INTO meta (key, value) SELECT 'group_seq', CAST(COALESCE(MAX(version_counter), 0) AS TEXT) FROM groups;
    CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL);
    """,
    # calls: every async call (durable before it is acknowledged) and a record of sync calls
    """
    CREATE TABLE calls (
        id TEXT PRIMARY KEY,
        function TEXT NOT NULL,
        status TEXT NOT NULL,
        kind TEXT NOT NULL,
        source TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL DEFAULT 1,
        idempotency_key TEXT,
        callback_url TEXT,
        callback_state TEXT,
        owner TEXT,
        payload BLOB,
        content_type TEXT,
        headers TEXT,
        result BLOB,
        result_status INTEGER,
        result_content_type TEXT,
        error TEXT,
        parent_id TEXT,
        cold_start INTEGER NOT NULL DEFAULT 0,
        queued_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        next_attempt_at REAL
    );
    CREATE INDEX calls_status ON calls (status, next_attempt_at);
    CREATE INDEX calls_function ON calls (function, queued_at);
    CREATE INDEX calls_finished ON calls (finished_at);
    CREATE UNIQUE INDEX calls_idempotency ON calls (function, idempotency_key) WHERE idempotency_key IS NOT NULL;
    """,
    # registered runtimes (PUT /runtimes/{name}): an image, a code path and two argv commands (JSON lists)
    """
    CREATE TABLE runtimes (
        name TEXT PRIMARY KEY,
        image TEXT NOT NULL,
        image_id TEXT NOT NULL,
        path TEXT NOT NULL,
        dependencies TEXT NOT NULL,
        run TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # regroups (PUT /groups, the optimizer) are staged: the groups a setup needs are built under
    # groups.regroup and take over only once all of them serve; NULL marks a group in force
    """
    ALTER TABLE groups ADD COLUMN regroup INTEGER;
    CREATE TABLE regroups (
        id INTEGER PRIMARY KEY,
        setup TEXT NOT NULL,
        state TEXT NOT NULL,
        error TEXT,
        failed_tasks TEXT NOT NULL,
        log_tail TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # zips kept in the database itself: on PostgreSQL every store replica reaches them with no shared disk
    # (services/store/blobs.py); SQLite keeps them as files beside its database and leaves this table empty
    """
    CREATE TABLE blob_data (digest TEXT PRIMARY KEY, data BLOB NOT NULL);
    """,
    # live gateways (shared/gateways.py): a row per gateway boot, its record as JSON, refreshed by its beats
    """
    CREATE TABLE gateways (id TEXT PRIMARY KEY, record TEXT NOT NULL, started_at REAL NOT NULL,
                           seen_at REAL NOT NULL);
    """,
    # W3C trace context (shared/tracecontext.py): a call's trace, the caller's span when it came from outside
    # (a task call's parent span is derived from parent_id), the flags and tracestate an async call runs with,
    # and whether it ran in-process (fused); GET /traces/{id} reads a trace by its index
    """
    ALTER TABLE calls ADD COLUMN trace_id TEXT;
    ALTER TABLE calls ADD COLUMN parent_span TEXT;
    ALTER TABLE calls ADD COLUMN trace_flags INTEGER;
    ALTER TABLE calls ADD COLUMN tracestate TEXT;
    ALTER TABLE calls ADD COLUMN fused INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX calls_trace ON calls (trace_id);
    """,
]


class DatabaseUnreachable(RuntimeError):
    """The database named by the settings cannot be used at all: the message is one line saying what to check."""


class LeadershipLost(RuntimeError):
    """Another store took the lead of the database while this one was cut off from it (see pg.py)."""


class SqlDatabase:
    """What the store's logic needs of a database, whichever the dialect; subclasses connect and translate."""

    dialect = ""
    errors: tuple[type[BaseException], ...] = ()  # the driver's errors: the database failed, not the request
    integrity_errors: tuple[type[BaseException], ...] = ()  # a constraint refused a change (the request's fault)
    conn: Any

    def ddl(self, statement: str) -> str:
        """A migration statement in this dialect (they are written in SQLite's)."""
        return statement

    def describe(self) -> str:
        """Where the data lives, for logs: never a password."""
        raise NotImplementedError

    def lead(self) -> bool:
        """Become the one store that writes this database; False while another store does (see pg.py)."""
        return True

    def leader(self) -> str:
        """Who leads the database, for a standby's log line."""
        return "this store"

    def check_lead(self) -> None:
        """Raise a database error when this store can no longer be sure it is the one writer (see pg.py)."""

    def migrate(self) -> int:
        self.execute(self.ddl("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                              " applied_at REAL NOT NULL)"))
        done = {row[0] for row in self.all("SELECT version FROM schema_migrations")}
        applied = 0
        for number, sql in enumerate(MIGRATIONS, start=1):
            if number in done:
                continue
            with self.tx():
                for statement in filter(None, (s.strip() for s in sql.split(";"))):
                    self.execute(self.ddl(statement))
                self.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", (number, time.time()))
            applied += 1
        return applied

    def probe_write(self) -> None:
        """One tiny write transaction: raises when the database cannot be written right now."""
        with self.tx():
            self.execute("UPDATE meta SET value=value WHERE key='seq'")

    def one(self, sql: str, params: tuple = ()) -> Any:
        return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: tuple = ()) -> list[Any]:
        return self.execute(sql, params).fetchall()

    def execute(self, sql: str, params: tuple = ()) -> Any:
        raise NotImplementedError

    def executemany(self, sql: str, rows: list[tuple]) -> int:
        """Run one statement for each row (PostgreSQL sends them in one pipeline); the rows it changed in all."""
        raise NotImplementedError

    def tx(self) -> Any:
        raise NotImplementedError

    def reopen(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.conn.close()


class Database(SqlDatabase):
    """SQLite in WAL mode: a single connection used by the store's one thread; every change is a transaction."""

    dialect = "sqlite"
    errors = (sqlite3.Error,)
    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.conn = self._connect()
        self.migrate()

    def describe(self) -> str:
        return str(self.path)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def reopen(self) -> None:
        """A fresh connection after an I/O error: SQLite may keep a failed WAL index until it reconnects."""
        try:
            self.conn.close()
        except sqlite3.Error:
            pass
        self.conn = self._connect()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            if self.conn.in_transaction:  # a failed COMMIT may have ended it already
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the error that got us here is the one to report
            raise
        else:
            self.conn.execute("COMMIT")

    def execute(self, sql: str, params: tuple = ()) -> Any:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: list[tuple]) -> int:
        return self.conn.executemany(sql, rows).rowcount
