"""The broker contract (streamplane.realtime.broker), run on every engine in ENGINES.

Deliveries may arrive asynchronously (Redis pub/sub), so the tests wait on what was delivered,
never on time; expiry is driven by the harness's clock.
"""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from streamplane.realtime.broker import (
    Broker,
    BrokerUnavailable,
    Position,
    PresenceEntry,
    PresenceShare,
    PresenceStats,
    Publication,
    StateValue,
    state_from_data,
)
from tests.realtime.engines import Harness

KEEP = {"history_size": 100, "history_ttl": 300.0}


class Inbox:
    """A delivery callback that records what it got and lets a test wait for a count."""

    def __init__(self) -> None:
        self.got: list[Publication] = []
        self._changed = asyncio.Event()

    def __call__(self, pub: Publication) -> None:
        self.got.append(pub)
        self._changed.set()

    async def wait(self, count: int, timeout: float = 5.0) -> list[Publication]:
        async with asyncio.timeout(timeout):
            while len(self.got) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.got


def doc(n: int) -> bytes:
    return json.dumps({"text": f"message {n}"}).encode()


async def publish_many(node: Broker, channel: str, count: int, **keep: float) -> list[Position]:
    kept = {**KEEP, **keep}
    return [await node.publish(channel, doc(i), user="u1", **kept) for i in range(count)]


async def test_offsets_count_from_one_without_gaps_in_one_epoch(harness: Harness) -> None:
    node = await harness.node()
    positions = await publish_many(node, "chat:a", 5)
    assert [p.offset for p in positions] == [1, 2, 3, 4, 5]
    assert len({p.epoch for p in positions}) == 1
    other = await node.publish("chat:b", doc(0), **KEEP)
    assert other.offset == 1, "each channel has its own stream"


async def test_every_node_receives_every_publication_in_order(harness: Harness) -> None:
    a, b = await harness.node(), await harness.node()
    inbox_a, inbox_b = Inbox(), Inbox()
    await a.subscribe("chat:a", inbox_a)
    await b.subscribe("chat:a", inbox_b)
    await publish_many(a, "chat:a", 3)
    await publish_many(b, "chat:a", 3)
    for inbox in (inbox_a, inbox_b):
        got = await inbox.wait(6)
        assert [p.offset for p in got] == [1, 2, 3, 4, 5, 6]
        assert got[0].data == doc(0) and got[0].user == "u1" and got[0].kind == "message"
        assert got[0].time_ms == int(harness.clock() * 1000)


async def test_subscribing_twice_is_one_subscription_and_unsubscribe_stops_it(
    harness: Harness,
) -> None:
    node = await harness.node()
    inbox, witness = Inbox(), Inbox()
    await node.subscribe("chat:a", inbox)
    await node.subscribe("chat:a", inbox)
    await node.subscribe("chat:a", witness)
    await publish_many(node, "chat:a", 1)
    await witness.wait(1)
    await node.unsubscribe("chat:a", inbox)
    await publish_many(node, "chat:a", 1)
    await witness.wait(2)
    assert [p.offset for p in inbox.got] == [1], "one delivery per publication, none after"


async def test_a_closed_node_stops_receiving_and_the_others_carry_on(harness: Harness) -> None:
    a, b = await harness.node(), await harness.node()
    inbox_a, inbox_b = Inbox(), Inbox()
    await a.subscribe("chat:a", inbox_a)
    await b.subscribe("chat:a", inbox_b)
    await a.close()
    await publish_many(b, "chat:a", 2)
    await inbox_b.wait(2)
    assert inbox_a.got == []


async def test_recovery_within_history_gives_exactly_the_missed_publications(
    harness: Harness,
) -> None:
    a, b = await harness.node(), await harness.node()
    positions = await publish_many(a, "chat:a", 10)
    answer = await b.recover("chat:a", positions[3], limit=100)
    assert answer.recovered
    assert [p.offset for p in answer.publications] == [5, 6, 7, 8, 9, 10]
    assert [p.data for p in answer.publications] == [doc(i) for i in range(4, 10)]
    assert answer.top == positions[-1]


async def test_recovery_at_the_top_is_recovered_with_nothing_to_send(harness: Harness) -> None:
    node = await harness.node()
    positions = await publish_many(node, "chat:a", 3)
    answer = await node.recover("chat:a", positions[-1], limit=100)
    assert answer.recovered and answer.publications == []


async def test_recovery_from_before_the_first_publication(harness: Harness) -> None:
    node = await harness.node()
    positions = await publish_many(node, "chat:a", 3)
    answer = await node.recover("chat:a", Position(positions[0].epoch, 0), limit=100)
    assert answer.recovered and [p.offset for p in answer.publications] == [1, 2, 3]


async def test_a_gap_older_than_the_history_is_not_recovered_never_partly(
    harness: Harness,
) -> None:
    node = await harness.node()
    positions = await publish_many(node, "chat:a", 10, history_size=4)
    answer = await node.recover("chat:a", positions[4], limit=100)  # missed 6..10, kept 7..10
    assert not answer.recovered and answer.publications == []
    assert answer.top == positions[-1]
    edge = await node.recover("chat:a", positions[5], limit=100)  # missed 7..10, all kept
    assert edge.recovered and [p.offset for p in edge.publications] == [7, 8, 9, 10]


async def test_publications_older_than_the_history_ttl_are_not_recovered(
    harness: Harness,
) -> None:
    node = await harness.node()
    first = await publish_many(node, "chat:a", 3, history_ttl=60.0)
    harness.clock.advance(120)
    later = await publish_many(node, "chat:a", 2, history_ttl=60.0)
    assert not (await node.recover("chat:a", first[0], limit=100)).recovered
    assert not (await node.recover("chat:a", first[1], limit=100)).recovered, "3 expired"
    ok = await node.recover("chat:a", first[-1], limit=100)  # missed 4 and 5, both kept
    assert ok.recovered and [p.offset for p in ok.publications] == [4, 5]
    assert ok.top == later[-1]


async def test_another_epoch_is_not_recovered(harness: Harness) -> None:
    node = await harness.node()
    positions = await publish_many(node, "chat:a", 3)
    answer = await node.recover("chat:a", Position("another-epoch", 2), limit=100)
    assert not answer.recovered and answer.publications == []
    assert answer.top == positions[-1]


async def test_a_position_ahead_of_the_stream_is_not_recovered(harness: Harness) -> None:
    node = await harness.node()
    positions = await publish_many(node, "chat:a", 3)
    ahead = Position(positions[0].epoch, 7)
    assert not (await node.recover("chat:a", ahead, limit=100)).recovered


async def test_more_missed_than_the_limit_is_not_recovered(harness: Harness) -> None:
    node = await harness.node()
    positions = await publish_many(node, "chat:a", 10)
    assert not (await node.recover("chat:a", positions[1], limit=5)).recovered
    assert (await node.recover("chat:a", positions[4], limit=5)).recovered


async def test_history_gives_the_newest_publications_oldest_first(harness: Harness) -> None:
    node = await harness.node()
    positions = await publish_many(node, "chat:a", 6)
    page = await node.history("chat:a", limit=3)
    assert [p.offset for p in page.publications] == [4, 5, 6]
    assert page.top == positions[-1]
    empty = await node.history("chat:never", limit=3)
    assert empty.publications == [] and empty.top.offset == 0


async def test_presence_is_shared_by_every_node_and_leaving_removes_the_entry(
    harness: Harness,
) -> None:
    a, b = await harness.node(), await harness.node()
    await a.presence_join("chat:a", PresenceEntry(client="c1", user="ann"), ttl=30)
    await b.presence_join("chat:a", PresenceEntry(client="c2", user="bob", info=b'{"n":1}'), ttl=30)
    await b.presence_join("chat:a", PresenceEntry(client="c3", user="bob"), ttl=30)
    entries = await a.presence("chat:a")
    assert [(e.client, e.user) for e in entries] == [("c1", "ann"), ("c2", "bob"), ("c3", "bob")]
    assert entries[1].info == b'{"n":1}'
    stats = await b.presence_stats("chat:a")
    assert (stats.clients, stats.users) == (3, 2)
    await a.presence_leave("chat:a", "c2")
    assert [e.client for e in await b.presence("chat:a")] == ["c1", "c3"]
    assert await a.presence("chat:other") == []


async def test_presence_of_a_dead_connection_expires_unless_refreshed(harness: Harness) -> None:
    a, b = await harness.node(), await harness.node()
    await a.presence_join("chat:a", PresenceEntry(client="alive", user="ann"), ttl=30)
    await b.presence_join("chat:a", PresenceEntry(client="dead", user="bob"), ttl=30)
    harness.clock.advance(20)
    await a.presence_refresh("chat:a", ["alive"], ttl=30)
    harness.clock.advance(20)  # "dead" was last seen 40 s ago
    assert [e.client for e in await a.presence("chat:a")] == ["alive"]
    assert (await b.presence_stats("chat:a")).clients == 1
    await a.presence_refresh("chat:a", ["dead"], ttl=30)
    assert [e.client for e in await a.presence("chat:a")] == ["alive"], "refresh never revives"


def price(seq: int, value: float, *, at: float, max_age_ms: int = 5000) -> StateValue:
    return StateValue(
        key="home-win",
        value=json.dumps({"odds": value}).encode(),
        seq=seq,
        source_time_ms=int(at * 1000),
        max_age_ms=max_age_ms,
    )


def viewers(first: int, end: int, *more: str) -> frozenset[str]:
    return frozenset({f"u{i}" for i in range(first, end)} | set(more))


async def test_a_large_channels_presence_is_one_share_per_node_and_a_dead_nodes_expires(
    harness: Harness,
) -> None:
    a, b = await harness.node(), await harness.node()
    await a.presence_join("event:final", PresenceEntry(client="a1", user="ann"), ttl=30)
    await a.presence_join("event:final", PresenceEntry(client="a2", user="bob"), ttl=30)
    await b.presence_join("event:final", PresenceEntry(client="b1", user="carl"), ttl=30)
    # a moves the channel to a share: its entries go in the same step, never counted twice;
    # carl, listed on b and in a's share too, is one user
    share_a = PresenceShare(clients=500, users=viewers(0, 449, "carl"), replaces=("a1", "a2"))
    await a.report_presence({"event:final": share_a}, ttl=3)
    assert [e.client for e in await b.presence("event:final")] == ["b1"]
    assert await b.presence_stats("event:final") == PresenceStats(
        clients=501, users=450, shared=500
    )
    # b's users overlap a's: u400..u448 and carl are in both shares, and count once
    share_b = PresenceShare(clients=300, users=viewers(400, 679, "carl"), replaces=("b1",))
    await b.report_presence({"event:final": share_b}, ttl=3)
    assert await a.presence("event:final") == []
    assert await a.presence_stats("event:final") == PresenceStats(
        clients=800, users=680, shared=800
    )
    await b.report_presence({"event:final": PresenceShare(clients=1, users=viewers(0, 1))}, ttl=3)
    assert (await a.presence_stats("event:final")).users == 450, "b's users left, u0 stays"
    harness.clock.advance(2)
    await a.report_presence(
        {"event:final": PresenceShare(clients=520, users=viewers(0, 460))}, ttl=3
    )
    harness.clock.advance(2)  # b last reported 4 s ago: its process is gone, its share too
    assert await b.presence_stats("event:final") == PresenceStats(
        clients=520, users=460, shared=520
    )
    await a.report_presence({}, ttl=3)  # a channel absent from a report is withdrawn
    assert await b.presence_stats("event:final") == PresenceStats(clients=0, users=0)
    assert await b.presence_stats("event:other") == PresenceStats(clients=0, users=0)
    # with its users: a share reported again starts from none
    await b.report_presence({"event:final": PresenceShare(clients=2, users=viewers(0, 2))}, ttl=3)
    assert await a.presence_stats("event:final") == PresenceStats(clients=2, users=2, shared=2)


async def test_state_keeps_the_newest_value_per_key_and_drops_old_or_repeated_ones(
    harness: Harness,
) -> None:
    a, b = await harness.node(), await harness.node()
    inbox = Inbox()
    await b.subscribe("odds:final", inbox)
    now = harness.clock()
    first = await a.state_write("odds:final", price(5, 1.9, at=now), **KEEP)
    assert first.applied and first.position is not None and first.position.offset == 1
    duplicate = await b.state_write("odds:final", price(5, 2.5, at=now), **KEEP)
    older = await a.state_write("odds:final", price(3, 1.1, at=now), **KEEP)
    assert not duplicate.applied and not older.applied
    assert duplicate.current == price(5, 1.9, at=now) and older.position is None
    newer = await b.state_write("odds:final", price(6, 2.0, at=now + 1), **KEEP)
    assert newer.applied
    other_key = msgspec.structs.replace(price(1, 7.0, at=now), key="draw")
    assert (await a.state_write("odds:final", other_key, **KEEP)).applied
    state = await b.state("odds:final")
    assert state == {"home-win": price(6, 2.0, at=now + 1), "draw": other_key}
    got = await inbox.wait(3)
    assert [p.kind for p in got] == ["state"] * 3
    assert [state_from_data(p.data) for p in got] == [
        price(5, 1.9, at=now),
        price(6, 2.0, at=now + 1),
        other_key,
    ]
    assert json.loads(got[0].data)["value"] == {"odds": 1.9}, "the value travels as JSON"


async def test_viewer_counts_sum_every_live_node_and_drop_a_dead_one(harness: Harness) -> None:
    a, b = await harness.node(), await harness.node()
    await a.report_counts({"event:final": 120, "event:semi": 3}, ttl=10)
    await b.report_counts({"event:final": 80}, ttl=10)
    report = await a.counts(["event:final", "event:semi", "event:none"])
    assert report.counts == {"event:final": 200, "event:semi": 3, "event:none": 0}
    await a.report_counts({"event:final": 100}, ttl=10)  # a report replaces the node's last
    assert (await b.counts(["event:final", "event:semi"])).counts == {
        "event:final": 180,
        "event:semi": 0,
    }
    harness.clock.advance(8)
    await a.report_counts({"event:final": 100}, ttl=10)
    harness.clock.advance(5)  # b last reported 13 s ago: its process is gone
    assert (await a.counts(["event:final"])).counts == {"event:final": 100}


async def test_an_outage_is_reported_and_the_return_makes_subscribers_recover(
    harness: Harness,
) -> None:
    node = await harness.node()
    inbox = Inbox()
    await node.subscribe("chat:a", inbox)
    before = await publish_many(node, "chat:a", 3)
    await inbox.wait(3)
    told: list[frozenset[str]] = []
    returned = asyncio.Event()

    def listener(channels: frozenset[str]) -> None:
        told.append(channels)
        returned.set()

    node.on_recovered(listener)
    assert node.health().ok
    await harness.interrupt()
    with pytest.raises(BrokerUnavailable):
        async with asyncio.timeout(10):
            while True:  # an engine may notice the outage only when it next talks to the store
                await node.publish("chat:a", doc(99), **KEEP)
                await asyncio.sleep(0.05)
    assert not node.health().ok
    await harness.restore()
    async with asyncio.timeout(10):
        await returned.wait()
    assert node.health().ok
    assert told == [frozenset({"chat:a"})]
    # What was missed cannot be told apart from what was lost: the client must not recover
    # partly from the old stream, and fresh publications reach the subscriber again.
    answer = await node.recover("chat:a", before[-1], limit=100)
    assert not answer.recovered and answer.top.epoch != before[-1].epoch
    after = await node.publish("chat:a", doc(100), **KEEP)
    got = await inbox.wait(4)
    assert got[-1].position == after


async def test_a_users_rate_limit_is_one_bucket_shared_by_every_node(harness: Harness) -> None:
    """A user with connections on several gateway processes gets the channel's rate once."""
    a, b, c = await harness.node(), await harness.node(), await harness.node()
    limit = {"rate": 2.0, "burst": 3}
    taken = [await node.rate_take("chat:a", "ann", **limit) for node in (a, b, c, a, b, c)]
    assert [t.taken for t in taken] == [True, True, True, False, False, False]
    assert 0 < taken[3].wait_ms <= 500, "one token comes back in half a second at 2/s"
    assert (await b.rate_take("chat:a", "bob", **limit)).taken, "each user has their own bucket"
    assert (await b.rate_take("chat:other", "ann", **limit)).taken, "and each channel"
    harness.clock.advance(0.5)  # one token back, whichever node asks
    assert (await c.rate_take("chat:a", "ann", **limit)).taken
    assert not (await a.rate_take("chat:a", "ann", **limit)).taken
    harness.clock.advance(60)  # idle: full again, never more than the burst
    again = [(await b.rate_take("chat:a", "ann", **limit)).taken for _ in range(4)]
    assert again == [True, True, True, False]


async def test_a_burst_of_concurrent_operations_on_one_node_is_served_not_refused(
    harness: Harness,
) -> None:
    """A reconnect storm on one gateway process: hundreds of presence joins and recoveries at
    once. Each is answered; none is refused as if the store were down."""
    node = await harness.node()
    positions = await publish_many(node, "chat:a", 3)
    clients = [f"c{i:03d}" for i in range(150)]  # past redis-py's pool of 100
    joins = [node.presence_join("chat:a", PresenceEntry(client=c, user=c), ttl=30) for c in clients]
    recoveries = [node.recover("chat:a", positions[0], limit=100) for _ in clients]
    await asyncio.gather(*joins)
    answers = await asyncio.gather(*recoveries)
    assert all(a.recovered and [p.offset for p in a.publications] == [2, 3] for a in answers)
    assert (await node.presence_stats("chat:a")).clients == 150
    assert node.health().ok
