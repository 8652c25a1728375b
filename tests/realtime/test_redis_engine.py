"""What only the Redis engines can get wrong: the key layout a cluster relies on, a stream that
lost entries behind its meta, sequence numbers past what Lua's numbers hold, bad settings."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from streamplane.realtime.broker import BrokerError, Position, StateValue
from streamplane.realtime.redis import RedisBroker, channel_key, client_options
from tests.realtime.redis_engines import delete_prefix
from tests.realtime.redis_servers import SHARED_REDIS, reachable

KEEP = {"history_size": 100, "history_ttl": 300.0}


@pytest.fixture
async def shared() -> AsyncIterator[tuple[RedisBroker, aioredis.Redis, str]]:
    if not reachable(SHARED_REDIS):
        pytest.skip("no Redis at 127.0.0.1:6379")
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    broker = RedisBroker(aioredis.Redis(port=SHARED_REDIS[1], **client_options()), prefix=prefix)
    raw = aioredis.Redis(port=SHARED_REDIS[1])
    await broker.start()
    try:
        yield broker, raw, prefix
    finally:
        await broker.close()
        await raw.aclose()
        await delete_prefix(SHARED_REDIS, prefix)


async def test_every_key_of_a_channel_hashes_to_one_cluster_slot_even_with_braces(
    shared: tuple[RedisBroker, aioredis.Redis, str],
) -> None:
    broker, raw, prefix = shared
    for channel in ("chat:final", "chat:{x}", "chat:}{", "chat:%7B"):
        await broker.publish(channel, b"{}", **KEEP)
        await broker.state_write(
            channel,
            StateValue(key="k", value=b"1", seq=1, source_time_ms=0, max_age_ms=1),
            **KEEP,
        )
        keys = [k async for k in raw.scan_iter(match=f"{prefix}*")]
        parts = [channel_key(prefix, channel, part) for part in "mhsq"]
        assert set(parts) <= {k.decode() for k in keys}
        slots = {key_slot(k.encode()) for k in parts}  # redis-py's CRC16 with the tag rules
        assert len(slots) == 1, f"{channel!r}: its keys must share one slot"
    # The escaping is injective: "chat:{x}" and "chat:%7Bx%7D" are two channels.
    assert channel_key(prefix, "chat:{x}", "m") != channel_key(prefix, "chat:%7Bx%7D", "m")


async def test_a_stream_that_lost_entries_behind_its_meta_is_not_recovered_partly(
    shared: tuple[RedisBroker, aioredis.Redis, str],
) -> None:
    broker, raw, prefix = shared
    positions = [await broker.publish("chat:a", b'{"n":1}', **KEEP) for _ in range(6)]
    # An operator's XDEL, a key evicted under memory pressure: the meta still says 1..6.
    await raw.xdel(channel_key(prefix, "chat:a", "h"), "4-0")
    answer = await broker.recover("chat:a", positions[1], limit=100)
    assert not answer.recovered and answer.publications == []
    assert (await broker.recover("chat:a", positions[3], limit=100)).recovered  # 5, 6 kept
    await raw.delete(channel_key(prefix, "chat:a", "h"))
    assert not (await broker.recover("chat:a", positions[3], limit=100)).recovered
    after = await broker.publish("chat:a", b"{}", **KEEP)
    assert after == Position(positions[0].epoch, 7), "the epoch holds while its meta does"
    assert (await broker.recover("chat:a", positions[-1], limit=100)).publications[0].offset == 7


async def test_a_lost_meta_starts_a_new_epoch_and_the_old_positions_are_not_recovered(
    shared: tuple[RedisBroker, aioredis.Redis, str],
) -> None:
    broker, raw, prefix = shared
    before = await broker.publish("chat:a", b"{}", **KEEP)
    await raw.delete(channel_key(prefix, "chat:a", "m"))
    after = await broker.publish("chat:a", b"{}", **KEEP)
    assert after.offset == 1 and after.epoch != before.epoch
    assert not (await broker.recover("chat:a", before, limit=100)).recovered


async def test_state_sequence_numbers_compare_exactly_across_the_whole_64_bit_range(
    shared: tuple[RedisBroker, aioredis.Redis, str],
) -> None:
    broker, _, _ = shared

    def value(seq: int) -> StateValue:
        return StateValue(key="odds", value=json.dumps(seq).encode(), seq=seq,
                          source_time_ms=0, max_age_ms=1000)  # fmt: skip

    big = 2**62 + 1  # past 2**53, where a double cannot tell it from its neighbours
    assert (await broker.state_write("odds:x", value(-(2**63)), **KEEP)).applied
    assert (await broker.state_write("odds:x", value(big - 1), **KEEP)).applied
    assert (await broker.state_write("odds:x", value(big), **KEEP)).applied
    stale = await broker.state_write("odds:x", value(big - 1), **KEEP)
    assert not stale.applied and stale.current.seq == big
    assert not (await broker.state_write("odds:x", value(big), **KEEP)).applied
    assert (await broker.state_write("odds:x", value(2**63 - 1), **KEEP)).applied
    with pytest.raises(BrokerError, match="64 bits"):
        await broker.state_write("odds:x", value(2**63), **KEEP)
    assert (await broker.state("odds:x"))["odds"].seq == 2**63 - 1


async def test_settings_that_would_break_the_engine_are_refused_with_a_reason() -> None:
    with pytest.raises(BrokerError, match="braces"):
        RedisBroker(aioredis.Redis(), prefix="{event}:")
    with pytest.raises(BrokerError, match="TLS"):
        RedisBroker.connect("rediss://127.0.0.1:6379")
    with pytest.raises(BrokerError, match="TCP"):
        RedisBroker.connect("unix:///tmp/redis.sock")
    broker = RedisBroker(aioredis.Redis())
    with pytest.raises(BrokerError, match="empty"):
        await broker.publish("", b"{}", **KEEP)
    await broker.close()


async def test_a_prefix_in_the_url_keeps_events_apart_on_one_redis(
    shared: tuple[RedisBroker, aioredis.Redis, str],
) -> None:
    _, raw, prefix = shared
    one = RedisBroker.connect(f"redis://127.0.0.1:{SHARED_REDIS[1]}/0?prefix={prefix}a:")
    two = RedisBroker.connect(f"redis://127.0.0.1:{SHARED_REDIS[1]}/0?prefix={prefix}b:")
    try:
        assert (await one.publish("chat:final", b"{}", **KEEP)).offset == 1
        assert (await two.publish("chat:final", b"{}", **KEEP)).offset == 1, "another stream"
        assert await raw.exists(channel_key(f"{prefix}a:", "chat:final", "m"))
    finally:
        await one.close()
        await two.close()
