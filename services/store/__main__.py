"""Entry point: python -m services.store [--check]."""

from __future__ import annotations

import asyncio

import zmq

from shared.aiosock import sync_call
from shared.config import Settings
from shared.entry import main


async def serve(settings: Settings, ctx: zmq.Context, stop: asyncio.Event) -> int:
    from services.store.server import StoreServer

    server = StoreServer(settings, ctx)
    await server.serve(stop)
    return 0


def check(settings: Settings) -> str:
    return f"store ok, seq {sync_call(settings.store_rpc, 'ping')['seq']}"


if __name__ == "__main__":
    main("store", serve, check)
