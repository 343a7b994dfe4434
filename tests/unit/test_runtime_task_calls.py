"""Task calls served in-process by a fused group's executor: real handlers loaded from files, no sockets."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from shared.instanceconfig import InstanceConfig
from services.runtime.loop import Executor, load_functions, on_alarm

CHAIN = {
    "t1": "def handler(context, event):\n    return context.call('t2', event.body)\n",
    "t2": "def handler(context, event):\n    return context.call('t3', event.body)\n",
    "t3": ("def handler(context, event):\n"
           "    return {'seen': event.body.decode(), 'id': event.call_id, 'parent': event.parent_id,"
           " 'path': event.path, 'fn': context.function_name}\n"),
}


def executor(tmp_path: Path, sources: dict[str, str], env: dict[str, dict[str, str]] | None = None,
             timeout_s: float = 30.0) -> Executor:
    functions = []
    for name, source in sources.items():
        code = tmp_path / name
        code.mkdir()
        (code / "main.py").write_text(source)
        functions.append({"name": name, "version": 1, "code_dir": str(code), "handler": "main:handler",
                          "env": (env or {}).get(name, {}), "timeout_s": timeout_s})
    config = InstanceConfig("i1", "g", 1, ("tcp://127.0.0.1:9",), tuple(functions))
    return Executor(config, load_functions(config))


def invoke(ex: Executor, name: str, body: bytes = b"", call_id: str = "c1") -> tuple[dict[str, Any], bytes]:
    header = {"call_id": call_id, "function": name, "method": "POST", "path": f"/{name}", "query": "",
              "headers": [], "content_type": "text/plain", "deadline_ms": int((time.time() + 30) * 1000),
              "mode": "http"}
    return ex.execute(header, body, ex.loop)


def test_a_chain_runs_in_process_with_events_and_edges(tmp_path: Path) -> None:
    ex = executor(tmp_path, CHAIN)
    try:
        result, out = invoke(ex, "t1", b"hello")
        assert result["status"] == 200, out
        doc = json.loads(out)
        assert doc["seen"] == "hello" and doc["fn"] == "t3" and doc["path"] == "/"
        # each callee gets its own call id under its caller's
        assert doc["parent"].startswith("c1.") and doc["id"].startswith(doc["parent"] + ".")
        assert "edges" not in result  # the instance reports them summed, not per call
        invoke(ex, "t1", b"again", call_id="c2")
        edges = ex.caller.take_reports()["edges"]
        # [caller, callee, sync, local, mean ms, calls], summed over both calls
        assert [e[:4] + e[5:] for e in edges] == [["t2", "t3", True, True, 2], ["t1", "t2", True, True, 2]]
        assert all(e[4] >= 0 for e in edges)
        assert ex.caller.take_reports() == {} and not ex.caller.edges_pending
        # the caller's context is its own again once the nested call returned
        assert ex.functions["t1"].context.call_id == "c2"
    finally:
        ex.close()


def test_a_cycle_meets_the_depth_limit(tmp_path: Path) -> None:
    ex = executor(tmp_path, {"loop": "def handler(context, event):\n    return context.call('loop', b'')\n",
                             "other": "def handler(context, event):\n    return 'x'\n"})
    try:
        result, out = invoke(ex, "loop")
        assert result["status"] == 508
        assert "call depth limit of 16 exceeded" in json.loads(out)["error"]["message"]
    finally:
        ex.close()


def test_a_failing_callee_is_a_task_call_failure_of_the_caller(tmp_path: Path) -> None:
    ex = executor(tmp_path, {"a": "def handler(context, event):\n    return context.call('b', b'')\n",
                             "b": "def handler(context, event):\n    raise ValueError('bad input')\n"})
    try:
        result, out = invoke(ex, "a")
        assert result["status"] == 500
        error = json.loads(out)["error"]
        assert error["code"] == "task_call_failed" and error["message"] == "call to 'b' failed: bad input"
    finally:
        ex.close()


def test_each_task_of_a_fused_group_sees_its_own_env(tmp_path: Path) -> None:
    src = "import os\ndef handler(context, event):\n    mine = os.environ.get('WHO')\n"
    ex = executor(tmp_path, {
        "a": src + "    inner = context.call('b', b'')\n    return {'a': mine, 'b': inner, 'after': os.environ.get('WHO')}\n",
        "b": src + "    return mine\n",
    }, env={"a": {"WHO": "task-a"}, "b": {"WHO": "task-b"}})
    try:
        result, out = invoke(ex, "a")
        assert result["status"] == 200, out
        assert json.loads(out) == {"a": "task-a", "b": "task-b", "after": "task-a"}
    finally:
        ex.close()


def test_an_async_handler_calls_sync_and_async_tasks(tmp_path: Path) -> None:
    ex = executor(tmp_path, {
        "a": "async def handler(context, event):\n    return [context.call('b', b'1'), context.call('c', b'2')]\n",
        "b": "def handler(context, event):\n    return 'sync ' + event.body.decode()\n",
        "c": "async def handler(context, event):\n    return 'async ' + event.body.decode()\n",
    })
    try:
        result, out = invoke(ex, "a")
        assert result["status"] == 200, out
        assert json.loads(out) == ["sync 1", "async 2"]
    finally:
        ex.close()


@pytest.mark.parametrize("value, expected", [
    ("text", "text"), (b"\x00raw", "AHJhdw=="), ({"k": [1, 2]}, {"k": [1, 2]}), (None, ""), ((201, [1]), [1]),
    # str and bytes skip the mapping in-process: non-ASCII text and lone surrogates still take it
    ("h\u00e9llo \u2713", "h\u00e9llo \u2713"), ("a\udc80", "a?"), (bytearray(b"ab"), "YWI="), ("", ""),
])
def test_the_caller_gets_what_an_http_caller_would(tmp_path: Path, value: Any, expected: Any) -> None:
    ex = executor(tmp_path, {
        "a": ("import base64\ndef handler(context, event):\n    got = context.call('b', b'')\n"
              "    return {'v': base64.b64encode(got).decode() if isinstance(got, bytes) else got}\n"),
        "b": f"def handler(context, event):\n    return {value!r}\n",
    })
    try:
        result, out = invoke(ex, "a")
        assert result["status"] == 200, out
        assert json.loads(out) == {"v": expected}
    finally:
        ex.close()


def test_a_nested_call_past_the_outer_timeout_answers_for_the_outer_task(tmp_path: Path) -> None:
    previous = signal.signal(signal.SIGALRM, on_alarm)  # what the instance loop installs
    ex = executor(tmp_path, {
        "outer": "def handler(context, event):\n    return context.call('slow', b'')\n",
        "slow": "import os, time\ndef handler(context, event):\n    time.sleep(5)\n"
                "    open(os.path.join(os.path.dirname(__file__), 'done'), 'w').close()\n    return 'late'\n",
    }, timeout_s=0.3)
    try:
        result, out = invoke(ex, "outer")
        # the outer task answered at its timeout, before the nested call finished (and wrote its marker)
        assert not (tmp_path / "slow" / "done").exists()
        assert result["status"] == 504
        assert json.loads(out)["error"]["message"] == \
            "function 'outer' did not finish within its 0.3 s timeout (spec.timeout)"
    finally:
        ex.close()
        signal.signal(signal.SIGALRM, previous)


def test_a_reentered_task_gets_its_context_back(tmp_path: Path) -> None:
    ex = executor(tmp_path, {
        "r": ("def handler(context, event):\n"
              "    if event.body == b'inner':\n        return context.call_id\n"
              "    before = context.call_id\n    inner = context.call('r', b'inner')\n"
              "    return [before, inner, context.call_id]\n"),
        "other": "def handler(context, event):\n    return 'x'\n",
    })
    try:
        result, out = invoke(ex, "r", b"outer")
        before, inner, after = json.loads(out)
        assert before == after == "c1" and inner.startswith("c1.")
    finally:
        ex.close()
