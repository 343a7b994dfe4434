"""Log lines: the one JSON layout, ``since`` parsing, and the deployer's tail and follow reads of log files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.deployer import logread
from services.runtime.context import Logger
from shared.errors import InvalidRequest
from shared.logtime import line_time, parse_since, utc_iso
from tests.stack import ROOT

NOW = 1_800_000_000.0


@pytest.mark.parametrize("text, ago_s", [("30s", 30), ("5m", 300), ("1h30m", 5400), ("2d", 172800),
                                         ("250ms", 0.25), ("1.5h", 5400), ("0s", 0)])
def test_since_durations(text: str, ago_s: float) -> None:
    assert parse_since(text, now_s=NOW) == pytest.approx(NOW - ago_s)


@pytest.mark.parametrize("text, epoch_s", [
    ("2026-01-02T15:04:05Z", 1767366245.0), ("2026-01-02T15:04:05.250Z", 1767366245.25),
    ("2026-01-02T17:04:05+02:00", 1767366245.0), ("2026-01-02 15:04:05z", 1767366245.0),
])
def test_since_rfc3339_times(text: str, epoch_s: float) -> None:
    assert parse_since(text) == epoch_s


@pytest.mark.parametrize("text", ["", "5", "m", "-5m", "5 m", "5min", "yesterday", "2026-01-02", "2026-01-02T15:04:05",
                                  "2026-13-02T15:04:05Z", "2026-02-30T00:00:00Z", "1e3s"])
def test_since_refuses_anything_else_naming_the_forms(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_since(text)
    assert info.value.message.startswith("since: ") and "5m" in info.value.message and "RFC 3339" in info.value.message


def test_a_function_line_and_a_service_line_share_one_layout() -> None:
    out = io.StringIO()
    before = time.time()
    Logger("fn", stream=out).info("hello", extra=1)
    fn_line = json.loads(out.getvalue())
    code = ("from shared.logs import configure, get_logger; configure('gateway', fmt='json');"
            " get_logger('x').info('hello', extra=1)")
    svc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    svc_line = json.loads(svc.stderr.strip().splitlines()[-1])
    assert list(fn_line)[:3] == list(svc_line)[:3] == ["ts", "level", "msg"]
    assert (fn_line["msg"], svc_line["msg"], svc_line["service"], svc_line["extra"]) == ("hello", "hello", "gateway", 1)
    after = time.time()
    for line in (fn_line, svc_line):  # both stamp the wall clock when written (to the millisecond)
        assert before - 0.001 <= line_time(json.dumps(line)) <= after + 0.001, line["ts"]
    assert line_time("plain text") is None and line_time('{"ts": 3}') is None and line_time("{bad") is None


def _line(epoch_s: float, msg: str) -> str:
    return json.dumps({"ts": utc_iso(epoch_s), "level": "info", "msg": msg}) + "\n"


def test_tail_then_follow_from_the_cursor(tmp_path: Path) -> None:
    group = tmp_path / "g-f-v1"
    group.mkdir()
    a = group / "a.log"
    a.write_text(_line(NOW, "one") + "printed one\n" + _line(NOW + 1, "two") + '{"ts": "half a li')
    text, cursor = logread.tail([a], 10)
    assert [json.loads(ln)["msg"] if ln.startswith("{") else ln for ln in text.splitlines()] == \
        ["one", "printed one", "two"], "the line still being written is not shown"
    assert logread.after([a], cursor) == ("", cursor)
    with open(a, "a") as fh:
        fh.write('ne"}\n')
    b = group / "b.log"  # an instance started since: read from its start
    b.write_text("from b\n")
    text, cursor = logread.after([a, b], cursor)
    assert text.splitlines() == ['{"ts": "half a line"}', "from b"]
    assert logread.after([a, b], cursor)[0] == ""
    a.write_text("rewritten\n")  # shorter than its offset: read again from the start
    assert logread.after([a, b], cursor)[0] == "rewritten\n"


def test_since_drops_older_lines_and_their_unstamped_followers(tmp_path: Path) -> None:
    path = tmp_path / "g" / "a.log"
    path.parent.mkdir()
    path.write_text(_line(NOW - 100, "old") + "printed old\n" + _line(NOW, "new") + "printed new\n")
    os.utime(path, (NOW, NOW))  # its last write: a file untouched since `since` is skipped whole
    text, _ = logread.tail([path], 10, since_s=NOW - 10)
    assert "old" not in text and "printed new" in text
    text, _ = logread.after([path], {}, since_s=NOW - 10)
    assert "old" not in text and "printed new" in text
    assert logread.tail([path], 1)[0] == "printed new\n"


def test_a_cursor_cannot_name_other_files(tmp_path: Path) -> None:
    path = tmp_path / "g" / "a.log"
    path.parent.mkdir()
    path.write_text("mine\n")
    text, cursor = logread.after([path], {"../../etc/passwd": 0, "g/a.log": 0})
    assert text == "mine\n" and cursor == {"g/a.log": 5}
