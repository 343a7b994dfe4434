"""The nuclio-compatible Event a handler receives, built from one INVOKE message."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, NamedTuple
from urllib.parse import parse_qsl

from shared.errors import ProtocolError

__all__ = ["Event", "Headers", "Trigger", "event_uuid", "is_json_content_type"]

# Marks a body that has not been decoded yet; None is a legitimate body value.
_UNPARSED: Any = object()


class Trigger(NamedTuple):
    """What delivered the event; a tuple so the shared instance cannot be mutated."""

    kind: str
    name: str
    klass: str = "sync"  # nuclio's trigger class: "sync" for HTTP


# event.id is a UUID named by the call id: the same call (an async call's retries) keeps its id
_EVENT_ID_NAMESPACE = "5a0c2f4e-8f4b-4d8e-9a51-6e75636c6964"


def event_uuid(call_id: str) -> str:
    """The UUID string a call's event carries (nuclio's event.id, Lambda's aws_request_id).

    ``uuid`` is imported here, on first use: it costs about 2 ms, which an instance whose handlers
    never read an event id does not pay at its start."""
    import uuid

    return str(uuid.uuid5(uuid.UUID(_EVENT_ID_NAMESPACE), call_id))


# nuclio names the HTTP trigger it creates by default "default-http".
HTTP_TRIGGER = Trigger("http", "default-http")


def is_json_content_type(content_type: str | None) -> bool:
    """True for application/json and any +json media type, ignoring parameters and case."""
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class Headers(dict):
    """A dict of header name -> value whose lookups ignore case.

    Keys keep the names they were stored with, so iteration yields the original
    spelling. Exact-case hits cost one dict lookup; since INVOKE names are lower
    case, the next try is the lower-cased name, and only then a scan.
    """

    __slots__ = ()

    def _find(self, name: Any) -> Any:
        """The stored key matching ``name`` case-insensitively, or _UNPARSED."""
        if dict.__contains__(self, name):
            return name
        if not isinstance(name, str):
            return _UNPARSED
        lower = name.lower()
        if dict.__contains__(self, lower):
            return lower
        for key in self:
            if isinstance(key, str) and key.lower() == lower:
                return key
        return _UNPARSED

    def __getitem__(self, name: Any) -> Any:
        try:
            return dict.__getitem__(self, name)
        except KeyError:
            pass
        key = self._find(name)
        if key is _UNPARSED:
            raise KeyError(name)
        return dict.__getitem__(self, key)

    def __contains__(self, name: object) -> bool:
        return self._find(name) is not _UNPARSED

    def get(self, name: Any, default: Any = None) -> Any:
        key = self._find(name)
        return default if key is _UNPARSED else dict.__getitem__(self, key)

    def __setitem__(self, name: Any, value: Any) -> None:
        # Replace an existing spelling rather than keep two entries for one header.
        key = self._find(name)
        if key is not _UNPARSED and key != name:
            dict.__delitem__(self, key)
        dict.__setitem__(self, name, value)

    def __delitem__(self, name: Any) -> None:
        key = self._find(name)
        if key is _UNPARSED:
            raise KeyError(name)
        dict.__delitem__(self, key)

    def pop(self, name: Any, *default: Any) -> Any:
        key = self._find(name)
        if key is _UNPARSED:
            if default:
                return default[0]
            raise KeyError(name)
        return dict.pop(self, key)

    def setdefault(self, name: Any, default: Any = None) -> Any:
        key = self._find(name)
        if key is _UNPARSED:
            dict.__setitem__(self, name, default)
            return default
        return dict.__getitem__(self, key)

    def update(self, *others: Any, **more: Any) -> None:
        for other in others:
            pairs = other.items() if isinstance(other, Mapping) else other
            for name, value in pairs:
                self[name] = value
        for name, value in more.items():
            self[name] = value

    def copy(self) -> Headers:
        return Headers(self)

    @classmethod
    def from_pairs(cls, pairs: Iterable[Any] | None, extra: Mapping[str, str] | None = None) -> Headers:
        """Headers from [name, value] pairs, then ``extra`` on top (extra wins)."""
        if pairs:
            headers = cls(pairs)
            if len(headers) != len(pairs):  # type: ignore[arg-type]
                headers = cls._merge_repeated(pairs)
        else:
            headers = cls()
        if extra:
            for name, value in extra.items():
                headers[name] = value
        return headers

    @classmethod
    def _merge_repeated(cls, pairs: Iterable[Any]) -> Headers:
        # A repeated request header means one comma-separated list (RFC 9110 5.3);
        # Cookie is the exception and joins with "; " (RFC 6265 5.4).
        headers = cls()
        for name, value in pairs:
            key = headers._find(name)
            if key is _UNPARSED:
                dict.__setitem__(headers, name, value)
            else:
                sep = "; " if key.lower() == "cookie" else ", "
                dict.__setitem__(headers, key, f"{dict.__getitem__(headers, key)}{sep}{value}")
        return headers


class Event:
    """One invocation as the handler sees it (nuclio's ``event`` object)."""

    __slots__ = (
        "call_id",
        "parent_id",
        "function",
        "mode",
        "method",
        "path",
        "query",
        "content_type",
        "headers",
        "raw_body",
        "deadline_ms",
        "trigger",
        "_body",
        "_fields",
        "_arrival_s",
        "_timestamp",
        "_id",
    )

    # nuclio attributes that an HTTP-only runtime never varies.
    version = 1
    type = ""
    type_version = ""
    shard_id = 0
    num_shards = 0
    offset = 0
    last_in_batch = False

    def __init__(
        self,
        body: Any = b"",
        *,
        content_type: str = "",
        headers: Mapping[str, str] | Iterable[Any] | None = None,
        fields: Mapping[str, str] | None = None,
        id: str = "",
        method: str = "POST",
        path: str = "/",
        query: str = "",
        deadline_ms: int = 0,
        parent_id: str | None = None,
        mode: str = "http",
        function: str = "",
        trigger: Trigger = HTTP_TRIGGER,
        timestamp: datetime | None = None,
    ) -> None:
        """Build an event by hand (tests, local tools); the runtime uses :meth:`from_invoke`."""
        parsed: Any = _UNPARSED
        if isinstance(body, (bytes, bytearray, memoryview)):
            raw = bytes(body)
        elif isinstance(body, str):
            raw, parsed = body.encode("utf-8"), body
        elif isinstance(body, (dict, list)):
            raw, parsed = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), body
            content_type = content_type or "application/json"
        elif body is None:
            raw = b""
        else:
            raw, parsed = str(body).encode("utf-8"), body
        if headers is None:
            hdrs = Headers()
        elif isinstance(headers, Mapping):
            hdrs = Headers.from_pairs(None, headers)
        else:
            hdrs = Headers.from_pairs(list(headers))
        self._fill(id, parent_id, function, mode, method, path, query, hdrs, content_type, raw, deadline_ms, trigger)
        if not id:
            import uuid

            id = str(uuid.uuid4())
        self._id = id  # a hand-made event keeps the id it was given
        self._body = parsed
        self._fields = dict(fields) if fields is not None else None
        self._timestamp = timestamp

    @classmethod
    def from_invoke(
        cls,
        header: Mapping[str, Any],
        body: bytes,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Event:
        """The event for one INVOKE: its header dict and body; ``extra_headers`` win over sent ones.

        Neither ``header`` nor ``extra_headers`` is modified. Body decoding, query
        parsing and the timestamp are deferred until a handler asks for them.
        """
        try:
            call_id = header["call_id"]
        except KeyError:
            raise ProtocolError(
                "INVOKE header has no 'call_id'; the gateway must send one with every INVOKE"
            ) from None
        get = header.get
        try:
            headers = Headers.from_pairs(get("headers"), extra_headers)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(
                f"INVOKE 'headers' must be a list of [name, value] string pairs ({exc}); fix the sender"
            ) from None
        return cls._make(call_id, get("parent_id"), get("function", ""), get("mode", "http"), get("method", "POST"),
                         get("path") or "/", get("query") or "", headers, get("content_type") or "", body,
                         get("deadline_ms") or 0)

    @classmethod
    def for_call(cls, call_id: str, parent_id: str | None, function: str, method: str, path: str, query: str,
                 headers: Iterable[Any] | None, content_type: str, body: bytes, deadline_ms: int) -> Event:
        """The event of a task call served in this process: what :meth:`from_invoke` makes of its INVOKE."""
        return cls._make(call_id, parent_id, function, "http", method, path, query, Headers.from_pairs(headers),
                         content_type, body, deadline_ms)

    @classmethod
    def _make(cls, call_id: str, parent_id: str | None, function: str, mode: str, method: str, path: str,
              query: str, headers: Headers, content_type: str, body: bytes, deadline_ms: int) -> Event:
        # __init__ normalises hand-made input; these fields are already in shape
        self = cls.__new__(cls)
        self._fill(call_id, parent_id, function, mode, method, path, query, headers, content_type,
                   body if type(body) is bytes else bytes(body or b""), deadline_ms, HTTP_TRIGGER)
        return self

    def _fill(self, call_id: str, parent_id: str | None, function: str, mode: str, method: str, path: str,
              query: str, headers: Headers, content_type: str, raw_body: bytes, deadline_ms: int,
              trigger: Trigger) -> None:
        """Every field, from values in shape; the body unparsed, no extra fields, the id and timestamp on demand."""
        self.call_id = call_id
        self._id = None
        self.parent_id = parent_id
        self.function = function
        self.mode = mode
        self.method = method
        self.path = path
        self.query = query
        self.deadline_ms = deadline_ms
        self.headers = headers
        self.content_type = content_type or headers.get("content-type", "")
        self.raw_body = raw_body
        self.trigger = trigger
        self._body = _UNPARSED
        self._fields = None
        self._arrival_s = time.time()
        self._timestamp = None

    @property
    def body(self) -> Any:
        """The body: a dict/list when it is JSON (by content type) and parses, else the raw bytes."""
        body = self._body
        if body is _UNPARSED:
            body = self._body = self._decode_body()
        return body

    @body.setter
    def body(self, value: Any) -> None:
        self._body = value

    def _decode_body(self) -> Any:
        raw = self.raw_body
        if raw and is_json_content_type(self.content_type):
            try:
                parsed = json.loads(raw)
            except ValueError:  # also covers UnicodeDecodeError
                return raw
            # A JSON scalar stays bytes: handlers index event.body as a mapping or list.
            if isinstance(parsed, (dict, list)):
                return parsed
        return raw

    @property
    def fields(self) -> dict[str, str]:
        """Query parameters, name -> value; the last of a repeated name wins."""
        fields = self._fields
        if fields is None:
            query = self.query
            fields = self._fields = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
        return fields

    @fields.setter
    def fields(self, value: Mapping[str, str]) -> None:
        self._fields = dict(value)

    @property
    def id(self) -> str:
        """The event's UUID (nuclio's event.id), named by the call id: an async call's retries share it.

        Made on first use (uuid5 costs about 2 us, which a call that never reads it does not pay);
        ``call_id`` is nuclide's own id of the call, the ``X-Call-Id`` the caller sees."""
        event_id = self._id
        if event_id is None:
            event_id = self._id = event_uuid(self.call_id)
        return event_id

    @id.setter
    def id(self, value: str) -> None:
        self._id = value

    @property
    def timestamp(self) -> datetime:
        """When the runtime received the event: a naive UTC datetime, as nuclio's SDK gives it."""
        ts = self._timestamp
        if ts is None:
            ts = self._timestamp = datetime.fromtimestamp(self._arrival_s, timezone.utc).replace(tzinfo=None)
        return ts

    @timestamp.setter
    def timestamp(self, value: datetime) -> None:
        self._timestamp = value

    @property
    def url(self) -> str:
        """The request target: path plus ``?query`` when there is one (nuclio's event.url)."""
        query = self.query
        return f"{self.path}?{query}" if query else self.path

    @property
    def size(self) -> int:
        """Length of the raw body in bytes."""
        return len(self.raw_body)

    def get_header(self, name: str, default: Any = None) -> Any:
        """The header's value, matching the name case-insensitively, or ``default``."""
        return self.headers.get(name, default)

    def get_field(self, name: str, default: Any = None) -> Any:
        """The query parameter's value, or ``default``."""
        return self.fields.get(name, default)

    def __repr__(self) -> str:
        return (
            f"Event(call_id={self.call_id!r}, method={self.method!r}, path={self.path!r}, "
            f"content_type={self.content_type!r}, body_bytes={len(self.raw_body)})"
        )
