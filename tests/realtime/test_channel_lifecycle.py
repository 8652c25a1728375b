"""A channel's broker subscription across its last viewer leaving and a new one joining at once.

The gateway drops a channel's broker subscription in a task of its own when the channel's last
connection leaves. In a reconnect storm a new viewer can subscribe to the channel after the old
one left but before that task has run. The connections here are driven without sockets (their
transport records what is written) so the order of events is exact, not left to the loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from streamplane.realtime.broker import Position
from streamplane.realtime.gateway import Gateway, GatewaySettings, _Connection
from streamplane.realtime.memory import MemoryHub
from streamplane.realtime.protocol import Subscribe, SubscribeItem
from streamplane.realtime.tokens import sign_realtime_token, verify_realtime_token

KEY = b"k" * 32
CHANNEL = "event:final"


class _Recording(asyncio.Transport):
    """A transport that keeps what the gateway writes: the connection's outgoing bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: Any) -> None:
        self.written += data

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.written += line

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def _viewer(gateway: Gateway, name: str) -> tuple[_Connection, _Recording]:
    now = int(time.time())
    token = sign_realtime_token(KEY, user=name, channels={"event:*": ["read"]}, now=now, ttl_s=60)
    conn = _Connection(gateway)
    transport = _Recording()
    conn.transport = transport
    conn.grant = verify_realtime_token(token, KEY, now=now)
    conn.open = True
    conn.client = gateway._joined(conn, conn.grant)
    return conn, transport


def _frames(written: bytes) -> list[dict[str, Any]]:
    """The server's unmasked text frames (all short here)."""
    out, at = [], 0
    while at < len(written):
        length = written[at + 1] & 0x7F
        head = 2
        if length == 126:
            length, head = int.from_bytes(written[at + 2 : at + 4], "big"), 4
        out.append(msgspec.json.decode(written[at + head : at + head + length]))
        at += head + length
    return out


def _offsets(written: bytes) -> list[int]:
    got: list[int] = []
    for frame in _frames(written):
        if frame["type"] == "subscribed":
            got += [p["offset"] for p in frame["channels"][0]["publications"]]
        elif frame["type"] == "pub":
            got.append(frame["offset"])
    return got


async def test_a_viewer_joining_as_the_last_one_leaves_still_gets_the_live_stream() -> None:
    hub = MemoryHub()
    source = hub.node()
    await source.start()
    gateway = Gateway(hub.node(), GatewaySettings(token_key=KEY, tick=0.1))
    await gateway.broker.start()
    try:
        old, _ = _viewer(gateway, "old")
        await gateway._subscribe(old, Subscribe(id=1, channels=[SubscribeItem(channel=CHANNEL)]))
        first = await source.publish(CHANNEL, b"{}", history_size=100, history_ttl=60)
        assert old.positions.position(CHANNEL) == first
        # The last viewer goes and, before the loop runs again, another arrives with its
        # last position: the storm's order of events.
        new, written = _viewer(gateway, "new")
        old.connection_lost(None)
        since = SubscribeItem(channel=CHANNEL, since=Position(first.epoch, first.offset))
        await gateway._subscribe(new, Subscribe(id=1, channels=[since]))
        for _ in range(3):  # the loop runs whatever the leave left behind
            await asyncio.sleep(0)
        for _ in range(2):
            await source.publish(CHANNEL, b"{}", history_size=100, history_ttl=60)
        assert _offsets(bytes(written.written)) == [2, 3], "the channel went deaf"
        assert new.positions.position(CHANNEL) == Position(first.epoch, 3)
    finally:
        await gateway.close()
        await source.close()


async def test_viewers_whose_tokens_expire_in_the_same_second_all_join() -> None:
    """Connections come and go within a second under a storm: CPython gives a new connection
    the address (the ``id``) of one just freed, so the expiry heap must never fall back to
    comparing its entries' connections."""
    gateway = Gateway(MemoryHub().node(), GatewaySettings(token_key=KEY, tick=0.1))
    await gateway.broker.start()
    try:
        for i in range(50):
            conn, _ = _viewer(gateway, f"v{i}")  # every token: the same second's expiry
            conn.connection_lost(None)
            del conn
        assert gateway.stats["accepted"] == 50
    finally:
        await gateway.close()
