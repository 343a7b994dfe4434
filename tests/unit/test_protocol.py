"""The wire protocol: golden bytes, round trips and malformed input."""

from __future__ import annotations

import msgpack
import pytest

from shared import protocol
from shared.errors import Conflict, Internal, NotFound, ProtocolError, from_wire


def test_golden_bytes_of_a_request() -> None:
    frames = protocol.request(1, "ping", {"x": 1})
    assert frames == [b"NUC1", b"REQ", b"\x83\xa2id\x01\xa6method\xa4ping\xa4args\x81\xa1x\x01"]


def test_golden_bytes_of_an_invoke_header() -> None:
    frames = protocol.encode(protocol.INVOKE, {"call_id": "c1", "function": "f"}, b"payload")
    assert frames == [b"NUC1", b"INVOKE", b"\x82\xa7call_id\xa2c1\xa8function\xa1f", b"payload"]


def test_round_trip_keeps_bodies_raw() -> None:
    zip_bytes = bytes(range(256)) * 10
    msg = protocol.decode(protocol.encode(protocol.RESULT, {"call_id": "x", "status": 200}, zip_bytes, b""))
    assert msg.command == protocol.RESULT
    assert msg.header == {"call_id": "x", "status": 200}
    assert msg.bodies == (zip_bytes, b"") and msg.body == zip_bytes


def test_event_round_trip() -> None:
    topic, msg = protocol.decode_published(protocol.encode_published(b"function.changed", {"seq": 4, "kind": "k", "data": {}}))
    assert topic == b"function.changed" and msg.command == protocol.PUBLISH and msg.header["seq"] == 4


def test_envelope_split() -> None:
    env, rest = protocol.split_envelope([b"peer-id", *protocol.request(3, "m")])
    assert env == [b"peer-id"] and protocol.decode(rest).header["id"] == 3
    env, rest = protocol.split_envelope([b"peer-id", b"", *protocol.request(3, "m")])
    assert env == [b"peer-id", b""]


@pytest.mark.parametrize("frames,needle", [
    ([b"NUC1", b"REQ"], "at least 3"),
    ([b"NUC2", b"REQ", msgpack.packb({})], "bad signature"),
    ([b"NUC1", b"NOPE", msgpack.packb({})], "unknown command"),
    ([b"NUC1", b"REQ", b"\xc1"], "not valid msgpack"),
    ([b"NUC1", b"REQ", msgpack.packb([1, 2])], "must be a msgpack map"),
    ([b"NUC1", b"REQ", b"\x81" + msgpack.packb(1) + msgpack.packb(2)], "not valid msgpack"),
    ([b"NUC1", b"REQ", b"\x00" * (protocol.MAX_HEADER_BYTES + 1)], "over the"),
    ([b"NUC1", b"REQ", msgpack.packb({})] + [b""] * protocol.MAX_FRAMES, "at most"),
])
def test_malformed_messages_raise_protocol_error(frames: list[bytes], needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(frames)
    assert needle in str(info.value)


def test_envelope_without_signature() -> None:
    with pytest.raises(ProtocolError):
        protocol.split_envelope([b"a", b"b", b"c", b"d", b"e", b"f"])
    with pytest.raises(ProtocolError):
        protocol.split_envelope(protocol.request(1, "m"))


def test_encode_refuses_unknown_commands_and_huge_headers() -> None:
    with pytest.raises(ProtocolError):
        protocol.encode(b"HELLO", {})
    with pytest.raises(ProtocolError):
        protocol.encode(protocol.REQ, {"x": "y" * protocol.MAX_HEADER_BYTES})


def test_errors_cross_the_wire_as_the_same_class() -> None:
    wire = NotFound("function 'x' not found").to_wire()
    assert wire == {"code": "not_found", "message": "function 'x' not found"}
    back = from_wire(wire)
    assert isinstance(back, NotFound) and back.message == "function 'x' not found" and back.http_status == 404
    c = from_wire(Conflict("dup", {"package": "requests"}).to_wire())
    assert isinstance(c, Conflict) and c.details == {"package": "requests"}
    assert isinstance(from_wire({"code": "martian"}), Internal)
    assert isinstance(from_wire("garbage"), Internal)
