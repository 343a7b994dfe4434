"""AWS Lambda's event and result shapes, from events built as the runtime builds them."""

from __future__ import annotations

import base64
import json

import pytest

from services.runtime.event import Event
from services.runtime.lambda_shape import apigateway_event, lambda_event, lambda_response
from services.runtime.responses import to_result


def event(body: bytes = b"", content_type: str = "", headers: list | None = None, method: str = "POST",
          path: str = "/", query: str = "") -> Event:
    return Event.from_invoke({"call_id": "c1", "method": method, "path": path, "query": query,
                              "headers": headers or [], "content_type": content_type}, body)


@pytest.mark.parametrize("body,expected", [
    (b'{"a": 1}', {"a": 1}), (b"[1, 2]", [1, 2]), (b'"text"', "text"), (b"3", 3), (b"null", None),
])
def test_a_json_request_gets_the_decoded_payload(body: bytes, expected: object) -> None:
    assert lambda_event(event(body, "application/json")) == expected


def test_other_requests_get_the_api_gateway_http_api_event() -> None:
    ev = event(b"hi", "text/plain", [["Content-Type", "text/plain"], ["X-A", "1"], ["x-a", "2"], ["Cookie", "a=1; b=2"],
                                     ["User-Agent", "curl/8"], ["Host", "api.example"]],
               path="/orders/7", query="q=1&q=2&r")
    doc = lambda_event(ev)
    assert doc == apigateway_event(ev)
    assert doc["rawPath"] == "/orders/7" and doc["rawQueryString"] == "q=1&q=2&r"
    assert doc["headers"] == {"content-type": "text/plain", "x-a": "1,2", "user-agent": "curl/8",
                              "host": "api.example"}
    assert doc["cookies"] == ["a=1", "b=2"] and doc["queryStringParameters"] == {"q": "1,2", "r": ""}
    assert (doc["body"], doc["isBase64Encoded"]) == ("hi", False)
    http = doc["requestContext"]["http"]
    assert (http["method"], http["path"], http["userAgent"]) == ("POST", "/orders/7", "curl/8")
    assert doc["requestContext"]["requestId"] == ev.id and doc["requestContext"]["domainName"] == "api.example"
    assert json.loads(json.dumps(doc)) == doc, "plain JSON types only"


def test_api_gateway_event_edges() -> None:
    empty = lambda_event(event(method="GET"))
    assert "body" not in empty and "queryStringParameters" not in empty and "cookies" not in empty
    assert empty["isBase64Encoded"] is False
    binary = lambda_event(event(b"\xff\x00", "application/octet-stream"))
    assert binary["isBase64Encoded"] is True and base64.b64decode(binary["body"]) == b"\xff\x00"
    assert lambda_event(event(b"{broken", "application/json"))["body"] == "{broken", "bad JSON: the HTTP shape"
    assert lambda_event(event(b'{"a": 1}', "application/json"), "apigateway")["body"] == '{"a": 1}'


def test_payload_shape() -> None:
    assert lambda_event(event(b'{"a": 1}'), "payload") == {"a": 1}, "JSON without a JSON content type"
    assert lambda_event(event(b"plain"), "payload") == "plain"
    assert lambda_event(event(), "payload") == {}


def test_status_code_results_map_as_api_gateway_does() -> None:
    result = to_result(lambda_response({"statusCode": 201, "headers": {"X-A": "1"}, "body": "made",
                                        "multiValueHeaders": {"X-B": ["1", "2"]}, "cookies": ["c=1"]}))
    assert result == (201, [["X-A", "1"], ["X-B", "1"], ["X-B", "2"], ["Set-Cookie", "c=1"]], "application/json",
                      b"made")
    result = to_result(lambda_response({"statusCode": "404", "headers": {"content-type": "text/html"}, "body": "<p>"}))
    assert result == (404, [], "text/html", b"<p>")
    png = base64.b64encode(b"\x89PNG").decode()
    assert to_result(lambda_response({"statusCode": 200, "body": png, "isBase64Encoded": True}))[3] == b"\x89PNG"
    assert to_result(lambda_response({"statusCode": 204}))[::3] == (204, b"")
    assert to_result(lambda_response({"statusCode": 200, "body": {"a": 1}}))[3] == b'{"a": 1}'
    with pytest.raises(TypeError, match="isBase64Encoded"):
        lambda_response({"statusCode": 200, "body": "not base64!", "isBase64Encoded": True})
    with pytest.raises(TypeError, match="status"):
        to_result(lambda_response({"statusCode": "teapot"}))


@pytest.mark.parametrize("value,body", [
    ({"a": 1}, b'{"a":1}'), ([1], b"[1]"), ("text", b'"text"'), (3, b"3"), (None, b"null"), ((1, 2), b"[1, 2]"),
])
def test_any_other_value_is_json(value: object, body: bytes) -> None:
    assert to_result(lambda_response(value)) == (200, [], "application/json", body)


def test_bytes_are_sent_as_they_are() -> None:
    assert to_result(lambda_response(b"\x00")) == (200, [], "application/octet-stream", b"\x00")
