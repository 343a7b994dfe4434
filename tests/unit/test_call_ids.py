"""Call ids: unguessable from one another, and in the order they were made (the store appends them to its index)."""

from __future__ import annotations

import time

from services.gateway.core import new_call_id


def test_a_call_id_is_32_hex_digits_whose_last_80_bits_are_random() -> None:
    ids = [new_call_id() for _ in range(2000)]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    tails = {i[12:] for i in ids}
    assert len(tails) == len(ids), "no two random parts alike"
    # each hex digit of the random part takes many values over 2000 ids (a counter or a constant would not)
    assert all(len({t[k] for t in tails}) >= 12 for k in range(20))


def test_call_ids_sort_in_the_order_they_were_made_across_milliseconds() -> None:
    before = new_call_id()
    start = time.monotonic()
    while time.monotonic() - start < 0.002:  # into a later millisecond
        pass
    after = new_call_id()
    assert before < after and int(before[:12], 16) <= time.time_ns() // 1_000_000
    assert abs(int(after[:12], 16) - time.time_ns() // 1_000_000) < 60_000, "the prefix is the time in ms"
