"""The write-behind fold: batches delivered in any order, any number of times, leave the same
writes (which is what makes at-least-once delivery safe)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from streamplane.telemetry import EventBatch, HeartbeatEvent
from streamplane.telemetry.consumers import Position, StoreWrites, WriteBehind, fold
from streamplane.telemetry.stream_embedded import EmbeddedStream


def _batch(session: str, at: float, position: float, kind: str = "position") -> EventBatch:
    event = HeartbeatEvent(
        account="a",
        session=session,
        device=f"d-{session}",
        title="demo",
        received_at=at + 0.5,
        at=at,
        seq=int(at),
        kind=kind,
        position_s=position,
    )
    return EventBatch(
        device=event.device,
        events=[event],
        account="a",
        session=session,
        title="demo",
        received_at=at + 0.5,
    )


_BATCHES = st.lists(
    st.builds(
        _batch,
        st.sampled_from(["s1", "s2"]),
        st.floats(min_value=0, max_value=1e4),
        st.floats(min_value=0, max_value=1e4),
        st.sampled_from(["position", "position", "stop"]),
    ),
    min_size=1,
    max_size=30,
)


@given(_BATCHES, st.randoms(use_true_random=False), st.integers(min_value=0, max_value=5))
def test_order_and_duplicates_change_nothing(
    batches: list[EventBatch], rnd: object, copies: int
) -> None:
    delivered = batches + batches[:copies]
    rnd.shuffle(delivered)  # type: ignore[attr-defined]
    once, redelivered = fold(batches), fold(delivered)
    assert (once.resume, once.seen, once.stopped) == (
        redelivered.resume,
        redelivered.seen,
        redelivered.stopped,
    )


@given(_BATCHES)
def test_the_latest_event_by_event_time_wins(batches: list[EventBatch]) -> None:
    latest = max(Position(b.events[0].at, b.events[0].position_s) for b in batches)
    assert fold(batches).resume[("a", "demo")] == latest


def test_an_empty_heartbeat_still_keeps_the_screen() -> None:
    empty = EventBatch(
        device="tv", events=[], account="a", session="s1", title="demo", received_at=7.0
    )
    writes = fold([empty])
    assert writes.seen == {"s1": 7.0} and writes.resume == {} and bool(writes)


class _CountingSink:
    def __init__(self) -> None:
        self.writes: list[StoreWrites] = []

    async def write(self, writes: StoreWrites) -> None:
        self.writes.append(writes)


async def test_a_steady_trickle_reaches_the_store_in_few_large_writes(tmp_path: Path) -> None:
    """Heartbeats arriving one at a time (a storm seen from one consumer) are written a few
    rounds a second, not one write per heartbeat or two; every one of them is written."""
    stream = EmbeddedStream(tmp_path / "stream", partitions=4)
    sink = _CountingSink()
    consumer = WriteBehind(stream, sink, linger_s=0.5)
    await consumer.start()
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        n = 0
        while loop.time() - began < 1.5:
            await stream.append(_batch(f"s{n % 7}", 1000.0 + n, float(n)))
            n += 1
            await asyncio.sleep(0.005)
        await consumer.settle(timeout_s=30)
        spent = loop.time() - began
    finally:
        await consumer.stop()
        await stream.close()
    assert sum(w.events for w in sink.writes) == n  # nothing lost
    # a round at most every 0.5 s (the last may follow the trickle's end at once)
    assert len(sink.writes) <= spent / 0.5 + 2, (len(sink.writes), n, spent)


class _SlowSink(_CountingSink):
    async def write(self, writes: StoreWrites) -> None:
        await asyncio.sleep(0.1)  # a round's work
        await super().write(writes)


async def test_a_consumer_given_a_share_of_the_time_rests_between_rounds(tmp_path: Path) -> None:
    """With a backlog it cannot clear at once and a quarter of the time, a consumer rests
    three times as long as each round took, leaving its process the rest; then it writes
    everything all the same."""
    stream = EmbeddedStream(tmp_path / "stream", partitions=4)
    for n in range(40):
        await stream.append(_batch(f"s{n}", 1000.0 + n, float(n)))
    sink = _SlowSink()
    consumer = WriteBehind(stream, sink, max_batches=2, share=0.25)
    await consumer.start()
    try:
        await asyncio.sleep(1.5)
        rounds = len(sink.writes)
        await consumer.settle(timeout_s=60)
    finally:
        await consumer.stop()
        await stream.close()
    # each round takes 0.1 s at least, then rests 0.3 s: 4 rounds in 1.5 s at most (15 without)
    assert rounds <= 4, rounds
    assert sum(w.events for w in sink.writes) == 40  # nothing lost


class _DeafSink(_CountingSink):
    """A store write that does not hear a cancellation (as a library may not) until told to."""

    def __init__(self) -> None:
        super().__init__()
        self.deaf = True

    async def write(self, writes: StoreWrites) -> None:
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if not self.deaf:
                    raise


async def test_a_consumer_that_will_not_stop_does_not_hold_its_process(
    tmp_path: Path, caplog: object
) -> None:
    """Stopping gives a consumer a bounded time and then says that it did not stop: a process
    shutting down (the control plane, a test's teardown) is never held for ever."""
    stream = EmbeddedStream(tmp_path / "stream", partitions=4)
    await stream.append(_batch("s1", 1000.0, 1.0))
    sink = _DeafSink()
    consumer = WriteBehind(stream, sink)
    await consumer.start()
    task = consumer._task
    assert task is not None
    await asyncio.sleep(0.3)  # inside the write
    try:
        await asyncio.wait_for(consumer.stop(timeout_s=0.5), 10)
        assert "did not stop" in caplog.text  # type: ignore[attr-defined]
    finally:
        sink.deaf = False
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        await stream.close()
