"""The gateway's recovery tail (history.RecentTail), pure: any sequence of deliveries, holes,
repeats, epoch changes and resets, and every recovery it answers is exact; one it refuses is
left to the engine."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.realtime.broker import Position, Publication
from streamplane.realtime.history import RecentTail

EPOCHS = ("e0", "e1", "e2")


def pub(epoch: str, offset: int, *, step_ms: int = 100) -> Publication:
    """The one publication the stream holds at ``(epoch, offset)``: an engine never makes two."""
    return Publication(
        channel="chat:final",
        epoch=epoch,
        offset=offset,
        data=f'{{"e":"{epoch}","n":{offset}}}'.encode(),
        time_ms=1_000_000 + offset * step_ms,
    )


def stream(epoch: str, first: int, last: int) -> list[Publication]:
    return [pub(epoch, n) for n in range(first, last + 1)]


deliver = st.tuples(st.just("deliver"), st.sampled_from(EPOCHS), st.integers(1, 40))
reset = st.tuples(st.just("reset"), st.sampled_from(EPOCHS), st.integers(0, 40), st.integers(0, 12))
forget = st.just(("forget",))
query = st.tuples(st.sampled_from(EPOCHS), st.integers(-2, 44), st.integers(0, 50))


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(0, 16),
    ttl_ms=st.integers(0, 5_000),
    steps=st.lists(st.one_of(deliver, deliver, deliver, reset, forget), max_size=60),
    queries=st.lists(query, min_size=1, max_size=8),
)
def test_every_answer_is_exactly_the_missed_publications_or_a_refusal(
    size: int,
    ttl_ms: int,
    steps: list[tuple[object, ...]],
    queries: list[tuple[str, int, int]],
) -> None:
    tail = RecentTail(size, ttl_ms)
    for step in steps:
        if step[0] == "deliver":
            _, epoch, offset = step
            tail.append(pub(str(epoch), int(offset)))  # type: ignore[call-overload]
        elif step[0] == "reset":
            _, epoch, offset, history = step
            top = int(offset)  # type: ignore[call-overload]
            page = stream(str(epoch), max(1, top - int(history) + 1), top)  # type: ignore[call-overload]
            tail.reset(Position(str(epoch), top), page)
        else:
            tail.reset(None)
        for epoch, since, limit in queries:
            answer = tail.recover(Position(epoch, since), limit=limit)
            if answer is None:
                continue
            top = tail.top
            assert top is not None and top.epoch == epoch
            assert 0 <= since <= top.offset and top.offset - since <= limit
            # Exact: every publication after ``since`` up to the top, each the stream's own,
            # once and in order; nothing more, nothing less.
            assert answer == stream(epoch, since + 1, top.offset)
            assert len(answer) <= size


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(1, 16),
    start=st.integers(0, 20),
    delivered=st.integers(0, 30),
    back=st.integers(0, 16),
)
def test_a_tail_that_saw_every_delivery_answers_any_gap_it_holds(
    size: int, start: int, delivered: int, back: int
) -> None:
    """Not refusing everything: a gap within the newest ``size`` delivered is answered."""
    tail = RecentTail(size, ttl_ms=10**9)
    tail.reset(Position("e0", start))
    for n in range(start + 1, start + delivered + 1):
        tail.append(pub("e0", n))
    top = start + delivered
    since = max(start, top - min(back, size, delivered))
    answer = tail.recover(Position("e0", since), limit=1_000)
    assert answer == stream("e0", since + 1, top)
    assert tail.recover(Position("e0", top), limit=1_000) == [], "nothing missed: recovered"


def test_a_hole_in_the_deliveries_is_never_bridged() -> None:
    tail = RecentTail(10, ttl_ms=10**9)
    tail.reset(Position("e0", 0))
    for n in (1, 2, 3, 5, 6):  # 4 never reached this process
        tail.append(pub("e0", n))
    assert tail.recover(Position("e0", 2), limit=100) is None
    assert tail.recover(Position("e0", 4), limit=100) == stream("e0", 5, 6)


def test_another_epoch_a_future_position_and_the_limit_are_refused() -> None:
    tail = RecentTail(10, ttl_ms=10**9)
    tail.reset(Position("e1", 5), stream("e1", 1, 5))
    assert tail.recover(Position("e0", 3), limit=100) is None
    assert tail.recover(Position("e1", 6), limit=100) is None
    assert tail.recover(Position("e1", 1), limit=3) is None
    assert tail.recover(Position("e1", 2), limit=3) == stream("e1", 3, 5)


def test_publications_past_the_history_age_are_not_given() -> None:
    tail = RecentTail(100, ttl_ms=250)  # publications 100 ms apart: the newest 3 are kept
    tail.reset(Position("e0", 0))
    for n in range(1, 11):
        tail.append(pub("e0", n))
    assert tail.recover(Position("e0", 6), limit=100) is None
    assert tail.recover(Position("e0", 7), limit=100) == stream("e0", 8, 10)


def test_an_unknown_tail_refuses_everything() -> None:
    tail = RecentTail(10, ttl_ms=10**9)
    assert tail.recover(Position("e0", 0), limit=100) is None
    tail.reset(Position("e0", 3), stream("e0", 1, 3))
    tail.reset(None)
    assert tail.recover(Position("e0", 3), limit=100) is None
