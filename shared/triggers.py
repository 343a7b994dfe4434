"""Retry policy and triggers from function.yaml: parsing, validation and cron schedules.

```yaml
spec:
  retry:                     # async calls only; sync callers see the first failure
    maxAttempts: 3           # 1-100, default 3
    backoff: {initial: 1s, max: 60s, multiplier: 2}
    maxEventAge: 6h          # a call not done within this age is DEAD
  triggers:
    tick:  {kind: cron, attributes: {interval: 30s}}           # or schedule: "*/5 * * * *"
    feed:  {kind: topic, attributes: {topic: orders}}
    web:   {kind: http, attributes: {maxRequestBodySize: 8388608}}  # bytes, up to max_body_ceiling_bytes
```

Cron schedules have 5 fields (minute hour day-of-month month day-of-week) or 6
(seconds first), each ``*``, ``n``, ``a-b``, lists and ``/step``; also ``@hourly``,
``@daily``, ``@weekly``, ``@monthly``, ``@every 10s``. Times are UTC.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidRequest

DEFAULT_RETRY = {"max_attempts": 3, "backoff_initial_s": 1.0, "backoff_max_s": 60.0, "backoff_multiplier": 2.0,
                 "max_event_age_s": 6 * 3600.0}
TRIGGER_KINDS = ("http", "cron", "topic")
_DESCRIPTORS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
                "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
_RANGES = [(0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]  # sec min hour dom month dow


def _duration(value: Any, where: str) -> float:
    from shared.spec import parse_duration_s

    return parse_duration_s(value, where)


def parse_retry(value: Any) -> dict[str, float]:
    out = dict(DEFAULT_RETRY)
    if value is None:
        return out
    if not isinstance(value, dict):
        raise InvalidRequest("function.yaml: spec.retry must be a mapping (maxAttempts, backoff, maxEventAge)")
    unknown = set(value) - {"maxAttempts", "backoff", "maxEventAge"}
    if unknown:
        raise InvalidRequest(f"function.yaml: spec.retry.{sorted(unknown)[0]} is not a retry setting;"
                             " use maxAttempts, backoff or maxEventAge")
    if "maxAttempts" in value:
        attempts = value["maxAttempts"]
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
            raise InvalidRequest("function.yaml: spec.retry.maxAttempts must be an integer from 1 to 100")
        out["max_attempts"] = attempts
    backoff = value.get("backoff") or {}
    if not isinstance(backoff, dict):
        raise InvalidRequest("function.yaml: spec.retry.backoff must be a mapping (initial, max, multiplier)")
    for key, field in (("initial", "backoff_initial_s"), ("max", "backoff_max_s")):
        if key in backoff:
            out[field] = _duration(backoff[key], f"spec.retry.backoff.{key}")
    if "multiplier" in backoff:
        mult = backoff["multiplier"]
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 1 <= mult <= 10:
            raise InvalidRequest("function.yaml: spec.retry.backoff.multiplier must be a number from 1 to 10")
        out["backoff_multiplier"] = float(mult)
    if out["backoff_initial_s"] > out["backoff_max_s"]:
        raise InvalidRequest("function.yaml: spec.retry.backoff.initial must not exceed spec.retry.backoff.max")
    if "maxEventAge" in value:
        out["max_event_age_s"] = _duration(value["maxEventAge"], "spec.retry.maxEventAge")
    return out


def backoff_s(retry: dict[str, float], attempt: int) -> float:
    """Delay before attempt number ``attempt + 1`` (attempt >= 1)."""
    return min(retry["backoff_max_s"], retry["backoff_initial_s"] * retry["backoff_multiplier"] ** max(0, attempt - 1))


@dataclass(frozen=True)
class Cron:
    fields: tuple[frozenset[int], ...]  # sec, min, hour, dom, month, dow
    dom_any: bool
    dow_any: bool
    every_s: float | None = None

    def next_after(self, ts: float) -> float:
        """The first matching second strictly after ``ts`` (UTC)."""
        if self.every_s is not None:
            return ts + self.every_s
        t = int(ts) + 1
        limit = t + 366 * 24 * 3600 * 5
        while t < limit:
            tm = time.gmtime(t)
            if tm.tm_mon not in self.fields[4]:
                # jump to the first day of the next month
                year, month = (tm.tm_year + 1, 1) if tm.tm_mon == 12 else (tm.tm_year, tm.tm_mon + 1)
                t = calendar.timegm((year, month, 1, 0, 0, 0))
                continue
            dom_ok = tm.tm_mday in self.fields[3]
            dow_ok = (tm.tm_wday + 1) % 7 in self.fields[5]
            day_ok = (dom_ok and dow_ok) if (self.dom_any or self.dow_any) else (dom_ok or dow_ok)
            if not day_ok:
                t = calendar.timegm((tm.tm_year, tm.tm_mon, tm.tm_mday, 0, 0, 0)) + 86400
                continue
            if tm.tm_hour not in self.fields[2]:
                t = calendar.timegm((tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, 0, 0)) + 3600
                continue
            if tm.tm_min not in self.fields[1]:
                t = calendar.timegm((tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, 0)) + 60
                continue
            if tm.tm_sec not in self.fields[0]:
                t += 1
                continue
            return float(t)
        raise InvalidRequest("cron schedule never matches")


def _field(text: str, low: int, high: int, where: str) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            if not step_text.isdigit() or int(step_text) < 1:
                raise InvalidRequest(f"{where}: step {step_text!r} must be a positive integer")
            step = int(step_text)
        if part in ("*", ""):
            start, end = low, high
        elif "-" in part:
            a, b = part.split("-", 1)
            if not (a.isdigit() and b.isdigit()):
                raise InvalidRequest(f"{where}: {part!r} is not a range like 1-5")
            start, end = int(a), int(b)
        elif part.isdigit():
            start = end = int(part)
            if step > 1:
                end = high
        else:
            raise InvalidRequest(f"{where}: {part!r} is not a number, range, list or *")
        if high == 6 and end == 7:  # Sunday as 7
            end = 6 if start <= 6 else 0
            values.add(0)
        if not (low <= start <= high and low <= end <= high and start <= end):
            raise InvalidRequest(f"{where}: {part!r} is out of range {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


def parse_cron(expr: Any, where: str = "schedule") -> Cron:
    if not isinstance(expr, str) or not expr.strip():
        raise InvalidRequest(f"{where} must be a cron expression like '*/5 * * * *'")
    text = expr.strip()
    if text.startswith("@every"):
        return Cron((), True, True, _duration(text[len("@every"):].strip(), where))
    text = _DESCRIPTORS.get(text, text)
    parts = text.split()
    if len(parts) == 5:
        parts = ["0"] + parts
    if len(parts) != 6:
        raise InvalidRequest(f"{where}: {expr!r} needs 5 fields (minute hour day month weekday) or 6 (seconds first)")
    names = ["seconds", "minutes", "hours", "day of month", "month", "day of week"]
    fields = tuple(_field(p, lo, hi, f"{where} ({name})") for p, (lo, hi), name in zip(parts, _RANGES, names))
    return Cron(fields, parts[3] in ("*", "?"), parts[5] in ("*", "?"))


def max_body_bytes(triggers: list[dict[str, Any]]) -> tuple[int, str] | None:
    """The largest invocation body a function's http triggers ask for, with the trigger's name; None: no ask."""
    asks = [(t["max_body_bytes"], t["name"]) for t in triggers if t["kind"] == "http"]
    return max(asks) if asks else None


def validate_triggers(triggers: tuple[dict, ...], warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """Check cron, topic and http triggers (bad ones fail); other nuclio kinds are ignored with a warning."""
    out: list[dict[str, Any]] = []
    for trig in triggers:
        name = trig.get("name", "?")
        kind = trig.get("kind")
        where = f"function.yaml: spec.triggers.{name}"
        attrs = trig.get("attributes") or {}
        if not isinstance(attrs, dict):
            raise InvalidRequest(f"{where}.attributes must be a mapping")
        if kind not in TRIGGER_KINDS:
            if warnings is not None:
                warnings.append(f"{where}: kind {kind!r} is not supported by nuclide and is ignored"
                                f" (supported: {', '.join(TRIGGER_KINDS)})")
            continue
        if kind == "cron":
            if "interval" in attrs:
                interval = _duration(attrs["interval"], f"spec.triggers.{name}.attributes.interval")
                if interval < 1:
                    raise InvalidRequest(f"{where}.attributes.interval must be at least 1s")
                out.append({"name": name, "kind": "cron", "interval_s": interval, "body": attrs.get("body", "")})
            elif "schedule" in attrs:
                parse_cron(attrs["schedule"], f"{where}.attributes.schedule")
                out.append({"name": name, "kind": "cron", "schedule": attrs["schedule"], "body": attrs.get("body", "")})
            else:
                raise InvalidRequest(f"{where}: a cron trigger needs attributes.interval (e.g. 30s) or"
                                     " attributes.schedule (e.g. '*/5 * * * *')")
        elif kind == "http":
            size = attrs.get("maxRequestBodySize")
            if size is not None:
                if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                    raise InvalidRequest(f"{where}.attributes.maxRequestBodySize must be a positive integer number"
                                         f" of bytes (e.g. 8388608 for 8 MiB), got {size!r}")
                out.append({"name": name, "kind": "http", "max_body_bytes": size})
        elif kind == "topic":
            topic = attrs.get("topic")
            if not isinstance(topic, str) or not topic or len(topic) > 200:
                raise InvalidRequest(f"{where}: a topic trigger needs attributes.topic, a non-empty string")
            out.append({"name": name, "kind": "topic", "topic": topic})
    return out
