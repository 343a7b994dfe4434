"""The stacks the CLI knows: a URL and token per stack, recorded by what started it, in one file per user.

`nuclide up` and `make up` record the stack they start, `nuclide login` any other, and the
newest recording becomes the current stack: the one the CLI talks to unless ``--url`` or
``NUCLIDE_URL`` names another. A recording replaces only the entry of its own URL, so two
stacks on one machine keep their tokens side by side, and the CLI sends each URL its own
token. The file is ``$XDG_CONFIG_HOME/nuclide/cli.json`` (``~/.config``), or the one
``NUCLIDE_CLI_CONFIG`` names (like KUBECONFIG), mode 0600:

    {"current": "http://127.0.0.1:8000",
     "stacks": {"http://127.0.0.1:8000": {"token": "...", "started_by": "`nuclide up` (state in /srv/var)",
                                          "token_hint": "`cat /srv/var/token`", "recorded_at": "2024-05-06T07:08:09Z"}}}

``started_by`` and ``token_hint`` are what a rejected token's message tells the user: who
put the token there, and the command that prints the right one. A file of the older
one-stack form ``{"url": ..., "token": ...}`` is read as one stack and rewritten in this
form at the next recording.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from services.cli.client import DEFAULT_URL, Client, CliError, Target, normalise_url

_STARTERS = "the command that started it prints its token (`nuclide up`, `make up`)"


@dataclass(frozen=True)
class StackEntry:
    """One stack's URL and token, and what to tell the user when the token is rejected."""

    url: str
    token: str = field(repr=False)
    started_by: str = ""  # what started the stack, as its user would recognise it
    token_hint: str = ""  # a command that prints the stack's token
    recorded_at: str = ""  # UTC, ISO 8601

    def as_json(self) -> dict[str, str]:
        data = asdict(self)
        del data["url"]
        return data


@dataclass(frozen=True)
class Stacks:
    """What the stacks file holds: entries by URL, and the URL of the current stack."""

    path: Path
    current: str | None
    entries: dict[str, StackEntry]


def stacks_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    explicit = environ.get("NUCLIDE_CLI_CONFIG")
    if explicit:
        return Path(explicit)
    base = Path(environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "nuclide" / "cli.json"


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    return value if isinstance(value, str) else ""


def read_stacks(path: Path) -> Stacks:
    """The recorded stacks; none when the file does not exist yet."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Stacks(path, None, {})
    except OSError as exc:
        raise CliError(f"cannot read the CLI's stacks file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CliError(f"the CLI's stacks file {path} is not valid JSON ({exc}); fix it or delete it") from None
    if not isinstance(data, dict):
        raise CliError(f"the CLI's stacks file {path} must be a JSON object; fix it or delete it")
    if "stacks" not in data:  # the one-stack form older versions wrote
        url, token = _text(data, "url"), _text(data, "token")
        if not url or not token:
            return Stacks(path, normalise_url(url) if url else None, {})
        entry = StackEntry(normalise_url(url), token, started_by="an earlier `nuclide up`")
        return Stacks(path, entry.url, {entry.url: entry})
    raw = data["stacks"] if isinstance(data["stacks"], dict) else {}
    entries = {}
    for url, item in raw.items():
        if isinstance(url, str) and isinstance(item, dict) and _text(item, "token"):
            entry = StackEntry(normalise_url(url), _text(item, "token"), _text(item, "started_by"),
                               _text(item, "token_hint"), _text(item, "recorded_at"))
            entries[entry.url] = entry
    current = _text(data, "current")
    return Stacks(path, normalise_url(current) if current else None, entries)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two stacks starting at once would otherwise each write back what they read, losing one.
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record_stack(entry: StackEntry, path: Path | None = None) -> Path:
    """Add or replace ``entry.url``'s entry and make it the current stack; other stacks' entries stay."""
    path = path or stacks_path()
    entry = StackEntry(normalise_url(entry.url), entry.token, entry.started_by, entry.token_hint,
                       entry.recorded_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(path):
        entries = {**read_stacks(path).entries, entry.url: entry}
        data = {"current": entry.url, "stacks": {url: e.as_json() for url, e in entries.items()}}
        # Written aside and renamed, so a reader never sees half a file; 0600 from the start, as it holds tokens.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return path


def _when(entry: StackEntry) -> str:
    return f" at {entry.recorded_at.replace('T', ' ').replace('Z', ' UTC')}" if entry.recorded_at else ""


def _login_hint(url: str) -> str:
    return f"`nuclide login --url {url}`"


def resolve_target(url_flag: str | None = None, token_flag: str | None = None,
                   environ: Mapping[str, str] | None = None) -> Target:
    """URL from --url, NUCLIDE_URL, the current stack, the default; token from --token, NUCLIDE_TOKEN, that URL's entry.

    The stacks file is read only when flags and environment leave something open, and a
    token recorded for one URL is never sent to another.
    """
    environ = os.environ if environ is None else environ
    url = url_flag or environ.get("NUCLIDE_URL") or None
    token = token_flag or environ.get("NUCLIDE_TOKEN") or None
    path = stacks_path(environ)
    stacks = read_stacks(path) if url is None or token is None else Stacks(path, None, {})
    url = normalise_url(url or stacks.current or DEFAULT_URL)
    entry = stacks.entries.get(url)
    login = _login_hint(url)
    if token is not None:
        given = "given by --token" if token_flag else "in NUCLIDE_TOKEN"
        return Target(url, token, token_from=given,
                      token_help=f"{_STARTERS}; pass it with --token or NUCLIDE_TOKEN, or record it with {login}")
    if entry is None:
        return Target(url, None, token_help=f"none is recorded for {url} in {path}; {_STARTERS} and records it there;"
                      f" or pass --token, set NUCLIDE_TOKEN, or run {login}")
    by = f" by {entry.started_by}" if entry.started_by else ""
    where = f"{entry.token_hint} prints that stack's token" if entry.token_hint else _STARTERS
    return Target(url, entry.token, token_from=f"recorded for it in {path}{by}{_when(entry)}",
                  token_help=f"{where}; if something else started a stack at {url} since, record the token it printed"
                  f" with {login}", started_by=entry.started_by)


# ----- commands -----------------------------------------------------------------------


def read_token(opts: argparse.Namespace) -> str:
    """--token, else a line on stdin (asked for on a terminal), so the token stays out of argv and shell history."""
    if opts.token:
        return opts.token
    if sys.stdin is None:
        token = ""
    elif sys.stdin.isatty():
        token = getpass.getpass("token: ")
    else:
        token = sys.stdin.readline()
    token = token.strip()
    if not token:
        raise CliError("no token given: pipe it to `nuclide login` on stdin, type it when asked, or pass --token")
    return token


def cmd_login(opts: argparse.Namespace) -> int:
    """Check the token against the stack at the URL, then record both and make that stack current."""
    url = normalise_url(opts.url or os.environ.get("NUCLIDE_URL") or read_stacks(stacks_path()).current or DEFAULT_URL)
    token = read_token(opts)
    with Client(url, token) as client:
        resp = client.request("GET", "/functions")
    if resp.status_code == 401:
        raise CliError(f"nuclide at {url} rejected this token, so nothing was recorded; {_STARTERS}")
    if resp.status_code != 200:
        raise CliError(f"nuclide at {url} answered HTTP {resp.status_code}, not the function list; is --url"
                       " pointing at nuclide? Nothing was recorded.")
    path = record_stack(StackEntry(url, token, opts.started_by or "`nuclide login`", opts.token_hint or ""))
    print(f"recorded {url} in {path}; it is the current stack")
    return 0


def cmd_stacks(_opts: argparse.Namespace) -> int:
    from services.cli.commands import format_table

    stacks = read_stacks(stacks_path())
    if not stacks.entries:
        print(f"no stacks recorded in {stacks.path}; `nuclide up` and `make up` record the stack they start,"
              " `nuclide login --url URL` any other")
        return 0
    rows = [["*" if url == stacks.current else "", url, e.started_by or "-", _when(e).removeprefix(" at ") or "-"]
            for url, e in stacks.entries.items()]
    print(format_table(["CURRENT", "URL", "STARTED BY", "RECORDED"], rows))
    print(f"(tokens in {stacks.path})")
    return 0
