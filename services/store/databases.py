"""The store's database from its settings: SQLite by default, PostgreSQL when ``database_url`` names one."""

from __future__ import annotations

from shared.config import Settings
from services.store.db import Database, SqlDatabase


def open_database(settings: Settings) -> SqlDatabase:
    """The database ``settings.database_url`` names, connected (not yet led nor migrated for PostgreSQL)."""
    if not settings.database_url:
        return Database(settings.state_db)
    from services.store.pg import PgDatabase  # psycopg is only imported by a store that uses PostgreSQL

    return PgDatabase(settings.database_url)
