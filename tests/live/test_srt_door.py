"""The channel's SRT port as pure decisions: who holds it, and the refusal a second caller gets."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from streamplane.live.srt import IDLE_S, REJECT_CONFLICT, PublisherSlot, control_type, rejection

A, B = ("127.0.0.1", 4000), ("127.0.0.1", 4001)
HANDSHAKE, SHUTDOWN, DATA = 0, 5, None


def handshake(socket_id: int = 0x2EBAEEBC) -> bytes:
    """A caller's induction handshake, as libsrt sends it."""
    header = struct.pack("!IIII", 0x80000000, 0, 0x93, 0)
    cif = struct.pack("!IHHIIIiII", 4, 2, 0x3100, 0x513C, 1500, 8192, 1, socket_id, 0)
    return header + cif + bytes(16)


def test_a_second_caller_is_refused_while_the_first_is_on_air_and_let_in_once_it_left() -> None:
    slot = PublisherSlot()
    assert slot.admit(A, 0.0, 1, HANDSHAKE) == "take"
    assert slot.admit(A, 0.1, 1, DATA) == "forward"
    assert slot.admit(B, 0.2, 1, HANDSHAKE) == "refuse"
    assert slot.admit(A, 0.3, 1, DATA) == "forward"  # the first plays on
    assert slot.admit(A, 0.4, 1, SHUTDOWN) == "forward"  # its goodbye reaches the encoder
    assert slot.admit(B, 0.5, 2, HANDSHAKE) == "take"


def test_a_publisher_that_went_silent_or_never_got_on_air_gives_the_port_up() -> None:
    slot = PublisherSlot()
    slot.admit(A, 0.0, 1, HANDSHAKE)
    slot.admit(A, 0.1, 1, DATA)
    assert slot.admit(B, 0.1 + IDLE_S / 2, 1, HANDSHAKE) == "refuse"
    assert slot.admit(B, 0.2 + IDLE_S, 1, HANDSHAKE) == "take"  # A was killed: no goodbye
    # B's key was wrong: the listener refused it (the epoch moved on) before any data
    assert slot.admit(A, 0.3 + IDLE_S, 2, HANDSHAKE) == "take"


@given(st.lists(st.tuples(st.sampled_from([A, B]), st.sampled_from([HANDSHAKE, SHUTDOWN, DATA]))))
def test_while_one_publisher_sends_data_in_a_run_no_other_ever_gets_in(
    steps: list[tuple[tuple[str, int], int | None]],
) -> None:
    slot = PublisherSlot()
    assert slot.admit(A, 0.0, 1, HANDSHAKE) == "take"
    now = 0.0
    for sender, kind in steps:
        now += 0.01
        if sender == A and kind == SHUTDOWN:
            continue  # A stays
        slot.admit(A, now, 1, DATA)
        assert slot.admit(sender, now, 1, kind) == ("forward" if sender == A else "refuse")


def test_the_refusal_is_a_handshake_rejecting_that_caller_as_already_in_use() -> None:
    answer = rejection(handshake(0x1234))
    assert answer is not None and control_type(answer) == HANDSHAKE
    assert struct.unpack("!I", answer[12:16])[0] == 0x1234  # addressed to the caller's socket
    assert struct.unpack("!i", answer[16 + 20 : 16 + 24])[0] == REJECT_CONFLICT
    assert rejection(handshake()[:40]) is None  # not a whole handshake: nothing to answer
    assert control_type(b"\x00" * 16) is None  # data
