"""One call of a Python function in a process of its own: the shell runner's entry point for warmStart none/runtime.

``python -m services.runtime.once`` loads the function exactly as an instance does
(:func:`services.runtime.executor.load_or_report`: env, handler, ``init_context``), runs one call
through :class:`services.runtime.executor.Executor` (the same events, timeouts, memory and error
mapping, task calls) and exits. ``--check`` only loads it: exit 0, or 3 with the reason on stderr.

The instance config (as ``services.runtime`` gets it, one function) is in the environment
(:data:`CONFIG_ENV`). The runner and this process speak over stdin and stdout, one msgpack
array each way::

    stdin    [header, body]    header: the INVOKE header (msgpack map), body: bin
    stdout   [result, body]    result: the RESULT header (call_id, status, headers,
                               content_type, took_ms, error, edges, failed_calls), body: bin

Nothing else reaches stdout: the handler's ``print`` and its subprocesses write to file
descriptor 1, which is stderr here (the runner copies stderr to the instance log); the result
goes to a private duplicate of the original stdout. A process that dies (killed at its memory
limit, ``os._exit``) leaves an incomplete or empty stdout, which :func:`decode_result` refuses.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import msgpack

CONFIG_ENV = "NUCLIDE_INSTANCE_CONFIG_JSON"
ARGV = ["python3", "-m", "services.runtime.once"]
CHECK_ARG = "--check"
EXIT_BAD_INPUT = 2


def _pack(head: dict[str, Any], body: bytes) -> bytes:
    return msgpack.packb([head, bytes(body)], use_bin_type=True)


def _unpack(data: bytes, what: str) -> tuple[dict[str, Any], bytes]:
    """Exactly one ``[map, bin]``; anything else (empty, cut short, trailing bytes) is a ValueError."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types, ExtraData for trailing bytes
        raise ValueError(f"{what} is not one msgpack [map, bin] ({type(exc).__name__}: {exc})"[:300]) from None
    if (not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], dict)
            or not isinstance(value[1], bytes)):
        raise ValueError(f"{what} must be a msgpack [map, bin]")
    return value[0], value[1]


def encode_invoke(header: dict[str, Any], body: bytes) -> bytes:
    return _pack(header, body)


def decode_invoke(data: bytes) -> tuple[dict[str, Any], bytes]:
    return _unpack(data, "the invoke")


def encode_result(result: dict[str, Any], body: bytes) -> bytes:
    return _pack(result, body)


def decode_result(data: bytes) -> tuple[dict[str, Any], bytes]:
    return _unpack(data, "the result")


def run(argv: list[str], stdin: Any, result_out: Any) -> int:
    from services.runtime.executor import EXIT_INIT_FAILED, Executor, _on_alarm, load_or_report

    config = json.loads(os.environ[CONFIG_ENV])
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
    signal.signal(signal.SIGALRM, _on_alarm)
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
