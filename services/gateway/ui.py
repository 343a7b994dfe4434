"""The web dashboard at /ui: static files shipped in this package (services/gateway/ui/), no build step.

The pages are public, as a login form must be; everything they show comes from the
JSON API, which needs the token (the page keeps it in sessionStorage). A strict
Content-Security-Policy keeps the pages to the gateway's own origin: no CDN, no
third-party script, and no other site may frame them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

UI_URL = "/ui"  # a reserved function name (shared/names.py)
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; base-uri 'none';"
       " form-action 'self'; frame-ancestors 'none'")


class DashboardFiles(StaticFiles):
    """The package's ui/ folder, with the headers that keep the pages to this origin."""

    def file_response(self, *args: Any, **kwargs: Any) -> Any:
        response = super().file_response(*args, **kwargs)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-cache"  # a gateway upgrade shows its new pages at once
        return response


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at /ui/ (/ui redirects there)."""

    async def to_index() -> RedirectResponse:
        return RedirectResponse("ui/")  # relative: right behind a proxy that adds a path prefix too

    # a mount takes /ui/... only; without this route, GET /ui would describe a function named "ui"
    app.add_api_route(UI_URL, to_index, methods=["GET"], include_in_schema=False)
    app.mount(UI_URL, DashboardFiles(packages=[("services.gateway", "ui")], html=True), name="ui")
