"""shared.failures: the bounded error message a failed call is recorded with."""

from __future__ import annotations

import json

from shared.failures import ERROR_MAX_BYTES, bounded, message_of, result_error


def test_bounded_keeps_short_messages_and_cuts_long_ones_on_a_character():
    assert bounded("ValueError: kaboom") == "ValueError: kaboom"
    exact = "x" * ERROR_MAX_BYTES
    assert bounded(exact) is exact
    cut = bounded("\u20ac" * ERROR_MAX_BYTES)  # 3 bytes each: a cut in the middle of one drops it
    assert cut.endswith("...") and set(cut[:-3]) == {"\u20ac"} and len(cut.encode()) <= ERROR_MAX_BYTES


def test_message_of_reads_a_json_error_or_the_text():
    doc = json.dumps({"error": {"code": "deadline_exceeded", "message": "too slow"}}).encode()
    assert message_of("application/json", doc) == "too slow"
    assert message_of("application/json", b'{"error": "flat"}') == '{"error": "flat"}'
    assert message_of("application/json", b"{broken") == "{broken"
    assert message_of("text/plain", b"caf\xc3\xa9 \xff") == "caf\u00e9 \ufffd"


def test_result_error_prefers_the_runtimes_error_then_the_body():
    assert result_error({"status": 500, "error": "ValueError: kaboom"}, b"kaboom") == "ValueError: kaboom"
    assert result_error({"status": 503, "content_type": "text/plain"}, b"busy\n") == "busy"
    assert result_error({"status": 500, "error": 7, "content_type": "text/plain"}, b"") == "HTTP status 500"
    assert len(result_error({"status": 500}, b"y" * 100_000).encode()) <= ERROR_MAX_BYTES
