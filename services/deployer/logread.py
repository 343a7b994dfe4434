"""Reading instances' log files: the last lines, or what was written after a cursor (what ``logs -f`` follows).

A cursor maps a log file's key (``<group>/<instance>.log``) to the byte offset read up to, always
the end of a complete line, so a line being written is never split between two reads. A reader
that follows sends back the cursor it got; a file missing from it (an instance started since) is
read from its start, and a file shorter than its offset (rewritten) from its start again. Keys
name files of the function's own log folder only: a cursor cannot point a read anywhere else.

``since_s`` drops lines stamped before it (``shared/logtime.line_time``). A line without a stamp
(a ``print``, a traceback) goes with the stamped line before it in the same file; before any, with
the file's last write.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.logtime import line_time

TAIL_WINDOW_BYTES = 256 * 1024  # how far back from a file's end a tail reads
# a file's mtime is the kernel's coarse clock (a tick, up to ~10 ms, behind the line's own stamp): a file is
# skipped by its mtime only when that is well before `since`; its stamped lines decide the rest
MTIME_SLACK_S = 1.0
READ_BYTES = 256 * 1024  # at most this much of one file per follow read; the rest comes with the next one


def key_of(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _complete(data: bytes, at_eof_limit: bool) -> bytes:
    """``data`` up to its last newline; all of it when a full read found none (a line longer than a read)."""
    end = data.rfind(b"\n")
    if end < 0:
        return data if at_eof_limit else b""
    return data[:end + 1]


def _filter(lines: list[str], since_s: float | None, keep: bool) -> list[str]:
    if since_s is None:
        return lines
    out = []
    for line in lines:
        stamp = line_time(line)
        if stamp is not None:
            keep = stamp >= since_s
        if keep:
            out.append(line)
    return out


def _by_mtime(paths: list[Path]) -> list[tuple[float, Path]]:
    """The files that exist, oldest modified first, with their modification times."""
    existing = []
    for path in paths:
        try:
            existing.append((path.stat().st_mtime, path))
        except OSError:
            continue
    return sorted(existing)


def tail(paths: list[Path], tail_lines: int, since_s: float | None = None) -> tuple[str, dict[str, int]]:
    """The last ``tail_lines`` lines across the files (newest file last), and a cursor at their ends."""
    existing = _by_mtime(paths)
    cursor: dict[str, int] = {}
    chunks: list[list[str]] = []
    remaining = tail_lines
    for mtime, path in reversed(existing):
        try:
            with open(path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                start = max(0, size - TAIL_WINDOW_BYTES)
                fh.seek(start)
                data = _complete(fh.read(size - start), at_eof_limit=False)
        except OSError:
            continue
        cursor[key_of(path)] = start + len(data)
        if remaining <= 0 or (since_s is not None and mtime < since_s - MTIME_SLACK_S):
            continue
        lines = data.decode(errors="replace").splitlines()
        if start > 0:
            lines = lines[1:]  # the window cut the first line
        take = _filter(lines, since_s, keep=True)[-remaining:]
        chunks.insert(0, take)
        remaining -= len(take)
    text = "\n".join(line for chunk in chunks for line in chunk)
    return (text + "\n" if text else ""), cursor


def after(paths: list[Path], cursor: dict[str, int], since_s: float | None = None) -> tuple[str, dict[str, int]]:
    """What the files hold past the cursor (oldest file first), and the cursor moved past it."""
    existing = _by_mtime(paths)
    moved: dict[str, int] = {}
    out: list[str] = []
    for _mtime, path in existing:
        key = key_of(path)
        offset = max(0, int(cursor.get(key, 0)))
        try:
            with open(path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                if size < offset:
                    offset = 0  # rewritten since
                fh.seek(offset)
                want = min(READ_BYTES, size - offset)
                data = _complete(fh.read(want), at_eof_limit=want == READ_BYTES)
        except OSError:
            continue
        moved[key] = offset + len(data)
        if data:
            out += _filter(data.decode(errors="replace").splitlines(), since_s, keep=True)
    text = "\n".join(out)
    return (text + "\n" if text else ""), moved
