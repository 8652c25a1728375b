"""One behaviour suite for every stream engine (embedded, JetStream): durable appends in
device order, durable consumer groups, explicit acks, redelivery of what was not acknowledged."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from streamplane.telemetry import Delivery, StreamError, StreamUnavailable, partition_of
from streamplane.telemetry.stream_embedded import EmbeddedStream
from streamplane.telemetry.stream_nats import NatsStream

from .conftest import Opener, PrivateNats, batch


async def _drain(group_fetch: object, want: int, timeout_s: float = 5.0) -> list[Delivery]:
    fetch = group_fetch  # a Group
    got: list[Delivery] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    # distinct batches: on a loaded machine one may come back (its ack wait ran out) before
    # the last is handed out
    while (
        len({(d.partition, d.offset) for d in got}) < want
        and asyncio.get_running_loop().time() < deadline
    ):
        got += await fetch.fetch(256, timeout_s=0.5)  # type: ignore[attr-defined]
    return got


async def test_a_device_keeps_its_partition_and_its_order(open_stream: Opener) -> None:
    stream = await open_stream()
    group = await stream.group("writer")
    for n in range(1, 6):
        for device in ("tv-1", "phone-2", "laptop-3"):
            appended = await stream.append(batch(device, n))
            assert appended.partition == partition_of(device, stream.partitions)
    got = await _drain(group, 15)
    assert len(got) == 15
    for device in ("tv-1", "phone-2", "laptop-3"):
        mine = [d for d in got if d.batch.device == device]
        assert [d.batch.events[0].seq for d in mine] == [1, 2, 3, 4, 5]
        assert [d.offset for d in mine] == sorted(d.offset for d in mine)
    assert all(d.attempt == 1 for d in got)


async def test_concurrent_appends_are_all_stored_once(open_stream: Opener) -> None:
    stream = await open_stream()
    group = await stream.group("writer")
    acks = await asyncio.gather(*(stream.append(batch(f"d{n % 37}", n)) for n in range(400)))
    assert len({(a.partition, a.offset) for a in acks}) == 400
    got = await _drain(group, 400)
    assert sorted(d.batch.events[0].seq for d in got) == list(range(400))
    await group.ack(got)
    assert await group.backlog() == 0
    assert await group.fetch(10, timeout_s=0.2) == []


async def test_acknowledged_stays_acknowledged_and_the_rest_comes_back_after_a_restart(
    open_stream: Opener,
) -> None:
    stream = await open_stream()
    group = await stream.group("writer", ack_wait_s=1)
    for n in range(10):
        await stream.append(batch(f"d{n}", n))
    got = await _drain(group, 10)
    done = [d for d in got if d.batch.events[0].seq % 2 == 0]
    await group.ack(done)
    await group.close()
    await stream.close()  # the process goes away holding five batches unacknowledged

    again = await open_stream()
    # a restarted embedded stream hands them out at once; JetStream after the ack wait
    group = await again.group("writer", ack_wait_s=1)
    back = await _drain(group, 5)
    assert sorted(d.batch.events[0].seq for d in back) == [1, 3, 5, 7, 9]
    await group.ack(back)
    assert await group.backlog() == 0


async def test_a_batch_not_acknowledged_in_time_is_redelivered(open_stream: Opener) -> None:
    stream = await open_stream()
    group = await stream.group("writer", ack_wait_s=1.0)
    await stream.append(batch("tv", 1))
    await stream.append(batch("tv", 2))
    first = await _drain(group, 2)
    assert [d.attempt for d in first] == [1, 1]
    await group.ack(first[1:])  # the consumer died before acknowledging the first
    assert await group.fetch(10, timeout_s=0.2) == []  # not yet: its ack wait runs
    again = await _drain(group, 1, timeout_s=5)
    assert [(d.batch.events[0].seq, d.attempt) for d in again] == [(1, 2)]
    await group.ack(again)
    assert await group.fetch(10, timeout_s=1.3) == []
    assert await group.backlog() == 0


async def test_a_killed_member_s_batches_go_to_another_member(open_stream: Opener) -> None:
    stream = await open_stream()
    dying = await stream.group("writer", ack_wait_s=1.0)
    for n in range(5):
        await stream.append(batch("tv", n))
    taken = await _drain(dying, 5)
    assert {d.batch.events[0].seq for d in taken} == {0, 1, 2, 3, 4}
    await dying.close()  # killed mid-batch: nothing acknowledged
    other = await stream.group("writer", ack_wait_s=1.0)
    back = await _drain(other, 5, timeout_s=10)
    assert {d.batch.events[0].seq for d in back} == {0, 1, 2, 3, 4}
    assert all(d.attempt >= 2 for d in back)


async def test_groups_are_independent(open_stream: Opener) -> None:
    stream = await open_stream()
    resume = await stream.group("resume")
    qos = await stream.group("qos")
    for n in range(3):
        await stream.append(batch("tv", n))
    a = await _drain(resume, 3)
    await resume.ack(a)
    b = await _drain(qos, 3)
    assert len(a) == len(b) == 3
    assert await resume.backlog() == 0 and await qos.backlog() == 3


async def test_bad_group_names_are_refused(open_stream: Opener) -> None:
    stream = await open_stream()
    for bad in ("", "a.b", "x" * 65, "a b", "a>"):
        with pytest.raises(StreamError):
            await stream.group(bad)


async def test_an_embedded_stream_refuses_another_partition_count(tmp_path: Path) -> None:
    stream = EmbeddedStream(tmp_path, partitions=4)
    await stream.append(batch("tv", 1))
    await stream.close()
    with pytest.raises(StreamError, match="4 partitions"):
        EmbeddedStream(tmp_path, partitions=8)


def test_an_embedded_stream_is_refused_to_a_second_process(tmp_path: Path) -> None:
    import multiprocessing

    first = EmbeddedStream(tmp_path, partitions=2)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        why = pool.apply(_open_elsewhere, (str(tmp_path),))
    assert "open in another process" in why
    asyncio.run(first.close())
    with ctx.Pool(1) as pool:  # closed: free again
        assert pool.apply(_open_elsewhere, (str(tmp_path),)) == "opened"


def _open_elsewhere(directory: str) -> str:
    try:
        stream = EmbeddedStream(Path(directory), partitions=2)
    except StreamError as err:
        return str(err)
    asyncio.run(stream.close())
    return "opened"


async def test_an_embedded_stream_trims_what_every_group_acknowledged(tmp_path: Path) -> None:
    stream = EmbeddedStream(tmp_path, partitions=2)
    group = await stream.group("writer")
    for n in range(50):
        await stream.append(batch(f"d{n}", n))
    got = await _drain(group, 50)
    await group.ack(got)
    await stream.close()
    reopened = EmbeddedStream(tmp_path, partitions=2)
    group = await reopened.group("writer")
    assert await group.fetch(10, timeout_s=0.1) == []
    # offsets carry on after the trimmed ones, so no group mistakes new for acknowledged
    appended = await reopened.append(batch("d0", 99))
    assert appended.offset > max(d.offset for d in got if d.partition == appended.partition)
    (d,) = await _drain(group, 1)
    assert d.batch.events[0].seq == 99
    await reopened.close()


async def test_jetstream_restarted_under_load_loses_nothing_acknowledged(
    private_nats: PrivateNats,
) -> None:
    stream = await NatsStream.open(private_nats.url, name="RESTART", partitions=4, timeout_s=1)
    group = await stream.group("writer", ack_wait_s=2)
    acknowledged: set[int] = set()
    refused = 0

    async def player(n: int) -> None:
        nonlocal refused
        try:
            await stream.append(batch(f"d{n % 16}", n))
            acknowledged.add(n)
        except StreamUnavailable:
            refused += 1  # the player is told to retry: not acknowledged, not counted

    await asyncio.gather(*(player(n) for n in range(200)))
    private_nats.kill()  # kill -9 with appends in flight
    during = asyncio.gather(*(player(n) for n in range(200, 260)))
    await asyncio.sleep(0.3)
    private_nats.start()  # same port, same store
    await during
    await asyncio.gather(*(player(n) for n in range(260, 300)))
    assert refused < 100 and len(acknowledged) >= 200

    seen: set[int] = set()
    deadline = asyncio.get_running_loop().time() + 20
    while not acknowledged <= seen and asyncio.get_running_loop().time() < deadline:
        try:
            got = await group.fetch(256, timeout_s=0.5)
        except StreamUnavailable:
            await asyncio.sleep(0.1)
            continue
        seen |= {d.batch.events[0].seq for d in got}
        await group.ack(got)
    assert acknowledged <= seen, sorted(acknowledged - seen)[:10]
    await stream.close()


async def test_a_fetch_cancelled_as_its_stream_closes_ends_cancelled(open_stream: Opener) -> None:
    """A consumer told to stop while its connection closes under it stops: nats-py turns the
    cancellation of a waiting fetch into ConnectionClosedError when the connection is closed
    by the time the fetch wakes, and a loop that catches that and fetches again never ends."""
    stream = await open_stream()
    group = await stream.group("writer")
    fetching = asyncio.ensure_future(group.fetch(16, timeout_s=30.0))
    await asyncio.sleep(0.3)  # waiting for a batch that does not come
    fetching.cancel()
    await stream.close()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(fetching, 10)
