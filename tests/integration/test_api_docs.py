"""The published API document: every route the gateway answers is in it, its bodies match real answers, and
/docs works without internet access."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any
from unittest import mock

import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter
from starlette.routing import Match

from services.gateway import apimodels as m
from services.gateway.control import build_control_app
from services.gateway.openapi import CONTROL_DOCS, DOCS_STATIC_URL
from shared.names import invoke_target
from tests.stack import Stack, function_yaml, wait_for

pytestmark = pytest.mark.integration

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# pages for people, not API operations: the docs themselves and the dashboard
PAGES = {"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", DOCS_STATIC_URL, "/ui"}
# routes that only refuse, with a 400 naming the real routes: a PUT of a path no function can have
REFUSALS = {"/{path:path}"}
# request paths of every shape the invoke path takes, besides those made from FastAPI's routes
INVOKE_SHAPES = ("/fn", "/fn/", "/fn/a", "/fn/a/b", "/functions/fn/invoke", "/functions/fn/invoke/a/b",
                 "/functions/fn/execute", "/functions/fn/execute/x", "/async-function/fn", "/async-function/fn/a/b",
                 "/async-function", "/functions/fn/other", "/calls/x/y", "/ui/x")


def control_app() -> Any:
    return build_control_app(mock.MagicMock())  # routes only: no request is served


def template_regex(template: str) -> re.Pattern[str]:
    """A path template of the document as a regex; {path} spans segments (it is the rest of the URL)."""
    parts = re.split(r"(\{[^}]+\})", template)
    out = "".join(("(.+)" if p == "{path}" else "([^/]+)") if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(out + "$")


def documented(schema: dict[str, Any], method: str, path: str) -> bool:
    path = path.rstrip("/") or "/"  # /fn/ is /fn, as OpenAPI tools read a document
    return any(method.lower() in item and template_regex(t).match(path) for t, item in schema["paths"].items())


def sample_paths(app: Any) -> set[str]:
    paths = set(INVOKE_SHAPES)
    for route in app.routes:
        template = getattr(route, "path", "")
        paths.add(re.sub(r"\{[^}]+\}", "x1", template) or "/")
    return paths


def answered_by_control(app: Any, method: str, path: str) -> Any:
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    for route in app.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route
    return None


def test_every_route_the_gateway_answers_is_in_the_schema(stack: Stack) -> None:
    schema = stack.client.get("/openapi.json").json()
    app = control_app()
    missing = []
    for path in sorted(sample_paths(app)):
        for method in METHODS:
            if invoke_target(method, path) is not None:  # what the gateway's invoke path serves (services/gateway/http.py)
                if not documented(schema, method, path):
                    missing.append(f"invoke {method} {path}")
                continue
            route = answered_by_control(app, method, path)
            if route is None:
                continue
            if getattr(route, "path", None) in REFUSALS:
                continue
            if isinstance(route, APIRoute) and route.path not in PAGES:
                if not documented(schema, method, path):
                    missing.append(f"control {method} {path} ({route.path})")
            elif getattr(route, "path", None) not in PAGES:
                missing.append(f"{method} {path}: {route!r} is neither an API route nor a known page")
    assert not missing, "answered but not in /openapi.json:\n" + "\n".join(missing)


def test_every_control_operation_documents_its_bodies() -> None:
    app = control_app()
    operations = {(method.lower(), r.path) for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema
                  for method in r.methods if method != "HEAD"}
    assert operations - set(CONTROL_DOCS) == set(), "add these to CONTROL_DOCS in services/gateway/openapi.py"
    assert set(CONTROL_DOCS) - operations == set(), "these CONTROL_DOCS entries name no route"
    schema = app.openapi()
    for path, item in schema["paths"].items():
        for method, op in item.items():
            ok = [code for code in op["responses"] if code.startswith("2")]
            assert ok, f"{method} {path} documents no success answer"
            for code in ok:
                if code != "204":
                    assert op["responses"][code].get("content"), f"{method} {path} {code} has no body schema"


def test_every_reference_in_the_schema_resolves() -> None:
    schema = control_app().openapi()
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                found.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    defined = {f"#/components/schemas/{name}" for name in schema["components"]["schemas"]}
    assert found and set(found) - defined == set(), "add these models to MODELS in services/gateway/openapi.py"


def validate(model: Any, value: Any) -> None:
    TypeAdapter(model).validate_python(value, strict=False)


def test_real_answers_match_the_published_models(stack: Stack) -> None:
    deployed = stack.deploy("docsfn", {"function.yaml": function_yaml("docsfn"),
                                       "main.py": "def handler(context, event):\n    return 'ok'\n"})
    validate(m.FunctionDescription, deployed.json())
    stack.deploy("docsdead", {"function.yaml": function_yaml("docsdead", retry={"maxAttempts": 1}),
                              "main.py": "def handler(context, event):\n    raise ValueError('no')\n"})
    accepted = stack.invoke("docsdead", "x", headers={"X-Nuclide-Async": "true"})
    assert accepted.status_code == 202
    validate(m.AsyncAccepted, accepted.json())
    call_id = accepted.json()["call_id"]
    dead = wait_for(lambda: (c := stack.client.get(f"/calls/{call_id}").json())["status"] == "DEAD" and c, 60,
                    what="the call to become a dead letter")
    validate(m.Call, dead)
    assert stack.invoke("docsfn", "x").status_code == 200
    answers: dict[str, tuple[Any, type[BaseModel] | Any]] = {
        "/": (stack.anon.get("/"), m.RootInfo),
        "/healthz": (stack.anon.get("/healthz"), m.Health),
        "/functions": (stack.client.get("/functions"), list[m.FunctionDescription]),
        "/functions/docsfn": (stack.client.get("/functions/docsfn"), m.FunctionDescription),
        "/calls": (stack.client.get("/calls", params={"limit": 50}), list[m.Call]),
        "/groups": (stack.client.get("/groups"), m.GroupsState),
        "/runtimes": (stack.client.get("/runtimes"), list[m.Runtime]),
        "redrive": (stack.client.post(f"/calls/{call_id}/redrive"), m.Call),
        "purge": (stack.client.delete("/calls", params={"status": "DEAD", "function": "docsdead"}), m.PurgeResult),
        "404": (stack.client.get("/functions/nosuchfn"), m.ErrorBody),
    }
    for what, (resp, model) in answers.items():
        assert resp.status_code < 500, f"{what}: {resp.status_code} {resp.text[:500]}"
        validate(model, resp.json())
    optimizer = stack.client.get("/optimizer")
    if optimizer.status_code == 200:  # 503 until the optimizer's first report
        validate(m.OptimizerStatus, optimizer.json())
    schema = stack.client.get("/openapi.json").json()
    assert set(schema["components"]["schemas"]) >= {"FunctionDescription", "Call", "GroupsState", "ErrorBody"}


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "spec-url") and value:
                self.urls.append(value)


def test_docs_work_offline(stack: Stack) -> None:
    for page in ("/docs", "/redoc"):
        resp = stack.anon.get(page)
        assert resp.status_code == 200, page
        html = resp.text
        external = re.findall(r"""(?:https?:)?//[^\s"'<>)]+""", html)
        assert not external, f"{page} references external URLs: {external}"
        refs = _Refs()
        refs.feed(html)
        assets = [u for u in refs.urls if u.startswith(DOCS_STATIC_URL)]
        assert assets, f"{page} loads nothing from {DOCS_STATIC_URL}: {refs.urls}"
        for url in assets + ["/openapi.json"]:
            got = stack.anon.get(url)
            assert got.status_code == 200 and len(got.content) > 100, f"{page}: {url} answered {got.status_code}"
