"""Unit tests for services.runtime.responses: handler return values to RESULT tuples."""

from __future__ import annotations

import enum
import json
from http import HTTPStatus

import pytest

from services.runtime.context import Response
from services.runtime.responses import BINARY, JSON, TEXT, error_result, execute_result, to_result


def test_str_is_utf8_text():
    assert to_result("héllo") == (200, [], TEXT, "héllo".encode())
    assert TEXT == "text/plain", "exactly what nuclio sets for a str"


def test_str_with_lone_surrogate_does_not_fail():
    status, _, content_type, body = to_result("a\udc80b")
    assert (status, content_type) == (200, TEXT)
    assert body.startswith(b"a") and body.endswith(b"b")


@pytest.mark.parametrize("value", [b"\x00\x01", bytearray(b"\x00\x01"), memoryview(b"\x00\x01")])
def test_binary_types(value):
    status, headers, content_type, body = to_result(value)
    assert (status, headers, content_type, body) == (200, [], BINARY, b"\x00\x01")
    assert type(body) is bytes


def test_dict_and_list_are_compact_utf8_json():
    assert to_result({"name": "Zoë", "n": [1, 2]}) == (200, [], JSON, '{"name":"Zoë","n":[1,2]}'.encode())
    assert to_result([1, "a"]) == (200, [], JSON, b'[1,"a"]')


def test_unserialisable_json_raises_type_error():
    with pytest.raises(TypeError, match="which JSON cannot hold"):
        to_result({"x": object()})
    with pytest.raises(TypeError, match="which JSON cannot hold"):
        to_result({"x": float("nan")})


BYTES_FIX = "decode it to str (e.g. event.body.decode()) or return bytes alone, not inside a dict or list"


@pytest.mark.parametrize("value, where, kind", [
    ({"hello": b"world"}, 'result["hello"]', "bytes"),
    ([1, {"a": [bytearray(b"x")]}], 'result[1]["a"][0]', "bytearray"),
    ((201, {"id": memoryview(b"x")}), 'result["id"]', "memoryview"),
])
def test_bytes_inside_json_name_where_they_are_and_the_fix(value, where, kind):
    with pytest.raises(TypeError) as info:
        to_result(value)
    assert str(info.value) == f"handler result: {where} is {kind}, which JSON cannot hold; {BYTES_FIX}"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_other_values_json_cannot_hold_are_named_too():
    from datetime import date

    with pytest.raises(TypeError, match=r'^handler result: result\["when"\] is of type date, which JSON cannot hold; '
                                        r"convert it to str, a number, a list or a dict$"):
        to_result({"when": date(2024, 1, 2)})
    with pytest.raises(TypeError, match=r"^handler result: result\[0\] is nan, which JSON cannot hold; "):
        to_result([float("nan")])
    with pytest.raises(TypeError, match=r'^handler result: result\["k"\] has a key of type tuple'):
        to_result({"k": {(1, 2): 3}})
    with pytest.raises(TypeError, match=r'^execute result: result\["x"\] is bytes, '):
        execute_result({"x": b"1"})


def test_none_is_empty_text():
    assert to_result(None) == (200, [], TEXT, b"")


@pytest.mark.parametrize("value, body", [(True, b"true"), (False, b"false"), (42, b"42"), (1.5, b"1.5")])
def test_scalars_are_json(value, body):
    assert to_result(value) == (200, [], JSON, body)


def test_status_tuple():
    assert to_result((201, {"id": 7})) == (201, [], JSON, b'{"id":7}')
    assert to_result((404, "missing")) == (404, [], TEXT, b"missing")
    assert to_result((204, None)) == (204, [], TEXT, b"")
    assert to_result((HTTPStatus.ACCEPTED, b"x")) == (202, [], BINARY, b"x")


@pytest.mark.parametrize("status", [99, 600, 0, -1])
def test_status_tuple_out_of_range(status):
    with pytest.raises(TypeError, match=str(status)):
        to_result((status, "x"))


def test_non_status_tuples_are_text():
    assert to_result((1, 2, 3)) == (200, [], TEXT, b"(1, 2, 3)")
    assert to_result(("a", "b")) == (200, [], TEXT, b"('a', 'b')")
    assert to_result((True, "b")) == (200, [], TEXT, b"(True, 'b')")


def test_response_object():
    response = Response(body={"ok": True}, headers={"X-Trace": "t1", "X-Count": 3}, status_code=201)
    assert to_result(response) == (201, [["X-Trace", "t1"], ["X-Count", "3"]], JSON, b'{"ok":true}')


def test_response_defaults_and_explicit_content_type():
    assert to_result(Response()) == (200, [], TEXT, b"")
    assert to_result(Response("hi")) == (200, [], TEXT, b"hi")
    assert to_result(Response(b"<p/>", content_type="text/html")) == (200, [], "text/html", b"<p/>")
    assert to_result(Response({"a": 1}, content_type="application/vnd.x+json")) == (
        200,
        [],
        "application/vnd.x+json",
        b'{"a":1}',
    )


def test_response_content_type_header_becomes_content_type():
    response = Response("<p/>", headers=[("Content-Type", "text/html"), ("X-A", "1")])
    assert to_result(response) == (200, [["X-A", "1"]], "text/html", b"<p/>")
    explicit = Response("x", headers={"content-type": "text/html"}, content_type="text/csv")
    assert to_result(explicit) == (200, [], "text/csv", b"x")


def test_response_bad_status():
    with pytest.raises(TypeError, match="700"):
        to_result(Response("x", status_code=700))
    with pytest.raises(TypeError, match="'200'"):
        to_result(Response("x", status_code="200"))


def test_response_bad_headers():
    with pytest.raises(TypeError, match="CR or LF"):
        to_result(Response("x", headers={"X-A": "1\r\nSet-Cookie: evil=1"}))
    with pytest.raises(TypeError, match="not a \\(name, value\\) pair"):
        to_result(Response("x", headers=[("only-name",)]))
    with pytest.raises(TypeError, match="dict or a list"):
        to_result(Response("x", headers=5))


def test_response_unserialisable_body():
    with pytest.raises(TypeError, match="which JSON cannot hold"):
        to_result(Response({"x": {1, 2}}))


def test_other_values_are_str():
    class Thing:
        def __str__(self):
            return "a thing"

    assert to_result(Thing()) == (200, [], TEXT, b"a thing")
    assert to_result({1, 2}) == (200, [], TEXT, str({1, 2}).encode())


def test_subclasses_map_like_their_base():
    class Colour(str, enum.Enum):
        RED = "red"

    class MyDict(dict):
        pass

    assert to_result(MyDict(a=1)) == (200, [], JSON, b'{"a":1}')
    assert to_result(Colour.RED)[2] == TEXT


def test_error_result():
    assert error_result(ValueError("bad input")) == (500, [], TEXT, b"bad input")
    assert error_result(RuntimeError()) == (500, [], TEXT, b"RuntimeError")

    class Broken(Exception):
        def __str__(self):
            raise RuntimeError("no")

    assert error_result(Broken()) == (500, [], TEXT, b"Broken")


def test_execute_result():
    assert execute_result({"a": 1}) == (200, [], JSON, b'{"result":{"a":1}}')
    assert execute_result("text") == (200, [], JSON, b'{"result":"text"}')
    assert execute_result(None) == (200, [], JSON, b'{"result":null}')
    assert execute_result(b"caf\xc3\xa9 \xff") == (200, [], JSON, '{"result":"café \ufffd"}'.encode())
    assert execute_result(Response(body=[1, 2], status_code=201)) == (200, [], JSON, b'{"result":[1,2]}')
    assert execute_result((404, "gone")) == (200, [], JSON, b'{"result":"gone"}')
    assert json.loads(execute_result(3.5)[3]) == {"result": 3.5}
    with pytest.raises(TypeError, match="which JSON cannot hold"):
        execute_result(object())
