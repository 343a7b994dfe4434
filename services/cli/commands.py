"""The API subcommands of the nuclide CLI: deploy, invoke, get, list, delete, logs, calls, trace."""

from __future__ import annotations

import argparse
import contextlib
import json
import keyword
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TextIO

import yaml

from shared.archive import make_zip, read_archive, zip_directory
from shared.errors import InvalidRequest
from shared.spec import SPEC_FILES
from services.cli.client import INVOKE_TIMEOUT_S, Client, CliError, error_from_response

POLL_INTERVAL_S = 0.5
DEFAULT_DEPLOY_TIMEOUT_S = 600.0  # the gateway's own default deploy timeout
_NAME_MAX = 63
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class Streams:
    """Where a command writes; tests pass their own."""

    out: TextIO
    err: TextIO
    stdin: BinaryIO | None = None

    @classmethod
    def std(cls) -> "Streams":
        return cls(sys.stdout, sys.stderr, sys.stdin.buffer if sys.stdin else None)

    def is_tty(self, stream: Any) -> bool:
        try:
            return bool(stream.isatty())
        except (AttributeError, ValueError):
            return False


# ----- packaging and names -------------------------------------------------------


def sanitise_name(text: str) -> str:
    """A deployable name from a file or folder name: letters, digits, '-' and '_', starting alphanumeric."""
    name = _UNSAFE_NAME_CHARS.sub("-", text)
    name = re.sub(r"^[^A-Za-z0-9]+", "", name)[:_NAME_MAX]
    return name.rstrip("-_")


def _module_name(stem: str) -> str:
    # The server infers handlers only from files whose name is an importable module.
    return stem if stem.isidentifier() and not keyword.iskeyword(stem) else "main"


def metadata_name(zip_bytes: bytes) -> str | None:
    """metadata.name from the package's function.yaml, if it has a usable one."""
    try:
        archive = read_archive(zip_bytes)
    except InvalidRequest:
        return None  # the server will say what is wrong with the package
    for filename in SPEC_FILES:
        raw = archive.get(filename)
        if raw is None:
            continue
        try:
            doc = yaml.safe_load(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, yaml.YAMLError):
            return None
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        return name if isinstance(name, str) and name.strip() else None
    return None


def package(path: Path) -> tuple[bytes, str]:
    """(zip bytes, name from the path) for a function folder, a .zip, or a single .py file."""
    try:
        if path.is_dir():
            return zip_directory(path), path.resolve().name
        if not path.exists():
            raise CliError(f"{path} does not exist; pass a function folder, a .zip or a .py file")
        suffix = path.suffix.lower()
        if suffix == ".zip":
            return path.read_bytes(), path.stem
        if suffix == ".py":
            return make_zip({f"{_module_name(path.stem)}.py": path.read_bytes()}), path.stem
    except InvalidRequest as exc:
        raise CliError(exc.message) from None
    except OSError as exc:
        raise CliError(f"cannot read {exc.filename or path}: {exc.strerror or exc}") from None
    raise CliError(f"{path} is not a folder, a .zip or a .py file; pass one of those")


def function_name(explicit: str | None, zip_bytes: bytes, path_name: str) -> str:
    """--name, else metadata.name in function.yaml, else the sanitised file or folder name."""
    if explicit:
        return explicit
    from_yaml = metadata_name(zip_bytes)
    if from_yaml:
        return from_yaml
    name = sanitise_name(path_name)
    if not name:
        raise CliError(f"cannot make a function name from {path_name!r}; pass --name")
    return name


# ----- progress ---------------------------------------------------------------------


class Progress:
    """A spinner on a terminal, plain lines otherwise (logs and CI want no control codes)."""

    def __init__(self, streams: Streams) -> None:
        self.streams = streams
        self.live = streams.is_tty(streams.err)
        self._status: Any = None
        self._last = ""

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator["Progress"]:
        if not self.live:
            self.update(text)
            yield self
            return
        from rich.console import Console

        console = Console(file=self.streams.err, stderr=True)
        with console.status(text) as status:
            self._status = status
            try:
                yield self
            finally:
                self._status = None

    def update(self, text: str) -> None:
        if self._status is not None:
            self._status.update(text)
        elif text != self._last:
            print(text, file=self.streams.err, flush=True)
        self._last = text


# ----- output helpers -------------------------------------------------------------


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").splitlines())


def _replicas(fn: dict[str, Any]) -> str:
    reps = fn.get("replicas") or {}
    return f"{reps.get('ready', 0)}/{reps.get('desired', 0)}"


def _version(fn: dict[str, Any]) -> str:
    serving, latest = fn.get("version") or 0, fn.get("latest_version") or 0
    # A version still building (or one that failed) is not the one serving calls.
    return str(serving) if serving == latest or not latest else f"{serving} (latest {latest})"


def print_summary(fn: dict[str, Any], streams: Streams) -> None:
    out = streams.out
    print(f"name:     {fn.get('name')}", file=out)
    print(f"version:  {_version(fn)}", file=out)
    print(f"state:    {fn.get('state')}", file=out)
    print(f"replicas: {_replicas(fn)} ready", file=out)
    out.flush()
    for warning in fn.get("warnings") or ():
        print(f"warning: {warning}", file=streams.err)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def list_rows(functions: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for fn in functions:
        group = fn.get("group") or {}
        rows.append([str(fn.get("name", "")), _version(fn), str(fn.get("state", "")), _replicas(fn),
                     str(fn.get("runtime") or "-"), str(fn.get("handler") or "-"), str(group.get("id") or "-")])
    return rows


def describe_table(fn: dict[str, Any]) -> str:
    group = fn.get("group") or {}
    fields = [
        ("name", fn.get("name")),
        ("version", _version(fn)),
        ("state", fn.get("state")),
        ("replicas", f"{_replicas(fn)} ready"),
        ("runtime", fn.get("runtime")),
        ("handler", fn.get("handler")),
        ("group", f"{group.get('id')} ({', '.join(group.get('tasks') or [])})" if group.get("id") else None),
        ("private", "yes" if fn.get("private") else "no"),
        ("timeout", f"{fn['timeout_s']:g} s" if isinstance(fn.get("timeout_s"), (int, float)) else None),
        ("description", fn.get("description") or None),
        ("created", fn.get("created_at")),
        ("updated", fn.get("updated_at")),
    ]
    lines = [f"{key + ':':<13}{value}" for key, value in fields if value is not None]
    for warning in fn.get("warnings") or ():
        lines.append(f"warning:     {warning}")
    if fn.get("last_error"):
        lines.append("last error:")
        lines.append(_indent(str(fn["last_error"])))
    return "\n".join(lines)


def dump(data: Any, fmt: str) -> str:
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip("\n")
    return json.dumps(data, indent=2, ensure_ascii=False)


# ----- deploy ---------------------------------------------------------------------


def _build_failed(exc: CliError, name: str) -> CliError:
    """The 422 message plus the build or import log tail, indented under it."""
    tail = str(exc.details.get("log_tail") or "").strip("\n")
    message = exc.message or f"deploying '{name}' failed"
    return CliError(f"{message}\n{_indent(tail)}" if tail else message, exc.details, status=exc.status, code=exc.code)


def _poll_until_settled(client: Client, name: str, target: int, timeout_s: float, progress: Progress,
                        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    deadline = clock() + timeout_s
    while True:
        fn = client.get_function(name)
        state = fn.get("state")
        serving, latest = int(fn.get("version") or 0), int(fn.get("latest_version") or 0)
        if latest > target:
            raise CliError(f"'{name}' version {target} was superseded by version {latest} before it was ready;"
                           f" see `nuclide get {name}`")
        if state == "ready" and serving >= target:
            return fn
        # A failed redeploy falls back to the version that was serving: ready, but older than ours.
        if state == "failed" or (state == "ready" and serving < target):
            error = str(fn.get("last_error") or "no error recorded").strip("\n")
            first, _, rest = error.partition("\n")
            message = f"deploying '{name}' version {target} failed: {first}"
            raise CliError(f"{message}\n{_indent(rest)}" if rest.strip() else message)
        progress.update(f"{name}: {state} (version {target})...")
        if clock() >= deadline:
            raise CliError(f"'{name}' is still {state} after {timeout_s:g} s; the deploy continues in the background:"
                           f" check `nuclide get {name}`")
        sleep(POLL_INTERVAL_S)


class DeployOutput:
    """While a deploy runs: the function's log lines from the deploy's start (its build's output first, then
    its new instances' start) copied to stderr as they are written, by a thread following its logs."""

    RETRY_S = 0.2  # a first deploy's function exists a moment after the upload: ask again this often

    def __init__(self, client: Client, name: str, streams: Streams) -> None:
        self.client, self.name, self.streams = client, name, streams
        self._stop = threading.Event()
        self._sock: Any = None
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"deploy-output-{name}")

    def __enter__(self) -> "DeployOutput":
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        with self._lock:
            self._shutdown()
        self._thread.join(5)

    def _shutdown(self) -> None:
        _shut(self._sock)

    def _opened(self, sock: Any) -> None:
        with self._lock:
            self._sock = sock
            if self._stop.is_set():
                self._shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            # since as a duration, measured on the server's clock: a client clock that is off loses nothing
            since = f"{int(time.monotonic() - self._started) + 2}s"
            try:
                for chunk in self.client.follow_logs(self.name, tail=10_000, since=since, on_open=self._opened):
                    if self._stop.is_set():
                        return
                    self.streams.err.write(chunk)
                    self.streams.err.flush()
                return
            except CliError as exc:
                if exc.status != 404:
                    return  # nothing to show; the deploy's own answer says what went wrong
            except Exception:  # the output is a courtesy: it never fails the deploy
                return
            self._stop.wait(self.RETRY_S)


def deploy_one(client: Client, name: str, zip_bytes: bytes, opts: argparse.Namespace, streams: Streams) -> dict[str, Any]:
    """Deploy one package and wait for it as the options say; its description once settled."""
    timeout_s = opts.timeout or DEFAULT_DEPLOY_TIMEOUT_S
    if getattr(opts, "quiet", False):
        return _deploy_one(client, name, zip_bytes, opts, streams, timeout_s, Progress(streams))
    with DeployOutput(client, name, streams):
        progress = Progress(streams)
        progress.live = False  # a spinner would be torn by the lines the build writes meanwhile
        return _deploy_one(client, name, zip_bytes, opts, streams, timeout_s, progress)


def _deploy_one(client: Client, name: str, zip_bytes: bytes, opts: argparse.Namespace, streams: Streams,
                timeout_s: float, progress: "Progress") -> dict[str, Any]:
    if opts.async_:
        accepted = client.deploy(name, zip_bytes, wait=False)
        target = int(accepted.get("latest_version") or accepted.get("version") or 0)
        with progress.status(f"{name}: {accepted.get('state', 'deploying')} (version {target})..."):
            return _poll_until_settled(client, name, target, timeout_s, progress)
    try:
        with progress.status(f"building {name}..."):
            # Slack so that, at the default timeout, the server's own 504 (with its message) arrives first.
            return client.deploy(name, zip_bytes, wait=True, timeout_s=timeout_s + 10)
    except CliError as exc:
        if exc.status == 422:
            raise _build_failed(exc, name) from None
        if exc.code == "client_timeout":
            raise CliError(f"'{name}' was not ready after {timeout_s:g} s; the deploy continues in the background:"
                           f" check `nuclide get {name}`") from None
        raise


def cmd_deploy(client: Client, opts: argparse.Namespace, streams: Streams) -> int:
    if getattr(opts, "file", None) is not None:
        return deploy_file(client, opts, streams)
    zip_bytes, path_name = package(Path(opts.path))
    name = function_name(opts.name, zip_bytes, path_name)
    print_summary(deploy_one(client, name, zip_bytes, opts, streams), streams)
    return 0


def deploy_file(client: Client, opts: argparse.Namespace, streams: Streams) -> int:
    """Every function of a deploy file, in its order; all are packaged first, so a bad entry deploys nothing."""
    from services.cli import deployfile

    path = Path(opts.file)
    entries, warnings = deployfile.read(path)
    for warning in warnings:
        print(f"warning: {warning}", file=streams.err)
    packages = []
    for entry in entries:
        try:
            packages.append((entry.name, package(entry.handler)[0]))
        except CliError as exc:
            raise CliError(f"{path} line {entry.line}: functions.{entry.name}.handler: {exc.message}") from None
    failed: list[str] = []
    for i, (name, zip_bytes) in enumerate(packages):
        if i:
            streams.out.write("\n")
        try:
            print_summary(deploy_one(client, name, zip_bytes, opts, streams), streams)
        except CliError as exc:
            failed.append(name)
            print(f"error: {exc.message}", file=streams.err)
    if failed:
        raise CliError(f"deployed {len(packages) - len(failed)} of {len(packages)} functions from {path};"
                       f" failed: {', '.join(failed)}")
    return 0


# ----- invoke ----------------------------------------------------------------------


def parse_header(text: str) -> tuple[str, str]:
    """'Name=value' or curl's 'Name: value'; the first separator wins since names hold neither."""
    cut = min((i for i in (text.find("="), text.find(":")) if i >= 0), default=-1)
    key = text[:cut].strip() if cut > 0 else ""
    if not key or any(c.isspace() for c in key):
        raise CliError(f"header {text!r} must look like NAME=VALUE (or 'NAME: VALUE')")
    return key, text[cut + 1:].strip()


def read_body(data: str | None, streams: Streams) -> bytes:
    """-d TEXT, -d @file, -d @- (stdin); without -d, stdin when it is not a terminal."""
    if data is None:
        stdin = streams.stdin
        if stdin is None or streams.is_tty(stdin):
            return b""
        return stdin.read()
    if data.startswith("@"):
        source = data[1:]
        if source == "-":
            return streams.stdin.read() if streams.stdin is not None else b""
        try:
            return Path(source).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read body file {source}: {exc.strerror or exc}") from None
    return data.encode("utf-8")


def guess_content_type(body: bytes) -> str | None:
    # The runtime parses event.body as JSON only for a JSON content type, so say so when it is JSON.
    if not body:
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    try:
        json.loads(text)
        return "application/json"
    except ValueError:
        return "text/plain; charset=utf-8"


def invoke_error(resp: Any, method: str, name: str, client: Client) -> str:
    """The stderr line for a failed call; the body itself already went to stdout."""
    if method != "POST" and resp.status_code in (404, 405):
        return f"the gateway invokes functions only with POST, not {method}; drop -X"
    if resp.status_code == 401:
        return error_from_response(resp, client.target).message
    call_id = resp.headers.get("x-call-id")
    where = f" (call {call_id})" if call_id else ""
    line = f"{method} /{name} answered HTTP {resp.status_code}{where}"
    try:
        err = resp.json().get("error")
        message = err.get("message") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        message = None
    return f"{line}: {message}" if isinstance(message, str) and message else line


def write_body(content: bytes, streams: Streams) -> None:
    """Raw bytes to stdout (a newline added only on a terminal); text streams, as tests pass, get text."""
    out = streams.out
    out.flush()
    buffer = getattr(out, "buffer", None)
    if buffer is not None:
        buffer.write(content)
        if content and not content.endswith(b"\n") and streams.is_tty(out):
            buffer.write(b"\n")
        buffer.flush()
    else:
        out.write(content.decode("utf-8", "replace"))
        out.flush()


def _invoke_headers(opts: argparse.Namespace, body: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw in opts.header or ():
        key, value = parse_header(raw)
        headers[key] = value
    if opts.content_type:
        headers["Content-Type"] = opts.content_type
    elif not any(k.lower() == "content-type" for k in headers):
        guessed = guess_content_type(body)
        if guessed:
            headers["Content-Type"] = guessed
    return headers


def _print_response_head(resp: Any, streams: Streams) -> None:
    err = streams.err
    call_id = resp.headers.get("x-call-id", "")
    print(f"HTTP/1.1 {resp.status_code} {resp.reason_phrase}".rstrip(), file=err)
    if call_id:
        print(f"x-call-id: {call_id}", file=err)
    for key, value in resp.headers.multi_items():
        if key.lower() != "x-call-id":
            print(f"{key}: {value}", file=err)
    print(file=err, flush=True)


def async_options(opts: argparse.Namespace) -> tuple[bool, str | None, str | None, bool]:
    """(--async, --callback, --idempotency-key, --wait); the last three need --async."""
    async_ = bool(getattr(opts, "async_", False))
    callback = getattr(opts, "callback", None)
    key = getattr(opts, "idempotency_key", None)
    wait = bool(getattr(opts, "wait", False))
    if not async_:
        given = [flag for flag, value in (("--callback", callback), ("--idempotency-key", key), ("--wait", wait))
                 if value]
        if given:
            raise CliError(f"{given[0]} goes with --async: nuclide invoke NAME --async {given[0]} ...")
    return async_, callback, key, wait


def cmd_invoke(client: Client, opts: argparse.Namespace, streams: Streams) -> int:
    async_, callback, key, wait = async_options(opts)
    body = read_body(opts.data, streams)
    headers = _invoke_headers(opts, body)
    if async_:
        headers["X-Nuclide-Async"] = "true"
        if callback:
            headers["X-Callback-Url"] = callback
        if key:
            headers["X-Idempotency-Key"] = key
    resp = client.invoke(opts.name, body, method=opts.method.upper(), headers=headers, timeout_s=opts.timeout)
    if opts.include:
        _print_response_head(resp, streams)
    if async_:
        return _async_accepted(client, opts, resp, streams, wait)
    write_body(resp.content, streams)
    if resp.status_code >= 400:
        print(f"error: {invoke_error(resp, opts.method.upper(), opts.name, client)}", file=streams.err)
        return 1
    return 0


def _async_accepted(client: Client, opts: argparse.Namespace, resp: Any, streams: Streams, wait: bool) -> int:
    if resp.status_code != 202:
        raise CliError(invoke_error(resp, opts.method.upper(), opts.name, client))
    try:
        answer = resp.json()
        call_id = str(answer["call_id"])
    except (ValueError, KeyError, TypeError):
        raise CliError(f"the gateway accepted the call but named no call id (HTTP {resp.status_code})") from None
    if answer.get("duplicate"):
        print(f"note: idempotency key {getattr(opts, 'idempotency_key', None)!r} was used before; this is that call",
              file=streams.err)
    if not wait:
        print(call_id, file=streams.out, flush=True)
        return 0
    print(f"call {call_id}", file=streams.err, flush=True)
    wait_final(client, call_id, opts.timeout or INVOKE_TIMEOUT_S)
    return print_result(client, call_id, streams)


# ----- calls --------------------------------------------------------------------------

FINAL_STATUSES = ("DONE", "FAILED", "DEAD")
CALL_HEADERS = ["ID", "FUNCTION", "STATUS", "KIND", "SOURCE", "ATTEMPTS", "QUEUED", "DURATION", "ERROR"]
ERROR_WIDTH = 48


def wait_final(client: Client, call_id: str, timeout_s: float, clock: Callable[[], float] | None = None,
               sleep: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Poll GET /calls/{id} (0.1 s, growing to 1 s apart) until the call is DONE, FAILED or DEAD."""
    clock = clock or time.monotonic
    sleep = sleep or time.sleep
    deadline = clock() + timeout_s
    interval = 0.1
    while True:
        rec = client.get_call(call_id)
        if rec.get("status") in FINAL_STATUSES:
            return rec
        if clock() >= deadline:
            raise CliError(f"call {call_id} is still {rec.get('status')} after {timeout_s:g} s;"
                           f" check `nuclide calls get {call_id}`")
        sleep(interval)
        interval = min(interval * 1.5, 1.0)


def first_line(text: Any, width: int = ERROR_WIDTH) -> str:
    """The first non-blank line of an error, whitespace squeezed, cut to ``width`` with '...'."""
    line = next((ln for ln in str(text or "").splitlines() if ln.strip()), "")
    line = " ".join(line.split())
    return line if len(line) <= width else line[: max(0, width - 3)] + "..."


def format_duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    return f"{seconds / 60:.1f}m"


def format_time(iso: Any) -> str:
    """'2024-01-01T12:00:00.123Z' -> '2024-01-01 12:00:00' (UTC, as the API gives it)."""
    if not isinstance(iso, str) or not iso:
        return "-"
    return iso.replace("T", " ").split(".")[0].rstrip("Z")


_DEAD_PREFIX = re.compile(r"^failed \d+ time\(s\); last error: ")


def short_error(error: Any) -> str:
    """The table's ERROR cell: the first line of the last error (ATTEMPTS already says how many failed)."""
    return first_line(_DEAD_PREFIX.sub("", str(error or "").lstrip())) or "-"


def call_rows(calls: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for c in calls:
        attempts = f"{c.get('attempts', 0)}/{c.get('max_attempts', 1)}"
        rows.append([str(c.get("id", "")), str(c.get("function", "")), str(c.get("status", "")),
                     str(c.get("kind") or "-"), str(c.get("source") or "-"), attempts,
                     format_time((c.get("timings") or {}).get("queued")), format_duration(c.get("duration_s")),
                     short_error(c.get("error"))])
    return rows


def print_result(client: Client, call_id: str, streams: Streams) -> int:
    """The stored result body to stdout; 0 for a DONE call whose function answered < 400, else 1 and a line."""
    resp = client.call_result(call_id)
    status = resp.headers.get("x-call-status")
    if status is None:  # 202: not final yet
        try:
            status = str(resp.json().get("status") or "not finished")
        except (ValueError, AttributeError):
            status = "not finished"
        raise CliError(f"call {call_id} is {status} and has no result yet; wait, or check"
                       f" `nuclide calls get {call_id}`")
    write_body(resp.content, streams)
    if status == "DONE" and resp.status_code < 400:
        return 0
    if status == "DONE":
        message = f"call {call_id} is DONE, but the function answered HTTP {resp.status_code}"
    else:
        error = first_line(client.get_call(call_id).get("error"), 300)
        message = f"call {call_id} is {status}" + (f": {error}" if error else f" (HTTP {resp.status_code})")
    print(f"error: {message}", file=streams.err)
    return 1


def cmd_calls(client: Client, opts: argparse.Namespace, streams: Streams) -> int:
    action = getattr(opts, "calls_command", None)
    if action == "get":
        print(dump(client.get_call(opts.id), opts.output), file=streams.out)
        return 0
    if action == "result":
        return print_result(client, opts.id, streams)
    if action == "redrive":
        rec = client.redrive_call(opts.id)
        print(f"redriven {rec.get('id', opts.id)}: {rec.get('status', 'PENDING')}, attempts start again from 0",
              file=streams.out)
        return 0
    if action == "purge":
        function = getattr(opts, "function", None)
        n = client.purge_calls(opts.status, function)
        where = f" of {function}" if function else ""
        print(f"purged {n} {opts.status} call{'' if n == 1 else 's'}{where}", file=streams.out)
        return 0
    calls = client.list_calls(opts.function, opts.status, opts.limit)
    if opts.output == "json":
        print(dump(calls, "json"), file=streams.out)
    elif not calls:
        what = " ".join(x for x in (opts.status, f"calls of {opts.function}" if opts.function else "calls") if x)
        print(f"no {what} recorded", file=streams.err)
    else:
        print(format_table(CALL_HEADERS, call_rows(calls)), file=streams.out)
    return 0


def trace_lines(tree: dict[str, Any]) -> list[str]:
    """A trace (GET /calls/{id}/trace) as indented lines: function, status, duration, fused or remote, start, id."""
    cut = " (the first 1000)" if tree.get("truncated") else ""
    out = [f"trace {tree['trace_id']}: {tree['calls']} call{'' if tree['calls'] == 1 else 's'}{cut}"]

    def walk(node: dict[str, Any], depth: int) -> None:
        took = f"{node['duration_ms']:.3f} ms" if node.get("duration_ms") is not None else "running"
        code = f" {node['result_status']}" if node.get("result_status") is not None else ""
        out.append(f"{'  ' * depth}{node['function']}  {node['status']}{code}  {took}  {node['mode']}"
                   f"  {node.get('started') or '-'}  {node['id']}")
        for child in node.get("children") or ():
            walk(child, depth + 1)

    for root in tree.get("roots") or ():
        walk(root, 1)
    return out


def cmd_trace(client: Client, opts: argparse.Namespace, streams: Streams) -> int:
    tree = client.call_trace(opts.id)
    if opts.output == "json":
        print(dump(tree, "json"), file=streams.out)
    else:
        print("\n".join(trace_lines(tree)), file=streams.out)
    return 0


# ----- get, list, delete, logs -------------------------------------------------------


def cmd_get(client: Client, opts: argparse.Namespace, streams: Streams) -> int:
    fn = client.get_function(opts.name)
    print(describe_table(fn) if opts.output == "table" else dump(fn, opts.output), file=streams.out)
    return 0


def cmd_list(client: Client, opts: argparse.Namespace, streams: Streams) -> int:
    functions = client.list_functions()
    if getattr(opts, "quiet", False):
        for fn in functions:
            print(fn["name"], file=streams.out)
        return 0
    if opts.output == "json":
        print(dump(functions, "json"), file=streams.out)
    elif not functions:
        print("no functions deployed; deploy one with `nuclide deploy PATH`", file=streams.err)
    else:
        headers = ["NAME", "VERSION", "STATE", "READY/DESIRED", "RUNTIME", "HANDLER", "GROUP"]
        print(format_table(headers, list_rows(functions)), file=streams.out)
    return 0


def cmd_delete(client: Client, opts: argparse.Namespace, streams: Streams) -> int:
    client.delete_function(opts.name)
    print(f"deleted {opts.name}", file=streams.out)
    return 0


def cmd_scale(client: Client, opts: argparse.Namespace, streams: Streams) -> int:
    replicas = None if opts.replicas == "auto" else int(opts.replicas)
    result = client.scale(opts.name, replicas)
    if result.get("override") is None:
        print(f"{opts.name}: replicas back to the autoscaler", file=streams.out)
    else:
        print(f"{opts.name}: held at {result['override']} replicas (group {result['group_id']}); "
              f"`nuclide scale {opts.name} auto` gives them back to the autoscaler", file=streams.out)
    return 0


def follow_logs(client: Client, opts: argparse.Namespace, streams: Streams) -> int:
    """Print the function's log lines as they come until Ctrl-C (SIGINT) or the stream's end.

    Once the stream is open, SIGINT only shuts its socket down and the loop ends at the stream's end, so the
    interrupt never lands as an exception inside the HTTP client's own bookkeeping (its locks and pool); before
    that (still connecting) it interrupts as usual."""
    stopping = threading.Event()
    opened: list[Any] = []

    def on_open(sock: Any) -> None:
        opened.append(sock)
        if stopping.is_set():
            _shut(sock)

    def on_sigint(_signum: int, _frame: Any) -> None:
        stopping.set()
        if not opened or opened[0] is None:
            raise KeyboardInterrupt
        _shut(opened[0])

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        for chunk in client.follow_logs(opts.name, opts.tail, opts.since, on_open=on_open):
            if stopping.is_set():
                break
            streams.out.write(chunk)
            streams.out.flush()
    except KeyboardInterrupt:
        pass  # the way to stop following
    except CliError:
        if not stopping.is_set():
            raise  # the stream broke on its own; after Ctrl-C a cut stream is what was asked for
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    return 0


def _shut(sock: Any) -> None:
    """Shut a log stream's socket down (ends its iteration at once), if it has one."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def cmd_logs(client: Client, opts: argparse.Namespace, streams: Streams) -> int:
    if opts.follow:
        return follow_logs(client, opts, streams)
    text = client.logs(opts.name, opts.tail, opts.since)
    if text:
        streams.out.write(text if text.endswith("\n") else text + "\n")
        streams.out.flush()
    else:
        print(f"no logs for {opts.name} yet", file=streams.err)
    return 0


def client_version() -> str:
    from shared.version import VERSION

    return VERSION


def cmd_version(client: Client, opts: argparse.Namespace, streams: Streams) -> int:
    """The CLI's version, then the gateway's (from its public `GET /`, no token needed)."""
    print(f"nuclide {client_version()}", file=streams.out)
    streams.out.flush()
    resp = client.request("GET", "/", send_token=False)
    try:
        server = resp.json().get("version") if resp.status_code == 200 else None
    except ValueError:
        server = None
    if not isinstance(server, str):
        raise CliError(f"{client.url} did not say its version (HTTP {resp.status_code}); is --url pointing at nuclide?")
    print(f"gateway {server} at {client.url}", file=streams.out)
    return 0


COMMANDS: dict[str, Callable[[Client, argparse.Namespace, Streams], int]] = {
    "version": cmd_version,
    "deploy": cmd_deploy,
    "invoke": cmd_invoke,
    "get": cmd_get,
    "list": cmd_list,
    "delete": cmd_delete,
    "logs": cmd_logs,
    "calls": cmd_calls,
    "trace": cmd_trace,
    "scale": cmd_scale,
}
