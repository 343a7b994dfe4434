"""The control plane: FastAPI routes for deploying, describing and deleting functions.

Off the invoke path on purpose (FastAPI costs about 4x a bare ASGI app per
request); OpenAPI lives at /docs. Every route but /healthz needs the bearer token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import secrets
import time
from typing import Any, AsyncIterator

import yaml
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile

from shared.archive import make_zip
from shared.auth import bearer_is
from shared.config import FUSIONIZER_MODE_WARNING
from shared.deployerclient import DeployerClient
from shared.errors import BuildFailed, Conflict, InvalidRequest, NotFound, NuclideError, PayloadTooLarge, Unavailable
from shared.logtime import SINCE_FORMS, parse_since
from shared.names import validate_function_name
from shared.version import VERSION
from shared.runtimes import DEFAULT_WARM_START, parse_runtime
from shared.spec import HOST_RUNTIME, FunctionSpec, other_python, read_function
from shared.storeclient import StoreClient
from shared import tracecontext
from services.gateway import fusionizer, tracetree
from services.gateway.core import Gateway
from services.gateway.openapi import make_control_app
from services.gateway.ui import UI_URL, mount_dashboard

MULTIPART_OVERHEAD_BYTES = 1024 * 1024
MAX_CALLS_PAGE = 1000  # GET /calls: calls per page
# a log follower asks the deployer for new lines this often: a line shows within it (1 RPC per follower per tick)
LOG_FOLLOW_POLL_S = 0.25
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def parse_flag(param: str, value: str | None) -> bool:
    """A query flag: absent, true/false, 1/0, yes/no, on/off; anything else is a 400 naming it."""
    if value is None:
        return False
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on", ""):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise InvalidRequest(f"{param}: {value[:32]!r} is not a flag; use {param}=true or {param}=false")


def error_response(exc: NuclideError) -> Response:
    """An error as JSON (shared/errors.py error_body), the way the invoke path answers one."""
    return Response(exc.body(), status_code=exc.http_status, media_type="application/json")


def build_control_app(gw: Gateway) -> FastAPI:
    app = make_control_app(
        title="nuclide",
        description="Self-hosted serverless platform for Python functions. Invoke routes (tag `invoke`) are served"
        " by the lean invoke path; services/gateway/openapi.py documents them and every body.",
        version=VERSION,
    )
    mount_dashboard(app)  # before the routes: GET /{name} would take /ui

    def store() -> StoreClient:
        assert gw.store is not None  # connected when the gateway starts, before it serves a request
        return gw.store

    def deployer() -> DeployerClient:
        assert gw.deployer is not None
        return gw.deployer

    def text_mode(request: Request) -> bool:
        return fusionizer.wants_text(request.headers.get("accept"), gw.settings.fusionizer_mode)

    @app.exception_handler(NuclideError)
    async def _nuclide_error(request: Request, exc: NuclideError) -> Response:
        if text_mode(request):
            return PlainTextResponse(exc.message, status_code=exc.http_status)
        return error_response(exc)

    async def require_token(request: Request) -> None:
        if gw.settings.fusionizer_mode:
            return  # the operator's choice, refused unless the gateway listens on loopback (shared/config.py)
        gw.check_token(request.headers.get("authorization"))

    auth = [Depends(require_token)]
    metrics_token = gw.settings.metrics_token.encode()

    async def require_scrape_token(request: Request) -> None:
        """The API token, or the scrape-only metrics_token (accepted on this route alone)."""
        if bearer_is(request.headers.get("authorization"), metrics_token):
            return
        await require_token(request)

    async def read_upload(request: Request) -> bytes:
        limit = gw.settings.max_zip_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD_BYTES:
            raise PayloadTooLarge(f"upload is {declared} bytes, over the {limit} byte archive limit")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=4, max_fields=16)
            for _key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    data = await value.read(limit + 1)
                    if len(data) > limit:
                        raise PayloadTooLarge(f"uploaded file is over the {limit} byte archive limit")
                    return data
            raise InvalidRequest("the multipart upload has no file; send the zip as a file field, e.g. -F zip_file=@task.zip")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"upload is over the {limit} byte archive limit")
            chunks.append(chunk)
        data = b"".join(chunks)
        if not data:
            raise InvalidRequest("the request has no body; send a zip (application/zip or a multipart file field)")
        return data

    async def describe(name: str) -> dict[str, Any]:
        return await store().function_get(name)

    async def choose_python(name: str, spec: FunctionSpec, version: str, warnings: list[str]) -> FunctionSpec:
        """``spec`` on Python ``version`` when the deployer's backend has it, else on the platform's, with a warning."""
        try:
            found = await deployer().python_check(version)
        except NuclideError as exc:
            raise Unavailable(f"'{name}' was not deployed: the deployer, which knows whether its backend has"
                              f" Python {version}, did not answer ({exc}); retry when it is up") from None
        if found.get("available"):
            return spec
        warnings.append(f"spec.runtime python:{version} is not available here ({found.get('detail')}); '{name}'"
                        f" runs on {HOST_RUNTIME}, the platform's Python: code that needs Python {version} exactly"
                        " may behave differently")
        return dataclasses.replace(spec, runtime=HOST_RUNTIME)

    async def deploy(name: str, data: bytes, wait: bool, status_ok: int = 200) -> Response:
        validate_function_name(name)
        runtimes = {rt["name"]: rt for rt in await store().runtime_list()}
        # reading a zip and parsing YAML of a user's are bounded, but can take a while: off the event loop
        spec, warnings = await asyncio.to_thread(read_function, data, runtimes, gw.settings.max_zip_bytes,
                                                 gw.settings.max_body_ceiling_bytes)
        if spec.registered_runtime is None and spec.warm_start != DEFAULT_WARM_START:  # per-call containers: docker backend only
            try:
                await deployer().warm_start_check(spec.warm_start)
            except InvalidRequest:
                raise
            except NuclideError as exc:
                raise Unavailable(f"'{name}' was not deployed: the deployer, which knows whether its backend can run"
                                  f" warmStart {spec.warm_start!r}, did not answer ({exc}); retry when it is up") from None
        wanted = other_python(spec.runtime)
        if wanted is not None:
            spec = await choose_python(name, spec, wanted, warnings)
        if gw.settings.sandbox_warning():
            warnings.append(gw.settings.sandbox_warning())
        if spec.name and spec.name != name:
            warnings.append(f"metadata.name '{spec.name}' differs from the deployed name '{name}'; using '{name}'")
        unknown = [n for n in spec.allow_calls_from if n != "*" and n != name and n not in gw.catalogue.functions]
        if unknown:  # not refused: the caller may be deployed next
            warnings.append(f"spec.allowCallsFrom names {', '.join(repr(n) for n in unknown)}, not deployed here: a"
                            " function of that name may call it once deployed; check the spelling")
        result = await store().function_put(name, spec.to_dict(), warnings, data)
        gw.catalogue.apply_function(result["function"])
        if not wait:
            return JSONResponse(result["function"], status_code=202)
        waited_from = time.monotonic()
        assert gw.deploys is not None
        outcome = await gw.deploys.wait_deployed(result["group_id"], int(result["group_version"]),
                                                 gw.settings.deploy_timeout_s)
        gw.telemetry.deploy_waited(name, outcome.ok, time.monotonic() - waited_from)
        desc = await describe(name)
        if not outcome.ok:
            exc = BuildFailed(f"deploying '{name}' version {result['version']} failed: {outcome.error}",
                              {"log_tail": outcome.log_tail, "function": desc})
            return error_response(exc)
        return JSONResponse(desc, status_code=status_ok)

    @app.get("/healthz", tags=["system"])
    async def healthz() -> JSONResponse:
        parts: dict[str, Any] = {"gateway": True, "store": False, "deployer": False}
        try:
            health = await store().health(timeout_s=1.0)
            parts["store"] = bool(health.get("store"))
            if health.get("store_error"):
                parts["store_error"] = health["store_error"]
            parts["deployer"] = bool(health.get("deployer"))
        except NuclideError as exc:
            parts["error"] = str(exc)
        ok = parts["store"] and parts["deployer"] and gw.feed is not None and gw.feed.synced.is_set()
        parts["status"] = "ok" if ok else "degraded"
        # which gateway answered (its boot id) and how many are live: with several, each answers for itself
        parts["gateway_id"] = gw.boot_id
        parts["gateways"] = len(gw.gateways)
        if gw.settings.fusionizer_mode:
            parts["fusionizer_mode"] = True
            parts["warning"] = FUSIONIZER_MODE_WARNING
        if gw.settings.sandbox_warning():
            parts["warnings"] = [gw.settings.sandbox_warning()]
        return JSONResponse(parts, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=[Depends(require_scrape_token)], tags=["system"])
    async def metrics() -> Response:
        """Prometheus' text format: OpenFaaS's gateway_* families per function, nuclide_* ones (README "Metrics")."""
        try:  # the autoscaler's families: what the optimizer last reported (nothing if the store is slow)
            gw.optimizer_status = await store().kv_get("optimizer", timeout_s=1.0)
            # the store's, the deployer's and the optimizer's families (services/gateway/svcmetrics.py)
            gw.service_metrics = await store().metrics_get(timeout_s=1.0)
        except NuclideError:  # a store that did not answer is not asked twice: its families are left out
            gw.optimizer_status = gw.service_metrics = None
        return Response(gw.metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/functions", dependencies=auth, tags=["functions"])
    async def list_functions() -> JSONResponse:
        return JSONResponse(await store().function_list())

    @app.post("/functions", dependencies=auth, tags=["functions"], status_code=201)
    async def create_from_file(request: Request) -> JSONResponse:
        """Service FaaS style: multipart `python_file` + `function_name` -> 201 with `id`, `function_name`, `status`."""
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise InvalidRequest("POST /functions needs multipart fields python_file and function_name")
        form = await request.form(max_files=2, max_fields=8)
        upload = form.get("python_file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("field python_file is missing: send -F python_file=@handler.py")
        source = await upload.read(gw.settings.max_zip_bytes + 1)
        if len(source) > gw.settings.max_zip_bytes:
            raise PayloadTooLarge(f"python_file is over the {gw.settings.max_zip_bytes} byte limit")
        func = str(form.get("function_name") or "")
        if not func:
            raise InvalidRequest("field function_name is missing: name the function in python_file to call,"
                                 " e.g. -F function_name=handle")
        if not _IDENT.match(func):
            raise InvalidRequest(f"function_name {func!r} is not a Python identifier")
        stem = (upload.filename or "main.py").rsplit("/", 1)[-1].removesuffix(".py")
        module = stem if _IDENT.match(stem) and stem not in ("function",) else "main"
        base = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")[:40] or "fn"
        name = str(form.get("name") or f"{base}-{secrets.token_hex(3)}")
        spec_yaml = yaml.safe_dump({"metadata": {"name": name}, "spec": {"handler": f"{module}:{func}"}})
        data = make_zip({f"{module}.py": source, "function.yaml": spec_yaml.encode()})
        response = await deploy(name, data, wait=not _truthy(request.headers.get("x-nuclide-async")), status_ok=201)
        if response.status_code in (201, 202):
            import json as _json

            body = _json.loads(response.body)
            # Service FaaS' own fields: the function's id, the handler's name in the file, and its status
            body.update(id=name, function_name=func, status="running" if response.status_code == 201 else "creating")
            return JSONResponse(body, status_code=response.status_code)
        return response

    def failed_text(message: bytes | str) -> PlainTextResponse:
        return PlainTextResponse(message, status_code=fusionizer.FAILED_STATUS)

    async def put_function(name: str, request: Request) -> Response:
        wait = not (_truthy(request.headers.get("x-nuclide-async")) or _truthy(request.query_params.get("async")))
        if not text_mode(request):
            return await deploy(name, await read_upload(request), wait)
        try:
            response = await deploy(name, await read_upload(request), wait)
        except NuclideError as exc:
            return failed_text(exc.message)
        if response.status_code >= 400:
            return failed_text(fusionizer.failure_text("application/json", bytes(response.body)))
        return PlainTextResponse(fusionizer.deployed(name, response.status_code == 200),
                                 status_code=response.status_code)

    async def get_function(name: str, request: Request) -> Response:
        if not text_mode(request):
            return JSONResponse(await describe(name))
        try:
            desc = await describe(name)
        except NotFound:
            return failed_text(fusionizer.not_found(name))
        return PlainTextResponse(fusionizer.describe(name, desc, gw.settings.http_port))

    async def delete_function(name: str, request: Request) -> Response:
        try:
            await store().function_delete(name)
        except NotFound:
            if text_mode(request):
                return failed_text(fusionizer.not_found(name))
            raise
        gw.catalogue.functions.pop(name, None)
        if text_mode(request):
            return PlainTextResponse(fusionizer.deleted(name))
        return Response(status_code=204)

    async def read_logs(name: str, tail: int, since_s: float | None, cursor: dict[str, int] | None) -> dict[str, Any]:
        try:
            return await deployer().logs(name, tail, since_s, cursor)
        except NuclideError as exc:
            raise Unavailable(f"logs are kept by the deployer, which did not answer: {exc}") from None

    async def follow_logs(name: str, since_s: float | None, first: dict[str, Any]) -> AsyncIterator[bytes]:
        """What is logged from now on, until the client leaves (Starlette cancels this then), the function is
        deleted, or the gateway stops. A deployer that does not answer for a while only delays the lines."""
        gw.log_followers += 1
        try:
            yield b""  # the HTTP server writes the status and headers with the first body message: send them now
            if first.get("text"):
                yield first["text"].encode()
            cursor = first.get("cursor") or {}
            while name in gw.catalogue.functions and not gw.stopping:
                await asyncio.sleep(LOG_FOLLOW_POLL_S)
                try:
                    got = await read_logs(name, 1, since_s, cursor)
                except Unavailable:
                    continue
                cursor = got.get("cursor") or {}
                if got.get("text"):
                    yield got["text"].encode()
        finally:
            gw.log_followers -= 1

    async def function_logs(name: str, tail: int = Query(200, description="the last N lines (1-10000)"),
                            follow: str | None = Query(None, description="true: keep the response open and stream"
                                                       " each new line until the client leaves"),
                            since: str | None = Query(None, description=f"only lines since then: {SINCE_FORMS}"),
                            ) -> Response:
        following = parse_flag("follow", follow)
        since_s = parse_since(since) if since is not None else None
        await describe(name)  # 404 for unknown functions
        first = await read_logs(name, max(1, min(tail, 10_000)), since_s, None)
        if not following:
            return PlainTextResponse(first.get("text", ""))
        # no Content-Length: the HTTP server sends it chunked, each read as it comes
        return StreamingResponse(follow_logs(name, since_s, first), media_type="text/plain; charset=utf-8",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/runtimes", dependencies=auth, tags=["runtimes"])
    async def list_runtimes() -> JSONResponse:
        """Registered runtimes, by name."""
        return JSONResponse(await store().runtime_list())

    @app.put("/runtimes/{name}", dependencies=auth, tags=["runtimes"])
    async def put_runtime(name: str, request: Request) -> JSONResponse:
        """Register (201) or replace (200) a runtime: `{image, path, dependencies, run}`.

        The image must be in the local Docker Engine (nothing is pulled); the deployer checks it.
        Functions name the runtime in `spec.runtime`; a replaced runtime applies to later deploys.
        """
        try:
            body = await request.json()
        except ValueError:
            raise InvalidRequest('PUT /runtimes/{name} needs a JSON body like {"image": "myruntime:1", "path": "/ws",'
                                 ' "dependencies": ["pip3", "install", "-r", "requirements.txt"],'
                                 ' "run": ["python3", "main.py"]}') from None
        runtime = parse_runtime(name, body)
        try:
            checked = await deployer().runtime_check(runtime["image"])
        except Unavailable as exc:
            raise Unavailable(f"runtime '{name}' was not registered: {exc.message}") from None
        except InvalidRequest:
            raise
        except NuclideError as exc:
            raise Unavailable(f"runtime '{name}' was not registered: the deployer, which checks the image with the"
                              f" Docker Engine, did not answer ({exc}); retry when it is up") from None
        rec = await store().runtime_put(runtime, checked.get("image_id", ""))
        created = rec.pop("created", False)
        return JSONResponse(rec, status_code=201 if created else 200)

    @app.get("/runtimes/{name}", dependencies=auth, tags=["runtimes"])
    async def get_runtime(name: str) -> JSONResponse:
        return JSONResponse(await store().runtime_get(name))

    @app.delete("/runtimes/{name}", dependencies=auth, tags=["runtimes"], status_code=204)
    async def delete_runtime(name: str) -> Response:
        """Remove a runtime (409 naming the functions that still use it)."""
        await store().runtime_delete(name)
        return Response(status_code=204)

    @app.get("/groups", dependencies=auth, tags=["fusion"])
    async def get_groups() -> JSONResponse:
        """The fusion setup: which tasks are deployed together, and each group's state."""
        return JSONResponse(await store().groups_list())

    @app.put("/groups", dependencies=auth, tags=["fusion"])
    async def put_groups(request: Request) -> Response:
        """Set a fusion setup, e.g. [["taska", "taskb"], ["taskc"]]; tasks left out keep their group.

        Answers once the request is recorded, with the setup in force and, under
        "regroup", the change under way (None when the setup is in force already). The
        groups it needs are built and take over together, with no downtime, once all of
        them serve; if one fails, the setup in force stays (watch GET /groups). With
        ?wait=true it answers once the new setup serves, or with the error that stopped
        it: 422 naming the task that failed and why, 409 when a newer setup or a
        redeploy or delete of one of its tasks came first.
        """
        try:
            setup = await request.json()
        except ValueError:
            raise InvalidRequest('PUT /groups needs a JSON body like [["taska", "taskb"], ["taskc"]]') from None
        result = await store().groups_set(setup)
        regroup = result.get("regroup")
        if regroup is None or not _truthy(request.query_params.get("wait")):
            return JSONResponse(result)
        assert gw.deploys is not None
        regroup = await gw.deploys.wait_regrouped(int(regroup["id"]), gw.settings.deploy_timeout_s)
        result = {**await store().groups_list(), "regroup": regroup}
        if regroup["state"] == "done":
            return JSONResponse(result)
        in_force = result["setup"]
        exc: NuclideError
        if regroup["state"] == "failed":
            exc = BuildFailed(f"the setup {json.dumps(regroup['setup'])} was not applied and"
                              f" {json.dumps(in_force)} stays in force: {regroup['error']}",
                              {"failed_tasks": regroup["failed_tasks"], "log_tail": regroup["log_tail"],
                               "setup": in_force})
        else:
            exc = Conflict(f"the setup {json.dumps(regroup['setup'])} was not applied and {json.dumps(in_force)}"
                           f" stays in force: it was {regroup['state']} ({regroup['error']})", {"setup": in_force})
        return error_response(exc)

    @app.get("/calls", dependencies=auth, tags=["calls"])
    async def list_calls(function: str | None = None, status: str | None = None, source: str | None = None,
                         limit: int = 100, before: float | None = None) -> JSONResponse:
        """Calls, newest first (at most 1000 a page): async calls and records of sync calls.

        Page with ``before`` = the smallest ``queued_ts`` of the previous page; filter by
        ``source`` (http, zmq, topic, cron, call).
        """
        if status:
            status = status.upper()
        if before is not None and not math.isfinite(before):
            raise InvalidRequest("before must be a finite number: the queued_ts of the previous page's last call")
        limit = min(max(limit, 1), MAX_CALLS_PAGE)  # any integer the client sends, within what a page holds
        return JSONResponse(await store().calls_list(function, status, limit, source, before))

    @app.get("/calls/{call_id}", dependencies=auth, tags=["calls"])
    async def get_call(call_id: str) -> JSONResponse:
        """One call: status (PENDING, RUNNING, DONE, FAILED, DEAD), attempts, timings, result or error."""
        return JSONResponse(await store().calls_get(call_id))

    async def trace_tree(trace_id: str) -> dict[str, Any]:
        trace = await store().calls_trace(trace_id)
        if not trace["calls"]:
            raise NotFound(f"trace '{trace_id}' not found: no call recorded in it (calls are kept"
                           f" {gw.settings.call_retention_s:g} s)")
        return tracetree.build(trace)

    @app.get("/calls/{call_id}/trace", dependencies=auth, tags=["calls"])
    async def get_call_trace(call_id: str) -> JSONResponse:
        """The W3C trace the call is part of: every recorded call in it, as a tree."""
        rec = await store().calls_get(call_id)
        if not rec.get("trace_id"):
            raise NotFound(f"call '{call_id}' has no trace: it was recorded before calls had one")
        return JSONResponse(await trace_tree(rec["trace_id"]))

    @app.get("/traces/{trace_id}", dependencies=auth, tags=["calls"])
    async def get_trace(trace_id: str) -> JSONResponse:
        """A W3C trace as a tree of calls: each with its span, parent span, status, start, duration, fused or
        remote, and the task calls it made."""
        if not tracecontext.valid_trace_id(trace_id):
            raise InvalidRequest(f"trace id {trace_id[:80]!r} is not a W3C trace id: it must be"
                                 f" {tracecontext.TRACE_ID_FORMAT}")
        return JSONResponse(await trace_tree(trace_id))

    @app.get("/calls/{call_id}/result", dependencies=auth, tags=["calls"])
    async def get_call_result(call_id: str) -> Response:
        """The raw result of a finished call, with its status and content type."""
        rec, result = await store().calls_result(call_id)
        if rec["status"] not in ("DONE", "FAILED", "DEAD"):
            return JSONResponse({"id": call_id, "status": rec["status"]}, status_code=202)
        return Response(result, status_code=rec.get("result_status") or 200,
                        media_type=rec.get("result_content_type") or None, headers={"X-Call-Status": rec["status"]})

    @app.post("/calls/{call_id}/redrive", dependencies=auth, tags=["calls"])
    async def redrive_call(call_id: str) -> JSONResponse:
        """Run a DEAD call again from its first attempt (409 for any other status)."""
        rec = await store().calls_redrive(call_id)
        if gw.calls is not None and gw.calls._claim_wanted is not None:
            gw.calls._claim_wanted.set()
        return JSONResponse(rec)

    @app.delete("/calls", dependencies=auth, tags=["calls"])
    async def purge_calls(status: str, function: str | None = None) -> JSONResponse:
        """Delete finished calls of a status (DEAD: purge the dead letters)."""
        return JSONResponse(await store().calls_purge(status.upper(), function))

    @app.get("/optimizer", dependencies=auth, tags=["fusion"])
    async def get_optimizer() -> JSONResponse:
        """The optimizer's strategy, rounds, current and best setup, and the latencies it decided on."""
        status = await store().kv_get("optimizer")
        if status is None:
            raise Unavailable("the optimizer has not reported yet (is it running?)")
        return JSONResponse(status)

    @app.put("/functions/{name}/replicas", dependencies=auth, tags=["functions"])
    async def put_replicas(name: str, request: Request) -> JSONResponse:
        """Hold a function's replicas (its group's) at a count within its minReplicas-maxReplicas, whatever
        its load, until {"replicas": null} gives them back to the autoscaler."""
        validate_function_name(name)
        how = ('send {"replicas": N} with N within the function\'s spec.minReplicas (at least 1) and'
               ' spec.maxReplicas, or {"replicas": null} to give its replicas back to the autoscaler')
        try:
            body = await request.json()
        except ValueError:
            raise InvalidRequest(f"PUT /functions/{name}/replicas needs a JSON body: {how}") from None
        if not isinstance(body, dict) or "replicas" not in body:
            raise InvalidRequest(f"PUT /functions/{name}/replicas needs a JSON object with 'replicas': {how}")
        replicas = body["replicas"]
        if replicas is not None and (not isinstance(replicas, int) or isinstance(replicas, bool)):
            raise InvalidRequest(f"replicas {json.dumps(replicas)[:40]} is not a whole number: {how}")
        return JSONResponse(await store().function_replicas(name, replicas))

    for prefix in ("/functions", ""):
        app.add_api_route(prefix + "/{name}", put_function, methods=["PUT"], dependencies=auth, tags=["functions"])
        app.add_api_route(prefix + "/{name}", get_function, methods=["GET"], dependencies=auth, tags=["functions"])
        app.add_api_route(prefix + "/{name}", delete_function, methods=["DELETE"], dependencies=auth,
                          tags=["functions"], status_code=204)
    app.add_api_route("/functions/{name}/logs", function_logs, methods=["GET"], dependencies=auth, tags=["functions"])

    async def put_unroutable(path: str) -> None:
        """A PUT no route above takes names no deployable function (it has a '/'): a 400 saying why."""
        validate_function_name(path.removeprefix("functions/"))
        raise InvalidRequest(f"PUT /{path} is not a route: deploy with PUT /{{name}} or PUT /functions/{{name}}")

    app.add_api_route("/{path:path}", put_unroutable, methods=["PUT"], dependencies=auth, include_in_schema=False)

    @app.get("/", tags=["system"])
    async def root() -> dict[str, Any]:
        return {"name": "nuclide", "version": VERSION, "docs": "/docs", "health": "/healthz", "ui": UI_URL + "/"}

    return app
