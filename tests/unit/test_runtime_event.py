"""Unit tests for services.runtime.event and the Context/Logger in services.runtime.context."""

from __future__ import annotations

import copy
import io
import json
import time
import uuid
from datetime import datetime, timezone

import pytest

from services.runtime.context import Context, Logger, Response
from services.runtime.event import Event, Headers, is_json_content_type
from shared.errors import ProtocolError


def make_header(**overrides):
    header = {
        "call_id": "call-1",
        "parent_id": None,
        "function": "hello",
        "method": "POST",
        "path": "/api/hello",
        "query": "a=1&b=two&a=3&empty=&q=x%20y+z",
        "headers": [["content-type", "application/json"], ["x-request-id", "r1"]],
        "content_type": "application/json",
        "deadline_ms": 1_700_000_000_000,
        "mode": "http",
    }
    header.update(overrides)
    return header


# --- Event -------------------------------------------------------------------


def test_from_invoke_sets_nuclio_attributes():
    event = Event.from_invoke(make_header(), b'{"name": "ada"}')
    assert event.call_id == "call-1"
    assert str(uuid.UUID(event.id)) == event.id, "nuclio's event.id is a UUID string"
    assert event.id == Event.from_invoke(make_header(), b"").id, "named by the call id: retries keep it"
    assert event.id != Event.from_invoke(make_header(call_id="call-2"), b"").id
    assert event.parent_id is None
    assert event.method == "POST"
    assert event.path == "/api/hello"
    assert event.content_type == "application/json"
    assert event.version == 1
    assert event.trigger.kind == "http"
    assert event.trigger.name
    assert event.url == "/api/hello?a=1&b=two&a=3&empty=&q=x%20y+z"
    assert event.deadline_ms == 1_700_000_000_000
    assert event.mode == "http"
    assert event.function == "hello"
    assert event.size == len(b'{"name": "ada"}')


def test_url_without_query_is_the_path():
    event = Event.from_invoke(make_header(query=""), b"")
    assert event.url == "/api/hello"
    assert event.fields == {}


def test_fields_parse_query_last_wins_and_decode():
    event = Event.from_invoke(make_header(), b"")
    assert event.fields == {"a": "3", "b": "two", "empty": "", "q": "x y z"}
    assert event.get_field("b") == "two"
    assert event.get_field("missing", "d") == "d"


def test_json_body_is_parsed_and_raw_kept():
    raw = '{"name": "Zoë", "n": [1, 2]}'.encode()
    event = Event.from_invoke(make_header(), raw)
    assert event.body == {"name": "Zoë", "n": [1, 2]}
    assert event.raw_body == raw


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json"],
)
def test_json_content_types_are_recognised(content_type):
    event = Event.from_invoke(make_header(content_type=content_type), b"[1, 2]")
    assert event.body == [1, 2]


def test_invalid_json_falls_back_to_bytes():
    event = Event.from_invoke(make_header(), b"{not json")
    assert event.body == b"{not json"
    assert event.raw_body == b"{not json"


def test_invalid_utf8_json_falls_back_to_bytes():
    event = Event.from_invoke(make_header(), b'{"a": "\xff"}')
    assert event.body == b'{"a": "\xff"}'


def test_json_scalar_stays_bytes():
    event = Event.from_invoke(make_header(), b'"just a string"')
    assert event.body == b'"just a string"'


def test_empty_json_body_is_empty_bytes():
    event = Event.from_invoke(make_header(), b"")
    assert event.body == b""


def test_non_json_content_type_keeps_bytes():
    event = Event.from_invoke(make_header(content_type="text/plain", headers=[]), b'{"a": 1}')
    assert event.body == b'{"a": 1}'
    assert not is_json_content_type("text/plain")
    assert not is_json_content_type("")
    assert not is_json_content_type(None)
    assert is_json_content_type("application/problem+json")


def test_content_type_falls_back_to_header():
    event = Event.from_invoke(make_header(content_type=""), b'{"a": 1}')
    assert event.content_type == "application/json"
    assert event.body == {"a": 1}


def test_body_can_be_reassigned():
    event = Event.from_invoke(make_header(), b'{"a": 1}')
    event.body = "replaced"
    assert event.body == "replaced"
    assert event.raw_body == b'{"a": 1}'


def test_headers_are_case_insensitive_and_keep_original_names():
    extra = {"Fusionizer-Server-Address": "tcp://10.0.0.1:5555"}
    event = Event.from_invoke(make_header(), b"", extra)
    headers = event.headers
    assert isinstance(headers, dict)
    assert headers["Fusionizer-Server-Address"] == "tcp://10.0.0.1:5555"
    assert headers["fusionizer-server-address"] == "tcp://10.0.0.1:5555"
    assert headers["FUSIONIZER-SERVER-ADDRESS"] == "tcp://10.0.0.1:5555"
    assert headers["X-Request-Id"] == "r1"
    assert "X-REQUEST-ID" in headers
    assert "nope" not in headers
    assert headers.get("Content-Type") == "application/json"
    assert headers.get("nope", "dflt") == "dflt"
    assert event.get_header("x-request-ID") == "r1"
    assert event.get_header("missing") is None
    assert event.get_header("missing", "d") == "d"
    assert list(headers) == ["content-type", "x-request-id", "Fusionizer-Server-Address"]
    with pytest.raises(KeyError):
        headers["missing"]


def test_extra_headers_override_sent_headers_case_insensitively():
    header = make_header(headers=[["x-user", "mallory"]])
    event = Event.from_invoke(header, b"", {"X-User": "alice"})
    assert event.headers["x-user"] == "alice"
    assert list(event.headers) == ["X-User"]


def test_repeated_headers_are_joined():
    header = make_header(headers=[["accept", "a"], ["cookie", "x=1"], ["accept", "b"], ["cookie", "y=2"]])
    event = Event.from_invoke(header, b"")
    assert event.headers["accept"] == "a, b"
    assert event.headers["Cookie"] == "x=1; y=2"


def test_from_invoke_never_mutates_input():
    header = make_header()
    extra = {"Fusionizer-Server-Address": "tcp://x"}
    before_header, before_extra = copy.deepcopy(header), dict(extra)
    event = Event.from_invoke(header, b'{"a": 1}', extra)
    event.headers["x-new"] = "1"
    event.headers["FUSIONIZER-SERVER-ADDRESS"] = "changed"
    event.fields["z"] = "9"
    event.body["a"] = 2
    assert header == before_header
    assert extra == before_extra


def test_from_invoke_requires_call_id():
    header = make_header()
    del header["call_id"]
    with pytest.raises(ProtocolError, match="call_id"):
        Event.from_invoke(header, b"")


def test_from_invoke_rejects_malformed_headers():
    with pytest.raises(ProtocolError, match="pairs"):
        Event.from_invoke(make_header(headers=[["only-a-name"]]), b"")


def test_timestamp_is_lazy_naive_utc_datetime_as_nuclio_gives_it():
    before = datetime.now(timezone.utc).replace(tzinfo=None)
    event = Event.from_invoke(make_header(), b"")
    after = datetime.now(timezone.utc).replace(tzinfo=None)
    ts = event.timestamp
    assert isinstance(ts, datetime)
    assert ts.tzinfo is None  # nuclio's SDK: datetime.utcfromtimestamp, so isoformat() + "Z" is valid
    assert before <= ts <= after, "the arrival time, not the first read of the attribute"
    assert event.timestamp is ts  # built once


def test_headers_mutation_replaces_other_spelling():
    headers = Headers.from_pairs([["content-type", "a"]])
    headers["Content-Type"] = "b"
    assert list(headers.items()) == [("Content-Type", "b")]
    assert headers.setdefault("CONTENT-TYPE", "c") == "b"
    headers.update({"X-A": "1"}, x_b="2")
    assert headers["x-a"] == "1"
    assert headers.pop("x-A") == "1"
    assert headers.pop("x-a", None) is None
    del headers["content-TYPE"]
    assert "content-type" not in headers
    with pytest.raises(KeyError):
        del headers["content-type"]
    assert isinstance(headers.copy(), Headers)


def test_hand_built_event():
    event = Event({"k": "v"}, headers={"X-Thing": "1"}, fields={"a": "b"}, id="e1", method="GET", path="/p")
    assert event.body == {"k": "v"}
    assert json.loads(event.raw_body) == {"k": "v"}
    assert event.content_type == "application/json"
    assert event.headers["x-thing"] == "1"
    assert event.fields == {"a": "b"}
    assert event.id == "e1"
    first, second = Event("x").id, Event("x").id
    assert first != second and str(uuid.UUID(first)) == first, "a hand-made event without an id gets a fresh UUID"
    text = Event("hi")
    assert text.body == "hi" and text.raw_body == b"hi"
    raw = Event(b'{"a": 1}', content_type="application/json")
    assert raw.body == {"a": 1}


# --- Context and Logger ------------------------------------------------------


def test_context_attributes():
    context = Context("hello", version=3, logger=Logger("hello", io.StringIO()))
    assert context.function_name == "hello"
    assert context.version == 3
    assert context.platform.kind == "local"
    assert context.Response is Response
    context.user_data.client = "c"
    assert context.user_data.client == "c"
    context.custom_attr = 1  # nuclio handlers set their own attributes in init_context
    assert context.custom_attr == 1
    assert context.request_id is None
    context._begin("call-9", 0)
    assert context.request_id == "call-9"
    assert context.call_id == "call-9"
    assert context.logger.call_id == "call-9"


def test_remaining_time_from_deadline():
    context = Context("f", logger=Logger("f", io.StringIO()))
    now_ms = time.time_ns() // 1_000_000
    context._begin("c", now_ms + 10_000)
    remaining_ms = context.get_remaining_time_in_millis()
    after_ms = time.time_ns() // 1_000_000
    assert now_ms + 10_000 - after_ms <= remaining_ms <= 10_000  # the deadline less the clock when read
    assert isinstance(remaining_ms, int)
    context._begin("c", now_ms - 5_000)
    assert context.get_remaining_time_in_millis() == 0
    context._begin("c", 0)
    assert context.get_remaining_time_in_millis() == 0


def test_call_is_not_implemented_until_a_caller_is_installed():
    context = Context("f", logger=Logger("f", io.StringIO()))
    with pytest.raises(NotImplementedError, match="fusion"):
        context.call("other", "{}")
    with pytest.raises(NotImplementedError, match="fusion"):
        context.call_async("other", "{}")

    class Caller:
        def call(self, name, payload):
            return ("sync", name, payload)

        def call_async(self, name, payload):
            return ("async", name, payload)

    context._caller = Caller()
    assert context.call("other", "p") == ("sync", "other", "p")
    assert context.call_async("other", "p") == ("async", "other", "p")


def read_lines(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_logger_writes_one_json_line_per_call():
    stream = io.StringIO()
    logger = Logger("hello", stream)
    logger.call_id = "c1"
    logger.info("started", user="ada", n=3)
    logger.debug_with("dbg", k="v")
    logger.warn("w %s", "x")
    logger.warning_with("w2")
    logger.error("bad", ts="user-ts")
    lines = read_lines(stream)
    assert [line["level"] for line in lines] == ["info", "debug", "warn", "warn", "error"]
    first = lines[0]
    assert first["msg"] == "started"
    assert first["function"] == "hello"
    assert first["call_id"] == "c1"
    assert first["user"] == "ada" and first["n"] == 3
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert lines[2]["msg"] == "w x"
    # A user field named like a core field does not overwrite it.
    assert lines[4]["ts"] != "user-ts" and lines[4]["_ts"] == "user-ts"


def test_logger_info_with_and_unserialisable_fields():
    stream = io.StringIO()
    logger = Logger("f", stream)
    logger.info_with("hello", when=datetime(2024, 1, 2, tzinfo=timezone.utc), obj=object())
    (line,) = read_lines(stream)
    assert line["when"].startswith("2024-01-02")
    assert "object" in line["obj"]


def test_logger_exception_includes_traceback():
    stream = io.StringIO()
    logger = Logger("f", stream)
    try:
        1 / 0
    except ZeroDivisionError:
        logger.exception("failed", step=2)
    (line,) = read_lines(stream)
    assert line["level"] == "error"
    assert "ZeroDivisionError" in line["exc"]
    assert line["step"] == 2


def test_logger_level_filter_and_broken_stream():
    stream = io.StringIO()
    logger = Logger("f", stream, level="warn")
    logger.debug("hidden")
    logger.info("hidden")
    logger.error("shown")
    assert [line["msg"] for line in read_lines(stream)] == ["shown"]
    with pytest.raises(ValueError, match="log level"):
        Logger("f", stream, level="loud")
    stream.close()
    logger.error("does not raise")


def test_logger_defaults_to_current_stderr(capsys):
    Logger("f").info("to stderr")
    assert json.loads(capsys.readouterr().err)["msg"] == "to stderr"
