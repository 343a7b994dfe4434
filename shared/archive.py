"""Function packages as zip archives: hostile-upload validation, deterministic packing, safe extraction."""

from __future__ import annotations

import io
import os
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InvalidRequest

MiB = 1024 * 1024

# Entries this small may compress absurdly well (a file of spaces) without being a threat.
RATIO_EXEMPT_BYTES = 1 * MiB
_READ_CHUNK_BYTES = 64 * 1024
# bzip2 and lzma decompress a whole chunk at once with no output cap, so a tiny
# chunk can expand to gigabytes before we can count it; deflate is capped per call.
_ALLOWED_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_SKIP_DIRS = frozenset({".git", "__pycache__", ".venv", "node_modules"})
_FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_HOW_TO_ZIP = "send a .zip of the function's folder (e.g. `cd myfunc && zip -r ../myfunc.zip .`)"


@dataclass(frozen=True)
class ArchiveLimits:
    """Ceilings for one uploaded archive; every one is checked before and while reading."""

    max_zip_bytes: int = 50 * MiB
    max_entries: int = 2000
    max_total_bytes: int = 256 * MiB
    max_entry_bytes: int = 128 * MiB
    max_ratio: float = 200.0


@dataclass(frozen=True)
class Archive:
    """A validated package: posix relative path -> file contents (directories omitted)."""

    files: dict[str, bytes]

    def names(self) -> list[str]:
        return sorted(self.files)

    def get(self, path: str) -> bytes | None:
        return self.files.get(path)

    def py_files(self) -> list[str]:
        return sorted(name for name in self.files if name.endswith(".py"))

    @property
    def total_bytes(self) -> int:
        return sum(len(data) for data in self.files.values())


def _fmt_bytes(n_bytes: float) -> str:
    return f"{n_bytes / MiB:.1f} MiB" if n_bytes >= MiB else f"{int(n_bytes)} bytes"


def _normalise(raw_name: str) -> tuple[str, bool]:
    """Return (posix relative path, is_dir) or raise for a path that could escape."""
    if "\x00" in raw_name:
        raise InvalidRequest(
            f"zip entry {raw_name!r} has a NUL byte in its name; re-create the zip with plain file names"
        )
    # Backslashes count as separators: a Windows extractor would honour them.
    name = raw_name.replace("\\", "/")
    if name.startswith("/") or _DRIVE_RE.match(name):
        raise InvalidRequest(
            f"zip entry {raw_name!r} has an absolute path; use paths relative to the function's root"
        )
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidRequest(
            f"zip entry {raw_name!r} escapes the archive; use paths relative to the function's root"
        )
    return "/".join(parts), name.endswith("/")


def _is_junk(path: str) -> bool:
    parts = path.split("/")
    return (
        parts[0] == "__MACOSX"
        or parts[-1] == ".DS_Store"
        or "__pycache__" in parts
        or path.endswith(".pyc")
    )


def _check_declared(info: zipfile.ZipInfo, limits: ArchiveLimits) -> None:
    """Reject on header values first: cheap, and most bombs announce themselves."""
    name = info.orig_filename
    if info.flag_bits & 0x1:
        raise InvalidRequest(f"zip entry {name!r} is encrypted; upload an archive without a password")
    if info.compress_type not in _ALLOWED_METHODS:
        raise InvalidRequest(
            f"zip entry {name!r} uses compression method {info.compress_type}, which is not accepted; "
            "re-create the zip with deflate (the default of zip tools)"
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise InvalidRequest(
            f"zip entry {name!r} is a symbolic link; replace it with the file it points to "
            "(e.g. zip without --symlinks)"
        )
    if info.file_size > limits.max_entry_bytes:
        raise InvalidRequest(
            f"zip entry {name!r} is {_fmt_bytes(info.file_size)} uncompressed, over the "
            f"{_fmt_bytes(limits.max_entry_bytes)} limit per file; keep large data out of the package"
        )
    if info.file_size > RATIO_EXEMPT_BYTES:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_ratio:
            raise InvalidRequest(
                f"zip entry {name!r} compresses {ratio:.0f}:1, over the {limits.max_ratio:.0f}:1 limit "
                "(this looks like a zip bomb); upload the real files"
            )


def _read_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """Decompress one entry, stopping as soon as it outgrows its declared size.

    The declared sizes were already checked against the limits, so capping at the
    declared size bounds memory even if the reader below ever stops enforcing it.
    """
    name = info.orig_filename
    chunks: list[bytes] = []
    got_bytes = 0
    try:
        with zf.open(info) as member:
            while True:
                chunk = member.read(_READ_CHUNK_BYTES)
                if not chunk:
                    break
                got_bytes += len(chunk)
                if got_bytes > info.file_size:
                    raise InvalidRequest(
                        f"zip entry {name!r} decompresses to more than its declared "
                        f"{_fmt_bytes(info.file_size)} (a forged header); upload an archive made by a zip tool"
                    )
                chunks.append(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise InvalidRequest(
            f"zip entry {name!r} is corrupt ({exc}); re-create the archive and upload it again"
        ) from None
    if got_bytes != info.file_size:
        raise InvalidRequest(
            f"zip entry {name!r} is corrupt (holds {got_bytes} bytes, its header says {info.file_size}); "
            "re-create the archive and upload it again"
        )
    return b"".join(chunks)


def read_archive(data: bytes, limits: ArchiveLimits = ArchiveLimits()) -> Archive:
    """Validate an untrusted zip and return its files; raises InvalidRequest naming the bad entry."""
    if len(data) > limits.max_zip_bytes:
        raise InvalidRequest(
            f"the upload is {_fmt_bytes(len(data))}, over the {_fmt_bytes(limits.max_zip_bytes)} "
            "limit for a function package; keep large data out of the package"
        )
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
        # NotImplementedError: a central directory that asks for a zip version or feature the reader lacks
        raise InvalidRequest(f"the upload is not a zip archive: {exc}; {_HOW_TO_ZIP}") from None
    if len(infos) > limits.max_entries:
        raise InvalidRequest(
            f"the archive has {len(infos)} entries, over the {limits.max_entries} limit; "
            "leave out virtualenvs, caches and data files"
        )
    declared_total_bytes = sum(info.file_size for info in infos)
    if declared_total_bytes > limits.max_total_bytes:
        raise InvalidRequest(
            f"the archive expands to {_fmt_bytes(declared_total_bytes)}, over the "
            f"{_fmt_bytes(limits.max_total_bytes)} limit; keep large data out of the package"
        )

    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    with zf:
        for info in infos:
            path, is_dir = _normalise(info.orig_filename)
            _check_declared(info, limits)
            if not path or _is_junk(path):
                continue
            if is_dir:
                dirs.add(path)
                continue
            if path in files:
                raise InvalidRequest(
                    f"zip entry {info.orig_filename!r} appears twice in the archive (as {path!r}); "
                    "re-create the zip so each file is stored once"
                )
            files[path] = _read_capped(zf, info)
    for path in files:
        parents = path.split("/")[:-1]
        dirs.update("/".join(parents[: i + 1]) for i in range(len(parents)))
    clash = sorted(dirs & files.keys())
    if clash:
        raise InvalidRequest(
            f"zip entry {clash[0]!r} is both a file and a folder; rename one of them"
        )
    if not files:
        raise InvalidRequest(f"the archive is empty (no files); {_HOW_TO_ZIP}")
    return Archive(_strip_single_root(files))


def _strip_single_root(files: dict[str, bytes]) -> dict[str, bytes]:
    """Zipping the folder itself (not its contents) nests everything one level; undo that."""
    top_level = [path for path in files if "/" not in path]
    if top_level:
        return files
    roots = {path.split("/", 1)[0] for path in files}
    if len(roots) != 1:
        return files
    return {path.split("/", 1)[1]: content for path, content in files.items()}


def make_zip(files: dict[str, bytes]) -> bytes:
    """Pack files into a byte-for-byte reproducible zip (same input, same bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_FIXED_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so external_attr means a mode on every host
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, files[name])
    return buffer.getvalue()


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def zip_directory(path: Path) -> bytes:
    """Zip a function folder for upload, leaving out VCS, caches and virtualenvs."""
    folder = Path(path)
    if not folder.is_dir():
        raise InvalidRequest(f"{str(folder)!r} is not a folder; pass the function's folder")
    root = folder.resolve()
    files: dict[str, bytes] = {}
    outside: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real_here = here.resolve()
        kept: list[str] = []
        for dirname in sorted(dirnames):
            if dirname in _SKIP_DIRS:
                continue
            child = here / dirname
            if child.is_symlink():
                target = child.resolve()
                if not _inside(target, root):
                    outside.append(child.relative_to(root).as_posix())
                    continue
                # A link to an ancestor would make the walk loop forever.
                if _inside(real_here, target):
                    continue
            kept.append(dirname)
        dirnames[:] = kept
        for filename in sorted(filenames):
            if filename.endswith(".pyc"):
                continue
            child = here / filename
            rel = child.relative_to(root).as_posix()
            if child.is_symlink():
                target = child.resolve()
                if not _inside(target, root):
                    outside.append(rel)
                    continue
                if not target.is_file():
                    raise InvalidRequest(f"symlink {rel!r} points to nothing; remove it or replace it with a file")
            files[rel] = child.read_bytes()
    if outside:
        raise InvalidRequest(
            f"symlinks pointing outside {str(folder)!r} cannot be uploaded: {', '.join(sorted(outside))}; "
            "copy the files they point to into the folder"
        )
    return make_zip(files)


def extract_archive(archive: Archive, dest: Path) -> None:
    """Write the archive's files below dest; never outside it, even if given a crafted Archive."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    for name in archive.names():
        # resolve() also follows links already in dest, so a planted symlink cannot redirect us.
        target = (root / name).resolve()
        if not name or os.path.isabs(name) or target == root or not target.is_relative_to(root):
            raise InvalidRequest(
                f"zip entry {name!r} would be written outside the function's folder; "
                "use paths relative to the function's root"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(target, flags, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(archive.files[name])
            os.fchmod(out.fileno(), 0o644)  # the umask must not decide what the runtime can read
