"""Entry point: python -m services.store [--check]."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TYPE_CHECKING

import zmq

from shared.aiosock import sync_call
from shared.config import Settings
from shared.curve import Keys
from shared.entry import main
from shared.logs import get_logger

if TYPE_CHECKING:
    from services.store.db import SqlDatabase

log = get_logger(__name__)

STANDBY_POLL_S = 0.5  # how often a standby asks for the leader lock: the takeover delay after a leader dies (0.1-5)
TAKEOVER_BIND_S = 15.0  # a standby that won the lead waits this long for the old leader's ports to be free


async def serve(settings: Settings, ctx: zmq.Context, stop: asyncio.Event) -> int:
    from services.store.databases import open_database
    from services.store.db import DatabaseUnreachable
    from services.store.server import StoreServer

    try:
        db = open_database(settings)
        if not await lead(db, stop):
            return 0
    except DatabaseUnreachable as exc:
        # a bad database_url is the operator's to fix: one line, no traceback, no retry loop
        print(f"nuclide store: {exc}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + TAKEOVER_BIND_S
    while True:
        try:
            server = StoreServer(settings, ctx, db)
            break
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline or stop.is_set():
                raise
            await asyncio.sleep(0.1)
    return await server.serve(stop)


async def lead(db: "SqlDatabase", stop: asyncio.Event) -> bool:
    """Wait until this store leads its database (at once on SQLite); False when stopped while standing by."""
    said = False
    while not stop.is_set():
        try:
            if db.lead():
                if said:
                    log.info("taking over as the leading store", db=db.describe())
                return True
            if not said:
                log.info("another store leads this database; standing by", db=db.describe(), leader=db.leader())
                said = True
        except db.errors as exc:  # the server went away while we wait: keep waiting for it
            log.warning("database unavailable while standing by", error=str(exc).splitlines()[0])
            try:
                db.reopen()
            except db.errors:
                pass
        try:
            await asyncio.wait_for(stop.wait(), STANDBY_POLL_S)
        except asyncio.TimeoutError:
            pass
    db.close()
    return False


def check(settings: Settings) -> str:
    return f"store ok, seq {sync_call(settings.store_rpc, 'ping', keys=Keys.load(settings, 'store'))['seq']}"


if __name__ == "__main__":
    main("store", serve, check)
