"""A surge of handshakes on the Redis engine: hundreds of commands at once from one process."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from streamplane.realtime.redis import RedisBroker
from tests.realtime.redis_engines import delete_prefix
from tests.realtime.redis_servers import SHARED_REDIS, reachable


async def test_hundreds_of_commands_at_once_wait_for_a_connection_rather_than_fail() -> None:
    """Each handshake runs several commands; redis-py's pool refused the 101st concurrent one
    with "Too many connections", which the engine must read as a lost Redis: a surge of viewers
    made every gateway process declare Redis down and reset its channels."""
    if not reachable(SHARED_REDIS):
        pytest.skip("no Redis on 127.0.0.1:6379")
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    broker = RedisBroker.connect(f"redis://{SHARED_REDIS[0]}:{SHARED_REDIS[1]}?prefix={prefix}")
    await broker.start()
    try:
        pages = await asyncio.gather(
            *(broker.history(f"event:surge{i % 7}", limit=5) for i in range(400))
        )
        assert len(pages) == 400
        assert broker.health().ok
    finally:
        await broker.close()
        await delete_prefix(SHARED_REDIS, prefix)
