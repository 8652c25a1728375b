"""The gateway's behaviours that depend on the engine, run over real WebSockets on every engine
in ENGINES (memory, Redis, Redis Cluster): recovery (within the history, beyond it, a new epoch),
rate and size limits across processes, state and its staleness, presence and counts across
processes (a large channel's distinct users, its viewers' leaves once it is listed again),
presence after the broker comes back, and a slow consumer cut while the others get every
publication.

Each gateway is one process's node on the harness's store; the harness's clock drives what the
broker times (rate-limit refills, presence and count expiry), so nothing here waits on it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamplane.realtime.client import RealtimeClient, RequestFailed
from streamplane.realtime.gateway import Gateway, GatewaySettings
from streamplane.realtime.protocol import (
    DEFAULT_NAMESPACES,
    Code,
    Namespace,
    PresenceQuery,
    Unsubscribe,
)
from tests.realtime.engines import Harness
from tests.realtime.test_gateway import FAST, KEY, clients, token, until

__all__ = ["clients"]  # the gateway tests' client fixture, used here too

Start = Callable[..., Awaitable[tuple[Gateway, str]]]


@pytest.fixture
async def start(harness: Harness) -> AsyncIterator[Start]:
    running: list[Gateway] = []

    async def _start(**overrides: object) -> tuple[Gateway, str]:
        fields: dict[str, object] = {"tick": 0.1, "handshake_timeout": 2.0, "namespaces": FAST}
        fields.update(overrides)
        settings = GatewaySettings(token_key=KEY, **fields)  # type: ignore[arg-type]
        gateway = Gateway(await harness.node(), settings)
        port = await gateway.start("127.0.0.1", 0)
        running.append(gateway)
        return gateway, f"ws://127.0.0.1:{port}"

    yield _start
    for gateway in running:
        await gateway.close()


def drop(gateway: Gateway, user: str) -> None:
    """A network blip: the user's connections on this gateway vanish without a close."""
    for conn in list(gateway.connections):
        if conn.grant is not None and conn.grant.user == user and conn.transport is not None:
            conn.transport.abort()


async def present(client: RealtimeClient, channel: str) -> list[str]:
    answer = await client.request(lambda i: PresenceQuery(id=i, channel=channel))
    return sorted(p.user for p in answer.present)


async def test_a_reconnecting_client_gets_exactly_what_it_missed_from_the_gateways_tail(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    gateway, url = await start()
    ann = clients(url, token("ann"), "fast:final")
    bob = clients(url, token("bob"), "fast:final")
    await ann.synced.wait()
    await bob.synced.wait()
    for i in range(3):
        await bob.publish("fast:final", {"n": i})
    await until(lambda: len(ann.views["fast:final"].messages) == 3)
    drop(gateway, "ann")
    for i in range(3, 8):  # some before ann is back, some after: all reach it once, in order
        await bob.publish("fast:final", {"n": i})
    await until(lambda: len(ann.views["fast:final"].messages) == 8 and ann.connects == 2)
    view = ann.views["fast:final"]
    assert [m.offset for m in view.messages] == list(range(1, 9))
    assert [json.loads(bytes(m.data))["n"] for m in view.messages] == list(range(8))
    assert view.reloads == 1, "only the first subscription loads; the reconnect recovered"
    # The channel stayed subscribed here (bob): the process had every publication ann missed.
    assert gateway.stats["tail_recoveries"] == 1 and gateway.stats["broker_recoveries"] == 0


async def test_without_a_tail_the_recovery_reads_the_broker_and_is_as_exact(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    gateway, url = await start(tail_size=0)
    ann = clients(url, token("ann"), "fast:final")
    bob = clients(url, token("bob"), "fast:final")
    await ann.synced.wait()
    await bob.synced.wait()
    await bob.publish("fast:final", {"n": 0})
    await until(lambda: len(ann.views["fast:final"].messages) == 1)
    drop(gateway, "ann")
    for i in range(1, 4):
        await bob.publish("fast:final", {"n": i})
    await until(lambda: len(ann.views["fast:final"].messages) == 4 and ann.connects == 2)
    assert [m.offset for m in ann.views["fast:final"].messages] == [1, 2, 3, 4]
    assert ann.views["fast:final"].reloads == 1
    assert gateway.stats["tail_recoveries"] == 0 and gateway.stats["broker_recoveries"] >= 1


async def test_a_gap_beyond_the_history_makes_the_client_reload(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    small = {**FAST, "fast": Namespace(name="fast", rate_per_s=1e6, burst=10**6, history_size=3)}
    _, url = await start(namespaces=small)
    ann = clients(url, token("ann"), "fast:final")
    bob = clients(url, token("bob"), "fast:final")
    await ann.synced.wait()
    await bob.synced.wait()
    await bob.publish("fast:final", {"n": 0})
    await until(lambda: len(ann.views["fast:final"].messages) == 1)
    await ann.stop()  # away while 9 more are published; the history (and the tail) keep 3
    for i in range(1, 10):
        await bob.publish("fast:final", {"n": i})
    ann.start()
    await until(lambda: ann.views["fast:final"].reloads == 2)
    view = ann.views["fast:final"]
    assert ann.cursor.position("fast:final") is not None
    assert ann.cursor.position("fast:final").offset == 10  # type: ignore[union-attr]
    assert [m.offset for m in view.messages] == [8, 9, 10], "reloaded from recent history"


async def test_chat_rate_limits_hold_across_gateway_processes_and_connections(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    """A user on two processes, with two connections on one, gets the channel's burst once."""
    _, url_a = await start()
    _, url_b = await start()
    ann = [clients(url, token("ann")) for url in (url_a, url_a, url_b)]
    burst = DEFAULT_NAMESPACES["chat"].burst
    for i in range(burst):
        assert (await ann[i % 3].publish("chat:final", {"n": i})).position is not None
    for connection in ann:
        with pytest.raises(RequestFailed) as err:
            await connection.publish("chat:final", {"n": "one too many"})
        assert err.value.reply.code == Code.RATE_LIMITED and err.value.reply.after_ms > 0
    bob = clients(url_b, token("bob"))
    assert (await bob.publish("chat:final", {"n": 0})).position is not None, "bob's own bucket"


async def test_an_oversized_message_is_refused_before_anything_is_stored_or_counted(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    gateway, url = await start()
    bob = clients(url, token("bob"), "chat:final")
    await bob.synced.wait()
    limit = DEFAULT_NAMESPACES["chat"].max_message_bytes
    with pytest.raises(RequestFailed) as err:
        await bob.publish("chat:final", {"text": "x" * limit})
    assert err.value.reply.code == Code.MESSAGE_TOO_LARGE
    page = await gateway.broker.history("chat:final", limit=10)
    assert page.top.offset == 0 and page.publications == [], "nothing stored"
    burst = DEFAULT_NAMESPACES["chat"].burst
    for i in range(burst):  # the refused message took no token from bob's bucket
        assert (await bob.publish("chat:final", {"n": i})).position is not None
    source = clients(url, token("feed", {"state:final": ["read", "publish"]}))
    with pytest.raises(RequestFailed) as err:
        await source.set_state(
            "state:final", "odds", "x" * 5000, seq=1, source_time_ms=0, max_age_ms=1000
        )
    assert err.value.reply.code == Code.MESSAGE_TOO_LARGE
    with pytest.raises(RequestFailed) as err:  # a small value under a huge key: as large
        await source.set_state(
            "state:final", "k" * 5000, 1, seq=1, source_time_ms=0, max_age_ms=1000
        )
    assert err.value.reply.code == Code.MESSAGE_TOO_LARGE
    assert await gateway.broker.state("state:final") == {}
    assert (await gateway.broker.history("state:final", limit=1)).top.offset == 0


async def test_state_is_ordered_by_source_sequence_and_shown_stale_past_its_age(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    _, url_a = await start()
    _, url_b = await start()
    viewer = clients(url_b, token("ann"), "state:final")
    source = clients(url_a, token("feed", {"state:final": ["read", "publish"]}))
    await viewer.synced.wait()
    now_ms = int(time.time() * 1000)
    applied = await source.set_state(
        "state:final", "odds", 2.1, seq=2, source_time_ms=now_ms, max_age_ms=60_000
    )
    late = await source.set_state(
        "state:final", "odds", 1.5, seq=1, source_time_ms=now_ms, max_age_ms=60_000
    )
    again = await source.set_state(
        "state:final", "odds", 9.9, seq=2, source_time_ms=now_ms, max_age_ms=60_000
    )
    assert applied.position is not None
    assert late.position is None and again.position is None, "older and repeated writes dropped"
    await until(lambda: "odds" in viewer.views["state:final"].state)
    assert json.loads(bytes(viewer.views["state:final"].state["odds"].value)) == 2.1
    assert viewer.views["state:final"].stale_keys(now_ms) == []
    assert viewer.views["state:final"].stale_keys(now_ms + 60_001) == ["odds"]
    late_joiner = clients(url_a, token("bob"), "state:final")
    await late_joiner.synced.wait()
    assert json.loads(bytes(late_joiner.views["state:final"].state["odds"].value)) == 2.1
    assert late_joiner.views["state:final"].stale_keys(now_ms + 60_001) == ["odds"]


async def test_presence_diffs_and_viewer_counts_across_processes(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    _, url_a = await start()
    _, url_b = await start()
    ann = clients(url_a, token("ann"), "event:final")
    bob = clients(url_b, token("bob"), "event:final")
    await until(
        lambda: ann.views["event:final"].viewers == 2 and bob.views["event:final"].viewers == 2
    )
    await until(lambda: sorted(ann.views["event:final"].present.values()) == ["ann", "bob"])
    await bob.stop()
    await until(lambda: ann.views["event:final"].viewers == 1)
    await until(lambda: sorted(ann.views["event:final"].present.values()) == ["ann"])


async def test_a_large_channels_presence_is_counted_per_process_and_a_gone_process_expires(
    start: Start, clients: Callable[..., RealtimeClient], harness: Harness
) -> None:
    """Past the diff limit each process holds its viewers' presence as one share: the counts
    are the sum over processes, nothing is listed, no entry is left behind, and a process that
    stops reporting (killed) drops out of the counts when its share expires."""
    large = {**FAST, "event": Namespace(name="event", history_size=20, presence_diff_limit=2)}
    gateway_a, url_a = await start(namespaces=large)
    gateway_b, url_b = await start(namespaces=large)
    on_a = [clients(url_a, token(f"a{i}"), "event:final") for i in range(4)]
    on_b = [clients(url_b, token(f"b{i}"), "event:final") for i in range(3)]
    everyone = on_a + on_b
    await until(lambda: all(c.views["event:final"].viewers == 7 for c in everyone), timeout=10)

    async def counted(clients: int) -> bool:
        answer = await on_a[0].request(lambda i: PresenceQuery(id=i, channel="event:final"))
        return (answer.clients, answer.users, answer.present) == (clients, clients, None)

    await until_async(lambda: counted(7), timeout=10)
    assert gateway_a.channels["event:final"].counted and gateway_b.channels["event:final"].counted
    assert await gateway_a.broker.presence("event:final") == [], "every entry went with the move"
    await gateway_b.close()  # as a killed process: its share stays until it expires
    for client in on_b:
        await client.stop()
    harness.clock.advance(1.0)  # shares and counts live three ticks (0.1 s)
    await until_async(lambda: counted(4), timeout=10)
    await until(lambda: on_a[0].views["event:final"].viewers == 4)


async def settle_presence(client: RealtimeClient, channel: str, users: list[str]) -> None:
    """Until the broker lists exactly ``users`` (asking again while it is still coming back)."""
    seen: list[str] | None = None

    async def poll() -> bool:
        nonlocal seen
        try:
            seen = await present(client, channel)
        except (RequestFailed, ConnectionError, TimeoutError):
            return False
        return seen == users

    try:
        await until_async(poll, timeout=10)
    except TimeoutError:
        raise AssertionError(f"presence of {channel}: {seen}, expected {users}") from None


async def until_async(condition: Callable[[], Awaitable[bool]], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("lose_data", [True, False], ids=["restarted-empty", "cut"])
async def test_presence_and_counts_are_whole_again_when_the_broker_returns(
    start: Start, clients: Callable[..., RealtimeClient], harness: Harness, lose_data: bool
) -> None:
    """Back empty (a Redis restart) or with its data (a cut): every connection still held is
    present again, and one that died during the outage is not."""
    gateway_a, url_a = await start()
    _, url_b = await start()
    ann = clients(url_a, token("ann"), "chat:final")
    bob = clients(url_a, token("bob"), "chat:final")
    carl = clients(url_b, token("carl"), "chat:final")
    dave = clients(url_b, token("dave"), "chat:final")
    for client in (ann, bob, carl, dave):
        await client.synced.wait()
    await settle_presence(ann, "chat:final", ["ann", "bob", "carl", "dave"])
    await until(lambda: ann.views["chat:final"].viewers == 4)
    first = (await bob.publish("chat:final", {"text": "before"})).position
    assert first is not None
    await until(lambda: ann.cursor.position("chat:final") == first)
    await harness.interrupt()
    await until(lambda: not gateway_a.broker.health().ok)
    await dave.stop()  # gone during the outage: its leave cannot reach the broker
    await harness.restore(lose_data=lose_data)
    await until(lambda: gateway_a.broker.health().ok, timeout=10)
    await settle_presence(carl, "chat:final", ["ann", "bob", "carl"])
    await until(lambda: carl.views["chat:final"].viewers == 3)
    # Kept data lists everyone at once: the rejoins may still be on their way (a cluster node
    # refuses work for a moment after it is back, and they retry).
    await until(lambda: gateway_a.stats["presence_rejoined"] >= 2, timeout=10)
    assert ann.connects == 1 and carl.connects == 1, "connections kept through the outage"
    # The stream: a new epoch when the store came back empty (every view reloads), the same
    # one when it kept its data (nothing to reload); either way the next publication arrives.
    await until(lambda: ann.views["chat:final"].reloads == (2 if lose_data else 1))
    after = await bob.publish("chat:final", {"text": "back"})
    assert after.position is not None
    await until(lambda: ann.cursor.position("chat:final") == after.position)
    assert (after.position.epoch != first.epoch) is lose_data
    assert ann.views["chat:final"].reloads == (2 if lose_data else 1)


async def test_a_tail_with_a_hole_behind_it_never_bridges_the_hole(
    start: Start, clients: Callable[..., RealtimeClient], harness: Harness
) -> None:
    """The process missed deliveries (its broker subscription dropped them) and a client
    reconnects before the hole shows: the tail answers only up to what the process delivered,
    and the hole, once seen, is filled from the broker for that client too: every publication
    once, in order, no reload."""
    gateway, url = await start()
    other = await harness.node()  # another process's publisher
    keep = {"history_size": 100, "history_ttl": 600.0}
    ann = clients(url, token("ann"), "fast:final")
    await ann.synced.wait()
    await other.publish("fast:final", b'{"n":0}', **keep)
    await until(lambda: len(ann.views["fast:final"].messages) == 1)
    await gateway.broker.unsubscribe("fast:final", gateway._on_publication)
    for n in (1, 2):  # published while the process hears nothing
        await other.publish("fast:final", f'{{"n":{n}}}'.encode(), **keep)
    drop(gateway, "ann")
    await until(lambda: ann.connects == 2 and ann.synced.is_set())
    assert gateway.stats["tail_recoveries"] == 1, "answered from the tail, up to offset 1"
    await gateway.broker.subscribe("fast:final", gateway._on_publication)
    await other.publish("fast:final", b'{"n":3}', **keep)
    await until(lambda: len(ann.views["fast:final"].messages) == 4)
    view = ann.views["fast:final"]
    assert [json.loads(bytes(m.data))["n"] for m in view.messages] == [0, 1, 2, 3]
    assert [m.offset for m in view.messages] == [1, 2, 3, 4]
    assert view.reloads == 1 and gateway.stats["resets"] == 0


async def test_a_slow_consumer_is_cut_and_the_others_get_everything(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    gateway, url = await start(send_queue_bytes=32 * 1024)
    fast = clients(url, token("bob"), "fast:final")
    await fast.synced.wait()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.setblocking(False)
    slow = await connect(f"{url}/connect?token={token()}", sock=sock, ping_interval=None)
    await slow.recv()
    await slow.send('{"type":"subscribe","id":1,"channels":[{"channel":"fast:final"}]}')
    await slow.recv()
    slow.transport.pause_reading()  # reads nothing more: its queue at the gateway grows
    text = "x" * 14_000  # 400 of them: more than the kernel's socket buffers hold

    async def publish_all() -> None:
        for i in range(400):
            await fast.publish("fast:final", {"n": i, "text": text})

    publishing = asyncio.create_task(publish_all())
    await until(lambda: gateway.stats["slow"] >= 1 or publishing.done(), timeout=30)
    assert gateway.stats["slow"] >= 1
    # Read at once: the gateway waits a second for a cut client to take its close, then aborts.
    slow.transport.resume_reading()
    codes = []
    with pytest.raises(ConnectionClosed):
        while True:
            codes.append(json.loads(await slow.recv()).get("code"))
    assert codes[-1] == Code.SLOW
    await slow.close()
    await publishing
    await until(lambda: len(fast.views["fast:final"].messages) == 400, timeout=20)
    assert [m.offset for m in fast.views["fast:final"].messages] == list(range(1, 401))


async def test_a_user_connected_through_two_processes_counts_once_in_a_large_channel(
    start: Start, clients: Callable[..., RealtimeClient], harness: Harness
) -> None:
    """Users are distinct users, whichever processes their connections come through; a killed
    process's users go with its share unless another process still holds them."""
    large = {**FAST, "event": Namespace(name="event", history_size=20, presence_diff_limit=2)}
    gateway_a, url_a = await start(namespaces=large)
    gateway_b, url_b = await start(namespaces=large)
    on_a = [clients(url_a, token(u), "event:final") for u in ("ann", "a1", "a2")]
    on_b = [clients(url_b, token(u), "event:final") for u in ("ann", "b1", "bob", "bob")]
    everyone = on_a + on_b
    await until(lambda: all(c.views["event:final"].viewers == 7 for c in everyone), timeout=10)
    seen: tuple[int, int, object] | None = None

    async def counted(clients: int, users: int) -> bool:
        nonlocal seen
        answer = await on_a[0].request(lambda i: PresenceQuery(id=i, channel="event:final"))
        seen = (answer.clients, answer.users, answer.present)
        return seen == (clients, users, None)

    try:
        await until_async(lambda: counted(7, 5), timeout=10)  # ann twice, bob twice
    except TimeoutError:
        raise AssertionError(f"(clients, users, present) = {seen}, expected (7, 5, None)") from None
    assert gateway_a.channels["event:final"].counted and gateway_b.channels["event:final"].counted
    await gateway_b.close()  # as a killed process: its share and its users expire
    for client in on_b:
        await client.stop()
    harness.clock.advance(1.0)  # shares and counts live three ticks (0.1 s)
    try:
        await until_async(lambda: counted(3, 3), timeout=10)  # ann is still on a
    except TimeoutError:
        raise AssertionError(f"(clients, users, present) = {seen}, expected (3, 3, None)") from None


@pytest.mark.parametrize("lose_data", [True, False], ids=["restarted-empty", "cut"])
async def test_a_large_channels_distinct_users_are_whole_again_when_the_broker_returns(
    start: Start, clients: Callable[..., RealtimeClient], harness: Harness, lose_data: bool
) -> None:
    """Each process reports its share again when the broker is back; a store that lost the
    users the shares held has them again in full, and none is counted twice."""
    large = {**FAST, "event": Namespace(name="event", history_size=20, presence_diff_limit=2)}
    gateway_a, url_a = await start(namespaces=large)
    _, url_b = await start(namespaces=large)
    on_a = [clients(url_a, token(u), "event:final") for u in ("ann", "bob")]
    on_b = [clients(url_b, token(u), "event:final") for u in ("ann", "carl")]
    seen: tuple[int, int, object] | None = None

    async def counted() -> bool:
        nonlocal seen
        try:
            answer = await on_b[1].request(lambda i: PresenceQuery(id=i, channel="event:final"))
        except (RequestFailed, ConnectionError, TimeoutError):
            return False
        seen = (answer.clients, answer.users, answer.present)
        return seen == (4, 3, None)

    for outage in range(3):  # before, after one outage, after a second one
        if outage:
            await harness.interrupt()
            await until(lambda: not gateway_a.broker.health().ok)
            await harness.restore(lose_data=lose_data)
            await until(lambda: gateway_a.broker.health().ok, timeout=10)
        try:
            await until_async(counted, timeout=10)
        except TimeoutError:
            raise AssertionError(f"(clients, users, present) = {seen}, not (4, 3, None)") from None
    assert all(c.connects == 1 for c in on_a + on_b), "connections kept through the outages"


async def test_leaves_reach_the_viewers_when_a_large_channel_is_listed_again(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    """A channel that grew past the diff limit and came back to half of it for presence_ttl is
    listed again: its viewers are told who left while it was counted, and who leaves after."""
    small = {**FAST, "event": Namespace(name="event", history_size=20, presence_diff_limit=4)}
    _, url_a = await start(namespaces=small, presence_ttl=0.3)
    gateway_b, url_b = await start(namespaces=small, presence_ttl=0.3)
    ann = clients(url_a, token("ann"), "event:final")
    view = ann.views["event:final"]
    await until(lambda: sorted(view.present.values()) == ["ann"])
    viewers = []
    for i, url in enumerate((url_a, url_b, url_b)):  # listed: ann sees each join
        viewers.append(clients(url, token(f"v{i}"), "event:final"))
        await until(lambda n=i: len(view.present) == n + 2, timeout=10)
    for i, url in ((3, url_a), (4, url_b)):  # six: past the limit, counted
        viewers.append(clients(url, token(f"v{i}"), "event:final"))
    await until(lambda: gateway_b.channels["event:final"].counted, timeout=10)
    for client in viewers[1:]:
        await client.stop()
    # Two left, at most half the limit: listed again once it has stayed so for presence_ttl.
    await until(lambda: sorted(view.present.values()) == ["ann", "v0"], timeout=10)
    await viewers[0].stop()  # and a leave after the move
    await until(lambda: sorted(view.present.values()) == ["ann"], timeout=10)
    assert await present(ann, "event:final") == ["ann"]


async def test_a_connection_that_leaves_a_large_channel_for_a_small_one_is_seen_leaving_both(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    """Carl, listed on a channel that then grows past the diff limit, leaves it for a small one:
    the small one's viewers see him join and leave, and the first one's see him gone once it is
    listed again."""
    limited = {**FAST, "event": Namespace(name="event", history_size=20, presence_diff_limit=4)}
    _, url_a = await start(namespaces=limited, presence_ttl=0.3)
    gateway_b, url_b = await start(namespaces=limited, presence_ttl=0.3)
    olga = clients(url_a, token("olga"), "event:big")
    big = olga.views["event:big"]
    carl = clients(url_b, token("carl"), "event:big")
    await until(lambda: sorted(big.present.values()) == ["carl", "olga"], timeout=10)
    ann = clients(url_b, token("ann"), "event:small")
    small = ann.views["event:small"]
    await until(lambda: sorted(small.present.values()) == ["ann"], timeout=10)
    crowd = [clients(url, token(f"v{i}"), "event:big") for i, url in enumerate([url_a, url_b] * 2)]
    await until(lambda: big.viewers == 6, timeout=10)
    await until(lambda: gateway_b.channels["event:big"].counted, timeout=10)
    await carl.request(lambda i: Unsubscribe(id=i, channels=["event:big"]))
    await carl.subscribe("event:small")
    await until(lambda: sorted(small.present.values()) == ["ann", "carl"], timeout=10)
    assert await present(ann, "event:small") == ["ann", "carl"]
    for client in crowd:
        await client.stop()
    await until(lambda: big.viewers == 1, timeout=10)
    # Listed again once it has stayed at half the limit for presence_ttl: carl is gone there.
    await until(lambda: sorted(big.present.values()) == ["olga"], timeout=10)
    assert await present(olga, "event:big") == ["olga"]
    await carl.request(lambda i: Unsubscribe(id=i, channels=["event:small"]))
    await until(lambda: sorted(small.present.values()) == ["ann"], timeout=10)
    assert await present(ann, "event:small") == ["ann"]


async def test_a_viewer_who_joins_a_small_channel_sees_who_is_already_there(
    start: Start, clients: Callable[..., RealtimeClient]
) -> None:
    """Presence diffs tell joins and leaves from a snapshot: a newcomer is sent the snapshot
    itself, or it would only ever see those who join after it."""
    _, url = await start()
    ann = clients(url, token("ann"), "event:final")
    await until(lambda: sorted(ann.views["event:final"].present.values()) == ["ann"])
    bob = clients(url, token("bob"), "event:final")
    await until(lambda: sorted(bob.views["event:final"].present.values()) == ["ann", "bob"])
    await until(lambda: sorted(ann.views["event:final"].present.values()) == ["ann", "bob"])
    await ann.stop()
    await until(lambda: sorted(bob.views["event:final"].present.values()) == ["bob"])
