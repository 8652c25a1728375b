"""The local stack starts a realtime gateway next to the control plane, on one shared key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from streamplane.realtime.client import RealtimeClient
from streamplane.stack import LocalStack


async def test_the_local_stack_runs_a_gateway_the_control_plane_signs_for(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path / "catalog", tmp_path / "stack", edges=1)
    (tmp_path / "catalog").mkdir()
    await asyncio.to_thread(stack.start)
    try:
        auth = await asyncio.to_thread(stack.account)
        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"{stack.control_url}/v1/realtime/token", json={"event": "final"}, headers=auth
            )
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["url"] == f"{stack.gateway_url}/connect"
        client = RealtimeClient(stack.gateway_url, info["token"], channels=["chat:final"])
        client.start()
        try:
            await asyncio.wait_for(client.synced.wait(), 30)
            reply = await client.publish("chat:final", {"text": "kick-off"})
            assert reply.position is not None
        finally:
            await client.stop()
    finally:
        await asyncio.to_thread(stack.stop)
