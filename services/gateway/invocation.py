"""How an HTTP request becomes a call, and a call's RESULT or error an HTTP answer: pure code both invoke paths share.

The gateway's two invoke paths (the direct one of services/gateway/http.py and ASGI) differ in
how they read a request and write an answer; what goes into the INVOKE and what comes out of
the RESULT is written here once, and unit tests call it directly.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from shared.errors import InvalidRequest, NuclideError, PayloadTooLarge, TooManyRequests
from services.gateway import fusionizer
from services.gateway.http import valid_header

Answer = tuple[int, list, bytes]  # (status, [(name, value) bytes pairs], body)

JSON_CT = (b"content-type", b"application/json")
_SKIP_RESPONSE_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_TRUE = (b"true", b"1", b"yes")
# never handed to function code: the caller's credentials are for the gateway only
_CREDENTIALS = frozenset({b"authorization"})
# read by the gateway's async path (submission, callback, idempotency), not part of the call itself
ASYNC_CONTROL = _CREDENTIALS | {b"x-nuclide-async", b"x-callback-url", b"x-idempotency-key"}


def function_headers(raw_headers: list, drop: frozenset[bytes] = _CREDENTIALS) -> list[list[str]]:
    """The request's headers as the function sees them: every path that makes a call of a request uses this."""
    # names are lowercased by every server we run under, but not by contract: compare them lowercased
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in raw_headers if k.lower() not in drop]


def wants_async(raw_headers: list) -> bool:
    for k, v in raw_headers:
        if k.lower() == b"x-nuclide-async" and v.strip().lower() in _TRUE:
            return True
    return False


def execute_payload(body: bytes) -> tuple[bytes, str]:
    """The Service FaaS execute route: body {"payload": "<string>"} -> the payload string."""
    try:
        doc = json.loads(body or b"null")
    except ValueError:
        raise InvalidRequest('execute needs a JSON body like {"payload": "<string>"}') from None
    if not isinstance(doc, dict) or "payload" not in doc:
        raise InvalidRequest('execute needs a JSON body like {"payload": "<string>"}')
    payload = doc["payload"]
    if not isinstance(payload, str):
        payload = json.dumps(payload)
    return payload.encode(), "text/plain; charset=utf-8"


async def read_body(scope: dict, receive: Callable[[], Awaitable[dict]], limit: int,
                    too_large: Callable[[int | None], PayloadTooLarge]) -> bytes:
    """An ASGI request's whole body; ``too_large(declared size or None)`` is raised past ``limit`` bytes."""
    for k, v in scope["headers"]:
        if k == b"content-length":
            try:
                declared = int(v)
            except ValueError:
                raise InvalidRequest("Content-Length is not a number") from None
            if declared > limit:
                raise too_large(declared)
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise too_large(None)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def result_answer(call_id: str, cold: bool, status: int, result: dict[str, Any], rbody: bytes) -> Answer:
    """The HTTP answer of a RESULT: the function's headers that are valid in a response, its content type."""
    out_headers = []
    for k, v in result.get("headers") or ():
        key = k.lower()
        if key in _SKIP_RESPONSE_HEADERS or key == "content-type":
            continue
        name_b, value_b = k.encode("latin-1", "replace"), str(v).encode("latin-1", "replace")
        if valid_header(name_b, value_b):
            out_headers.append((name_b, value_b))
    out_headers.append((b"content-type", (result.get("content_type") or "application/octet-stream").encode(
        "latin-1", "replace")))
    if cold:
        out_headers.append((b"x-nuclide-cold-start", b"true"))
    out_headers.append((b"x-call-id", call_id.encode()))
    return status, out_headers, rbody


def error_answer(exc: NuclideError, call_id: str) -> Answer:
    headers = [JSON_CT]
    if isinstance(exc, TooManyRequests):
        headers.append((b"retry-after", str(exc.details.get("retry_after_s", 1)).encode()))
    headers.append((b"x-call-id", call_id.encode()))
    return exc.http_status, headers, exc.body()


def async_answer(call_id: str, duplicate: bool) -> Answer:
    """202 for an async call once it is durable: where to find it."""
    payload = json.dumps({"call_id": call_id, "status_url": f"/calls/{call_id}", "duplicate": duplicate}).encode()
    return 202, [JSON_CT, (b"x-call-id", call_id.encode())], payload


def in_text_mode(raw_headers: list, answer: Answer, fusionizer_mode: bool) -> Answer:
    """An invocation's answer; a failed one in text mode is the Fusionizer's (services/gateway/fusionizer.py)."""
    status = answer[0]
    if status < 400 or not fusionizer.is_task_failure(status):
        return answer  # the success path pays one comparison
    accept = next((v.decode("latin-1") for k, v in raw_headers if k.lower() == b"accept"), None)
    if not fusionizer.wants_text(accept, fusionizer_mode):
        return answer
    content_type = next((v.decode("latin-1") for k, v in answer[1] if k == b"content-type"), "")
    headers = [(k, v) for k, v in answer[1] if k != b"content-type"]
    headers.append((b"content-type", fusionizer.TEXT.encode()))
    return fusionizer.FAILED_STATUS, headers, fusionizer.failure_text(content_type, answer[2])
