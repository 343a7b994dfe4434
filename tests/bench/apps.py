"""The baselines of the sync invoke scenario: the same no-op handler in a bare ASGI app and in a FastAPI app.

Served by ``python -m uvicorn tests.bench.apps:bare`` (or ``:fastapi_app``). Both
read the request body and call the handler with it, as nuclide's runtime does,
and answer text/plain like nuclide does for a ``str`` result. Importing this
module must stay cheap: it is all the baseline server process loads.
"""

from typing import Any

NOOP_SOURCE = "def handler(context, event):\n    return \"ok\"\n"

_ns: dict[str, Any] = {}
exec(NOOP_SOURCE, _ns)  # the very function nuclide deploys, so all three run the same code
handler = _ns["handler"]

_TEXT = (b"content-type", b"text/plain; charset=utf-8")


async def bare(scope: dict, receive: Any, send: Any) -> None:
    """The floor of Python HTTP serving here: raw ASGI, no routing, no framework."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        more = message.get("more_body", False)
    out = handler(None, body).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [_TEXT, (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


def _build_fastapi() -> Any:
    # what "just write a small web service" gives, and what a FastAPI FaaS worker does:
    # one route taking the function name, the body read, the handler called
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse

    app = FastAPI()

    @app.post("/{name}")
    async def invoke(name: str, request: Request) -> PlainTextResponse:
        body = await request.body()
        return PlainTextResponse(handler(None, body))

    return app


def __getattr__(attr: str) -> Any:
    # built on first access, so serving the bare app never imports FastAPI
    if attr == "fastapi_app":
        app = _build_fastapi()
        globals()["fastapi_app"] = app
        return app
    raise AttributeError(attr)
