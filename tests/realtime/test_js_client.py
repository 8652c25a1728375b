"""The browser client (web/static/realtime.js) under Node's WebSocket (the same WebSocket API a
browser has) against a real gateway: it recovers exactly what it missed across a dropped
connection, resubscribing in one batch."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest

import streamplane.web
from streamplane.realtime.client import RealtimeClient
from streamplane.realtime.gateway import Gateway, GatewaySettings
from streamplane.realtime.memory import MemoryHub
from streamplane.realtime.protocol import DEFAULT_NAMESPACES, Namespace
from streamplane.realtime.tokens import sign_realtime_token

KEY = b"j" * 32
NODE = shutil.which("node")
CLIENT = Path(streamplane.web.__file__).parent / "static" / "realtime.js"
pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node.js 20+ (it runs realtime.js)")

SCRIPT = """
import { RealtimeClient } from %(module)s;
const [url, token, want] = process.argv.slice(2);
const rt = new RealtimeClient(url, token, ["fast:final"], {
  onSynced: () => console.log(JSON.stringify({ synced: rt.connects })),
});
rt.start();
const timer = setInterval(() => {
  const view = rt.view("fast:final");
  if (view.messages.length >= Number(want) && rt.connects >= 2) {
    console.log(JSON.stringify({ offsets: view.messages.map((m) => m.offset),
      ns: view.messages.map((m) => m.data.n), reloads: view.reloads, connects: rt.connects }));
    rt.stop(); clearInterval(timer);
  }
}, 10);
"""


def _token(user: str, key: bytes = KEY) -> str:
    channels = {"fast:*": ["read", "publish"]}
    return sign_realtime_token(key, user=user, channels=channels, now=int(time.time()), ttl_s=600)


async def _node(tmp_path: Path, source: str, *args: str) -> asyncio.subprocess.Process:
    """``source`` (a script importing the client as ``%(module)s``) run by Node with ``args``."""
    script = tmp_path / "client.mjs"
    script.write_text(source % {"module": json.dumps(CLIENT.as_uri())})
    assert NODE is not None
    return await asyncio.create_subprocess_exec(
        NODE,
        "--experimental-websocket",
        "--no-warnings",
        str(script),
        *args,
        stdout=asyncio.subprocess.PIPE,
    )


async def _line(proc: asyncio.subprocess.Process) -> dict[str, object]:
    assert proc.stdout is not None
    async with asyncio.timeout(20):
        return json.loads(await proc.stdout.readline())  # type: ignore[no-any-return]


async def test_the_browser_client_recovers_exactly_what_it_missed(tmp_path: Path) -> None:
    fast = {**DEFAULT_NAMESPACES, "fast": Namespace(name="fast", rate_per_s=1e6, burst=10**6)}
    gateway = Gateway(MemoryHub().node(), GatewaySettings(token_key=KEY, namespaces=fast))
    port = await gateway.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}"
    publisher = RealtimeClient(url, _token("feed"))
    publisher.start()
    proc = await _node(tmp_path, SCRIPT, f"{url}/connect", _token("ann"), "8")
    try:
        assert await _line(proc) == {"synced": 1}
        for n in range(3):
            await publisher.publish("fast:final", {"n": n})
        await asyncio.sleep(0.2)
        for conn in list(gateway.connections):
            if conn.grant is not None and conn.grant.user == "ann" and conn.transport is not None:
                conn.transport.abort()  # the network drops the browser
        for n in range(3, 8):
            await publisher.publish("fast:final", {"n": n})
        assert await _line(proc) == {"synced": 2}
        result = await _line(proc)
        assert result == {
            "offsets": list(range(1, 9)),
            "ns": list(range(8)),
            "reloads": 1,
            "connects": 2,
        }
        async with asyncio.timeout(10):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await publisher.stop()
        await gateway.close()


REFUSED_SCRIPT = """
import { RealtimeClient } from %(module)s;
const [url, token] = process.argv.slice(2);
const rt = new RealtimeClient(url, token, ["fast:final"], {
  onSynced: () => console.log(JSON.stringify({ synced: rt.connects })),
});
rt.start();
const timer = setInterval(() => {
  const view = rt.view("fast:final");
  if (view.messages.length >= 1) {
    const offsets = view.messages.map((m) => m.offset);
    console.log(JSON.stringify({ offsets, connects: rt.connects }));
    rt.stop(); clearInterval(timer);
  }
}, 10);
"""


async def test_the_browser_client_asks_again_for_a_channel_refused_during_an_outage(
    tmp_path: Path,
) -> None:
    """Connected while the broker is away, its channel refused with 4503 on a connection that
    stays open: it asks again, and ends subscribed without reconnecting."""
    fast = {**DEFAULT_NAMESPACES, "fast": Namespace(name="fast", rate_per_s=1e6, burst=10**6)}
    hub = MemoryHub()
    gateway = Gateway(hub.node(), GatewaySettings(token_key=KEY, namespaces=fast))
    refused = asyncio.Event()
    answer = gateway._subscribe

    async def answer_and_tell(conn: object, frame: object) -> None:
        await answer(conn, frame)  # type: ignore[arg-type]
        refused.set()

    gateway._subscribe = answer_and_tell  # type: ignore[method-assign]
    port = await gateway.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}"
    hub.interrupt()
    proc = await _node(tmp_path, REFUSED_SCRIPT, f"{url}/connect", _token("ann"))
    publisher = RealtimeClient(url, _token("feed"))
    try:
        async with asyncio.timeout(20):
            await refused.wait()
        hub.restore()
        assert await _line(proc) == {"synced": 1}
        publisher.start()
        await publisher.publish("fast:final", {"n": 0})
        assert await _line(proc) == {"offsets": [1], "connects": 1}
        async with asyncio.timeout(10):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await publisher.stop()
        await gateway.close()


PRESENT_SCRIPT = """
import { RealtimeClient } from %(module)s;
const [url, token] = process.argv.slice(2);
const rt = new RealtimeClient(url, token, ["fast:final"], {
  onPresence: (channel, present) => console.log(JSON.stringify([...present.values()].sort())),
});
rt.start();
"""


async def test_the_browser_client_sees_who_was_there_before_it_joined(tmp_path: Path) -> None:
    fast = {**DEFAULT_NAMESPACES, "fast": Namespace(name="fast", rate_per_s=1e6, burst=10**6)}
    gateway = Gateway(MemoryHub().node(), GatewaySettings(token_key=KEY, namespaces=fast, tick=0.1))
    port = await gateway.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}"
    ann = RealtimeClient(url, _token("ann"), channels=["fast:final"])
    ann.start()
    proc = None
    try:
        async with asyncio.timeout(20):
            while sorted(ann.views["fast:final"].present.values()) != ["ann"]:
                await asyncio.sleep(0.02)
        proc = await _node(tmp_path, PRESENT_SCRIPT, f"{url}/connect", _token("bob"))
        seen: list[object] = []
        while seen != ["ann", "bob"]:  # ann, who was there first, among them
            seen = await _line(proc)  # type: ignore[assignment]
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await ann.stop()
        await gateway.close()
