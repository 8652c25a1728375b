"""Realtime tokens from the control plane: its own endpoint and a field of the playback answer,
checked by a real gateway with the same key."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest

from streamplane.config import RealtimeSettings
from streamplane.control import create_app
from streamplane.realtime import MemoryHub, verify_realtime_token
from streamplane.realtime.client import RealtimeClient, RequestFailed
from streamplane.realtime.gateway import Gateway, GatewaySettings
from streamplane.realtime.protocol import Code
from streamplane.realtime.tokens import rights_on
from streamplane.steering import GeoLocator, RoutingTable, Steering

from .conftest import Clock, Control, Db, control_settings, write_title

RT_KEY = "5e" * 32


async def _control(
    db: Db, tmp_path: Path, geo: GeoLocator, **realtime: object
) -> AsyncIterator[Control]:
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    settings = msgspec.structs.replace(
        control_settings(db, catalog),
        realtime=RealtimeSettings(**realtime),  # type: ignore[arg-type]
    )
    clock = Clock(time.time())
    app = create_app(settings, clock=clock, steering=Steering(RoutingTable(), geo))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://control.test") as client:
            yield Control(app, client, clock, settings, catalog)


async def test_a_viewer_token_opens_the_gateway_for_chat_and_state_reading(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    gateway = Gateway(MemoryHub().node(), GatewaySettings(token_key=bytes.fromhex(RT_KEY)))
    port = await gateway.start("127.0.0.1", 0)
    try:
        async for control in _control(
            db, tmp_path, geo, token_key=RT_KEY, public_url=f"ws://127.0.0.1:{port}"
        ):
            auth = await control.account()
            assert (
                await control.client.post("/v1/realtime/token", json={"event": "demo"})
            ).status_code == 401
            bad = await control.client.post(
                "/v1/realtime/token", json={"event": "../x"}, headers=auth
            )
            assert bad.status_code == 422
            r = await control.client.post(
                "/v1/realtime/token", json={"event": "demo"}, headers=auth
            )
            assert r.status_code == 200, r.text
            info = r.json()
            assert info["url"] == f"ws://127.0.0.1:{port}/connect"
            grant = verify_realtime_token(
                info["token"], bytes.fromhex(RT_KEY), now=int(time.time())
            )
            assert rights_on(grant, "chat:demo") == {"read", "publish"}
            assert rights_on(grant, "state:demo") == {"read"}
            assert rights_on(grant, "chat:other") == frozenset()

            await control.edge("e1", ("demo",))
            play = await control.play(auth, "demo")
            assert play.status_code == 200, play.text
            realtime = play.json()["realtime"]
            assert realtime["channels"] == info["channels"]

            client = RealtimeClient(
                f"ws://127.0.0.1:{port}", realtime["token"], channels=["chat:demo", "state:demo"]
            )
            client.start()
            try:
                await client.synced.wait()
                assert (await client.publish("chat:demo", {"text": "hello"})).position is not None
                with pytest.raises(RequestFailed) as err:
                    await client.set_state(
                        "state:demo", "score", [1, 0], seq=1, source_time_ms=0, max_age_ms=1
                    )
                assert err.value.reply.code == Code.FORBIDDEN
            finally:
                await client.stop()
    finally:
        await gateway.close()


async def test_without_a_gateway_the_endpoint_says_so_and_playback_carries_none(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    async for control in _control(db, tmp_path, geo):
        auth = await control.account()
        r = await control.client.post("/v1/realtime/token", json={"event": "demo"}, headers=auth)
        assert r.status_code == 404 and r.json()["error"] == "realtime_off"
        await control.edge("e1", ("demo",))
        assert (await control.play(auth, "demo")).json()["realtime"] is None
