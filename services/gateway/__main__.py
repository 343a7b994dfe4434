"""Entry point: python -m services.gateway [--check]."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request

import zmq

from shared.config import Settings
from shared.entry import main


async def serve(settings: Settings, ctx: zmq.Context, stop: asyncio.Event) -> int:
    import uvicorn

    from shared.auth import load_or_create_token
    from shared.logs import get_logger
    from services.gateway.control import build_control_app
    from services.gateway.core import Gateway, make_asgi

    log = get_logger("gateway")

    class Server(uvicorn.Server):
        # our shared service loop owns the signals; uvicorn must not replace them
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    gateway = Gateway(settings, ctx, load_or_create_token(settings))
    await gateway.start()
    app = make_asgi(gateway, build_control_app(gateway))
    config = uvicorn.Config(
        app, host=settings.http_host, port=settings.http_port, loop="none", http="httptools",
        lifespan="off", access_log=False, log_level="warning", timeout_graceful_shutdown=10,
        server_header=False, date_header=False, backlog=4096,
    )
    server = Server(config)
    task = asyncio.ensure_future(server.serve())
    log.info("gateway ready", url=settings.http_url, router=settings.gateway_router)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await task
    stopper.cancel()
    await gateway.stop()
    if not server.started:
        log.error("HTTP server did not start", host=settings.http_host, port=settings.http_port)
        return 1
    return 0


def check(settings: Settings) -> str:
    with urllib.request.urlopen(settings.http_url + "/healthz", timeout=2) as resp:
        return json.dumps(json.loads(resp.read()))


if __name__ == "__main__":
    main("gateway", serve, check)
