"""Retry policy and triggers from function.yaml: parsing, validation and cron schedules.

```yaml
spec:
  retry:                     # async calls only; sync callers see the first failure
    maxAttempts: 3           # 1-100, default 3
    backoff: {initial: 1s, max: 60s, multiplier: 2}
    maxEventAge: 6h          # a call not done within this age is DEAD
  triggers:
    tick:  {kind: cron, attributes: {interval: 30s, event: {body: ping, headers: {X-Source: cron}}}}
    daily: {kind: cron, attributes: {schedule: "0 9 * * MON-FRI", timezone: Europe/Berlin}}
    feed:  {kind: topic, attributes: {topic: orders}}
    web:   {kind: http, attributes: {maxRequestBodySize: 8388608}}  # bytes, up to max_body_ceiling_bytes
```

Cron schedules are parsed by cronsim (see :func:`parse_cron`); their wall clock times are in
``attributes.timezone`` (an IANA name), UTC by default. A cron call's body and headers are nuclio's
``attributes.event.{body,headers}`` (or ``attributes.body``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from shared.errors import InvalidRequest
from shared.units import parse_duration_s

DEFAULT_RETRY = {"max_attempts": 3, "backoff_initial_s": 1.0, "backoff_max_s": 60.0, "backoff_multiplier": 2.0,
                 "max_event_age_s": 6 * 3600.0}
TRIGGER_KINDS = ("http", "cron", "topic")


def _duration(value: Any, where: str) -> float:
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


def max_body_bytes(triggers: list[dict[str, Any]]) -> tuple[int, str] | None:
    """The largest invocation body a function's http triggers ask for, with the trigger's name; None: no ask."""
    asks = [(t["max_body_bytes"], t["name"]) for t in triggers if t["kind"] == "http"]
    return max(asks) if asks else None


# robfig/cron's descriptors (nuclio's cron trigger parses with it); cronsim knows none of them
_DESCRIPTORS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
                "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
_TZ_PREFIXES = ("CRON_TZ=", "TZ=")  # robfig/cron's way to give a schedule its own time zone
DEFAULT_TIMEZONE = "UTC"


def time_zone(name: Any, where: str) -> tzinfo:
    """The IANA time zone ``name`` (e.g. 'Europe/Berlin'), or InvalidRequest saying how to name one."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest(f"{where}: the time zone must be an IANA name like 'Europe/Berlin' or 'UTC',"
                             f" got {name!r:.60}")
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidRequest(f"{where}: unknown time zone {name.strip()!r}; use an IANA name like 'Europe/Berlin',"
                             " 'America/New_York' or 'UTC'") from None


@dataclass(frozen=True)
class Cron:
    """A parsed schedule: a cron expression in a time zone, or a fixed interval (``@every``)."""

    expr: str = ""
    tz: tzinfo | None = None
    every_s: float | None = None

    def next_after(self, ts: float) -> float:
        """The first matching second strictly after ``ts`` (epoch seconds); wall clock times in ``tz``."""
        if self.every_s is not None:
            return ts + self.every_s
        from cronsim import CronSim

        return next(CronSim(self.expr, datetime.fromtimestamp(ts, self.tz))).timestamp()


def parse_cron(expr: Any, where: str = "schedule", tz: str | None = None) -> Cron:
    """A schedule as nuclio's cron trigger takes it, parsed by cronsim (Debian cron's rules):

    5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first); ``*``, numbers,
    ranges, lists, steps, month and day names, 7 or 0 for Sunday, ``L``, ``#`` and ``?`` (no specific
    value, as ``*``); the descriptors ``@hourly`` ... ``@yearly`` and ``@every 10s``; a ``CRON_TZ=Zone``
    prefix. Wall clock times are in ``tz`` (a prefix wins), UTC by default.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise InvalidRequest(f"{where} must be a cron expression like '*/5 * * * *'")
    text = expr.strip()
    if text.startswith(_TZ_PREFIXES):
        prefix, _, text = text.partition(" ")
        tz = prefix.partition("=")[2]
        text = text.strip()
    zone = time_zone(tz or DEFAULT_TIMEZONE, where)
    if text.startswith("@every"):
        return Cron(every_s=_duration(text[len("@every"):].strip(), where))
    text = _DESCRIPTORS.get(text.lower(), text)
    if len(text.split()) not in (5, 6):
        raise InvalidRequest(f"{where}: {expr!r} needs 5 fields (minute hour day-of-month month day-of-week),"
                             " 6 with seconds first, or a descriptor such as @hourly or @every 10s")
    text = " ".join("*" if part == "?" else part for part in text.split())
    from cronsim import CronSim, CronSimError

    try:
        CronSim(text, datetime.now(zone))
    except CronSimError as exc:  # "Bad minute": cronsim names the field
        field = str(exc).removeprefix("Bad ")
        raise InvalidRequest(f"{where}: {expr!r} is not a cron schedule: its {field} field is out of range or"
                             " malformed (minute 0-59, hour 0-23, day-of-month 1-31, month 1-12 or JAN-DEC,"
                             " day-of-week 0-7 or SUN-SAT; 6 fields: seconds 0-59 first)") from None
    return Cron(text, zone)


def _event_attributes(attrs: dict[str, Any], where: str) -> tuple[bytes, str, list[list[str]]]:
    """A cron call's body, content type and headers: nuclio's ``attributes.event.{body,headers}``, or the
    older ``attributes.body``."""
    event = attrs.get("event")
    if event is None:
        event = {"body": attrs.get("body", "")}
    elif not isinstance(event, dict):
        raise InvalidRequest(f"{where}.attributes.event must be a mapping with body and headers")
    headers = event.get("headers") or {}
    if not isinstance(headers, dict):
        raise InvalidRequest(f"{where}.attributes.event.headers must be a mapping of header name -> value")
    body = event.get("body")
    content_type = ""
    if isinstance(body, (dict, list)):
        raw, content_type = json.dumps(body).encode(), "application/json"
    else:
        raw = b"" if body is None else str(body).encode()
    return raw, content_type, [[str(k), str(v)] for k, v in headers.items()]


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
            body, content_type, headers = _event_attributes(attrs, where)
            zone = attrs.get("timezone", DEFAULT_TIMEZONE)
            time_zone(zone, f"{where}.attributes.timezone")
            cron = {"name": name, "kind": "cron", "body": body, "content_type": content_type, "headers": headers,
                    "timezone": zone}
            if "interval" in attrs:
                interval = _duration(attrs["interval"], f"spec.triggers.{name}.attributes.interval")
                if interval < 1:
                    raise InvalidRequest(f"{where}.attributes.interval must be at least 1s")
                out.append({**cron, "interval_s": interval})
            elif "schedule" in attrs:
                parse_cron(attrs["schedule"], f"{where}.attributes.schedule", zone)
                out.append({**cron, "schedule": attrs["schedule"]})
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
