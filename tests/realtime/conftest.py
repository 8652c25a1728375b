from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.realtime.engines import ENGINES, Harness
from tests.realtime.redis_servers import RedisClusterServers, have_redis_server


@pytest.fixture(params=sorted(ENGINES))
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async with ENGINES[request.param](request) as harness:
        yield harness


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A three-primary Redis Cluster of the session's own, killed at its end (or with pytest)."""
    if not have_redis_server():
        pytest.skip("no redis-server binary")
    servers = RedisClusterServers(Path(tmp_path_factory.mktemp("redis-cluster")))
    servers.start()
    try:
        yield servers
    finally:
        servers.kill()
