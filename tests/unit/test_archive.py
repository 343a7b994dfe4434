"""Tests for shared/archive.py: hostile zips are refused by name, good ones round-trip."""

from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from shared.archive import RATIO_EXEMPT_BYTES as RATIO_EXEMPT
from shared.archive import Archive, ArchiveLimits, extract_archive, make_zip, read_archive, zip_directory
from shared.errors import InvalidRequest

MiB = 1024 * 1024
MAIN = b"def handler(context, event):\n    return 'ok'\n"


def build_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buffer.getvalue()


def refused(data: bytes, limits: ArchiveLimits = ArchiveLimits()) -> str:
    with pytest.raises(InvalidRequest) as exc_info:
        read_archive(data, limits)
    return exc_info.value.message


def patch_headers(data: bytes, local_offset: int, central_offset: int, fmt: str, value: int) -> bytes:
    """Overwrite one field in every local and central header (there is one entry)."""
    out = bytearray(data)
    local = out.find(b"PK\x03\x04")
    central = out.find(b"PK\x01\x02")
    assert local >= 0 and central >= 0
    struct.pack_into(fmt, out, local + local_offset, value)
    struct.pack_into(fmt, out, central + central_offset, value)
    return bytes(out)


# --- good archives ---------------------------------------------------------------------------


def test_reads_files_and_omits_directories() -> None:
    archive = read_archive(build_zip([("main.py", MAIN), ("lib/", b""), ("lib/util.py", b"x = 1\n")]))
    assert archive.names() == ["lib/util.py", "main.py"]
    assert archive.get("main.py") == MAIN
    assert archive.get("missing.py") is None
    assert archive.py_files() == ["lib/util.py", "main.py"]
    assert archive.total_bytes == len(MAIN) + 6


def test_junk_entries_are_dropped() -> None:
    archive = read_archive(
        build_zip(
            [
                ("main.py", MAIN),
                ("__MACOSX/._main.py", b"junk"),
                (".DS_Store", b"junk"),
                ("sub/.DS_Store", b"junk"),
                ("__pycache__/main.cpython-311.pyc", b"junk"),
                ("sub/mod.pyc", b"junk"),
                ("sub/mod.py", b""),
            ]
        )
    )
    assert archive.names() == ["main.py", "sub/mod.py"]


def test_single_top_level_folder_is_stripped() -> None:
    archive = read_archive(build_zip([("myfn/", b""), ("myfn/main.py", MAIN), ("myfn/lib/a.py", b"")]))
    assert archive.names() == ["lib/a.py", "main.py"]


def test_folder_is_not_stripped_when_top_level_files_exist() -> None:
    archive = read_archive(build_zip([("function.yaml", b"spec: {}"), ("src/main.py", MAIN)]))
    assert archive.names() == ["function.yaml", "src/main.py"]


def test_two_top_level_folders_are_not_stripped() -> None:
    archive = read_archive(build_zip([("a/main.py", MAIN), ("b/x.py", b"")]))
    assert archive.names() == ["a/main.py", "b/x.py"]


def test_dot_and_empty_components_are_normalised() -> None:
    archive = read_archive(build_zip([("./main.py", MAIN), ("lib//a.py", b"")]))
    assert archive.names() == ["lib/a.py", "main.py"]


def test_small_highly_compressible_file_is_allowed() -> None:
    # 1 MiB of zeros compresses ~1000:1, but tiny files are exempt from the ratio check.
    archive = read_archive(build_zip([("main.py", MAIN), ("zeros.bin", bytes(MiB))]))
    assert archive.get("zeros.bin") == bytes(MiB)


def test_stored_entries_are_read() -> None:
    archive = read_archive(build_zip([("main.py", MAIN)], compression=zipfile.ZIP_STORED))
    assert archive.get("main.py") == MAIN


# --- hostile and broken archives -------------------------------------------------------------


def test_not_a_zip() -> None:
    message = refused(b"this is not a zip at all")
    assert message.startswith("the upload is not a zip archive: ")
    assert "zip -r" in message


def test_truncated_zip_is_not_a_zip() -> None:
    data = build_zip([("main.py", MAIN)])
    assert "not a zip archive" in refused(data[: len(data) // 2])


def test_empty_archive() -> None:
    assert "the archive is empty" in refused(build_zip([]))


def test_archive_with_only_junk_is_empty() -> None:
    assert "the archive is empty" in refused(build_zip([("__MACOSX/._x", b"1"), ("dir/", b"")]))


def test_upload_too_big() -> None:
    data = build_zip([("main.py", MAIN)])
    message = refused(data, ArchiveLimits(max_zip_bytes=len(data) - 1))
    assert "over the" in message and "limit for a function package" in message


def test_too_many_entries_with_default_limit() -> None:
    data = build_zip([(f"f{i}.py", b"") for i in range(2001)], compression=zipfile.ZIP_STORED)
    message = refused(data)
    assert "2001 entries" in message and "2000 limit" in message


@pytest.mark.parametrize(
    "name",
    ["../etc/passwd", "a/../../x.py", "..\\evil.py", "ok/..\\..\\x", ".."],
)
def test_path_traversal_is_refused(name: str) -> None:
    message = refused(build_zip([("main.py", MAIN), (name, b"x")]))
    assert message == f"zip entry {name!r} escapes the archive; use paths relative to the function's root"


@pytest.mark.parametrize("name", ["/etc/passwd", "C:/windows/x.py", "c:evil.py", "\\abs.py", "D:\\x.py"])
def test_absolute_paths_are_refused(name: str) -> None:
    message = refused(build_zip([("main.py", MAIN), (name, b"x")]))
    assert repr(name) in message and "absolute path" in message


def test_symlink_entry_is_refused() -> None:
    link = zipfile.ZipInfo("config.py")
    link.create_system = 3
    link.external_attr = 0o120777 << 16
    message = refused(build_zip([("main.py", MAIN), (link, b"/etc/passwd")]))
    assert "'config.py' is a symbolic link" in message and message.endswith("(e.g. zip without --symlinks)")


def test_encrypted_entry_is_refused() -> None:
    data = build_zip([("secret.py", MAIN)])
    # General purpose flag bit 0: offset 6 in the local header, 8 in the central one.
    data = patch_headers(data, 6, 8, "<H", 0x1)
    message = refused(data)
    assert "'secret.py' is encrypted" in message


def test_nul_in_name_is_refused() -> None:
    data = build_zip([("evil.py", MAIN)]).replace(b"evil.py", b"ev\x00l.py")
    message = refused(data)
    assert "'ev\\x00l.py'" in message and "NUL" in message


def test_duplicate_after_normalisation_is_refused() -> None:
    message = refused(build_zip([("lib/a.py", b"1"), ("lib\\a.py", b"2")]))
    assert "'lib\\\\a.py' appears twice" in message and "'lib/a.py'" in message


def test_exact_duplicate_is_refused() -> None:
    with pytest.warns(UserWarning):
        data = build_zip([("main.py", MAIN), ("main.py", b"evil")])
    assert "'main.py' appears twice" in refused(data)


def test_file_and_folder_with_the_same_name_are_refused() -> None:
    message = refused(build_zip([("lib", b"x"), ("lib/a.py", b"")]))
    assert "'lib' is both a file and a folder" in message


def test_unsupported_compression_is_refused() -> None:
    message = refused(build_zip([("main.py", MAIN)], compression=zipfile.ZIP_BZIP2))
    assert "'main.py' uses compression method 12" in message
    assert message.endswith("re-create the zip with deflate (the default of zip tools)")


def test_entry_over_size_limit_by_header() -> None:
    message = refused(build_zip([("big.bin", bytes(2000))]), ArchiveLimits(max_entry_bytes=1000))
    assert "'big.bin'" in message and "limit per file" in message


def test_total_over_limit_by_header() -> None:
    data = build_zip([("a.bin", bytes(600)), ("b.bin", bytes(600))])
    message = refused(data, ArchiveLimits(max_total_bytes=1000))
    assert "expands to" in message and "over the 1000 bytes limit" in message


def test_compression_ratio_over_limit() -> None:
    message = refused(build_zip([("main.py", MAIN), ("zeros.bin", bytes(2 * MiB))]))
    assert "'zeros.bin' compresses" in message and "zip bomb" in message


@pytest.fixture(scope="module")
def bomb_zip() -> bytes:
    """One entry of 300 MiB of zeros, streamed so the test never holds it in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("bomb.bin", "w", force_zip64=True) as member:
            zeros = bytes(MiB)
            for _ in range(300):
                member.write(zeros)
    return buffer.getvalue()


def test_real_zip_bomb_is_refused(bomb_zip: bytes) -> None:
    assert len(bomb_zip) < 5 * MiB
    message = refused(bomb_zip)
    assert "'bomb.bin'" in message or "expands to" in message


def test_bomb_with_forged_small_size_is_refused(bomb_zip: bytes) -> None:
    # Lie in the central directory (what readers trust): claim 1000 bytes, which also dodges
    # the ratio check. Reading must stop near the claim instead of inflating 300 MiB.
    out = bytearray(bomb_zip)
    central = out.find(b"PK\x01\x02")
    assert struct.unpack_from("<I", out, central + 24)[0] == 300 * MiB
    struct.pack_into("<I", out, central + 24, 1000)
    message = refused(bytes(out))
    assert "'bomb.bin' is corrupt" in message


class EndlessZeros:
    """A member reader that never ends, as if the decompressor ignored the header."""

    def __enter__(self) -> "EndlessZeros":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self, n_bytes: int = -1) -> bytes:
        assert n_bytes > 0, "the archive reader must read in bounded chunks"
        return bytes(n_bytes)


def test_reading_is_capped_even_if_the_decompressor_ignores_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = build_zip([("main.py", MAIN)])
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *args, **kwargs: EndlessZeros())
    message = refused(data)
    assert "'main.py' decompresses to more than its declared" in message


def test_forged_small_size_on_a_deflated_entry_is_refused() -> None:
    data = build_zip([("data.bin", os.urandom(4096) * 64)])  # 256 KiB, compresses well but under ratio
    # Uncompressed size: offset 22 in the local header, 24 in the central one.
    data = patch_headers(data, 22, 24, "<I", 100)
    message = refused(data)
    assert "'data.bin'" in message
    assert "corrupt" in message or "declared" in message


def test_forged_large_size_is_caught_as_corrupt() -> None:
    data = patch_headers(build_zip([("main.py", MAIN)]), 22, 24, "<I", len(MAIN) + 10)
    message = refused(data)
    assert "'main.py' is corrupt" in message and message.endswith("re-create the archive and upload it again")


# --- make_zip / zip_directory / extract_archive ----------------------------------------------


def test_make_zip_is_deterministic_and_round_trips() -> None:
    files = {"b.py": b"b", "a/x.py": b"x", "main.py": MAIN}
    first = make_zip(files)
    second = make_zip(dict(reversed(list(files.items()))))
    assert first == second
    with zipfile.ZipFile(io.BytesIO(first)) as zf:
        infos = zf.infolist()
        assert [info.filename for info in infos] == ["a/x.py", "b.py", "main.py"]
        assert all(info.date_time == (1980, 1, 1, 0, 0, 0) for info in infos)
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in infos)
    assert read_archive(first).files == files


def test_zip_directory_skips_caches_and_vcs(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_bytes(MAIN)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "util.py").write_text("x = 1\n")
    (tmp_path / "lib" / "util.pyc").write_bytes(b"junk")
    for skipped in (".git", "__pycache__", ".venv", "node_modules", "lib/__pycache__"):
        (tmp_path / skipped).mkdir(parents=True, exist_ok=True)
        (tmp_path / skipped / "file").write_text("skip me")
    archive = read_archive(zip_directory(tmp_path))
    assert archive.names() == ["lib/util.py", "main.py"]


def test_zip_directory_follows_links_inside_and_refuses_links_outside(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_bytes(MAIN)
    (project / "alias.py").symlink_to(project / "main.py")
    (project / "loop").symlink_to(project)  # must not recurse forever
    assert read_archive(zip_directory(project)).names() == ["alias.py", "main.py"]

    (tmp_path / "secret.txt").write_text("secret")
    (project / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (project / "outdir").symlink_to(tmp_path)
    with pytest.raises(InvalidRequest) as exc_info:
        zip_directory(project)
    assert "leak.txt" in exc_info.value.message and "outdir" in exc_info.value.message


def test_zip_directory_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as exc_info:
        zip_directory(tmp_path / "nope")
    assert "is not a folder" in exc_info.value.message


def test_extract_archive_writes_files_with_mode_0644(tmp_path: Path) -> None:
    archive = read_archive(make_zip({"main.py": MAIN, "lib/deep/a.py": b"a"}))
    dest = tmp_path / "out"
    old_umask = os.umask(0o077)
    try:
        extract_archive(archive, dest)
    finally:
        os.umask(old_umask)
    assert (dest / "main.py").read_bytes() == MAIN
    assert (dest / "lib" / "deep" / "a.py").read_bytes() == b"a"
    assert stat.S_IMODE((dest / "main.py").stat().st_mode) == 0o644


@pytest.mark.parametrize("name", ["../escape.py", "/tmp/abs.py", "a/../../escape.py"])
def test_extract_refuses_crafted_paths(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "out"
    with pytest.raises(InvalidRequest) as exc_info:
        extract_archive(Archive({name: b"x"}), dest)
    assert repr(name) in exc_info.value.message
    assert not (tmp_path / "escape.py").exists()


def test_extract_refuses_planted_symlink_in_dest(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "lib").symlink_to(outside)
    with pytest.raises(InvalidRequest) as exc_info:
        extract_archive(Archive({"lib/a.py": b"x"}), dest)
    assert "'lib/a.py'" in exc_info.value.message
    assert not (outside / "a.py").exists()


# --- found by mutation testing (make mutate): limits are inclusive, messages say what to do ---------------


def test_sizes_in_messages_are_mib_from_one_mib_and_bytes_below() -> None:
    assert "the upload is 1.5 MiB, over the 1.0 MiB limit" in refused(b"x" * (3 * MiB // 2), ArchiveLimits(max_zip_bytes=MiB))
    assert "the upload is 101 bytes, over the 100 bytes limit" in refused(b"x" * 101, ArchiveLimits(max_zip_bytes=100))
    assert "over the 1048575 bytes limit" in refused(b"x" * MiB, ArchiveLimits(max_zip_bytes=MiB - 1))


def test_every_limit_is_inclusive() -> None:
    big = b"a" * (RATIO_EXEMPT + 4096)  # past the ratio exemption, highly compressible
    data = build_zip([("main.py", MAIN), ("big.txt", big)])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    ratio = max(i.file_size / max(i.compress_size, 1) for i in infos)
    exact = ArchiveLimits(max_zip_bytes=len(data), max_entries=len(infos), max_entry_bytes=len(big),
                          max_total_bytes=sum(i.file_size for i in infos), max_ratio=ratio)
    assert read_archive(data, exact).files["big.txt"] == big


@pytest.mark.parametrize("entries,hint", [
    ([("main.py", MAIN), ("big.bin", b"\0" * (2 * MiB))], "(this looks like a zip bomb); upload the real files"),
    ([("main.py", MAIN)] * 2, "re-create the zip so each file is stored once"),
])
def test_refusals_say_what_to_do(entries: list[tuple[str, bytes]], hint: str) -> None:
    assert refused(build_zip(entries)).endswith(hint)


def test_refusal_hints_for_limits() -> None:
    data = build_zip([("main.py", MAIN), ("b.py", b"b")])
    assert refused(data, ArchiveLimits(max_zip_bytes=10)).endswith(
        "limit for a function package; keep large data out of the package")
    assert refused(data, ArchiveLimits(max_entries=1)).endswith("leave out virtualenvs, caches and data files")
    assert refused(data, ArchiveLimits(max_total_bytes=5)).endswith("keep large data out of the package")
    assert refused(data, ArchiveLimits(max_entry_bytes=5)).endswith("limit per file; keep large data out of the package")


def test_pycache_folders_are_dropped_whatever_their_files_are_called() -> None:
    archive = read_archive(build_zip([("main.py", MAIN), ("pkg/__pycache__/notes.txt", b"x"), ("pkg/a.py", b"a")]))
    assert archive.names() == ["main.py", "pkg/a.py"]


@pytest.mark.parametrize("entries", [
    [("main.py", MAIN), ("data/", b""), ("data", b"x")],           # an explicit folder entry and a file
    [("main.py", MAIN), ("a/b/c.py", b"c"), ("a/b", b"x")],        # a file where a nested folder is
    [("main.py", MAIN), ("a/b/c.py", b"c"), ("a", b"x")],          # a file where the outer folder is
])
def test_a_name_used_as_file_and_folder_is_refused(entries: list[tuple[str, bytes]]) -> None:
    assert "is both a file and a folder; rename one of them" in refused(build_zip(entries))


def test_make_zip_entries_are_regular_files_mode_0644_from_unix() -> None:
    with zipfile.ZipFile(io.BytesIO(make_zip({"main.py": MAIN}))) as zf:
        [info] = zf.infolist()
    assert info.create_system == 3 and info.external_attr >> 16 == stat.S_IFREG | 0o644


def test_zip_directory_contents(tmp_path: Path) -> None:
    """What goes into the zip itself (read_archive would drop .pyc files again, hiding a mistake here)."""
    (tmp_path / "a.pyc").write_bytes(b"junk")
    (tmp_path / "b.py").write_text("b = 1\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "util.py").write_text("x = 1\n")
    (tmp_path / "shared").symlink_to(tmp_path / "lib")  # a linked folder inside: followed
    (tmp_path / "aa").symlink_to(tmp_path)  # a link to an ancestor, sorted first: skipped, not the end of the walk
    with zipfile.ZipFile(io.BytesIO(zip_directory(tmp_path))) as zf:
        assert zf.namelist() == ["b.py", "lib/util.py", "shared/util.py"]


def test_zip_directory_names_every_link_outside_and_the_folder(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    (project / "a-leak.txt").symlink_to(tmp_path / "secret.txt")
    (project / "b-leak.txt").symlink_to(tmp_path / "secret.txt")
    (project / "c.py").write_text("c = 1\n")
    with pytest.raises(InvalidRequest) as exc_info:
        zip_directory(project)
    assert exc_info.value.message == (f"symlinks pointing outside {str(project)!r} cannot be uploaded: a-leak.txt, "
                                      "b-leak.txt; copy the files they point to into the folder")
    (project / "a-leak.txt").unlink()
    (project / "b-leak.txt").unlink()
    (project / "dangling.py").symlink_to(project / "gone.py")
    with pytest.raises(InvalidRequest) as exc_info:
        zip_directory(project)
    assert exc_info.value.message == "symlink 'dangling.py' points to nothing; remove it or replace it with a file"
    with pytest.raises(InvalidRequest) as exc_info:
        zip_directory(project / "nope")
    assert exc_info.value.message == f"{str(project / 'nope')!r} is not a folder; pass the function's folder"


def test_extract_archive_makes_missing_parents_and_replaces_longer_files(tmp_path: Path) -> None:
    dest = tmp_path / "a" / "b" / "out"
    extract_archive(Archive({"main.py": b"long old contents " * 10}), dest)
    extract_archive(Archive({"main.py": MAIN}), dest)
    assert (dest / "main.py").read_bytes() == MAIN


def test_extract_refusal_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as exc_info:
        extract_archive(Archive({"../x.py": b"x"}), tmp_path / "out")
    assert exc_info.value.message.endswith("use paths relative to the function's root")
