"""The one error hierarchy: each error has a wire code and an HTTP status.

Errors cross ZeroMQ as ``{"code": ..., "message": ..., "details": ...}`` and come
back as the same class through :func:`from_wire`. The gateway maps them to HTTP
with :attr:`NuclideError.http_status`, in one place. Over HTTP an error's body is
always :func:`error_body`'s ``{"error": {code, message[, details]}}``, whichever process
answers (the gateway, an instance, the host-side runner of a registered runtime).
"""

from __future__ import annotations

import json
from typing import Any

_compact_json = json.JSONEncoder(separators=(",", ":")).encode  # built once: dumps() with options builds one a call


def wire_error(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{code, message[, details]}``: an error as it crosses the wire and stands in an error body."""
    wire: dict[str, Any] = {"code": code, "message": message}
    if details:
        wire["details"] = details
    return wire


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    """The JSON body of an error answer: ``{"error": {code, message[, details]}}`` (clients read it so, see
    services/cli/client.py)."""
    return _compact_json({"error": wire_error(code, message, details)}).encode()


class NuclideError(Exception):
    """Base class: a failure with a message that says what was wrong and what to do."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_wire(self) -> dict[str, Any]:
        return wire_error(self.code, self.message, self.details)

    def body(self) -> bytes:
        """This error as the JSON body of an HTTP answer (:func:`error_body`)."""
        return error_body(self.code, self.message, self.details)


class InvalidRequest(NuclideError):
    code = "invalid_request"
    http_status = 400


class Unauthorized(NuclideError):
    code = "unauthorized"
    http_status = 401


class Forbidden(NuclideError):
    """The caller is known, and not allowed this (a task call to a private function it may not call)."""

    code = "forbidden"
    http_status = 403


class NotFound(NuclideError):
    code = "not_found"
    http_status = 404


class Conflict(NuclideError):
    code = "conflict"
    http_status = 409


class PayloadTooLarge(NuclideError):
    code = "payload_too_large"
    http_status = 413


class BuildFailed(NuclideError):
    code = "build_failed"
    http_status = 422


class TooManyRequests(NuclideError):
    code = "too_many_requests"
    http_status = 429


class Internal(NuclideError):
    code = "internal"
    http_status = 500


class InstanceFailed(NuclideError):
    code = "instance_failed"
    http_status = 502


class Unavailable(NuclideError):
    code = "unavailable"
    http_status = 503


class DeadlineExceeded(NuclideError):
    code = "deadline_exceeded"
    http_status = 504


class ProtocolError(InvalidRequest):
    """A ZeroMQ message that does not follow shared/protocol.py."""

    code = "protocol_error"


_BY_CODE: dict[str, type[NuclideError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        BuildFailed,
        TooManyRequests,
        Internal,
        InstanceFailed,
        Unavailable,
        DeadlineExceeded,
        ProtocolError,
    )
}


def from_wire(wire: Any) -> NuclideError:
    """Rebuild the error a peer sent; an unknown or malformed one becomes Internal."""
    if not isinstance(wire, dict):
        return Internal(f"malformed error from peer: {wire!r:.200}")
    cls = _BY_CODE.get(str(wire.get("code")), Internal)
    details = wire.get("details")
    return cls(str(wire.get("message", "")), details if isinstance(details, dict) else None)
