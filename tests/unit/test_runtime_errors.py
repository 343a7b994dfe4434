"""Failed calls in the runtime: the error a RESULT reports, nested failures it reports, the tracebacks it logs."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from services.runtime.context import Logger
from services.runtime.executor import load_or_report
from shared.failures import ERROR_MAX_BYTES
from shared.instanceconfig import InstanceConfig
from tests.unit.test_runtime_task_calls import executor, invoke

NUCLIDE_DIRS = ("/services/", "/shared/")


def logged(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The JSON lines the functions' loggers wrote to stderr."""
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]


def frames(tb: str) -> list[str]:
    return re.findall(r'File "([^"]+)"', tb)


def test_a_raising_handler_reports_its_error_and_a_successful_one_none(tmp_path: Path) -> None:
    ex = executor(tmp_path, {"boom": "def handler(context, event):\n    raise ValueError('kaboom')\n",
                             "fine": "def handler(context, event):\n    return 'ok'\n"})
    try:
        result, out = invoke(ex, "boom")
        assert (result["status"], out, result["error"]) == (500, b"kaboom", "ValueError: kaboom")
        result, out = invoke(ex, "fine")
        assert result["status"] == 200 and "error" not in result
    finally:
        ex.close()


def test_the_reported_error_is_bounded(tmp_path: Path) -> None:
    ex = executor(tmp_path, {"big": "def handler(context, event):\n    raise ValueError('\u00e9' * 100_000)\n"})
    try:
        result, out = invoke(ex, "big")
        assert result["status"] == 500 and len(out) == 200_000  # the caller still gets the whole message
        assert result["error"].startswith("ValueError: \u00e9\u00e9") and result["error"].endswith("...")
        assert len(result["error"].encode()) <= ERROR_MAX_BYTES
    finally:
        ex.close()


def test_errors_the_runtime_answers_itself_are_reported(tmp_path: Path) -> None:
    ex = executor(tmp_path, {"a": "def handler(context, event):\n    return context.call('b', b'')\n",
                             "b": "def handler(context, event):\n    raise KeyError('k')\n"})
    try:
        assert invoke(ex, "a")[0]["error"] == "call to 'b' failed: 'k'"
        result, _ = ex.execute({"call_id": "c9", "function": "nope"}, b"")
        assert result["status"] == 404 and "error" not in result  # not a failed call: a 4xx is the caller's
    finally:
        ex.close()


def test_a_failing_in_process_call_is_reported_with_its_parent(tmp_path: Path) -> None:
    ex = executor(tmp_path, {
        "a": ("def handler(context, event):\n    try:\n        context.call('b', b'')\n"
              "    except Exception as exc:\n        return 'caught: ' + str(exc)\n"),
        "b": "def handler(context, event):\n    raise ValueError('kaboom')\n",
    })
    try:
        result, out = invoke(ex, "a", call_id="c1")
        assert (result["status"], out) == (200, b"caught: kaboom")
        reports = ex.caller.take_reports()
        (row,) = reports["failed_calls"]
        call_id, parent_id, function, status, error, queued_at, finished_at, trace_id = row
        assert trace_id is None, "an INVOKE without a trace has none"
        assert call_id.startswith("c1.") and (parent_id, function, status, error) == ("c1", "b", 500, "ValueError: kaboom")
        assert 0 < queued_at <= finished_at
        assert [e[:2] for e in reports["edges"]] == [["a", "b"]], "a failure travels with its edge"
        assert ex.caller.take_reports() == {}
    finally:
        ex.close()


def test_a_callees_own_5xx_is_reported_with_its_body_and_successes_are_not(tmp_path: Path) -> None:
    ex = executor(tmp_path, {"a": "def handler(context, event):\n    return context.call('b', event.body)\n",
                             "b": "def handler(context, event):\n    return (503, 'busy') if event.body == b'no' else 'ok'\n"})
    try:
        assert invoke(ex, "a", b"no")[0]["status"] == 500
        (row,) = ex.caller.take_reports()["failed_calls"]
        assert row[2:5] == ["b", 503, "busy"], "a handler's own 5xx is described by its body"
        assert invoke(ex, "a", b"yes")[0]["status"] == 200
        assert list(ex.caller.take_reports()) == ["edges"]
    finally:
        ex.close()


def test_a_handler_traceback_holds_only_the_users_frames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = ("import json\n\ndef check(body):\n    raise ValueError('kaboom')\n\n"
              "def handler(context, event):\n    try:\n        json.loads('{')\n    except ValueError as exc:\n"
              "        check(event.body)\n")
    ex = executor(tmp_path, {"tb": source})
    try:
        invoke(ex, "tb")
    finally:
        ex.close()
    (line,) = [rec for rec in logged(capsys) if rec["msg"] == "handler raised"]
    tb = line["traceback"]
    assert line["error"] == "ValueError: kaboom" and tb.rstrip().endswith("ValueError: kaboom")
    main = str(tmp_path / "tb" / "main.py")
    # the exception being handled keeps its json frames (not nuclide's); the raised one only the handler's
    assert frames(tb).count(main) == 3 and any("json" in f for f in frames(tb))
    assert not [f for f in frames(tb) if any(d in f for d in NUCLIDE_DIRS)], tb


def test_a_failing_callee_logs_its_own_frames_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ex = executor(tmp_path, {"a": "def handler(context, event):\n    context.call('b', b'')\n    return 1\n",
                             "b": "def handler(context, event):\n    raise ValueError('inner')\n"})
    try:
        invoke(ex, "a")
    finally:
        ex.close()
    lines = logged(capsys)
    (callee,) = [rec for rec in lines if rec["function"] == "b"]
    assert frames(callee["traceback"]) == [str(tmp_path / "b" / "main.py")], callee["traceback"]
    (caller,) = [rec for rec in lines if rec["function"] == "a"]
    assert caller["msg"] == "task call failed" and caller["error"] == "inner"


def test_load_failures_print_only_the_users_frames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = tmp_path / "broken"
    code.mkdir()
    (code / "helper.py").write_text("def setup():\n    raise RuntimeError('fails at import')\n")
    (code / "main.py").write_text("import helper\nhelper.setup()\n\ndef handler(context, event):\n    return 1\n")
    config = InstanceConfig("i1", "g", 1, (), ({"name": "broken", "version": 1, "code_dir": str(code),
                                                "handler": "main:handler"},))
    try:
        assert load_or_report(config) is None
    finally:
        for name in ("main", "helper"):
            sys.modules.pop(name, None)
    err = capsys.readouterr().err
    assert err.startswith("nuclide: function failed to load: importing 'main' failed: RuntimeError: fails at import\n")
    assert frames(err) == [str(code / "main.py"), str(code / "helper.py")], err
    assert err.rstrip().endswith("RuntimeError: fails at import")


def test_logger_exception_leaves_out_nuclides_frames(tmp_path: Path) -> None:
    from services.runtime.context_calls import decode_result

    stream = io.StringIO()
    try:
        decode_result("b", 500, "text/plain", b"inner")  # raised inside nuclide, as context.call does
    except Exception:
        Logger("f", stream).exception("the call failed")
    exc = json.loads(stream.getvalue())["exc"]
    assert frames(exc) == [__file__] and exc.rstrip().endswith("CallFailed: inner")


def test_a_per_call_process_reports_errors_and_logs_user_frames_alike(tmp_path: Path) -> None:
    """services.runtime.once, what Docker's warmStart none/runtime containers run, shares all of the above."""
    import os
    import subprocess
    import time

    from shared.oncewire import ARGV, CONFIG_ENV, decode_result, encode_invoke
    from tests.stack import ROOT

    functions = []
    for name, source in {"a": "def handler(context, event):\n    return context.call('b', b'')\n",
                         "b": "def check():\n    raise ValueError('kaboom')\n\ndef handler(context, event):\n"
                              "    check()\n"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "main.py").write_text(source)
        functions.append({"name": name, "version": 1, "code_dir": str(tmp_path / name), "handler": "main:handler"})
    config = {"instance_id": "i1", "group": "g", "group_version": 1, "gateways": [], "functions": functions}
    header = {"call_id": "c1", "function": "a", "deadline_ms": int((time.time() + 30) * 1000)}
    proc = subprocess.run([sys.executable, *ARGV[1:]], input=encode_invoke(header, b""), capture_output=True,
                          cwd=ROOT, env={**os.environ, CONFIG_ENV: json.dumps(config)}, timeout=60)
    result, out = decode_result(proc.stdout)
    assert (result["status"], result["error"]) == (500, "call to 'b' failed: kaboom")
    (row,) = result["failed_calls"]
    assert row[1:5] == ["c1", "b", 500, "ValueError: kaboom"]
    (line,) = [json.loads(x) for x in proc.stderr.decode().splitlines() if '"handler raised"' in x]
    assert frames(line["traceback"]) == [str(tmp_path / "b" / "main.py")] * 2, line["traceback"]
