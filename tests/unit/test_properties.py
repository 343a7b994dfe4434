"""Property-based tests (hypothesis) of the three parsers that take input from outside.

For any input, each either returns its result or raises the project's own error (InvalidRequest and
its ProtocolError), never another exception, and what it accepts round-trips.
"""

from __future__ import annotations

import io
import zipfile

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared import protocol
from shared.archive import Archive, ArchiveLimits, make_zip, read_archive
from shared.errors import InvalidRequest
from shared.spec import parse_function

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# msgpack-able values as a header could carry them
scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=30) \
    | st.binary(max_size=30)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                            max_size=4), max_leaves=20)
headers = st.dictionaries(st.text(max_size=12), values, max_size=6)
commands = st.sampled_from(sorted(protocol.COMMANDS))


@FAST
@given(commands, headers, st.lists(st.binary(max_size=64), max_size=4))
def test_frames_round_trip(command: bytes, header: dict, bodies: list[bytes]) -> None:
    msg = protocol.decode(protocol.encode(command, header, *bodies))
    assert msg.command == command and msg.header == header
    assert [bytes(b) for b in msg.bodies] == bodies


@FAST
@given(st.lists(st.binary(max_size=80), max_size=8))
def test_any_frames_decode_or_raise_protocol_error(frames: list[bytes]) -> None:
    try:
        protocol.decode(frames)
    except protocol.ProtocolError:
        pass


@FAST
@given(commands, st.binary(max_size=200), st.lists(st.binary(max_size=16), max_size=3))
def test_any_header_bytes_decode_or_raise_protocol_error(command: bytes, header: bytes, bodies: list[bytes]) -> None:
    try:
        protocol.decode([protocol.SIGNATURE, command, header, *bodies])
    except protocol.ProtocolError:
        pass


# YAML documents built from the keys a spec uses, with values of any shape
spec_keys = st.sampled_from(["handler", "runtime", "minReplicas", "maxReplicas", "replicas", "timeout", "env",
                             "build", "triggers", "resources", "maxConcurrency", "retry", "private", "warmStart",
                             "description", "idleTimeout", "targetConcurrency"])
yaml_values = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**6) | st.text(max_size=20)
                           | st.floats(allow_nan=False, allow_infinity=False),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=12)


@FAST
@given(st.dictionaries(spec_keys, yaml_values, max_size=6))
def test_any_spec_parses_or_raises_invalid_request(spec: dict) -> None:
    import yaml

    text = yaml.safe_dump({"metadata": {"name": "prop"}, "spec": {"handler": "main:handler", **spec}})
    archive = Archive({"function.yaml": text.encode(), "main.py": b"def handler(context, event):\n    return 1\n"})
    try:
        parsed, warnings = parse_function(archive)
    except InvalidRequest:
        return
    assert parsed.handler and all(isinstance(w, str) for w in warnings)


@FAST
@given(st.text(max_size=300))
def test_any_yaml_text_parses_or_raises_invalid_request(text: str) -> None:
    archive = Archive({"function.yaml": text.encode(), "main.py": b"def handler(context, event):\n    return 1\n"})
    try:
        parse_function(archive)
    except InvalidRequest:
        pass


# zipfile's writer itself truncates names at a NUL; the reader's NUL check is pinned in test_archive.py
names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=24)


@FAST
@given(st.dictionaries(names, st.binary(max_size=64), min_size=1, max_size=6))
@example({"0/0\\0": b""})  # found by CI: a folder in a folder, unwrapped once per read
@example({"0/0/0": b"", "0/1/0": b""})  # two folders left after the unwrap are kept as they are
def test_any_zip_reads_or_raises_invalid_request(files: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    try:
        archive = read_archive(buf.getvalue(), ArchiveLimits(max_entries=4))
    except InvalidRequest:
        return
    # what is accepted is kept byte for byte and packs to a zip that reads back the same, except that
    # a read unwraps one folder holding everything (a zipped folder): files still all in one folder
    # after that lose it again on the next read; files in several folders keep them
    assert all(data in files.values() for data in archive.files.values())
    again = read_archive(make_zip(archive.files)).files
    tops = {path.split("/", 1)[0] if "/" in path else None for path in archive.files}
    if len(tops) == 1 and None not in tops:
        assert again == {path.split("/", 1)[1]: data for path, data in archive.files.items()}
    else:
        assert again == archive.files


@FAST
@given(st.binary(max_size=400))
def test_any_bytes_read_or_raise_invalid_request(data: bytes) -> None:
    try:
        read_archive(data)
    except InvalidRequest:
        pass


@FAST
@given(st.binary(min_size=30, max_size=400), st.integers(0, 399), st.integers(0, 255))
def test_corrupted_zips_read_or_raise_invalid_request(seed: bytes, where: int, byte: int) -> None:
    data = bytearray(make_zip({"main.py": seed, "function.yaml": b"spec: {handler: main:handler}\n"}))
    data[where % len(data)] = byte
    try:
        read_archive(bytes(data))
    except InvalidRequest:
        pass
