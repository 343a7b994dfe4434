"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the ``traceparent`` and ``tracestate`` of a call.

``traceparent`` is ``00-<trace id: 32 hex>-<parent span id: 16 hex>-<flags: 2 hex>``, lowercase. A
header that is not exactly that (another version, a bad length, uppercase, an all-zero id) is
treated as absent: the call starts a new trace and never fails for it. ``tracestate`` is kept as
given, up to MAX_TRACESTATE characters (longer, or not printable ASCII, it is dropped).

Nothing about spans is stored: a call's span id is the first 8 bytes of blake2b of its call id,
so anyone holding a call id can name its span, and a trace nuclide starts itself takes the root
call's id as its trace id (call ids are 32 hex digits that begin with the time, so traces sort
and index like calls do) with flags 00: unsampled.
"""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

VERSION = "00"
SAMPLED = 0x01  # flags bit 0: the caller records this trace; in-process task calls are recorded only then
MAX_TRACESTATE = 512  # the spec lets 32 list members of up to 256 characters; more than this is not forwarded

_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_PRINTABLE = re.compile(r"[\x20-\x7e]*")

TRACE_ID_FORMAT = "32 lowercase hex digits, not all zero"


class TraceParent(NamedTuple):
    """A parsed ``traceparent``: the trace, the caller's span in it, and the flags."""

    trace_id: str
    parent_id: str
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)


def parse_traceparent(value: str | bytes | None) -> TraceParent | None:
    """The header's fields, or None when it is absent or not a valid version-00 ``traceparent``."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip(" \t")
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    trace_id, parent_id, flags = m.groups()
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return TraceParent(trace_id, parent_id, int(flags, 16))


def format_traceparent(trace_id: str, span_id: str, flags: int = 0) -> str:
    """``00-<trace id>-<span id>-<flags>``: the header a call forwards to name itself as the parent."""
    return f"{VERSION}-{trace_id}-{span_id}-{flags & 0xFF:02x}"


def clean_tracestate(value: str | bytes | None) -> str | None:
    """``tracestate`` as it is forwarded: as given, or None when absent, empty, too long or not printable ASCII."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip(" \t")
    if not value or len(value) > MAX_TRACESTATE or not _PRINTABLE.fullmatch(value):
        return None
    return value


def span_id(call_id: str) -> str:
    """A call's span id: the first 8 bytes of blake2b of its call id, as 16 hex digits."""
    # an all-zero result would be an invalid span id; its odds (2**-64) are not worth a branch on the hot path
    return hashlib.blake2b(call_id.encode()).hexdigest()[:16]


def valid_trace_id(value: object) -> bool:
    return isinstance(value, str) and _TRACE_ID.fullmatch(value) is not None and value != _ZERO_TRACE


def valid_span_id(value: object) -> bool:
    return isinstance(value, str) and _SPAN_ID.fullmatch(value) is not None and value != _ZERO_SPAN


def new_trace_id(call_id: str) -> str:
    """The trace id of a trace this call starts: the call id itself when it has a trace id's shape (nuclide's
    call ids do: the time, then random bits), else a hash of it."""
    if valid_trace_id(call_id):
        return call_id
    return hashlib.blake2b(call_id.encode(), digest_size=16).hexdigest()


class TraceFields(NamedTuple):
    """What a call carries of its trace: its trace id, flags, the parent span (None for a root) and tracestate."""

    trace_id: str
    flags: int
    parent_span: str | None
    tracestate: str | None

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)


def from_traceparent(traceparent: object, tracestate: object) -> TraceFields | None:
    """The trace a caller named with these two headers, or None when ``traceparent`` is absent or invalid.

    ``tracestate`` is kept only with a valid ``traceparent``, as the spec says."""
    parent = parse_traceparent(traceparent) if isinstance(traceparent, (str, bytes)) else None
    if parent is None:
        return None
    return TraceFields(parent.trace_id, parent.flags, parent.parent_id,
                       clean_tracestate(tracestate) if isinstance(tracestate, (str, bytes)) else None)


def from_headers(call_id: str, traceparent: str | bytes | None, tracestate: str | bytes | None) -> TraceFields:
    """A call's trace from a request's headers: the caller's trace, or a new one when it sent none (or a bad one)."""
    return from_traceparent(traceparent, tracestate) or TraceFields(new_trace_id(call_id), 0, None, None)


def from_header_map(call_id: str, header: dict) -> TraceFields:
    """A call's trace from the fields a peer sent (a CALL, an ingress message): each checked, a bad one dropped."""
    trace_id = header.get("trace_id")
    if not valid_trace_id(trace_id):
        return TraceFields(new_trace_id(call_id), 0, None, None)
    flags = header.get("trace_flags")
    parent = header.get("parent_span")
    state = header.get("tracestate")
    return TraceFields(trace_id, flags & 0xFF if isinstance(flags, int) and not isinstance(flags, bool) else 0,
                       parent if valid_span_id(parent) else None,
                       clean_tracestate(state) if isinstance(state, str) else None)


def of_invoke(header: dict) -> TraceFields | None:
    """The trace of an INVOKE the gateway sent (its fields already checked there), or None without one."""
    trace_id = header.get("trace_id")
    if trace_id is None:
        return None
    return TraceFields(trace_id, header.get("trace_flags") or 0, header.get("parent_span"), header.get("tracestate"))
