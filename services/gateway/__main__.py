"""Entry point: python -m services.gateway [--check]."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import zmq

from shared.config import Settings
from shared.entry import main


async def serve(settings: Settings, ctx: zmq.Context, stop: asyncio.Event) -> int:
    from shared.auth import load_or_create_token
    from shared.logs import get_logger
    from services.gateway.control import build_control_app
    from services.gateway.core import Gateway, make_asgi
    from services.gateway.http import HttpServer
    from shared.service import settle_gc

    log = get_logger("gateway")
    gateway = Gateway(settings, ctx, load_or_create_token(settings))
    await gateway.start()
    app = make_asgi(gateway, build_control_app(gateway))
    server = HttpServer(app, settings.http_host, settings.http_port, direct_target=gateway.direct_target,
                        direct=gateway.invoke_direct, refuse=gateway.refuse_direct,
                        body_limit=gateway.catalogue.body_limit, body_grace_s=settings.http_body_grace_s,
                        min_body_rate=settings.http_min_body_rate)
    try:
        await server.start()
    except OSError as exc:
        log.error("HTTP server did not start", host=settings.http_host, port=settings.http_port, error=str(exc))
        await gateway.stop()
        return 1
    settle_gc()
    log.info("gateway ready", url=settings.http_url, router=settings.gateway_router)
    if settings.fusionizer_mode:
        from shared.config import FUSIONIZER_MODE_WARNING

        log.warning(f"FUSIONIZER MODE: {FUSIONIZER_MODE_WARNING}")
    await stop.wait()
    await server.stop(timeout_s=10.0)
    await gateway.stop()
    return 0


def check(settings: Settings) -> str:
    with urllib.request.urlopen(settings.http_url + "/healthz", timeout=2) as resp:
        return json.dumps(json.loads(resp.read()))


if __name__ == "__main__":
    main("gateway", serve, check)
