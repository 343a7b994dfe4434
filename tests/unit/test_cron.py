"""Cron triggers: schedules as nuclio (robfig/cron) and Debian cron write them, time zones, nuclio's event shape."""

from __future__ import annotations

import calendar

import pytest

from shared.errors import InvalidRequest
from shared.triggers import parse_cron, validate_triggers

T0 = calendar.timegm((2026, 11, 23, 10, 7, 30))  # a Monday, 10:07:30 UTC


def utc(*parts: int) -> float:
    return float(calendar.timegm((*parts, 0, 0, 0)[:6]))


@pytest.mark.parametrize("expr,expected", [
    ("*/5 * * * *", utc(2026, 11, 23, 10, 10)),
    ("0 12 * * *", utc(2026, 11, 23, 12)),
    ("@hourly", utc(2026, 11, 23, 11)),
    ("@daily", utc(2026, 11, 24)),
    ("*/10 * * * * *", utc(2026, 11, 23, 10, 7, 40)),  # 6 fields: seconds first, as nuclio's cron trigger
    ("0 0 1 1 *", utc(2027, 1, 1)),
    ("0 9 * * 1", utc(2026, 11, 30, 9)),
    ("0 9 * * 7", utc(2026, 11, 29, 9)),  # a lone 7 is Sunday
    ("0 9 * * SUN", utc(2026, 11, 29, 9)),
    ("0 9 * * mon-fri", utc(2026, 11, 24, 9)),
    ("0 9 1 JAN ?", utc(2027, 1, 1, 9)),  # ? is "no specific value" (Quartz, robfig)
    ("0 0 9 ? * *", utc(2026, 11, 24, 9)),
    ("0 0 L * *", utc(2026, 11, 30)),  # the month's last day
    ("CRON_TZ=Asia/Tokyo 0 9 * * *", utc(2026, 11, 24, 0)),  # 09:00 in Tokyo
])
def test_schedules(expr: str, expected: float) -> None:
    assert parse_cron(expr).next_after(T0) == expected


def test_time_zones() -> None:
    assert parse_cron("0 9 * * *", tz="Europe/Berlin").next_after(T0) == utc(2026, 11, 24, 8)  # CET = UTC+1
    assert parse_cron("0 9 * * *", tz="UTC").next_after(T0) == utc(2026, 11, 24, 9)
    assert parse_cron("@every 15s", tz="Asia/Tokyo").next_after(T0) == T0 + 15
    # across the spring-forward gap: 02:30 does not exist in Berlin on 2027-03-28
    assert parse_cron("30 2 * * *", tz="Europe/Berlin").next_after(utc(2027, 3, 27, 12)) == utc(2027, 3, 28, 1)


@pytest.mark.parametrize("expr,tz,needle", [
    ("61 * * * *", None, "its minute field is out of range"),
    ("0 9 * * Funday", None, "its day-of-week field"),
    ("every day", None, "5 fields"),
    ("* * * * * * * *", None, "5 fields"),
    ("0 9 * * *", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ("CRON_TZ=Nowhere 0 9 * * *", None, "unknown time zone 'Nowhere'"),
    ("", None, "cron expression"),
    ("@every soon", None, "duration"),
])
def test_bad_schedules_say_what_and_how(expr: str, tz: str | None, needle: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_cron(expr, "spec.triggers.t.attributes.schedule", tz=tz)
    assert needle in info.value.message and "spec.triggers.t" in info.value.message, info.value.message


def trigger(**attributes: object) -> dict:
    [out] = validate_triggers(({"name": "t", "kind": "cron", "attributes": attributes},))
    return out


def test_nuclio_event_shape_and_the_old_body() -> None:
    got = trigger(schedule="*/1 * * * * ?", timezone="Europe/Berlin",
                  event={"body": "hello", "headers": {"X-Source": "cron", "X-Count": 3}})
    assert got["body"] == b"hello" and got["content_type"] == "" and got["timezone"] == "Europe/Berlin"
    assert got["headers"] == [["X-Source", "cron"], ["X-Count", "3"]]
    got = trigger(interval="30s", event={"body": {"a": 1}})
    assert (got["body"], got["content_type"]) == (b'{"a": 1}', "application/json")
    assert trigger(interval="30s", body="legacy")["body"] == b"legacy"
    assert trigger(interval="30s")["body"] == b"" and trigger(interval="30s")["timezone"] == "UTC"


@pytest.mark.parametrize("attributes,needle", [
    ({"interval": "30s", "event": "hello"}, "attributes.event must be a mapping"),
    ({"interval": "30s", "event": {"headers": ["a"]}}, "attributes.event.headers must be a mapping"),
    ({"schedule": "0 9 * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
    ({"schedule": "0 9 * * *", "timezone": 5}, "time zone"),
])
def test_bad_cron_attributes(attributes: dict, needle: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        trigger(**attributes)
    assert needle in info.value.message and "spec.triggers.t" in info.value.message, info.value.message
