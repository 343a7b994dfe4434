"""Map a handler's return value to a RESULT: (status, headers, content_type, body)."""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping

from services.runtime.context import Response
from shared.errors import error_body
from shared.failures import bounded

__all__ = ["to_result", "error_result", "json_error", "execute_result", "Failure", "Result", "TEXT", "JSON", "BINARY"]

Result = tuple[int, list[list[str]], str, bytes]

TEXT = "text/plain"  # exactly what nuclio sets for a str (no charset parameter); the body is UTF-8
JSON = "application/json"
BINARY = "application/octet-stream"

# Built once: json.dumps with non-default options builds a new encoder per call.
# NaN/Infinity are refused because they would make the body invalid JSON.
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


class Failure(tuple):
    """The Result of a failed call, with why in ``error``: the message alone (no traceback), bounded.

    The RESULT reports it for the call's record; a handler's own 5xx is a plain Result, and its
    body says why (see shared/failures.py)."""

    error: str

    def __new__(cls, result: Result, error: str) -> "Failure":
        self = super().__new__(cls, result)
        self.error = bounded(error)
        return self


_BYTES_TYPES = (bytes, bytearray, memoryview)
_KEY_TYPES = (str, int, float, bool, type(None))


def _unencodable(value: Any, path: str, within: tuple[int, ...] = ()) -> str | None:
    """What in ``value`` JSON cannot hold, named by its path from ``path`` (None if nothing is found).

    ``within``: the ids of the containers ``value`` is inside, to name a circular reference."""
    if isinstance(value, _BYTES_TYPES):
        return (f"{path} is {type(value).__name__}, which JSON cannot hold; decode it to str"
                " (e.g. event.body.decode()) or return bytes alone, not inside a dict or list")
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path} is {value!r}, which JSON cannot hold; use None or a finite number"
    if isinstance(value, (dict, list, tuple)):
        if id(value) in within:
            return f"{path} contains itself, which JSON cannot hold; return a copy without the cycle"
        within = (*within, id(value))
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, _KEY_TYPES):
                    return f"{path} has a key of type {type(key).__name__}; JSON keys must be str"
                shown = json.dumps(key) if isinstance(key, str) else repr(key)
                found = _unencodable(item, f"{path}[{shown}]", within)
                if found:
                    return found
        else:
            for i, item in enumerate(value):
                found = _unencodable(item, f"{path}[{i}]", within)
                if found:
                    return found
        return None
    if isinstance(value, (str, int, float, bool, type(None))):
        return None
    return f"{path} is of type {type(value).__name__}, which JSON cannot hold; convert it to str, a number, a list or a dict"


def _json_bytes(value: Any, what: str, user_value: Any) -> bytes:
    """``value`` as JSON; else a TypeError naming what in ``user_value`` (what the handler returned) JSON cannot hold."""
    try:
        return _encode_json(value).encode("utf-8")
    except (TypeError, ValueError) as exc:
        # only a failed call pays for the search; the cause is named, so the chain is left out
        found = _unencodable(user_value, "result")
        raise TypeError(f"{what}: {found}" if found else
                        f"{what} of type {type(value).__name__} cannot be sent as JSON ({exc}); return only dicts,"
                        " lists, str, numbers, bools and None, or return bytes/str yourself") from None


def _text_bytes(text: str) -> bytes:
    # Lone surrogates cannot be UTF-8; replace them rather than fail the whole call.
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def _map_str(value: Any) -> tuple[str, bytes]:
    return TEXT, _text_bytes(value)


def _map_bytes(value: Any) -> tuple[str, bytes]:
    return BINARY, value if type(value) is bytes else bytes(value)


def _map_json(value: Any) -> tuple[str, bytes]:
    return JSON, _json_bytes(value, "handler result", value)


def _map_none(value: Any) -> tuple[str, bytes]:
    return TEXT, b""


# Exact-type dispatch is one dict lookup; subclasses fall through to isinstance checks.
_BODY_MAPPERS: dict[type, Callable[[Any], tuple[str, bytes]]] = {
    str: _map_str,
    bytes: _map_bytes,
    bytearray: _map_bytes,
    memoryview: _map_bytes,
    dict: _map_json,
    list: _map_json,
    bool: _map_json,
    int: _map_json,
    float: _map_json,
    type(None): _map_none,
}


def _map_body(value: Any) -> tuple[str, bytes]:
    """(default content type, body bytes) for a plain body value."""
    mapper = _BODY_MAPPERS.get(type(value))
    if mapper is not None:
        return mapper(value)
    if isinstance(value, str):
        return _map_str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _map_bytes(value)
    if isinstance(value, (dict, list, int, float)):
        return _map_json(value)
    return TEXT, _text_bytes(str(value))


def _check_status(status: Any) -> int:
    if type(status) is not int:
        if isinstance(status, bool) or not isinstance(status, int):
            raise TypeError(
                f"response status {status!r} is a {type(status).__name__}; "
                "return an int HTTP status from 100 to 599"
            )
        status = int(status)  # IntEnum/HTTPStatus -> plain int for msgpack
    if not 100 <= status <= 599:
        raise TypeError(f"response status {status} is out of range; return an HTTP status from 100 to 599")
    return status


def _is_status_tuple(value: Any) -> bool:
    return (
        type(value) is tuple
        and len(value) == 2
        and isinstance(value[0], int)
        and not isinstance(value[0], bool)
    )


def _header_pairs(headers: Any) -> tuple[list[list[str]], str | None]:
    """Response headers as [name, value] string pairs, plus a Content-Type found among them."""
    if not headers:
        return [], None
    if isinstance(headers, Mapping):
        items: Any = headers.items()
    elif isinstance(headers, (list, tuple)):
        items = headers
    else:
        raise TypeError(
            f"response headers must be a dict or a list of (name, value) pairs, got {type(headers).__name__}"
        )
    pairs: list[list[str]] = []
    content_type: str | None = None
    for item in items:
        try:
            name, value = item
        except (TypeError, ValueError):
            raise TypeError(
                f"response header {item!r:.100} is not a (name, value) pair; "
                "give headers as a dict or a list of (name, value) pairs"
            ) from None
        name = name if type(name) is str else str(name)
        value = value if type(value) is str else str(value)
        # CR/LF in a header would let a handler forge extra headers or split the response.
        if "\n" in name or "\r" in name or "\n" in value or "\r" in value:
            raise TypeError(
                f"response header {name!r} contains a CR or LF character; "
                "remove line breaks from header names and values"
            )
        # The gateway writes Content-Type from the RESULT's content_type: keep one source.
        if name.lower() == "content-type":
            content_type = value
            continue
        pairs.append([name, value])
    return pairs, content_type


def _from_response(response: Response) -> Result:
    status = _check_status(response.status_code)
    headers, header_content_type = _header_pairs(response.headers)
    body = response.body
    default_type, body_bytes = _map_body(body)
    content_type = response.content_type or header_content_type or default_type
    return status, headers, content_type, body_bytes


def to_result(value: Any) -> Result:
    """(status, headers, content_type, body) for a handler's return value, nuclio-style.

    Raises TypeError (which the runtime reports as a 500) for a result it cannot
    encode: a non-JSON-serialisable dict/list, a bad status, or bad headers.
    """
    mapper = _BODY_MAPPERS.get(type(value))
    if mapper is not None:
        content_type, body = mapper(value)
        return 200, [], content_type, body
    if isinstance(value, Response):
        return _from_response(value)
    if _is_status_tuple(value):
        status = _check_status(value[0])
        content_type, body = _map_body(value[1])
        return status, [], content_type, body
    content_type, body = _map_body(value)
    return 200, [], content_type, body


def error_result(exc: BaseException) -> Failure:
    """A 500 whose text body is the exception's message (or its class name), nuclio-style; no traceback.

    The call's record gets the message with the exception's class: "ValueError: kaboom"."""
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not break error reporting
        message = ""
    name = type(exc).__name__
    return Failure((500, [], TEXT, _text_bytes(message or name)), f"{name}: {message}" if message else name)


def json_error(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> Failure:
    """An error the runtime answers itself: ``{"error": {code, message[, details]}}`` as JSON."""
    return Failure((status, [], JSON, error_body(code, message, details)), message)


def execute_result(value: Any) -> Result:
    """The "execute" mode result: ``{"result": value}`` as JSON, with Response/tuple unwrapped."""
    if isinstance(value, Response):
        value = value.body
    elif _is_status_tuple(value):
        value = value[1]
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "replace")
    return 200, [], JSON, _json_bytes({"result": value}, "execute result", value)
