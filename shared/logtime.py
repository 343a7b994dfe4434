"""Times in log lines: the one timestamp format every nuclide log line carries, and the ``since`` a reader gives.

Every line a service or a function writes is a JSON object whose ``ts`` is UTC in RFC 3339 with
milliseconds (``2026-12-05T23:56:08.123Z``, see ``shared/logs.py`` and ``runtime/context.py``).
A reader asks for lines since a duration ago (``30s``, ``5m``, ``1h30m``, Go's and ``docker logs``'
spelling) or since an RFC 3339 time.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime

from shared.errors import InvalidRequest

__all__ = ["utc_iso", "utc_iso_now", "parse_since", "line_time", "SINCE_FORMS"]

SINCE_FORMS = "a duration like 30s, 5m, 1h30m or 2d, or an RFC 3339 time like 2026-01-02T15:04:05Z"

_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
# RFC 3339 section 5.6: a full date, "T" (or a space, which the RFC allows), a time, and an offset
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})")


def utc_iso(epoch_s: float) -> str:
    """``epoch_s`` as the log timestamp: UTC, RFC 3339, milliseconds, ``Z``."""
    ms = round(epoch_s * 1000)
    secs, millis = divmod(ms, 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(secs))}.{millis:03d}Z"


def utc_iso_now() -> str:
    return utc_iso(time.time())


def parse_since(text: str, now_s: float | None = None, param: str = "since") -> float:
    """The epoch seconds ``text`` names: a duration back from now, or an RFC 3339 time.

    Raises InvalidRequest naming ``param`` and the accepted forms for anything else.
    """
    value = text.strip()
    if _DURATION.fullmatch(value):
        total_s = sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(value))
        return (time.time() if now_s is None else now_s) - total_s
    if _RFC3339.fullmatch(value):
        try:
            return datetime.fromisoformat(value.replace("z", "Z").replace("t", "T")).timestamp()
        except ValueError:  # e.g. month 13: the shape matched, the date does not exist
            pass
    raise InvalidRequest(f"{param}: {text[:64]!r} is not {SINCE_FORMS}")


def line_time(line: str | bytes) -> float | None:
    """The epoch seconds of a JSON log line's ``ts``; None for a line without one (a print, a traceback)."""
    if not line or line[:1] not in ("{", b"{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    stamp = record.get("ts") if isinstance(record, dict) else None
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
