"""One call of a Python function in a process of its own: the Docker runner's entry point for warmStart none/runtime.

``python -m services.runtime.once`` loads the function exactly as an instance does
(:func:`services.runtime.executor.load_or_report`: env, handler, ``init_context``), runs one call
through :class:`services.runtime.executor.Executor` (the same events, timeouts, memory and error
mapping, task calls) and exits. ``--check`` only loads it: exit 0, or 3 with the reason on stderr.

The instance config is in the environment and the call comes on stdin, its result goes to
stdout, one msgpack array each way (``shared/oncewire.py`` draws and packs them).

Nothing else reaches stdout: the handler's ``print`` and its subprocesses write to file
descriptor 1, which is stderr here (the runner copies stderr to the instance log); the result
goes to a private duplicate of the original stdout. A process that dies (killed at its memory
limit, ``os._exit``) leaves an incomplete or empty stdout, which ``decode_result`` refuses.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from shared.exits import EXIT_INIT_FAILED
from shared.instanceconfig import InstanceConfig
from shared.oncewire import CHECK_ARG, CONFIG_ENV, decode_invoke, encode_result

EXIT_BAD_INPUT = 2


def run(argv: list[str], stdin: Any, result_out: Any) -> int:
    from services.runtime.executor import Executor, load_or_report, on_alarm

    config = InstanceConfig.from_json(os.environ[CONFIG_ENV])
    check = argv[1:] == [CHECK_ARG]
    data = b"" if check else stdin.read()
    functions = load_or_report(config)
    if functions is None:
        return EXIT_INIT_FAILED
    if check:
        result_out.write(encode_result({"status": 200}, b""))
        return 0
    try:
        header, body = decode_invoke(data)
    except ValueError as exc:
        print(f"nuclide: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    signal.signal(signal.SIGALRM, on_alarm)
    executor = Executor(config, functions)
    try:
        result, out = executor.execute(header, body)
        result.update(executor.caller.take_reports())
    finally:
        executor.close()
    result_out.write(encode_result(result, out))
    return 0


def main(argv: list[str]) -> int:
    result_out = os.fdopen(os.dup(1), "wb")  # not inherited by the handler's subprocesses (os.dup: non-inheritable)
    os.dup2(2, 1)  # fd 1 is stderr from here on: print() and subprocesses go to the log
    try:
        return run(argv, sys.stdin.buffer, result_out)
    finally:
        result_out.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    # threads the handler left running must not keep a finished call's container or exec alive
    os._exit(code)
