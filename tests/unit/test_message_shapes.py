"""The shapes written once and used everywhere: the INVOKE header (shared/protocol.py) and the error body
(shared/errors.py), as each process that sends them builds them."""

from __future__ import annotations

import json

from shared import protocol
from shared.errors import NotFound, TooManyRequests, error_body
from services.deployer.backends.docker.runner.results import error_result
from services.gateway.invocation import error_answer
from services.runtime.responses import json_error

GOLDEN_INVOKE = (
    b"\x8a\xa7call_id\xa2c1\xa9parent_id\xc0\xa8function\xa1f\xa6method\xa4POST\xa4path\xa1/\xa5query\xa0"
    b"\xa7headers\x90\xaccontent_type\xa0\xabdeadline_ms\xce\x00\x01\xe2@\xa4mode\xa4http"
)


def test_an_invoke_header_has_every_field_in_a_fixed_order() -> None:
    header = protocol.invoke_header("c1", "f", 123_456)
    assert protocol.pack_header(header) == GOLDEN_INVOKE
    assert protocol.decode(protocol.encode(protocol.INVOKE, header)).header == header


def test_an_invoke_header_takes_the_request_and_extra_fields_after_the_common_ones() -> None:
    header = protocol.invoke_header("c2", "g", 1, parent_id="c1", method="GET", path="/a", query="x=1",
                                    headers=[["x-a", "1"]], content_type="text/plain", mode="execute", attempt=2)
    assert list(header) == ["call_id", "parent_id", "function", "method", "path", "query", "headers", "content_type",
                            "deadline_ms", "mode", "attempt"]
    assert header["headers"] == [["x-a", "1"]] and header["attempt"] == 2 and header["mode"] == "execute"


def test_every_error_body_is_the_same_compact_json() -> None:
    expected = b'{"error":{"code":"not_found","message":"function \'x\' not found"}}'
    assert error_body("not_found", "function 'x' not found") == expected
    assert NotFound("function 'x' not found").body() == expected
    # the gateway's invoke path, an instance's own error and the registered runtime's runner say it alike
    assert error_answer(NotFound("function 'x' not found"), "c1")[2] == expected
    assert json_error(404, "not_found", "function 'x' not found")[3] == expected
    assert error_result(404, "not_found", "function 'x' not found") == (404, "application/json", expected)


def test_an_error_body_keeps_details_and_escapes_what_json_must() -> None:
    body = TooManyRequests('queue of "f" is full', {"retry_after_s": 2}).body()
    assert json.loads(body) == {"error": {"code": "too_many_requests", "message": 'queue of "f" is full',
                                          "details": {"retry_after_s": 2}}}
    status, headers, _ = error_answer(TooManyRequests("full", {"retry_after_s": 2}), "c9")
    assert status == 429 and (b"retry-after", b"2") in headers and (b"x-call-id", b"c9") in headers
