"""The behaviour suite's harnesses for the Redis engines.

``redis``: the shared Redis (127.0.0.1:6379), a unique key prefix per test, its keys deleted
after. ``redis-cluster``: a real three-primary Redis Cluster of ``redis-server`` processes on free
loopback ports, started once per session (``redis_cluster`` in conftest) and killed at its end.

The nodes reach Redis through a :class:`FaultProxy` per server, so that an outage can be made
without stopping a Redis that others use: ``interrupt`` resets every connection and refuses new
ones, ``restore`` deletes the test's keys (what a restart without persistence loses; kept with
``lose_data=False``, a network cut) and lets connections through again. Tests that restart a
real ``redis-server`` are in ``test_redis_lost.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from streamplane.realtime.broker import Broker
from streamplane.realtime.redis import RedisBroker, client_options
from tests.realtime.engines import Harness, ManualClock
from tests.realtime.fault_proxy import FaultProxy
from tests.realtime.redis_servers import SHARED_REDIS, RedisClusterServers, reachable

# Short enough that an outage is noticed and healed within the suite's waits.
FAST = {"ping_interval": 1.0, "connect_timeout": 1.0, "backoff_min": 0.02, "backoff_max": 0.2}


async def delete_prefix(address: tuple[str, int], prefix: str) -> None:
    """Delete every key under ``prefix`` on one server (one key at a time: cluster slots)."""
    client = aioredis.Redis(host=address[0], port=address[1])
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=500):
            await client.delete(key)
    finally:
        await client.aclose()


class RedisHarness:
    """Nodes on one Redis or one Redis Cluster, each with its own client (one process each)."""

    def __init__(self, name: str, servers: list[tuple[str, int]], cluster: bool) -> None:
        self.name = name
        self.clock = ManualClock()
        self.prefix = f"t{uuid.uuid4().hex[:12]}:"
        self.servers = servers
        self.cluster = cluster
        self.proxies: dict[tuple[str, int], FaultProxy] = {}
        self.nodes: list[Broker] = []

    async def start(self) -> None:
        for server in self.servers:
            proxy = FaultProxy(server)
            await proxy.start()
            self.proxies[server] = proxy

    def _remap(self, address: tuple[str, int]) -> tuple[str, int]:
        proxy = self.proxies.get((address[0], int(address[1])))
        return proxy.address if proxy is not None else address

    async def node(self) -> Broker:
        client: aioredis.Redis | RedisCluster
        if self.cluster:
            client = RedisCluster(
                startup_nodes=[ClusterNode(*p.address) for p in self.proxies.values()],
                address_remap=self._remap,
                **client_options(1.0),
            )
        else:
            (proxy,) = self.proxies.values()
            client = aioredis.Redis(host="127.0.0.1", port=proxy.port, **client_options(1.0))
        broker = RedisBroker(client, prefix=self.prefix, clock=self.clock, **FAST)
        await broker.start()
        self.nodes.append(broker)
        return broker

    async def interrupt(self) -> None:
        for proxy in self.proxies.values():
            proxy.interrupt()

    async def restore(self, *, lose_data: bool = True) -> None:
        if lose_data:
            await self.forget()
        for proxy in self.proxies.values():
            proxy.heal()

    async def forget(self) -> None:
        for server in self.servers:
            await delete_prefix(server, self.prefix)

    async def close(self) -> None:
        for node in self.nodes:
            await node.close()
        for proxy in self.proxies.values():
            await proxy.close()
        await self.forget()


@asynccontextmanager
async def _harness(
    name: str, servers: list[tuple[str, int]], cluster: bool
) -> AsyncIterator[Harness]:
    harness = RedisHarness(name, servers, cluster)
    await harness.start()
    try:
        yield harness
    finally:
        await harness.close()


def redis_harness(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[Harness]:
    if not reachable(SHARED_REDIS):
        pytest.skip("no Redis at 127.0.0.1:6379")
    return _harness("redis", [SHARED_REDIS], cluster=False)


def redis_cluster_harness(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[Harness]:
    servers: RedisClusterServers = request.getfixturevalue("redis_cluster")
    return _harness("redis-cluster", servers.startup_nodes, cluster=True)
