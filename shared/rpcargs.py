"""Typed reads of an RPC request's arguments: a wrong type is an InvalidRequest naming the argument.

RPC arguments arrive from the network (msgpack maps), so every one is checked where it enters a
service; nothing is coerced with ``str()`` or ``int()``, which would turn a map into text or raise
an internal error.
"""

from __future__ import annotations

from typing import Any

from shared.errors import InvalidRequest

Kind = type | tuple[type, ...]


def _name(kind: Kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "string", "int": "integer", "dict": "map", "list": "list", "float": "number",
                        "NoneType": "null"}.get(k.__name__, k.__name__) for k in kinds)


def _is(value: Any, kind: Kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kind) and not (isinstance(value, bool) and bool not in kinds)


def required(args: dict[str, Any], key: str, kind: Kind) -> Any:
    value = args.get(key)
    if not _is(value, kind):
        raise InvalidRequest(f"argument {key!r} is missing or not a {_name(kind)}")
    return value


def optional(args: dict[str, Any], key: str, kind: Kind, default: Any = None) -> Any:
    value = args.get(key)
    if value is None:
        return default
    if not _is(value, kind):
        raise InvalidRequest(f"argument {key!r} must be a {_name(kind)} when given, not {type(value).__name__}")
    return value


def strings(args: dict[str, Any], key: str, default: list[str] | None = None) -> list[str]:
    """A list of strings (``default`` when absent)."""
    value = args.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"argument {key!r} must be a list of strings")
    return value
