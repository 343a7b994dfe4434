"""Units in a spec: durations ("500ms", "2m", "1h30m") to seconds, memory quantities ("128Mi", "1Gi") to bytes."""

from __future__ import annotations

import math
import re
from typing import Any

from shared.errors import InvalidRequest

MiB = 1024 * 1024

_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_QUANTITY_RE = re.compile(r"(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?")
_DURATION_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_QUANTITY_FACTOR = {None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY_FACTOR.update({s: 1024 ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))})


def parse_duration_s(value: Any, field: str) -> float:
    """Seconds from a number or a Go-style duration ("500ms", "30s", "2m", "1h30m"); must be >= 0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART_RE.findall(text)
            if not parts or "".join(num + unit for num, unit in parts) != text:
                raise InvalidRequest(
                    f"{field} {value!r} is not a duration; use seconds (30) or a string like '500ms', '30s', '2m'"
                ) from None
            seconds = sum(float(num) * _DURATION_UNIT_S[unit] for num, unit in parts)
    else:
        raise InvalidRequest(f"{field} must be a number of seconds or a duration like '30s', got {value!r:.60}")
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidRequest(f"{field} must be a finite, non-negative duration, got {value!r}")
    return seconds


def parse_memory_bytes(value: Any, field: str) -> int:
    """Bytes from an int or a Kubernetes quantity ("128Mi", "1Gi", "512M"); must be > 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        n_bytes = value
    else:
        match = _QUANTITY_RE.fullmatch(value.strip()) if isinstance(value, str) else None
        if match is None:
            raise InvalidRequest(f"{field} {value!r:.60} is not a memory size; use bytes or e.g. '128Mi', '1Gi', '512M'")
        n_bytes = int(float(match.group(1)) * _QUANTITY_FACTOR[match.group(2)])
    if n_bytes <= 0:
        raise InvalidRequest(f"{field} must be a positive memory size, got {value!r}")
    return n_bytes
