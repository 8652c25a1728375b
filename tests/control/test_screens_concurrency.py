"""The screens limit holds when many devices start at the same moment, on both engines."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from streamplane.steering import GeoLocator

from .conftest import Control, Db, running, write_title

STARTS = 50


async def _burst(control: Control, auth: dict[str, str], clients: list[httpx.AsyncClient]) -> None:
    async def start(i: int) -> httpx.Response:
        client = clients[i % len(clients)]
        return await client.post(
            "/v1/playback", json={"title": "demo", "device": f"device-{i}"}, headers=auth
        )

    responses = await asyncio.gather(*(start(i) for i in range(STARTS)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 4 + [409] * (STARTS - 4), codes
    for r in responses:
        if r.status_code == 409:
            assert r.json()["limit"] == 4
            assert "allows 4 screens at once" in r.json()["detail"]
    account = (await clients[0].get("/v1/account", headers=auth)).json()
    assert account["screens"]["in_use"] == 4


async def test_fifty_concurrent_starts(control: Control) -> None:
    await control.edge("e1", ("demo",))
    auth = await control.account("premium")  # four screens
    await _burst(control, auth, [control.client])


async def test_fifty_concurrent_starts_across_two_instances(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    """Two control planes on one database: the lock is in the store, not in a process."""
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    async with running(db, catalog, geo) as one, running(db, catalog, geo) as two:
        two.signers = one.signers  # one edge, heartbeating both instances in turn
        await one.edge("e1", ("demo",))
        await two.edge("e1", ("demo",))
        auth = await one.account("premium")
        await _burst(one, auth, [one.client, two.client])
