"""The gateway over real WebSockets on loopback: handshake, admission, frames, fan-out,
recovery, limits, moderation, presence and counts, slow consumers and a broker outage."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamplane.realtime.client import ClientGaveUp, RealtimeClient, RequestFailed
from streamplane.realtime.gateway import Gateway, GatewaySettings
from streamplane.realtime.memory import MemoryHub
from streamplane.realtime.protocol import DEFAULT_NAMESPACES, Code, Namespace, Ping, Pong
from streamplane.realtime.tokens import sign_realtime_token

KEY = b"k" * 32
VIEWER = {
    "chat:*": ["read", "publish"],
    "fast:*": ["read", "publish"],
    "state:*": ["read"],
    "event:*": ["read"],
}
FAST = {
    **DEFAULT_NAMESPACES,
    "fast": Namespace(
        name="fast", rate_per_s=1e6, burst=10**6, history_size=10_000, max_message_bytes=15_000
    ),
}


def token(user: str = "ann", channels: dict[str, list[str]] | None = None, ttl: int = 600) -> str:
    return sign_realtime_token(
        KEY, user=user, channels=channels or VIEWER, now=int(time.time()), ttl_s=ttl
    )


Start = Callable[..., Awaitable[tuple[Gateway, str]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    running: list[Gateway] = []

    async def _start(hub: MemoryHub | None = None, **overrides: object) -> tuple[Gateway, str]:
        fields: dict[str, object] = {"tick": 0.1, "handshake_timeout": 2.0, "namespaces": FAST}
        fields.update(overrides)
        settings = GatewaySettings(token_key=KEY, **fields)  # type: ignore[arg-type]
        gateway = Gateway((hub or MemoryHub()).node(), settings)
        port = await gateway.start("127.0.0.1", 0)
        running.append(gateway)
        return gateway, f"ws://127.0.0.1:{port}"

    yield _start
    for gateway in running:
        await gateway.close()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., RealtimeClient]]:
    made: list[RealtimeClient] = []

    def _make(url: str, tok: str, *channels: str, **kw: object) -> RealtimeClient:
        client = RealtimeClient(url, tok, channels=list(channels), backoff_base=0.05, **kw)  # type: ignore[arg-type]
        client.start()
        made.append(client)
        return client

    yield _make
    for client in made:
        await client.stop()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def raw(url: str, tok: str) -> object:
    return connect(f"{url}/connect?token={tok}", max_size=None, ping_interval=None)


async def test_publications_reach_every_subscriber_with_their_position(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    _, url = await start()
    ann = clients(url, token("ann"), "chat:final")
    bob = clients(url, token("bob"), "chat:final")
    await ann.synced.wait()
    await bob.synced.wait()
    reply = await ann.publish("chat:final", {"text": "goal!"})
    assert reply.position is not None and reply.position.offset == 1
    await until(lambda: len(bob.views["chat:final"].messages) == 1)
    got = bob.views["chat:final"].messages[0]
    assert (got.epoch, got.offset, got.user) == (reply.position.epoch, 1, "ann")
    assert json.loads(bytes(got.data)) == {"text": "goal!"}


async def test_forged_expired_and_missing_tokens_are_refused_at_the_handshake(
    start: Start,
) -> None:
    gateway, url = await start()
    forged = sign_realtime_token(
        b"x" * 32, user="eve", channels={"chat:*": ["moderate"]}, now=int(time.time()), ttl_s=60
    )
    expired = sign_realtime_token(
        KEY, user="ann", channels=VIEWER, now=int(time.time()) - 120, ttl_s=60
    )
    for tok, code in [(forged, 4001), (expired, 4002), ("", 4001), ("a.b.c", 4001)]:
        with pytest.raises(InvalidStatus) as err:
            async with connect(f"{url}/connect?token={tok}"):
                pass
        assert err.value.response.status_code == 401
        assert json.loads(err.value.response.body)["code"] == code
    assert gateway.connections == set()


async def test_a_viewer_cannot_write_a_state_channel_and_a_source_can(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    _, url = await start()
    viewer = clients(url, token("ann"), "state:final")
    source = clients(url, token("feed", {"state:final": ["read", "publish"]}))
    await viewer.synced.wait()
    with pytest.raises(RequestFailed) as err:
        await viewer.set_state("state:final", "odds", 1.9, seq=1, source_time_ms=0, max_age_ms=1000)
    assert err.value.reply.code == Code.FORBIDDEN
    with pytest.raises(RequestFailed) as err:
        await source.publish("state:final", {"text": "chat into a state channel"})
    assert err.value.reply.code == Code.FORBIDDEN
    now_ms = int(time.time() * 1000)
    applied = await source.set_state(
        "state:final", "odds", 2.1, seq=2, source_time_ms=now_ms, max_age_ms=60_000
    )
    late = await source.set_state(
        "state:final", "odds", 1.5, seq=1, source_time_ms=now_ms, max_age_ms=60_000
    )
    assert applied.position is not None and late.position is None, "out-of-order write dropped"
    await until(lambda: "odds" in viewer.views["state:final"].state)
    assert json.loads(bytes(viewer.views["state:final"].state["odds"].value)) == 2.1
    assert viewer.views["state:final"].stale_keys(now_ms) == []
    assert viewer.views["state:final"].stale_keys(now_ms + 60_001) == ["odds"]
    late_joiner = clients(url, token("bob"), "state:final")
    await late_joiner.synced.wait()
    assert json.loads(bytes(late_joiner.views["state:final"].state["odds"].value)) == 2.1


async def test_malformed_and_oversized_frames_close_that_connection_only(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    gateway, url = await start(max_frame_bytes=1024)
    witness = clients(url, token("bob"), "chat:final")
    await witness.synced.wait()
    for payload, code in [("{not json", 4000), ('{"type":"launch"}', 4000), ("x" * 2000, 4009)]:
        async with connect(f"{url}/connect?token={token()}", ping_interval=None) as ws:
            await ws.recv()  # connected
            await ws.send(payload)
            notice = json.loads(await ws.recv())
            assert notice["type"] == "disconnect" and notice["code"] == code
            assert notice["reconnect"] is False
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == code
    assert gateway.stats["bad_frames"] == 3
    assert (await witness.publish("chat:final", {"text": "still here"})).position is not None


async def test_a_slow_handshake_is_dropped(start: Start) -> None:
    gateway, url = await start(handshake_timeout=0.2)
    port = int(url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /connect HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    async with asyncio.timeout(3):
        assert await reader.read() == b""
    writer.close()
    assert gateway.stats["handshake_timeouts"] == 1


async def test_admission_refuses_past_the_rate_and_the_limit_with_503_and_retry_after(
    start: Start,
) -> None:
    _, url = await start(admission_rate=0.5, admission_burst=2)
    held = [await connect(f"{url}/connect?token={token()}") for _ in range(2)]
    with pytest.raises(InvalidStatus) as err:
        await connect(f"{url}/connect?token={token()}")
    assert err.value.response.status_code == 503
    assert int(err.value.response.headers["Retry-After"]) >= 1
    for ws in held:
        await ws.close()
    _, url = await start(max_connections=1)
    async with connect(f"{url}/connect?token={token()}"):
        with pytest.raises(InvalidStatus) as err:
            await connect(f"{url}/connect?token={token()}")
        assert err.value.response.status_code == 503
        assert "Retry-After" in err.value.response.headers


async def test_chat_rate_and_size_limits(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    _, url = await start()
    ann = clients(url, token("ann"), "chat:final")
    await ann.synced.wait()
    burst = DEFAULT_NAMESPACES["chat"].burst
    for i in range(burst):
        await ann.publish("chat:final", {"n": i})
    with pytest.raises(RequestFailed) as err:
        await ann.publish("chat:final", {"n": "one too many"})
    assert err.value.reply.code == Code.RATE_LIMITED and err.value.reply.after_ms > 0
    host = clients(url, token("host", {"chat:*": ["read", "publish", "moderate"]}))
    for i in range(burst + 3):  # moderators (and the operator's sources) are not limited
        await host.publish("chat:final", {"n": i})
    bob = clients(url, token("bob"), "chat:final")
    with pytest.raises(RequestFailed) as err:
        await bob.publish("chat:final", {"text": "x" * 3000})
    assert err.value.reply.code == Code.MESSAGE_TOO_LARGE
    assert (await bob.publish("chat:final", {"text": "fine"})).position is not None


async def test_moderators_delete_and_mute_and_viewers_cannot(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    _, url = await start()
    mod = clients(url, token("mod", {"chat:*": ["read", "publish", "moderate"]}), "chat:final")
    troll = clients(url, token("troll"), "chat:final")
    await mod.synced.wait()
    await troll.synced.wait()
    said = await troll.publish("chat:final", {"text": "spam"})
    assert said.position is not None
    with pytest.raises(RequestFailed) as err:
        await troll.request(
            lambda i: msgspec.json.decode(
                json.dumps(
                    {"type": "mute", "id": i, "channel": "chat:final", "user": "mod", "seconds": 60}
                ),
                type=__import__("streamplane.realtime.protocol", fromlist=["Mute"]).Mute,
            )
        )
    assert err.value.reply.code == Code.FORBIDDEN
    from streamplane.realtime.protocol import Delete, Mute

    await mod.request(lambda i: Delete(id=i, channel="chat:final", offset=said.position.offset))  # type: ignore[union-attr]
    await mod.request(lambda i: Mute(id=i, channel="chat:final", user="troll", seconds=60))
    with pytest.raises(RequestFailed) as err:
        await troll.publish("chat:final", {"text": "more spam"})
    assert err.value.reply.code == Code.MUTED
    await until(
        lambda: [m.kind for m in troll.views["chat:final"].messages][-2:] == ["delete", "mute"]
    )
    deleted = troll.views["chat:final"].messages[-2]
    assert json.loads(bytes(deleted.data))["offset"] == said.position.offset


async def test_a_broker_outage_is_reported_and_clients_reload_after_it(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    hub = MemoryHub()
    gateway, url = await start(hub)
    ann = clients(url, token("ann"), "chat:final")
    bob = clients(url, token("bob"), "chat:final")
    await ann.synced.wait()
    await bob.synced.wait()
    await bob.publish("chat:final", {"n": 0})
    await until(lambda: len(ann.views["chat:final"].messages) == 1)
    hub.interrupt()
    with pytest.raises(RequestFailed) as err:
        await bob.publish("chat:final", {"n": 1})
    assert err.value.reply.code == Code.UNAVAILABLE
    port = url.rsplit(":", 1)[1]
    import httpx

    async with httpx.AsyncClient() as http:
        health = await http.get(f"http://127.0.0.1:{port}/health")
        assert health.status_code == 503 and health.json()["degraded"] is True
        hub.restore(lose_data=True)  # the store came back empty: nothing can be recovered
        await until(lambda: ann.views["chat:final"].reloads == 2)
        assert (await http.get(f"http://127.0.0.1:{port}/health")).json()["ok"] is True
    assert ann.connected.is_set(), "connections are kept through the outage"
    after = await bob.publish("chat:final", {"n": 2})
    await until(
        lambda: any(m.offset == after.position.offset for m in ann.views["chat:final"].messages)
    )  # type: ignore[union-attr]
    assert gateway.stats["resets"] >= 2


async def test_an_expired_token_ends_the_connection_with_its_code(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    _, url = await start()
    client = RealtimeClient(url, token(ttl=1))
    with pytest.raises(ClientGaveUp) as err:
        await asyncio.wait_for(client.run(), 10)
    # the connection was cut with TOKEN_EXPIRED, the reconnect refused with the same code
    assert client.disconnects == [Code.TOKEN_EXPIRED]
    assert err.value.code == 401


async def test_deliveries_lost_between_broker_and_gateway_are_filled_from_history(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    """What a Redis pub/sub drop does: the gateway misses deliveries; the next one shows the
    hole, and every client still gets each publication once, in order, without a reload."""
    hub = MemoryHub()
    gateway, url = await start(hub)
    other = hub.node()
    await other.start()
    ann = clients(url, token("ann"), "fast:final")
    await ann.synced.wait()
    keep = {"history_size": 100, "history_ttl": 600.0}
    await other.publish("fast:final", b'{"n":0}', **keep)
    await until(lambda: len(ann.views["fast:final"].messages) == 1)
    await gateway.broker.unsubscribe("fast:final", gateway._on_publication)
    for n in (1, 2):  # published while the gateway hears nothing
        await other.publish("fast:final", f'{{"n":{n}}}'.encode(), **keep)
    await gateway.broker.subscribe("fast:final", gateway._on_publication)
    await other.publish("fast:final", b'{"n":3}', **keep)
    await until(lambda: len(ann.views["fast:final"].messages) == 4)
    view = ann.views["fast:final"]
    assert [json.loads(bytes(m.data))["n"] for m in view.messages] == [0, 1, 2, 3]
    assert view.reloads == 1 and gateway.stats["resets"] == 0
    await other.close()


async def test_a_batch_subscribes_what_it_may_and_names_what_it_may_not(start: Start) -> None:
    _, url = await start(max_channels=2)
    async with connect(f"{url}/connect?token={token()}", ping_interval=None) as ws:
        await ws.recv()
        batch = [{"channel": c} for c in ("chat:a", "nope:b", "state:c", "chat:d", "chat:e")]
        await ws.send(json.dumps({"type": "subscribe", "id": 9, "channels": batch}))
        answer = json.loads(await ws.recv())
        codes = {c["channel"]: c.get("code", 0) for c in answer["channels"]}
        assert answer["id"] == 9
        assert codes == {
            "chat:a": 0,
            "nope:b": Code.UNKNOWN_CHANNEL,
            "state:c": 0,
            "chat:d": Code.TOO_MANY_CHANNELS,
            "chat:e": Code.TOO_MANY_CHANNELS,
        }
        await ws.send(json.dumps({"type": "publish", "id": 10, "channel": "state:c", "data": {}}))
        refused = json.loads(await ws.recv())
        assert refused["code"] == Code.FORBIDDEN


async def test_a_silent_peer_is_dropped_and_a_pinging_client_is_kept(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    gateway, url = await start(ping_s=0.2)
    alive = clients(url, token("ann"), "chat:final")
    await alive.synced.wait()
    async with connect(f"{url}/connect?token={token('bob')}", ping_interval=None) as silent:
        await silent.recv()  # connected; then it says nothing (a peer behind a cut network)
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await silent.recv()
    assert gateway.stats["silent"] == 1
    assert alive.connected.is_set() and alive.connects == 1, "its pings kept it"


async def test_a_subscription_refused_during_an_outage_leaves_nothing_behind(
    start: Start,
) -> None:
    hub = MemoryHub()
    gateway, url = await start(hub)
    async with connect(f"{url}/connect?token={token()}", ping_interval=None) as ws:
        await ws.recv()
        hub.interrupt()
        await ws.send('{"type":"subscribe","id":1,"channels":[{"channel":"chat:final"}]}')
        answer = json.loads(await ws.recv())
        assert answer["channels"][0]["code"] == Code.UNAVAILABLE
        assert "chat:final" not in gateway.channels, "no half-joined channel"
        hub.restore()
        await ws.send('{"type":"subscribe","id":2,"channels":[{"channel":"chat:final"}]}')
        again = json.loads(await ws.recv())
        assert again["id"] == 2 and again["channels"][0].get("code", 0) == 0


async def test_a_client_refused_a_channel_during_an_outage_asks_again_and_gets_it(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    """A viewer that (re)connects while the broker is away is refused its channel with 4503 on
    a connection that stays open: it must ask again, or it stays deaf to the channel until some
    later reconnect."""
    hub = MemoryHub()
    _, url = await start(hub)
    hub.interrupt()
    ann = clients(url, token("ann"), "chat:final")
    await asyncio.wait_for(ann.connected.wait(), 10)
    # One frame at a time per connection: the pong comes after the subscribe's answer.
    assert isinstance(await ann.request(lambda i: Ping(id=i)), Pong)
    assert not ann.synced.is_set(), "a refused channel is not subscribed"
    hub.restore()
    await asyncio.wait_for(ann.synced.wait(), 15)
    bob = clients(url, token("bob"), "chat:final")
    await asyncio.wait_for(bob.synced.wait(), 10)
    await bob.publish("chat:final", {"text": "back"})
    await until(lambda: len(ann.views["chat:final"].messages) == 1, timeout=15)
    assert ann.connects == 1, "asked again on the same connection"
