"""The engines the broker behaviour suite runs on: one harness per engine, registered in ENGINES.

A harness hands out started nodes (each one gateway process) on one fresh backing store, a
clock the test advances, and a way to take the store down and bring it back empty (a Redis
restart without persistence) or with its data (a network cut). An engine joins the suite by
adding its harness factory here; a factory gets the pytest request, for the session fixtures it
needs (a Redis Cluster).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import pytest

from streamplane.realtime.broker import Broker
from streamplane.realtime.memory import MemoryHub


class ManualClock:
    """Seconds since the epoch, moved only by the test."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness(Protocol):
    name: str
    clock: ManualClock

    async def node(self) -> Broker: ...

    async def interrupt(self) -> None: ...

    async def restore(self, *, lose_data: bool = True) -> None: ...


class MemoryHarness:
    name = "memory"

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.hub = MemoryHub(self.clock)
        self.nodes: list[Broker] = []

    async def node(self) -> Broker:
        broker = self.hub.node()
        await broker.start()
        self.nodes.append(broker)
        return broker

    async def interrupt(self) -> None:
        self.hub.interrupt()

    async def restore(self, *, lose_data: bool = True) -> None:
        self.hub.restore(lose_data=lose_data)


@asynccontextmanager
async def memory_harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    harness = MemoryHarness()
    try:
        yield harness
    finally:
        for node in harness.nodes:
            await node.close()


HarnessContext = AbstractAsyncContextManager[Harness]


def redis_harness(request: pytest.FixtureRequest) -> HarnessContext:
    from tests.realtime.redis_engines import redis_harness as harness  # it imports this module

    return harness(request)


def redis_cluster_harness(request: pytest.FixtureRequest) -> HarnessContext:
    from tests.realtime.redis_engines import redis_cluster_harness as harness

    return harness(request)


ENGINES: dict[str, Callable[[pytest.FixtureRequest], HarnessContext]] = {
    "memory": memory_harness,
    "redis": redis_harness,
    "redis-cluster": redis_cluster_harness,
}
