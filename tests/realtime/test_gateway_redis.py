"""Gateways joined by Redis, as users run them: several gateway processes serving one event
(publications and viewer counts across them), and Redis restarted under them mid-stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from streamplane.realtime.client import RealtimeClient, RequestFailed
from streamplane.realtime.gateway import Gateway, GatewaySettings
from streamplane.realtime.protocol import Code, Namespace, PresenceQuery
from streamplane.realtime.serve import GatewayConfigError, make_broker
from tests.realtime.redis_engines import FAST, delete_prefix
from tests.realtime.redis_servers import SHARED_REDIS, RedisServer, have_redis_server, reachable
from tests.realtime.test_gateway import FAST as NAMESPACES
from tests.realtime.test_gateway import KEY, clients, token, until
from tests.realtime.test_gateway_engines import settle_presence, until_async

__all__ = ["clients"]  # the gateway tests' client fixture, used here too


@pytest.fixture
async def gateways() -> AsyncIterator[Callable[[str], object]]:
    running: list[Gateway] = []

    async def start_on(broker_url: str, **overrides: Any) -> str:
        broker = make_broker(broker_url)
        for name, value in FAST.items():  # notice an outage as fast as the test waits
            setattr(broker, name, value)
        fields: dict[str, Any] = {"tick": 0.1, "namespaces": NAMESPACES, **overrides}
        settings = GatewaySettings(token_key=KEY, **fields)
        gateway = Gateway(broker, settings)
        port = await gateway.start("127.0.0.1", 0)
        running.append(gateway)
        return f"ws://127.0.0.1:{port}"

    start_on.running = running  # type: ignore[attr-defined]

    yield start_on
    for gateway in running:
        await gateway.close()


def test_a_broker_url_that_is_not_an_engine_is_refused_with_the_forms_it_takes() -> None:
    with pytest.raises(GatewayConfigError, match="redis\\+cluster://"):
        make_broker("nats://127.0.0.1:4222")
    with pytest.raises(GatewayConfigError, match="TLS"):
        make_broker("rediss://127.0.0.1:6379")


async def test_two_gateways_on_one_redis_serve_one_event(
    gateways: Callable[[str], object], clients: Callable[..., RealtimeClient]
) -> None:
    if not reachable(SHARED_REDIS):
        pytest.skip("no Redis at 127.0.0.1:6379")
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    broker_url = f"redis://127.0.0.1:{SHARED_REDIS[1]}/0?prefix={prefix}"
    try:
        url_a = await gateways(broker_url)  # type: ignore[misc]
        url_b = await gateways(broker_url)  # type: ignore[misc]
        ann = clients(url_a, token("ann"), "chat:final", "event:final")
        bob = clients(url_b, token("bob"), "chat:final", "event:final")
        await ann.synced.wait()
        await bob.synced.wait()
        reply = await ann.publish("chat:final", {"text": "goal!"})
        await until(lambda: len(bob.views["chat:final"].messages) == 1)
        got = bob.views["chat:final"].messages[0]
        assert reply.position is not None and (got.epoch, got.offset) == (
            reply.position.epoch,
            reply.position.offset,
        )
        await until(
            lambda: bob.views["event:final"].viewers == 2 and ann.views["event:final"].viewers == 2,
            timeout=10,
        )
    finally:
        await delete_prefix(SHARED_REDIS, prefix)


async def test_redis_restarted_under_the_gateways_keeps_connections_and_every_view_reloads(
    tmp_path: Path, gateways: Callable[[str], object], clients: Callable[..., RealtimeClient]
) -> None:
    if not have_redis_server():
        pytest.skip("no redis-server binary")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        url_a = await gateways(server.url)  # type: ignore[misc]
        url_b = await gateways(server.url)  # type: ignore[misc]
        ann = clients(url_a, token("ann"), "chat:final")
        bob = clients(url_b, token("bob"), "chat:final")
        carl = clients(url_b, token("carl"), "chat:final")
        for client in (ann, bob, carl):
            await client.synced.wait()
        await bob.publish("chat:final", {"n": 0})
        await until(lambda: len(ann.views["chat:final"].messages) == 1)
        await settle_presence(ann, "chat:final", ["ann", "bob", "carl"])
        reloads = ann.views["chat:final"].reloads
        server.kill()
        port_a = url_a.rsplit(":", 1)[1]
        async with httpx.AsyncClient() as http:
            health = f"http://127.0.0.1:{port_a}/health"
            async with asyncio.timeout(10):
                while (await http.get(health)).status_code != 503:
                    await asyncio.sleep(0.05)
            with pytest.raises(RequestFailed) as err:
                await bob.publish("chat:final", {"n": 1})
            assert err.value.reply.code == Code.UNAVAILABLE
            await carl.stop()  # gone while Redis was: never present again
            server.start()  # the same port, empty
            await until(lambda: ann.views["chat:final"].reloads > reloads, timeout=10)
            async with asyncio.timeout(10):
                while (await http.get(health)).status_code != 200:
                    await asyncio.sleep(0.05)
        assert ann.connected.is_set() and bob.connected.is_set(), "connections kept"
        # Presence was lost with the data: every connection still held is present again, and
        # the viewer count is right again.
        await settle_presence(bob, "chat:final", ["ann", "bob"])
        await until(lambda: ann.views["chat:final"].viewers == 2, timeout=10)
        after = await bob.publish("chat:final", {"n": 2})
        assert after.position is not None
        await until(
            lambda: any(m.epoch == after.position.epoch for m in ann.views["chat:final"].messages)  # type: ignore[union-attr]
        )
    finally:
        server.kill()


def command_calls(server: RedisServer) -> dict[str, int]:
    """Commands Redis ran since its statistics were reset (those scripts ran included)."""
    calls = {}
    for line in server.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line.partition(":")
            calls[name.removeprefix("cmdstat_")] = int(fields.split(",")[0].split("=")[1])
    return calls


async def test_a_reconnect_storm_on_a_large_channel_costs_redis_no_presence_write_per_viewer(
    tmp_path: Path, gateways: Callable[..., Any], clients: Callable[..., RealtimeClient]
) -> None:
    """Every viewer of a large channel on two gateway processes drops and reconnects: Redis
    sees each process's share of the channel's presence once a tick, never a join or a leave
    per viewer, and the counts are whole again afterwards."""
    if not have_redis_server():
        pytest.skip("no redis-server binary")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        large = {**NAMESPACES, "event": Namespace(name="event", presence_diff_limit=10)}
        urls = [await gateways(server.url, namespaces=large) for _ in range(2)]
        running: list[Gateway] = gateways.running  # type: ignore[attr-defined]
        # A host per process keeps the channel there, as any viewer who stays does.
        hosts = [clients(url, token(f"host{i}"), "event:final") for i, url in enumerate(urls)]
        viewers = [
            clients(urls[i % 2], token(f"v{i}"), "event:final", backoff_cap=1.0) for i in range(60)
        ]
        everyone = hosts + viewers

        def whole() -> bool:
            return all(c.synced.is_set() and c.views["event:final"].viewers == 62 for c in everyone)

        await until(whole, timeout=20)
        server.cli("CONFIG", "RESETSTAT")
        ticks = sum(g._ticks for g in running)
        for gateway in running:  # a network blip: every viewer's connection gone at once
            for conn in list(gateway.connections):
                if conn.grant is not None and conn.grant.user.startswith("v"):
                    assert conn.transport is not None
                    conn.transport.abort()
        await until(lambda: all(v.connects == 2 for v in viewers) and whole(), timeout=30)
        calls = command_calls(server)
        ticks = sum(g._ticks for g in running) - ticks
        assert calls.get("zadd", 0) == 0 and calls.get("zrem", 0) == 0, calls
        # Per process and tick: its counts, its presence share, the counts and presence read.
        assert calls.get("evalsha", 0) <= 4 * ticks + 4 * len(running), (calls, ticks)
        assert all(g.channels["event:final"].counted for g in running)
        assert all(g.stats["broker_recoveries"] == 0 for g in running), "from the tail"

        async def counted() -> bool:
            answer = await hosts[0].request(lambda i: PresenceQuery(id=i, channel="event:final"))
            return (answer.clients, answer.users, answer.present) == (62, 62, None)

        # A share lives three ticks (0.3 s here): a process starved longer than that (a loaded
        # machine) is out of the sum until its next tick, as its viewer count is.
        await until_async(counted, timeout=10)
    finally:
        server.kill()
