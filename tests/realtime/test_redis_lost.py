"""Redis lost mid-stream: the gateway's node degrades, keeps going, and on return its subscribers
recover exactly what they missed or are told explicitly that they cannot (and reload). Never a
silent gap, never a publication applied twice or out of order.

A ``Viewer`` here is what the gateway keeps for one connection: the protocol's ordering cursor,
a recovery on a gap or when the broker says deliveries may have been lost, a reload on
``recovered: false``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from streamplane.realtime.broker import BrokerUnavailable, Position, Publication
from streamplane.realtime.protocol import Cursor, Verdict
from streamplane.realtime.redis import RedisBroker, client_options
from tests.realtime.fault_proxy import FaultProxy
from tests.realtime.redis_engines import FAST, delete_prefix
from tests.realtime.redis_servers import (
    SHARED_REDIS,
    RedisClusterServers,
    RedisServer,
    have_redis_server,
    reachable,
)

KEEP = {"history_size": 1000, "history_ttl": 300.0}


class Viewer:
    """One connection's view of one channel, kept the way the gateway keeps it."""

    def __init__(self, broker: RedisBroker, channel: str) -> None:
        self.broker = broker
        self.channel = channel
        self.cursor = Cursor()
        self.applied: list[Publication] = []
        self.reloads: list[Position] = []  # where each "recovered: false" restarted the view
        self.recoveries = 0
        self._changed = asyncio.Event()
        self._recovering: asyncio.Task[None] | None = None
        self._again = False

    async def join(self) -> None:
        await self.broker.subscribe(self.channel, self.deliver)
        page = await self.broker.history(self.channel, limit=0)
        self.cursor.reset(self.channel, page.top)

    def deliver(self, pub: Publication) -> None:
        if self._recovering is not None or self.cursor.position(self.channel) is None:
            return  # the recovery in flight (or the join) reads it from the stream
        verdict = self.cursor.offer(self.channel, pub.epoch, pub.offset)
        if verdict is Verdict.APPLY:
            self.applied.append(pub)
            self._changed.set()
        elif verdict is Verdict.GAP:
            self.recover()

    def recover(self) -> None:
        if self._recovering is not None:
            self._again = True
            return
        self._recovering = asyncio.create_task(self._recover())

    async def _recover(self) -> None:
        try:
            while True:
                self._again = False
                since = self.cursor.position(self.channel)
                assert since is not None
                try:
                    answer = await self.broker.recover(self.channel, since, limit=1000)
                except BrokerUnavailable:
                    await asyncio.sleep(0.05)
                    self._again = True
                    continue
                self.recoveries += 1
                if answer.recovered:
                    for pub in answer.publications:
                        assert self.cursor.offer(self.channel, pub.epoch, pub.offset) is (
                            Verdict.APPLY
                        ), "a recovery must continue exactly where the view stopped"
                        self.applied.append(pub)
                else:
                    self.reloads.append(answer.top)
                    self.cursor.reset(self.channel, answer.top)
                self._changed.set()
                if not self._again:
                    return
        finally:
            self._recovering = None

    async def wait_for(self, position: Position, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.cursor.position(self.channel) != position or self._recovering:
                self._changed.clear()
                if self._recovering is not None:
                    await asyncio.wait([self._recovering])
                    continue
                await self._changed.wait()


class Publisher:
    """Publishes numbered messages until stopped; what Redis acknowledged is in ``acked``."""

    def __init__(self, broker: RedisBroker, channel: str) -> None:
        self.broker = broker
        self.channel = channel
        self.acked: list[tuple[Position, int]] = []
        self.refused = 0
        self._numbers = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def one(self) -> Position:
        n = next(self._numbers)
        position = await self.broker.publish(self.channel, json.dumps({"n": n}).encode(), **KEEP)
        self.acked.append((position, n))
        return position

    def start(self) -> None:
        self._stopping = False

        async def run() -> None:
            while not self._stopping:
                try:
                    await self.one()
                except BrokerUnavailable:
                    self.refused += 1
                await asyncio.sleep(0.005)

        self._task = asyncio.create_task(run())

    async def stop(self) -> None:
        """After the publication on its way: cancelled mid-way, a publication Redis took would
        be missing from ``acked``, and the tests compare what the viewers got with it."""
        self._stopping = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


async def until(predicate: object, timeout: float = 10.0) -> None:
    """Poll a state that has no event of its own (a broker's health)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def assert_no_silent_gap(viewer: Viewer, acked: list[tuple[Position, int]]) -> None:
    """Every acknowledged publication was applied once, in order, unless a reload (an explicit
    "not recovered") came after it; what was applied within an epoch has no hole."""
    applied = [(p.epoch, p.offset) for p in viewer.applied]
    assert len(applied) == len(set(applied)), "nothing applied twice"
    by_epoch: dict[str, list[int]] = {}
    for epoch, offset in applied:
        by_epoch.setdefault(epoch, []).append(offset)
    for offsets in by_epoch.values():
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), "in order, no hole"
    seen = set(applied)
    for position, n in acked:
        if (position.epoch, position.offset) in seen:
            continue
        covered = any(
            reload.epoch != position.epoch or reload.offset >= position.offset
            for reload in viewer.reloads
        )
        assert covered, f"message {n} at {position} was lost without a reload"


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    if not have_redis_server():
        pytest.skip("no redis-server binary")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def node_on(url: str) -> RedisBroker:
    return RedisBroker.connect(url, prefix="lost:", **FAST)


async def test_a_redis_restart_mid_stream_degrades_and_every_viewer_recovers_or_reloads(
    private_redis: RedisServer,
) -> None:
    publisher_node, gateway = node_on(private_redis.url), node_on(private_redis.url)
    await publisher_node.start()
    await gateway.start()
    returned: list[frozenset[str]] = []
    viewers = [Viewer(gateway, "chat:final") for _ in range(3)]

    def on_recovered(channels: frozenset[str]) -> None:
        returned.append(channels)
        for viewer in viewers:
            if viewer.channel in channels:
                viewer.recover()

    gateway.on_recovered(on_recovered)
    publisher = Publisher(publisher_node, "chat:final")
    try:
        for viewer in viewers:
            await viewer.join()
        publisher.start()
        await until(lambda: len(publisher.acked) >= 20)
        private_redis.kill()  # kill -9: the history and every epoch are gone with it
        await until(lambda: not gateway.health().ok)
        assert "lost" in gateway.health().detail
        with pytest.raises(BrokerUnavailable):
            await gateway.publish("chat:final", b"{}", **KEEP)
        refused = publisher.refused
        await until(lambda: publisher.refused > refused)  # the publisher is told, not ignored
        private_redis.start()  # the same port, empty
        await until(lambda: bool(returned) and gateway.health().ok)
        assert returned == [frozenset({"chat:final"})]
        await until(lambda: len(publisher.acked) >= 60)
    finally:
        await publisher.stop()
    last = await publisher.one()
    for viewer in viewers:
        await viewer.wait_for(last)
        assert viewer.reloads, "the history was lost: the viewer must be told to reload"
        assert viewer.reloads[-1].epoch == last.epoch != publisher.acked[0][0].epoch
        assert_no_silent_gap(viewer, publisher.acked)
    await gateway.close()
    await publisher_node.close()


async def test_a_cut_between_a_gateway_and_redis_recovers_exactly_what_was_missed() -> None:
    """Redis kept running (a network blip, a gateway stalled): the stream still holds what the
    gateway missed, so its viewers get exactly those publications, in order, and no reload."""
    if not reachable(SHARED_REDIS):
        pytest.skip("no Redis at 127.0.0.1:6379")
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    proxy = FaultProxy(SHARED_REDIS)
    await proxy.start()
    publisher_node = RedisBroker(
        aioredis.Redis(port=SHARED_REDIS[1], **client_options()), prefix=prefix, **FAST
    )
    gateway = RedisBroker(
        aioredis.Redis(port=proxy.port, **client_options()), prefix=prefix, **FAST
    )
    viewer = Viewer(gateway, "chat:final")
    gateway.on_recovered(lambda channels: viewer.recover())
    publisher = Publisher(publisher_node, "chat:final")
    try:
        await publisher_node.start()
        await gateway.start()
        await viewer.join()
        publisher.start()
        await until(lambda: len(viewer.applied) >= 10)
        proxy.interrupt()
        await until(lambda: not gateway.health().ok)
        during = len(publisher.acked)
        await until(lambda: len(publisher.acked) >= during + 30)  # all missed by the gateway
        await publisher.stop()
        proxy.heal()
        # Nothing is published after the return: only the broker's word that deliveries may
        # have been lost brings the viewer up to date (a quiet channel must not stay behind).
        await viewer.wait_for(publisher.acked[-1][0])
        assert gateway.health().ok
        assert viewer.reloads == []
        assert [p.offset for p in viewer.applied] == [p.offset for p, _ in publisher.acked]
        assert [json.loads(p.data)["n"] for p in viewer.applied] == [n for _, n in publisher.acked]
        assert viewer.recoveries >= 1
    finally:
        await publisher.stop()
        await gateway.close()
        await publisher_node.close()
        await proxy.close()
        await delete_prefix(SHARED_REDIS, prefix)


def channels_on_two_shards(client: RedisCluster, prefix: str) -> tuple[str, str, ClusterNode]:
    """Two channel names whose keys live on different primaries, and the first one's primary."""
    first = "chat:a0"
    owner = client.get_node_from_key(f"{prefix}{{{first}}}:p")
    assert owner is not None
    for i in range(1, 200):
        other = f"chat:a{i}"
        node = client.get_node_from_key(f"{prefix}{{{other}}}:p")
        if node is not None and node.name != owner.name:
            return first, other, owner
    raise AssertionError("every channel landed on one shard")


@pytest.fixture
def cluster_node_restart(redis_cluster: RedisClusterServers) -> Iterator[RedisClusterServers]:
    """The session's cluster, healthy again after the test whatever it did to a node."""
    try:
        yield redis_cluster
    finally:
        for node in redis_cluster.nodes:
            if node.proc is None:
                node.start()
        redis_cluster.wait_ok()


async def test_a_cluster_shard_restart_affects_only_its_channels(
    cluster_node_restart: RedisClusterServers,
) -> None:
    cluster = cluster_node_restart
    prefix = f"t{uuid.uuid4().hex[:12]}:"

    def client() -> RedisCluster:
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes],
            **client_options(1.0),
        )

    publisher_node = RedisBroker(client(), prefix=prefix, **FAST)
    gateway = RedisBroker(client(), prefix=prefix, **FAST)
    returned: list[frozenset[str]] = []
    try:
        await publisher_node.start()
        await gateway.start()
        probe = client()
        await probe.initialize()
        lost, kept, shard = channels_on_two_shards(probe, prefix)
        await probe.aclose()
        viewers = {name: Viewer(gateway, name) for name in (lost, kept)}

        def on_recovered(channels: frozenset[str]) -> None:
            returned.append(channels)
            for name in channels:
                viewers[name].recover()

        gateway.on_recovered(on_recovered)
        for viewer in viewers.values():
            await viewer.join()
        before = await publisher_node.publish(lost, b'{"n": 0}', **KEEP)
        await viewers[lost].wait_for(before)
        (server,) = [n for n in cluster.nodes if n.port == shard.port]
        server.kill()
        await until(lambda: not gateway.health().ok)
        assert str(shard.port) in gateway.health().detail
        # The other shards keep serving, and their subscribers keep receiving.
        during = await publisher_node.publish(kept, b'{"n": 1}', **KEEP)
        await viewers[kept].wait_for(during)
        with pytest.raises(BrokerUnavailable):
            await publisher_node.publish(lost, b'{"n": 2}', **KEEP)
        server.start()  # same port, same cluster config, no data
        await until(lambda: bool(returned) and gateway.health().ok, timeout=15)
        assert returned == [frozenset({lost})], "only the restarted shard's channels recover"
        # A restarted cluster node answers CLUSTERDOWN until it has caught up with its peers:
        # the publisher is refused (BrokerUnavailable) and tries again, as a gateway's would.
        async with asyncio.timeout(10):
            while True:
                try:
                    after = await publisher_node.publish(lost, b'{"n": 3}', **KEEP)
                    break
                except BrokerUnavailable:
                    await asyncio.sleep(0.05)
        await viewers[lost].wait_for(after)
        assert viewers[lost].reloads and viewers[lost].reloads[-1].epoch == after.epoch
        assert after.epoch != before.epoch
        assert viewers[kept].reloads == [] and viewers[kept].recoveries == 0
    finally:
        await gateway.close()
        await publisher_node.close()
        for address in cluster.startup_nodes:
            await delete_prefix(address, prefix)


async def test_a_gateway_too_slow_for_its_pub_sub_connection_is_cut_and_recovers_exactly(
    private_redis: RedisServer,
) -> None:
    """Redis cuts a subscriber whose output buffer passes its limit (a gateway process stalled):
    to the engine that is a lost connection, and its viewers recover what they missed."""
    private_redis.cli("CONFIG", "SET", "client-output-buffer-limit", "pubsub 64kb 0 0")
    gateway = node_on(private_redis.url)
    await gateway.start()
    viewer = Viewer(gateway, "chat:final")
    returned: list[frozenset[str]] = []

    def on_recovered(channels: frozenset[str]) -> None:
        returned.append(channels)
        viewer.recover()

    gateway.on_recovered(on_recovered)
    await viewer.join()
    acked: list[tuple[Position, int]] = []
    message = b'{"text":"' + b"x" * 30_000 + b'"}'
    published = threading.Event()

    def publish_elsewhere() -> None:
        """Another process's publisher: its own loop in a thread, unaffected by the stall."""

        async def run() -> None:
            other = node_on(private_redis.url)
            for n in range(800):  # 24 MB: past what the kernel's socket buffers absorb
                acked.append((await other.publish("chat:final", message, **KEEP), n))
            await other.close()

        try:
            asyncio.run(run())
        finally:
            published.set()

    publisher = asyncio.get_running_loop().run_in_executor(None, publish_elsewhere)
    await until(lambda: len(acked) >= 1)
    published.wait(30)  # the gateway's loop stalls while the publications pile up in Redis
    await publisher
    await until(lambda: bool(returned))
    assert returned == [frozenset({"chat:final"})], "the cut was noticed and announced"
    log = (private_redis.workdir / "redis.log").read_text()
    assert "overcoming of output buffer limits" in log, "Redis cut it, nothing else did"
    await viewer.wait_for(acked[-1][0])
    assert viewer.reloads == []
    assert [p.offset for p in viewer.applied] == [p.offset for p, _ in acked]
    await gateway.close()


class _CancelsAtWriteEnd(aioredis.Connection):
    """A connection that cancels a chosen task in the instant a command's write completes: the
    interleaving a loaded machine produces now and then when a publisher is stopped."""

    victim: asyncio.Task[object] | None = None

    async def _send_packed_command(self, command: Any) -> None:
        await super()._send_packed_command(command)
        victim, _CancelsAtWriteEnd.victim = _CancelsAtWriteEnd.victim, None
        if victim is not None:
            victim.cancel()


async def test_a_task_cancelled_as_its_command_is_written_is_cancelled_not_carried_on(
    private_redis: RedisServer,
) -> None:
    """Stopping a publisher used to hang now and then: cancelled just as redis-py finished
    writing its command, the publish returned as if nothing happened (Python 3.11's wait_for
    keeps the result and drops the cancellation), so the publishing loop ran on for ever and
    whoever awaited its end waited for ever. The cancellation must reach the task."""
    pool = aioredis.ConnectionPool(
        host="127.0.0.1",
        port=private_redis.port,
        connection_class=_CancelsAtWriteEnd,
        **client_options(),
    )
    node = RedisBroker(aioredis.Redis(connection_pool=pool), prefix="lost:", **FAST)
    await node.start()
    published: list[Position] = []

    async def publish_until_stopped() -> None:
        while True:
            published.append(await node.publish("chat:final", b"{}", **KEEP))

    try:
        for _ in range(3):
            task: asyncio.Task[object] = asyncio.create_task(publish_until_stopped())
            _CancelsAtWriteEnd.victim = task
            async with asyncio.timeout(10):
                await asyncio.wait([task])
            assert task.cancelled(), "the publisher ran on after it was stopped"
    finally:
        _CancelsAtWriteEnd.victim = None
        await node.close()
