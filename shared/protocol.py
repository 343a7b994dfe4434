"""The nuclide wire protocol: the only code that packs or unpacks ZeroMQ frames.

Every message, on every socket::

    [routing frames ...]   added and removed by ROUTER sockets only
    frame 0   b"NUC1"      signature: protocol and version; anything else is rejected
    frame 1   command      short ASCII verb, one of COMMANDS
    frame 2   header       msgpack map with str keys (ids, trace, method, deadline_ms, ...)
    frame 3+  bodies       raw bytes (zips, payloads, results), never re-encoded

PUB/SUB messages put the topic alone in front::

    frame 0   topic        b"function.changed", b"call.done", ...
    frame 1+  as above     b"NUC1", b"PUB", header, bodies ...

Commands and who sends them:

    REQ / REP / ERR     RPC request, its reply, or an error reply {code, message}
    READY               instance -> gateway: {instance_id, group, group_version,
                        functions: {name: version}, credit, pid}
    HEARTBEAT           both ways; from an instance it repeats the READY fields
    INVOKE              gateway -> instance: {call_id, function, ...}, body = payload
    RESULT              instance -> gateway: {call_id, status, ..., error: why a 5xx
                        failed, when the runtime knows}, body = result; with a RESULT or
                        HEARTBEAT an instance reports its in-process task calls:
                        {edges: [...], failed_calls: [...]} (services/runtime/context_calls.py)
                        Both may carry a batch instead: header {batch: [h1, ..., hn]},
                        bodies b1 .. bn (see encode_batch); the gateway sends batched
                        INVOKEs only to instances whose READY says {batch: true}
    CALL                instance -> gateway: a task-to-task call
    BYE                 instance -> gateway: stop sending me work; gateway -> instance: ack
    PUB                 a publisher -> its subscribers: the store's changes {seq, kind, data}, the gateway's traces and load

Limits: a header is at most MAX_HEADER_BYTES, a message at most MAX_FRAMES frames
and MAX_MESSAGE_BYTES in total. Decoding raises :class:`ProtocolError` on anything
else; services log and drop such messages, or answer ERR where a reply is expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack

from shared.errors import ProtocolError

SIGNATURE = b"NUC1"

REQ = b"REQ"
REP = b"REP"
ERR = b"ERR"
READY = b"READY"
INVOKE = b"INVOKE"
RESULT = b"RESULT"
CALL = b"CALL"
HEARTBEAT = b"HEARTBEAT"
BYE = b"BYE"
PUBLISH = b"PUB"

COMMANDS = frozenset({REQ, REP, ERR, READY, INVOKE, RESULT, CALL, HEARTBEAT, BYE, PUBLISH})

MAX_HEADER_BYTES = 1024 * 1024  # headers carry ids and settings (batches of them), never payloads
MAX_FRAMES = 1024  # batches of calls carry one body frame per call
MAX_BATCH = 256  # calls per batched INVOKE or RESULT; keeps a batch well under MAX_FRAMES
MAX_ROUTING_FRAMES = 4  # ROUTER envelopes nuclide produces have 1 (DEALER peers)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # zips are capped lower, by the gateway

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message: its command, its header and its raw bodies."""

    command: bytes
    header: dict[str, Any]
    bodies: tuple[bytes, ...] = field(default=())

    @property
    def body(self) -> bytes:
        """The first body, or b"" when there is none."""
        return self.bodies[0] if self.bodies else b""


def pack_header(header: dict[str, Any]) -> bytes:
    return _packb(header)


def encode(command: bytes, header: dict[str, Any], *bodies: bytes) -> list[bytes]:
    """Frames for one message (no routing frames, no topic)."""
    if command not in COMMANDS:
        raise ProtocolError(f"unknown command {command!r}")
    packed = _packb(header)
    if len(packed) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(packed)} bytes, over the {MAX_HEADER_BYTES} byte limit")
    return [SIGNATURE, command, packed, *bodies]


def encode_batch(command: bytes, headers: list[dict[str, Any]], bodies: list[bytes]) -> list[bytes]:
    """Frames for several calls (or results) in one message: header {batch: [...]}, one body each.

    One message instead of n saves most of ZeroMQ's per-message cost (a wake-up of
    its I/O thread and a syscall on each side) when calls come in bursts.
    """
    if len(headers) != len(bodies) or not 0 < len(headers) <= MAX_BATCH:
        raise ProtocolError(f"a batch needs 1-{MAX_BATCH} headers with one body each")
    return [SIGNATURE, command, _packb({"batch": headers}), *bodies]


def unbatch(msg: Message) -> list[tuple[dict[str, Any], bytes]]:
    """The (header, body) pairs of a message: one for a plain message, n for a batch."""
    batch = msg.header.get("batch")
    if batch is None:
        return [(msg.header, msg.body)]
    if not isinstance(batch, list) or len(batch) != len(msg.bodies) or not all(isinstance(h, dict) for h in batch):
        raise ProtocolError("a batch header must be a list of maps with one body frame each")
    return list(zip(batch, msg.bodies))


def encode_published(topic: bytes, header: dict[str, Any], *bodies: bytes) -> list[bytes]:
    """Frames for a PUB message: the topic, then a PUB message."""
    return [topic, *encode(PUBLISH, header, *bodies)]


def decode(frames: Sequence[bytes]) -> Message:
    """Decode frames that start at the signature (routing frames already removed)."""
    if len(frames) < 3:
        raise ProtocolError(f"message has {len(frames)} frames; at least 3 are required")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"message has {len(frames)} frames; at most {MAX_FRAMES} are allowed")
    if bytes(frames[0]) != SIGNATURE:
        raise ProtocolError(f"bad signature {bytes(frames[0])[:16]!r}; expected {SIGNATURE!r}")
    command = bytes(frames[1])
    if command not in COMMANDS:
        raise ProtocolError(f"unknown command {command[:32]!r}")
    raw_header = frames[2]
    if len(raw_header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(raw_header)} bytes, over the {MAX_HEADER_BYTES} byte limit")
    total = sum(map(len, frames))
    if total > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message is {total} bytes, over the {MAX_MESSAGE_BYTES} byte limit")
    try:
        header = msgpack.unpackb(raw_header, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    bodies = frames[3:]
    if not all(type(f) is bytes for f in bodies):
        bodies = [bytes(f) for f in bodies]  # zmq.Frame or memoryview: copy once
    return Message(command, header, tuple(bodies))


def split_envelope(frames: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Split a ROUTER message into (routing frames, message frames).

    The routing frames are everything before the signature (an empty delimiter
    frame from REQ peers is kept in the envelope so replies route back).
    """
    for i in range(min(len(frames), MAX_ROUTING_FRAMES + 1)):
        if bytes(frames[i]) == SIGNATURE:
            if i == 0:
                raise ProtocolError("message has no routing frame")
            return list(frames[:i]), list(frames[i:])
    raise ProtocolError("no NUC1 signature frame found in the first frames")


def decode_published(frames: Sequence[bytes]) -> tuple[bytes, Message]:
    """Decode a SUB message into (topic, message)."""
    if len(frames) < 4:
        raise ProtocolError(f"event has {len(frames)} frames; at least 4 are required")
    topic = bytes(frames[0])
    msg = decode(frames[1:])
    if msg.command != PUBLISH:
        raise ProtocolError(f"expected PUB after the topic, got {msg.command!r}")
    return topic, msg


def request(req_id: int, method: str, args: dict[str, Any] | None = None, *bodies: bytes) -> list[bytes]:
    """An RPC request: header {id, method, args}."""
    return encode(REQ, {"id": req_id, "method": method, "args": args or {}}, *bodies)


def reply(req_id: Any, result: Any, *bodies: bytes) -> list[bytes]:
    """A successful RPC reply: header {id, result}."""
    return encode(REP, {"id": req_id, "result": result}, *bodies)


def error_reply(req_id: Any, wire_error: dict[str, Any]) -> list[bytes]:
    """An RPC error reply: header {id, error: {code, message, details}}."""
    return encode(ERR, {"id": req_id, "error": wire_error})


# ----- the instance link's hot path -------------------------------------------------------
# Built without encode()'s checks: the command is fixed and the headers are the sender's own
# (ids and timings, far below MAX_HEADER_BYTES); measured, each check is a cost per call.


def invoke(header: dict[str, Any], body: bytes) -> list[bytes]:
    """An INVOKE of one call: [NUC1, INVOKE, header, payload]."""
    return [SIGNATURE, INVOKE, _packb(header), body]


def result(header: dict[str, Any], body: bytes) -> list[bytes]:
    """A RESULT of one call: [NUC1, RESULT, header, result body]."""
    return [SIGNATURE, RESULT, _packb(header), body]


def result_batch(headers: list[dict[str, Any]], bodies: list[bytes], extra: dict[str, Any] | None = None) -> list[bytes]:
    """The RESULTs of several calls in one message: header {batch: [h1 .. hn], **extra}, bodies b1 .. bn.

    ``extra``: fields of the message rather than of one call (an instance's reports of task calls).
    """
    if len(headers) != len(bodies) or not 0 < len(headers) <= MAX_BATCH:
        raise ProtocolError(f"a batch needs 1-{MAX_BATCH} headers with one body each")
    outer: dict[str, Any] = {"batch": headers}
    if extra:
        outer.update(extra)
    return [SIGNATURE, RESULT, _packb(outer), *bodies]


def decode_from_peer(frames: Sequence[bytes]) -> tuple[bytes, Message]:
    """A message a ROUTER got from a DEALER peer: (the peer's identity, the message)."""
    if len(frames) < 4:
        raise ProtocolError(f"message has {len(frames)} frames; a peer's message has at least 4")
    return bytes(frames[0]), decode(frames[1:])


def invoke_header(call_id: str, function: str, deadline_ms: int, *, parent_id: str | None = None,
                  method: str = "POST", path: str = "/", query: str = "", headers: list[list[str]] | None = None,
                  content_type: str = "", mode: str = "http", trace_id: str | None = None, trace_flags: int = 0,
                  parent_span: str | None = None, tracestate: str | None = None, **extra: Any) -> dict[str, Any]:
    """The header of an INVOKE (gateway -> instance): the call's ids, its HTTP request (method, path below the
    function, query, ``[[name, value], ...]`` headers, content type), its deadline (ms since the epoch) and its
    mode (``http``, ``execute``). Its W3C trace (shared/tracecontext.py): ``trace_id`` and ``trace_flags``, the
    caller's span ``parent_span`` (absent for a trace's root) and ``tracestate`` (absent when empty); the call's
    own span id is derived from its call id. ``extra``: fields some INVOKEs add (an async call's ``attempt``); a CALL
    (instance -> gateway) is an INVOKE header plus the caller's ``depth``, ``chain``, ``caller``, ``async`` and
    ``instance``, and the gateway forwards it as the callee's INVOKE."""
    header = {
        "call_id": call_id,
        "parent_id": parent_id,
        "function": function,
        "method": method,
        "path": path,
        "query": query,
        "headers": headers if headers is not None else [],
        "content_type": content_type,
        "deadline_ms": deadline_ms,
        "mode": mode,
    }
    if trace_id is not None:
        header["trace_id"] = trace_id
        header["trace_flags"] = trace_flags
        if parent_span is not None:
            header["parent_span"] = parent_span
        if tracestate is not None:
            header["tracestate"] = tracestate
    if extra:
        header.update(extra)
    return header
