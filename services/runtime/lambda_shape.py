"""AWS Lambda's shapes for ``handler(event, context)``: the event a Lambda function expects, and its result's HTTP mapping.

The event (``spec.lambdaEvent``, checked by shared.spec):

- ``auto`` (the default): a request with a JSON body (by content type) gets the decoded body, as
  ``aws lambda invoke --payload`` gives it; any other request gets ``apigateway``.
- ``payload``: always the decoded JSON body; a body that is not JSON as a string, no body as ``{}``.
- ``apigateway``: always API Gateway's HTTP API event (payload format 2.0): ``rawPath`` (the path
  below the function), ``rawQueryString``, ``headers`` (names lower-cased, repeats joined with a
  comma), ``cookies``, ``queryStringParameters`` (repeats joined with a comma), ``body`` (base64 with
  ``isBase64Encoded`` when it is not UTF-8), ``requestContext.http.method``/``path``. As API Gateway
  does, ``body``, ``cookies`` and ``queryStringParameters`` are left out when the request has none.

The result, as API Gateway maps it: a dict with ``statusCode`` sets the status, ``headers``,
``multiValueHeaders``, ``cookies`` (each a Set-Cookie header) and ``body`` (base64-decoded when
``isBase64Encoded``), with ``application/json`` when no Content-Type header is given; any other value
is sent as JSON (bytes, which JSON cannot hold, as they are).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from services.runtime.context import Response
from services.runtime.event import Event, is_json_content_type

__all__ = ["apigateway_event", "lambda_event", "lambda_response"]

_JSON = "application/json"
_NOT_DECODED = object()
_EPOCH = datetime(1970, 1, 1)  # naive UTC (calendar.timegm would import locale: about 9 ms per cold start)


def _decoded_json(event: Event) -> Any:
    """The body as JSON (any JSON value), or _NOT_DECODED."""
    raw = event.raw_body
    if not raw:
        return _NOT_DECODED
    try:
        return json.loads(raw)
    except ValueError:  # UnicodeDecodeError too
        return _NOT_DECODED


def _joined(pairs: Any) -> dict[str, str]:
    joined: dict[str, str] = {}
    for name, value in pairs:
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    return joined


def apigateway_event(event: Event) -> dict[str, Any]:
    """API Gateway's HTTP API event (payload format 2.0) for one request."""
    cookies: list[str] = []
    headers = []
    for name, value in event.headers.items():
        lower = str(name).lower()
        if lower == "cookie":
            cookies += [part.strip() for part in str(value).split(";") if part.strip()]
        else:
            headers.append((lower, str(value)))
    header_map = _joined(headers)
    ts = event.timestamp  # naive UTC, unless a hand-made event was given an aware one
    arrived_s = ts.timestamp() if ts.tzinfo else (ts - _EPOCH).total_seconds()
    context = {
        "accountId": "anonymous",
        "apiId": "nuclide",
        "domainName": header_map.get("host", ""),
        "domainPrefix": header_map.get("host", "").partition(".")[0],
        "http": {"method": event.method, "path": event.path, "protocol": "HTTP/1.1", "sourceIp": "",
                 "userAgent": header_map.get("user-agent", "")},
        "requestId": event.id,
        "routeKey": "$default",
        "stage": "$default",
        "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(arrived_s)),
        "timeEpoch": int(arrived_s * 1000),
    }
    doc: dict[str, Any] = {"version": "2.0", "routeKey": "$default", "rawPath": event.path,
                           "rawQueryString": event.query, "headers": header_map}
    if cookies:
        doc["cookies"] = cookies
    if event.query:
        doc["queryStringParameters"] = _joined(parse_qsl(event.query, keep_blank_values=True))
    doc["requestContext"] = context
    raw = event.raw_body
    if raw:
        try:
            doc["body"], doc["isBase64Encoded"] = raw.decode("utf-8"), False
        except UnicodeDecodeError:
            doc["body"], doc["isBase64Encoded"] = base64.b64encode(raw).decode("ascii"), True
    else:
        doc["isBase64Encoded"] = False
    return doc


def lambda_event(event: Event, shape: str = "auto") -> Any:
    """What ``handler(event, context)`` gets for ``event`` (see the module docstring for ``shape``)."""
    if shape == "apigateway":
        return apigateway_event(event)
    if shape == "payload":
        decoded = _decoded_json(event)
        if decoded is not _NOT_DECODED:
            return decoded
        return event.raw_body.decode("utf-8", "replace") if event.raw_body else {}
    if is_json_content_type(event.content_type):
        decoded = _decoded_json(event)
        if decoded is not _NOT_DECODED:
            return decoded
    return apigateway_event(event)


def _status(value: Any) -> Any:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value  # responses.to_result says what is wrong with anything else


def lambda_response(value: Any) -> Response:
    """The HTTP answer API Gateway makes of a Lambda handler's return value."""
    if isinstance(value, dict) and "statusCode" in value:
        pairs: list[tuple[str, Any]] = list((value.get("headers") or {}).items())
        for name, values in (value.get("multiValueHeaders") or {}).items():
            pairs += [(name, v) for v in (values if isinstance(values, list) else [values])]
        pairs += [("Set-Cookie", cookie) for cookie in value.get("cookies") or ()]
        content_type = next((str(v) for k, v in pairs if str(k).lower() == "content-type"), _JSON)
        body = value.get("body")
        if body is None:
            body = b""
        elif value.get("isBase64Encoded") and isinstance(body, (str, bytes)):
            try:
                body = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise TypeError("the result says isBase64Encoded but its body is not base64; encode it with"
                                " base64.b64encode(data).decode() or set isBase64Encoded to false") from None
        elif not isinstance(body, (str, bytes)):
            body = json.dumps(body)  # API Gateway wants a string; a structure is sent as its JSON
        return Response(body, pairs, content_type, _status(value["statusCode"]))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Response(bytes(value), None, "application/octet-stream")
    if isinstance(value, (dict, list)):
        return Response(value, None, _JSON)
    return Response(json.dumps(value).encode(), None, _JSON)
