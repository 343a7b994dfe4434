"""The gateway's OpenAPI document and its offline /docs: every route it answers, with its bodies.

FastAPI sees only the control plane, and its handlers read and write their bodies
themselves (a zip streams in; errors keep the project's wording), so FastAPI infers
neither. This module completes the generated document in one place:
- the invoke routes, which the lean invoke path serves and FastAPI never sees
  (``shared.names.invoke_target`` decides what is an invocation; ``INVOKE_ROUTES`` lists
  them for the document, and tests/integration/test_api_docs.py checks the two agree);
- request and response bodies per control-plane operation (``CONTROL_DOCS``), as the
  pydantic models of ``apimodels``;
- the bearer token as a security scheme, so /docs has an "Authorize" button.

/docs and /redoc load Swagger UI and ReDoc from the files that the fastapi-offline
package ships (``DOCS_STATIC_URL``), never from a CDN: they work on a machine
without internet access.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from services.gateway import apimodels as m

DOCS_STATIC_URL = "/docs/static"  # Swagger UI's and ReDoc's files; under /docs, a reserved function name
SWAGGER_UI_PARAMETERS = {
    "validatorUrl": None,  # Swagger UI would otherwise send the document to validator.swagger.io
    "persistAuthorization": True,  # the token typed into "Authorize" survives a reload
    "tryItOutEnabled": True,
}
INVOKE_METHODS = ("get", "post", "put", "patch", "delete")  # documented for /functions/{name}/invoke (any is taken)
# (path template, methods, mode): every route served by the invoke path; {path} is the rest of the URL, slashes and all
INVOKE_ROUTES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("/{name}", ("post",), "http"),
    ("/{name}/{path}", ("post",), "http"),
    ("/functions/{name}/invoke", INVOKE_METHODS, "http"),
    ("/functions/{name}/invoke/{path}", INVOKE_METHODS, "http"),
    ("/functions/{name}/execute", ("post",), "execute"),
    ("/async-function/{name}", ("post",), "async"),
    ("/async-function/{name}/{path}", ("post",), "async"),
)
MODELS: tuple[type[BaseModel], ...] = (
    m.ErrorBody, m.FunctionDescription, m.ServiceFaasCreated, m.ZipUpload, m.PythonFileUpload, m.AsyncAccepted,
    m.ExecuteRequest, m.Call, m.PurgeResult, m.RuntimeBody, m.Runtime, m.GroupsState, m.OptimizerStatus, m.Health,
    m.RootInfo, m.ReplicasBody, m.ReplicasResult, m.Trace, m.TraceCall,
)
BEARER = [{"bearer": []}]
PUBLIC: list[dict[str, list[str]]] = []
PUBLIC_OR_BEARER = [{}, {"bearer": []}]  # invocations: public unless the function is private


def make_control_app(title: str, description: str, version: str) -> FastAPI:
    """The control plane's FastAPI app, with /docs and /redoc served from the installed package's files."""
    app = FastAPIOffline(title=title, description=description, version=version, static_url=DOCS_STATIC_URL,
                         swagger_ui_parameters=SWAGGER_UI_PARAMETERS)
    app.openapi = _cached(app)  # type: ignore[method-assign]
    return app


def _cached(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app)
        return app.openapi_schema

    return openapi


# ----- building blocks -------------------------------------------------------------------


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def answer(description: str, schema: dict[str, Any] | None = None, content: dict[str, Any] | None = None,
           headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = json_content(schema)
    if content is not None:
        out["content"] = content
    if headers:
        out["headers"] = headers
    return out


def error(description: str) -> dict[str, Any]:
    return answer(description, ref(m.ErrorBody))


def many(model: type[BaseModel]) -> dict[str, Any]:
    return {"type": "array", "items": ref(model)}


def query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "boolean"}}


def header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string", "enum": ["true", "false"]}}


TEXT = {"text/plain": {"schema": {"type": "string"}}}
ANY_BODY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {}}, "text/plain": {"schema": {"type": "string"}}}
SETUP = {"type": "array", "items": {"type": "array", "items": {"type": "string"}}, "example": [["taska", "taskb"]]}
ASYNC_HEADER = header("X-Nuclide-Async", "true: answer 202 at once instead of waiting")
NOT_FOUND = error("not found (the message names what)")
BAD = error("invalid request: the message says what was wrong and what to send")
UNAVAILABLE = error("a service the answer needs is down: retry")
CALL_ID_HEADER = {"X-Call-Id": {"description": "the call's id (GET /calls/{id})", "schema": {"type": "string"}}}

DEPLOY = {
    "parameters": [query("async", "true: answer 202 at once; the build goes on (watch GET /functions/{name})"),
                   ASYNC_HEADER],
    "requestBody": {"required": True, "content": {
        "application/zip": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": ref(m.ZipUpload)}}},
    "responses": {
        "200": answer("deployed: the new version serves", ref(m.FunctionDescription)),
        "202": answer("accepted (async): the version is recorded and being built", ref(m.FunctionDescription)),
        "400": BAD, "413": error("the zip is over the archive limit"),
        "422": error("the build or the handler's import failed; details.log_tail has the build log's tail,"
                     " and the previous version keeps serving"),
        "503": UNAVAILABLE}}
DESCRIBE = {"responses": {"200": answer("the function", ref(m.FunctionDescription)), "404": NOT_FOUND}}
DELETE = {"responses": {"204": answer("deleted; its instances stop"), "404": NOT_FOUND}}

# (method, FastAPI path) -> what to set on that operation; every control-plane operation has an entry
CONTROL_DOCS: dict[tuple[str, str], dict[str, Any]] = {
    ("get", "/"): {"security": PUBLIC, "responses": {"200": answer("where to look next", ref(m.RootInfo))}},
    ("get", "/healthz"): {"security": PUBLIC, "responses": {
        "200": answer("gateway, store and deployer are up", ref(m.Health)),
        "503": answer("degraded: the fields say what is down", ref(m.Health))}},
    ("get", "/metrics"): {"responses": {"200": answer("Prometheus' text format", content=TEXT)}},
    ("get", "/functions"): {"responses": {"200": answer("all functions", many(m.FunctionDescription))}},
    ("post", "/functions"): {
        "parameters": [ASYNC_HEADER],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": ref(m.PythonFileUpload)}}},
        "responses": {"201": answer("deployed", ref(m.ServiceFaasCreated)),
                      "202": answer("accepted (async)", ref(m.ServiceFaasCreated)),
                      "400": BAD, "413": error("python_file is over the limit"),
                      "422": error("the build or the import failed (details.log_tail)"), "503": UNAVAILABLE}},
    ("put", "/{name}"): DEPLOY, ("put", "/functions/{name}"): DEPLOY,
    ("get", "/{name}"): DESCRIBE, ("get", "/functions/{name}"): DESCRIBE,
    ("delete", "/{name}"): DELETE, ("delete", "/functions/{name}"): DELETE,
    ("get", "/functions/{name}/logs"): {"responses": {
        "200": answer("the instances' output and log lines, oldest first; with follow=true the response stays open"
                      " (chunked) and each new line follows as it is written, until the client leaves",
                      content=TEXT),
        "400": error("follow or since has a value it does not take (the message names it and the accepted forms)"),
        "404": NOT_FOUND, "503": UNAVAILABLE}},
    ("put", "/functions/{name}/replicas"): {
        "requestBody": {"required": True, "content": json_content(ref(m.ReplicasBody))},
        "responses": {"200": answer("held (or given back to the autoscaler with null)", ref(m.ReplicasResult)),
                      "400": error("not a whole number, or out of the function's minReplicas-maxReplicas (the"
                                   " message names the range)"), "404": NOT_FOUND}},
    ("get", "/runtimes"): {"responses": {"200": answer("registered runtimes", many(m.Runtime))}},
    ("put", "/runtimes/{name}"): {
        "requestBody": {"required": True, "content": json_content(ref(m.RuntimeBody))},
        "responses": {"200": answer("replaced", ref(m.Runtime)), "201": answer("registered", ref(m.Runtime)),
                      "400": BAD, "503": UNAVAILABLE}},
    ("get", "/runtimes/{name}"): {"responses": {"200": answer("the runtime", ref(m.Runtime)), "404": NOT_FOUND}},
    ("delete", "/runtimes/{name}"): {"responses": {
        "204": answer("removed"), "404": NOT_FOUND, "409": error("functions still use it (the message names them)")}},
    ("get", "/groups"): {"responses": {"200": answer("the fusion setup", ref(m.GroupsState))}},
    ("put", "/groups"): {
        "parameters": [query("wait", "true: answer once the setup serves, or with what stopped it")],
        "requestBody": {"required": True, "content": json_content(SETUP)},
        "responses": {"200": answer("recorded (or in force, with ?wait=true)", ref(m.GroupsState)), "400": BAD,
                      "409": error("a newer setup, or a redeploy or delete of one of its tasks, came first"),
                      "422": error("a group of the setup failed to deploy; details name the tasks and the log")}},
    ("get", "/calls"): {"responses": {"200": answer("calls, newest first", many(m.Call))}},
    ("delete", "/calls"): {"responses": {"200": answer("how many were deleted", ref(m.PurgeResult)), "400": BAD}},
    ("get", "/calls/{call_id}"): {"responses": {"200": answer("the call", ref(m.Call)), "404": NOT_FOUND}},
    ("get", "/calls/{call_id}/trace"): {"responses": {
        "200": answer("the W3C trace the call is part of, as a tree of calls", ref(m.Trace)), "404": NOT_FOUND}},
    ("get", "/traces/{trace_id}"): {"responses": {
        "200": answer("the trace as a tree of calls", ref(m.Trace)),
        "400": error("the trace id is not 32 lowercase hex digits"), "404": NOT_FOUND}},
    ("get", "/calls/{call_id}/result"): {"responses": {
        "200": answer("the raw result body with the function's status and content type (X-Call-Status says DONE,"
                      " FAILED or DEAD)", content={"*/*": {"schema": {}}}),
        "202": answer("not finished yet", {"type": "object", "properties": {"id": {"type": "string"},
                                                                             "status": {"type": "string"}}}),
        "404": NOT_FOUND}},
    ("post", "/calls/{call_id}/redrive"): {"responses": {
        "200": answer("queued again, from its first attempt", ref(m.Call)), "404": NOT_FOUND,
        "409": error("only a DEAD call can be redriven")}},
    ("get", "/optimizer"): {"responses": {"200": answer("the optimizer's state", ref(m.OptimizerStatus)),
                                          "503": error("the optimizer has not reported yet")}},
}


def invoke_operation(path: str, method: str, mode: str) -> dict[str, Any]:
    """The document of one invoke route."""
    params: list[dict[str, Any]] = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                                     "description": "the function"}]
    if "{path}" in path:
        params.append({"name": "path", "in": "path", "required": True, "schema": {"type": "string"},
                       "description": "the rest of the URL (it may hold slashes): the handler's event.path"})
    accepted = answer("accepted: the call is durable; its result is kept (GET /calls/{id}), or POSTed to"
                      " X-Callback-Url", ref(m.AsyncAccepted), headers=CALL_ID_HEADER)
    errors = {"400": BAD, "401": error("the function is private: send the token"), "404": NOT_FOUND,
              "413": error("the body is over the function's limit"), "429": error("too many calls queued: retry")}
    if mode == "async":
        summary, responses = "Invoke asynchronously", {"202": accepted, **errors}
    else:
        params.append(header("X-Nuclide-Async", "true: run it asynchronously and answer 202 at once"))
        done = answer("what the handler returned: its status, headers and body (X-Nuclide-Cold-Start: true when"
                      " this call started an instance)", content=TEXT if mode == "execute" else {"*/*": {"schema": {}}},
                      headers=CALL_ID_HEADER)
        summary = "Execute handle(payload)" if mode == "execute" else "Invoke"
        responses = {"200": done, "202": accepted, **errors, "503": UNAVAILABLE,
                     "504": error("the function did not answer within its timeout")}
        if mode == "http":
            responses["default"] = answer("any other status the handler answered", content={"*/*": {"schema": {}}})
    op: dict[str, Any] = {
        "tags": ["invoke"], "summary": summary, "parameters": params, "security": PUBLIC_OR_BEARER,
        "operationId": f"invoke_{mode}_{method}_" + "".join(c if c.isalnum() else "_" for c in path).strip("_"),
        "description": "Served by the gateway's invoke path. Async calls take X-Callback-Url (a URL the result is"
                       " POSTed to) and X-Idempotency-Key (a repeat answers the first call's id).",
        "responses": responses,
    }
    if mode == "execute":
        op["requestBody"] = {"required": True, "content": json_content(ref(m.ExecuteRequest))}
    elif method != "get" and method != "delete":
        op["requestBody"] = {"required": False, "content": ANY_BODY}
    return op


def build_schema(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {})
    _, defs = models_json_schema([(model, "validation") for model in MODELS],
                                 ref_template="#/components/schemas/{model}")
    components.setdefault("schemas", {}).update(defs.get("$defs", {}))
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                "description": "the token `nuclide up` printed"}}
    schema["security"] = BEARER
    paths = schema.setdefault("paths", {})
    for (method, path), doc in CONTROL_DOCS.items():
        op = paths.get(path, {}).get(method)
        if op is None:
            continue  # a route that was removed; tests/integration/test_api_docs.py notices the stale entry
        validation = op.get("responses", {}).get("422")
        op["parameters"] = op.get("parameters", []) + doc.get("parameters", [])
        if "requestBody" in doc:
            op["requestBody"] = doc["requestBody"]
        op["responses"] = dict(doc["responses"])
        if validation is not None and "422" not in op["responses"]:
            op["responses"]["422"] = validation  # FastAPI's own, for a query parameter of the wrong type
        if "security" in doc:
            op["security"] = doc["security"]
    for path, methods, mode in INVOKE_ROUTES:
        item = paths.setdefault(path, {})
        for method in methods:
            item[method] = invoke_operation(path, method, mode)
    return schema
