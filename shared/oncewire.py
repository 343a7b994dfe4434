"""What a runner and a one-call Python process (``python -m services.runtime.once``) say to each other.

The instance config (as ``services.runtime`` gets it, one function) is in the environment
(:data:`CONFIG_ENV`). The runner and the process speak over stdin and stdout, one msgpack
array each way::

    stdin    [header, body]    header: the INVOKE header (msgpack map), body: bin
    stdout   [result, body]    result: the RESULT header (call_id, status, headers,
                               content_type, took_ms, error, edges, failed_calls), body: bin

Nothing else reaches stdout: the handler's ``print`` and its subprocesses write to file
descriptor 1, which is stderr here (the runner copies stderr to the instance log); the result
goes to a private duplicate of the original stdout. A process that dies (killed at its memory
limit, ``os._exit``) leaves an incomplete or empty stdout, which :func:`decode_result` refuses.
"""

from __future__ import annotations

from typing import Any

import msgpack

from shared.instanceconfig import CONFIG_ENV  # noqa: F401 (where a per-call process finds its config)
ARGV = ["python3", "-m", "services.runtime.once"]
CHECK_ARG = "--check"


def _pack(head: dict[str, Any], body: bytes) -> bytes:
    return msgpack.packb([head, bytes(body)], use_bin_type=True)


def _unpack(data: bytes, what: str) -> tuple[dict[str, Any], bytes]:
    """Exactly one ``[map, bin]``; anything else (empty, cut short, trailing bytes) is a ValueError."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types, ExtraData for trailing bytes
        raise ValueError(f"{what} is not one msgpack [map, bin] ({type(exc).__name__}: {exc})"[:300]) from None
    if (not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], dict)
            or not isinstance(value[1], bytes)):
        raise ValueError(f"{what} must be a msgpack [map, bin]")
    return value[0], value[1]


def encode_invoke(header: dict[str, Any], body: bytes) -> bytes:
    return _pack(header, body)


def decode_invoke(data: bytes) -> tuple[dict[str, Any], bytes]:
    return _unpack(data, "the invoke")


def encode_result(result: dict[str, Any], body: bytes) -> bytes:
    return _pack(result, body)


def decode_result(data: bytes) -> tuple[dict[str, Any], bytes]:
    return _unpack(data, "the result")
