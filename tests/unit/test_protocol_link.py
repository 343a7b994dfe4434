"""The instance link's frames in shared/protocol.py: golden bytes, round trips, malformed input."""

from __future__ import annotations

import pytest

from shared import protocol
from shared.errors import ProtocolError


def test_golden_bytes_of_an_invoke_and_a_result() -> None:
    assert protocol.invoke({"call_id": "c1", "function": "f"}, b"payload") == [
        b"NUC1", b"INVOKE", b"\x82\xa7call_id\xa2c1\xa8function\xa1f", b"payload"]
    assert protocol.result({"call_id": "c1", "status": 200}, b"ok") == [
        b"NUC1", b"RESULT", b"\x82\xa7call_id\xa2c1\xa6status\xcc\xc8", b"ok"]


def test_the_hot_path_builders_say_what_encode_says() -> None:
    header = {"call_id": "c1", "function": "f", "deadline_ms": 1_700_000_000_000}
    assert protocol.invoke(header, b"x") == protocol.encode(protocol.INVOKE, header, b"x")
    assert protocol.result(header, b"x") == protocol.encode(protocol.RESULT, header, b"x")


def test_a_result_batch_carries_the_message_fields_beside_the_calls() -> None:
    frames = protocol.result_batch([{"call_id": "a"}, {"call_id": "b"}], [b"1", b"2"], {"edges": [["x", "y"]]})
    assert frames[:3] == [b"NUC1", b"RESULT",
                          b"\x82\xa5batch\x92\x81\xa7call_id\xa1a\x81\xa7call_id\xa1b\xa5edges\x91\x92\xa1x\xa1y"]
    msg = protocol.decode(frames)
    assert msg.header["edges"] == [["x", "y"]]
    assert protocol.unbatch(msg) == [({"call_id": "a"}, b"1"), ({"call_id": "b"}, b"2")]
    assert protocol.decode(protocol.result_batch([{"call_id": "a"}], [b"1"])).header == {"batch": [{"call_id": "a"}]}


@pytest.mark.parametrize("headers,bodies", [([], []), ([{}], [b"1", b"2"]), ([{}] * (protocol.MAX_BATCH + 1),
                                                                             [b""] * (protocol.MAX_BATCH + 1))])
def test_a_result_batch_refuses_a_bad_shape(headers: list, bodies: list) -> None:
    with pytest.raises(ProtocolError, match="a batch needs"):
        protocol.result_batch(headers, bodies)


def test_a_peers_message_is_split_from_its_identity() -> None:
    ident, msg = protocol.decode_from_peer([b"inst-1", *protocol.result({"call_id": "c"}, b"r")])
    assert ident == b"inst-1" and msg.command == protocol.RESULT and msg.body == b"r"


@pytest.mark.parametrize("frames,needle", [
    ([b"inst-1", b"NUC1", b"RESULT"], "at least 4"),
    ([b"inst-1", b"NUC0", b"RESULT", b"\x80"], "bad signature"),
    ([b"inst-1", b"NUC1", b"RESULT", b"\xc1"], "not valid msgpack"),
])
def test_a_malformed_peer_message_raises_protocol_error(frames: list[bytes], needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        protocol.decode_from_peer(frames)
