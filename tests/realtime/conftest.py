from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.realtime.engines import ENGINES, Harness


@pytest.fixture(params=sorted(ENGINES))
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async with ENGINES[request.param]() as harness:
        yield harness
