"""The common `python -m services.<name>` entry: settings, logging, --check, run."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Awaitable, Callable

import zmq

from shared import aiosock, service
from shared.config import ConfigError, Settings, load_settings
from shared.curve import Keys, ZapHandler
from shared.logs import configure

# a service's main coroutine: its settings, the process's ZeroMQ context, the event set when it should stop
Serve = Callable[[Settings, zmq.Context, asyncio.Event], Awaitable[int | None]]


def main(name: str, serve: Serve, check: Callable[[Settings], str]) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}")
    parser.add_argument("--check", action="store_true", help="ask the running service if it is healthy; exit 0 if so")
    opts = parser.parse_args()
    try:
        settings = load_settings(name)
        keys = Keys.load(settings, name)  # a damaged or leaked key file stops the start here, with what to do
    except ConfigError as exc:
        print(f"nuclide {name}: {exc}", file=sys.stderr)
        sys.exit(2)
    if opts.check:
        try:
            print(check(settings))
        except Exception as exc:
            print(f"{name} is not healthy: {exc}", file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    configure(name, settings.log_format, settings.log_level)

    service.exit_with(service.run(lambda stop: serve_with_context(settings, serve, stop, keys), name))


async def serve_with_context(settings: Settings, serve: Serve, stop: asyncio.Event,
                             keys: Keys | None = None) -> int | None:
    """``serve`` with the process's ZeroMQ context, closed after it however ``serve`` ended. ``keys``: the
    service's CURVE keys, by which its ZAP handler admits peers to its server sockets (shared/curve.py)."""
    ctx = zmq.Context.instance()
    # every socket this service opens drops a peer that sends a frame over the documented limits,
    # before any memory is taken for it (libzmq reads the size first)
    ctx.setsockopt(zmq.MAXMSGSIZE, settings.max_frame_bytes)
    zap = ZapHandler(ctx, keys) if keys is not None else None
    try:
        return await serve(settings, ctx, stop)
    finally:
        # a start that failed half-way (a port taken) leaves sockets the loop watches and no
        # stop() closed: they leave the loop before the context closes them, else uvloop aborts
        # the process on its next poll (see aiosock.close_all)
        aiosock.close_all()
        if zap is not None:
            zap.close()
        ctx.destroy(linger=0)
