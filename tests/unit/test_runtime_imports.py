"""What a runtime process imports before it knows its function: every module is paid for at each cold start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("asyncio", "zmq", "concurrent.futures", "ssl")


def imported(code: str) -> dict[str, bool]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_a_per_call_process_imports_neither_zeromq_nor_asyncio() -> None:
    # services.runtime.once (a warmStart none/runtime container's process) and the executor it runs
    assert imported("import services.runtime.once, services.runtime.executor") == {m: False for m in HEAVY}


def test_a_warm_instance_imports_zeromq_but_not_asyncio() -> None:
    got = imported("import services.runtime.loop")
    assert got["zmq"] is True
    assert got["asyncio"] is False and got["concurrent.futures"] is False


def test_an_async_handler_gets_its_loop_before_the_first_call(tmp_path: Path) -> None:
    code = tmp_path / "fn"
    code.mkdir()
    (code / "main.py").write_text("async def handler(context, event):\n    return 'async ok'\n")
    config = {"instance_id": "i1", "group": "g", "group_version": 1, "gateways": ["tcp://127.0.0.1:9"],
              "functions": [{"name": "a", "version": 1, "code_dir": str(code), "handler": "main:handler"}]}
    probe = (f"import json, sys, time\nfrom services.runtime.executor import Executor, load_functions\n"
             "from shared.instanceconfig import InstanceConfig\n"
             f"config = InstanceConfig.from_json({json.dumps(json.dumps(config))})\n"
             "functions = load_functions(config)\n"
             "loaded = 'asyncio' in sys.modules\n"
             "ex = Executor(config, functions)\n"
             "header = {'call_id': 'c1', 'function': 'a', 'deadline_ms': int((time.time() + 30) * 1000)}\n"
             "result, out = ex.execute(header, b'')\n"
             "print(json.dumps([loaded, result['status'], out.decode()]))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [True, 200, "async ok"]
