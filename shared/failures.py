"""Why a call failed, as its record keeps it: the error message alone (never a traceback), bounded in size.

The runtime reports it in a failed call's RESULT (``error``: "ValueError: kaboom"); for a 5xx
the runtime did not describe (a handler's own ``(500, ...)``, a registered runtime's exit) the
message is read from the body the caller got. The gateway records it with the call, sync or async.
"""

from __future__ import annotations

import json
from typing import Any

# a RESULT header carries up to protocol.MAX_BATCH of these, and a report of failed task calls as
# many again: 1 KiB each keeps both well under protocol.MAX_HEADER_BYTES (1 MiB)
ERROR_MAX_BYTES = 1024
_MORE = "..."


def bounded(message: str) -> str:
    """``message`` cut to at most ERROR_MAX_BYTES of UTF-8, with "..." when cut."""
    if len(message) * 4 <= ERROR_MAX_BYTES:  # short enough whatever its characters (the common case)
        return message
    data = message.encode("utf-8", "replace")
    if len(data) <= ERROR_MAX_BYTES:
        return message
    # a character cut in half is dropped, not replaced
    return data[: ERROR_MAX_BYTES - len(_MORE)].decode("utf-8", "ignore") + _MORE


def message_of(content_type: str, body: bytes) -> str:
    """The error message a failed call's body holds: a JSON error's ``message``, else the body as text."""
    if content_type.startswith("application/json"):
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict) and "message" in doc["error"]:
            return str(doc["error"]["message"])
    return body.decode("utf-8", "replace")


def result_error(result: dict[str, Any], body: bytes) -> str:
    """The bounded error of a failed call from its RESULT header and body (the header's ``error`` first)."""
    error = result.get("error")
    if not isinstance(error, str) or not error:
        error = message_of(str(result.get("content_type") or ""), body)
    return bounded(error.strip() or f"HTTP status {result.get('status')}")
