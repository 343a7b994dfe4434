"""What a runner's call did, as the caller sees it: the pure mapping from a command's output to a result.

Unit tested without an engine: the call's input as JSON, the driver script's status line, and
results the way the Python runtime maps handler results (a warm Python instance's 504 word for
word; a one-call Python process's RESULT as it wrote it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shared.errors import error_body
from shared.oncewire import decode_result

STDERR_TAIL_CHARS = 2000


def input_json(body: bytes) -> bytes:
    """The call's input as JSON: the body when it is JSON, else the body as a JSON string (empty: null)."""
    if not body.strip():
        return b"null"
    try:
        json.loads(body)
        return body
    except ValueError:
        return json.dumps(body.decode("utf-8", "replace")).encode()


@dataclass(frozen=True)
class Outcome:
    """What one call's command did, as the driver reported it."""

    exit_code: int | None  # None: no status line (the container died or the driver could not run)
    source: str  # "J": output.json, "S": stdout, "": none
    out: bytes
    stderr: bytes
    timed_out: bool = False


def parse_driver_output(stdout: bytes, stderr: bytes, timed_out: bool = False) -> Outcome:
    """The status line the driver script prints, and what follows it."""
    line, sep, rest = stdout.partition(b"\n")
    parts = line.split()
    if sep and len(parts) == 2 and parts[0].lstrip(b"-").isdigit() and parts[1] in (b"J", b"S"):
        return Outcome(int(parts[0]), parts[1].decode(), rest, stderr, timed_out)
    return Outcome(None, "", stdout, stderr, timed_out)


def error_result(status: int, code: str, message: str, **details: Any) -> tuple[int, str, bytes]:
    """(status, content type, body) of an error the way the gateway words errors."""
    return status, "application/json", error_body(code, message, details)


def stderr_tail(data: bytes) -> str:
    """The end of a command's stderr, as much as an error message carries."""
    return data.decode("utf-8", "replace").strip()[-STDERR_TAIL_CHARS:]


def to_result(function: str, program: str, outcome: Outcome, timeout_s: float,
              memory_bytes: int) -> tuple[int, str, bytes]:
    """(status, content type, body) for an outcome, the way the Python runtime maps handler results."""
    if outcome.timed_out:
        return timed_out_result(function, timeout_s)
    stderr = stderr_tail(outcome.stderr)
    if outcome.exit_code is None:
        return error_result(500, "command_failed", f"function '{function}': the container ended before `{program}` reported"
                      f" a result (killed, perhaps for going over its memory limit of {memory_bytes // (1 << 20)} MiB)"
                      + (f": {stderr}" if stderr else ""), stderr=stderr)
    if outcome.exit_code == 125 and not outcome.source:
        return error_result(500, "runtime_failed", f"function '{function}': {stderr or 'the call could not be prepared'}")
    if outcome.exit_code != 0:
        killed = (f" (killed: it went over its memory limit of {memory_bytes // (1 << 20)} MiB?)"
                  if outcome.exit_code == 137 else "")
        return error_result(500, "command_failed", f"function '{function}': `{program}` exited with code"
                      f" {outcome.exit_code}{killed}" + (f": {stderr}" if stderr else ""),
                      exit_code=outcome.exit_code, stderr=stderr)
    if outcome.source == "J":
        try:
            doc = json.loads(outcome.out)
        except ValueError as exc:
            return error_result(500, "bad_output", f"function '{function}': output.json is not JSON ({exc}); write"
                          ' {"output": ...}')
        if not isinstance(doc, dict) or "output" not in doc:
            return error_result(500, "bad_output", f"function '{function}': output.json must be an object with an"
                          ' "output" field, e.g. {"output": 42}')
        value = doc["output"]
        if isinstance(value, str):
            return 200, "text/plain; charset=utf-8", value.encode()
        return 200, "application/json", json.dumps(value).encode()
    try:
        json.loads(outcome.out)
        return 200, "application/json", outcome.out
    except ValueError:
        return 200, "text/plain; charset=utf-8", outcome.out


def timed_out_result(function: str, timeout_s: float) -> tuple[int, str, bytes]:
    """The 504 a warm Python instance answers at a call's timeout, word for word."""
    return error_result(504, "deadline_exceeded", f"function '{function}' did not finish within its {timeout_s:g} s timeout"
                  " (spec.timeout)", function=function, timeout_s=timeout_s)


def python_result(function: str, stdout: bytes, stderr: bytes, timed_out: bool, timeout_s: float,
                  memory_bytes: int) -> tuple[dict[str, Any], bytes]:
    """The RESULT header and body of a Python function's call from what ``services.runtime.once`` wrote."""
    if not timed_out:
        try:
            result, body = decode_result(stdout)
            if isinstance(result.get("status"), int):
                return result, body
        except ValueError:
            pass
    if timed_out:
        status, ctype, out = timed_out_result(function, timeout_s)
    else:
        lines = stderr.decode("utf-8", "replace").splitlines()
        prefix = "nuclide: function failed to load: "
        loading = next((line[len(prefix):] for line in lines if line.startswith(prefix)), "")
        if loading:
            status, ctype, out = error_result(500, "load_failed", f"function '{function}' failed to load: {loading}")
        else:
            status, ctype, out = error_result(
                500, "runtime_failed", f"function '{function}': its Python process ended before it returned a result"
                f" (killed, perhaps for going over its memory limit of {memory_bytes // (1 << 20)} MiB)"
                + (f": {stderr_tail(stderr)}" if stderr.strip() else ""))
    return {"status": status, "headers": [], "content_type": ctype}, out
