"""Following a function's logs on a real stack: GET /functions/{name}/logs?follow=true&since=..., and `nuclide logs -f`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from typing import Iterator

import pytest

from shared.logtime import line_time, utc_iso
from tests.follow import Follower
from tests.stack import ROOT, Stack, function_yaml, wait_for

pytestmark = pytest.mark.integration

HANDLER = textwrap.dedent("""\
    def handler(context, event):
        marker = event.body.decode()
        context.logger.info("logged " + marker)
        print("printed " + marker, flush=True)
        return marker
    """)


@pytest.fixture(scope="module")
def logger_fn(stack: Stack) -> str:
    stack.deploy("follow-me", {"function.yaml": function_yaml("follow-me"), "main.py": HANDLER})
    return "follow-me"


@pytest.fixture
def follower(stack: Stack) -> Iterator[list[Follower]]:
    opened: list[Follower] = []
    yield opened
    for f in opened:
        f.close()


def followers(stack: Stack) -> float:
    return stack.metrics()["nuclide_log_followers"]


def test_a_follower_sees_a_line_logged_after_it_started(stack: Stack, logger_fn: str,
                                                       follower: list[Follower]) -> None:
    f = Follower(stack, logger_fn, tail="1")
    follower.append(f)
    wait_for(lambda: followers(stack) >= 1, 10, what="the follower to be counted")
    marker = uuid.uuid4().hex
    assert marker not in f.text
    assert stack.invoke(logger_fn, marker).text == marker
    wait_for(lambda: f"logged {marker}" in f.text and f"printed {marker}" in f.text, 15,
             what="the new lines in the stream")
    assert f.status == 200 and not f.ended.is_set(), "the stream stays open after the lines came"
    line = next(ln for ln in f.text.splitlines() if f"logged {marker}" in ln)
    record = json.loads(line)
    assert (record["level"], record["msg"], record["function"]) == ("info", f"logged {marker}", logger_fn)


def test_the_follower_count_returns_to_zero_when_the_client_leaves(stack: Stack, logger_fn: str) -> None:
    wait_for(lambda: followers(stack) == 0, 10, what="no follower left from earlier tests")
    opened = [Follower(stack, logger_fn), Follower(stack, logger_fn, since="1m")]
    wait_for(lambda: followers(stack) == 2, 10, what="both followers counted")
    opened[0].close()
    wait_for(lambda: followers(stack) == 1, 10, what="the gateway to drop the follower that left")
    opened[1].close()
    wait_for(lambda: followers(stack) == 0, 10, what="the gateway to drop the second follower")


def test_since_keeps_the_lines_logged_after_it(stack: Stack, logger_fn: str, follower: list[Follower]) -> None:
    before, after = uuid.uuid4().hex, uuid.uuid4().hex
    stack.invoke(logger_fn, before)

    def stamp_of_before() -> float | None:
        for ln in stack.client.get(f"/functions/{logger_fn}/logs").text.splitlines():
            if f"logged {before}" in ln:
                return line_time(ln)
        return None

    logged_at = wait_for(stamp_of_before, 10, what="the first line")
    stack.invoke(logger_fn, after)
    since = utc_iso(logged_at + 0.001)
    wait_for(lambda: f"printed {after}" in stack.client.get(f"/functions/{logger_fn}/logs").text, 10,
             what="the second call's lines")
    text = stack.client.get(f"/functions/{logger_fn}/logs", params={"since": since}).text
    assert f"logged {after}" in text and f"printed {after}" in text
    # the print has no stamp of its own: it goes with the stamped line before it
    assert before not in text
    assert before in stack.client.get(f"/functions/{logger_fn}/logs", params={"since": "1h"}).text
    # a follow with since starts from the same cut
    f = Follower(stack, logger_fn, since=since)
    follower.append(f)
    wait_for(lambda: f"printed {after}" in f.text, 10, what="the kept lines at the start of the stream")
    assert before not in f.text


@pytest.mark.parametrize("params, named", [
    ({"since": "yesterday"}, "since"), ({"since": "5"}, "since"), ({"since": "2026-01-02"}, "since"),
    ({"since": "2026-13-02T00:00:00Z"}, "since"), ({"follow": "maybe"}, "follow"),
])
def test_bad_values_are_a_400_naming_the_parameter(stack: Stack, logger_fn: str, params: dict[str, str],
                                                   named: str) -> None:
    r = stack.client.get(f"/functions/{logger_fn}/logs", params={"follow": "true", **params})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.startswith(f"{named}: ")
    if named == "since":
        assert "5m" in message and "RFC 3339" in message


def test_a_refused_follow_is_never_counted(stack: Stack, logger_fn: str) -> None:
    wait_for(lambda: followers(stack) == 0, 10, what="no follower left from earlier tests")
    assert stack.client.get(f"/functions/{logger_fn}/logs", params={"follow": "true", "since": "x"}).status_code == 400
    assert stack.client.get("/functions/no-such-fn/logs", params={"follow": "true"}).status_code == 404
    assert followers(stack) == 0


def test_the_stream_ends_when_the_function_is_deleted(stack: Stack, follower: list[Follower]) -> None:
    stack.deploy("follow-gone", {"function.yaml": function_yaml("follow-gone"), "main.py": HANDLER})
    f = Follower(stack, "follow-gone")
    follower.append(f)
    wait_for(lambda: f.status == 200, 10, what="the stream to start")
    assert stack.client.delete("/follow-gone").status_code == 204
    assert f.ended.wait(10) and f.complete, "the stream ended, with its last chunk, with its function"


def test_cli_logs_follow_since(stack: Stack, logger_fn: str) -> None:
    env = {k: v for k, v in stack.env.items() if k != "NUCLIDE_CLI_CONFIG"}
    # a CLI that does not stop at Ctrl-C is sent SIGABRT below: faulthandler then prints where it was stuck
    env.update({"NUCLIDE_URL": stack.url, "NUCLIDE_TOKEN": stack.token, "PYTHONFAULTHANDLER": "1"})
    before = followers(stack)  # streams other tests of this module left may still be counted
    proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "logs", "-f", "--since", "5m", logger_fn],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: followers(stack) > before, 15, what="the CLI to follow")
        marker = uuid.uuid4().hex
        stack.invoke(logger_fn, marker)
        wait_for(lambda: any(f"logged {marker}" in ln for ln in out), 15, what="the line in `nuclide logs -f`")
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(10)
            raise AssertionError(f"`nuclide logs -f` did not stop at SIGINT; where it was:\n{proc.stderr.read()}")
        err = proc.stderr.read()
        assert code == 0 and "Traceback" not in err, err
        wait_for(lambda: followers(stack) <= before, 15, what="the gateway to see the CLI's stream closed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lambda: followers(stack) == 0, 10, what="the gateway to drop the CLI's follower")


def test_cli_logs_bad_since_says_what_is_accepted(stack: Stack, logger_fn: str) -> None:
    env = {k: v for k, v in stack.env.items() if k != "NUCLIDE_CLI_CONFIG"}
    env.update({"NUCLIDE_URL": stack.url, "NUCLIDE_TOKEN": stack.token})
    result = subprocess.run([sys.executable, "-m", "services.cli.main", "logs", "--since", "soon", logger_fn],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "since: 'soon' is not a duration like 30s, 5m" in result.stderr and "Traceback" not in result.stderr
