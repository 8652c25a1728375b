"""Two real ExaBGP speakers on loopback: an ISP router announces, the edge site's BgpFeed
learns, and Steering's ranking follows within seconds."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from streamplane.steering import (
    BgpError,
    BgpFeed,
    BgpNeighbor,
    Client,
    EdgeCandidate,
    ExabgpNotFound,
    RoutingTable,
    Steering,
    find_exabgp,
)

ISP, SITE = "127.0.0.2", "127.0.0.3"
ISP_AS, SITE_AS = 64500, 64512
COMMANDS = Path(__file__).with_name("isp_commands.py")

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    """A port free on both loopback addresses (each speaker listens on its own)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((ISP, 0))
            port = int(probe.getsockname()[1])
            with socket.socket() as other:
                try:
                    other.bind((SITE, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port on both loopback addresses")


class IspRouter:
    """An ExaBGP announcing what the test writes to its command FIFO."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.fifo = workdir / "commands"
        self.process: asyncio.subprocess.Process | None = None
        self._writer: int | None = None

    async def start(self) -> None:
        os.mkfifo(self.fifo)
        self._writer = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)
        config = self.workdir / "isp.conf"
        config.write_text(
            f"process commands {{\n  run {sys.executable} {COMMANDS} {self.fifo};\n"
            "  encoder json;\n}\n"
            f"neighbor {SITE} {{\n  router-id {ISP};\n  local-address {ISP};\n"
            f"  local-as {ISP_AS};\n  peer-as {SITE_AS};\n"
            "  family { ipv4 unicast; ipv6 unicast; }\n"
            "  api { processes [ commands ]; }\n}\n"
        )
        env = {
            **os.environ,
            "exabgp_tcp_port": str(self.port),
            "exabgp_tcp_bind": ISP,
            "exabgp_daemon_user": getpass.getuser(),
            "exabgp_api_cli": "false",
        }
        with (self.workdir / "isp.log").open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                str(find_exabgp()),
                str(config),
                env=env,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )

    def send(self, command: str) -> None:
        assert self._writer is not None
        os.write(self._writer, (command + "\n").encode())

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None


@pytest.fixture
async def isp(tmp_path: Path) -> AsyncIterator[IspRouter]:
    router = IspRouter(tmp_path, _free_port())
    await router.start()
    try:
        yield router
    finally:
        await router.stop()


async def _eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    """Seconds until ``check()`` holds; fails the test after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > timeout:
            pytest.fail(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)
    return loop.time() - start


FLEET = [
    # The BGP-fed site is far from the client; the other is next door but has no prefix.
    EdgeCandidate(edge_id="bgp-1", site="bgp-site", base_url="https://bgp-1", lat=40.7, lon=-74.0),
    EdgeCandidate(edge_id="near-1", site="near", base_url="https://near-1", lat=52.4, lon=4.9),
]
V4 = Client(address="203.0.113.7", lat=52.37, lon=4.9)
V6 = Client(address="2001:db8:77::5", lat=52.37, lon=4.9)


def _first(steering: Steering, client: Client) -> str:
    return steering.rank(client, "tt1", "session-1", FLEET)[0].edge_id


async def test_announcements_and_withdrawals_change_the_ranking(isp: IspRouter) -> None:
    table = RoutingTable()
    steering = Steering(table)
    neighbor = BgpNeighbor(
        address=ISP, peer_as=ISP_AS, local_as=SITE_AS, local_address=SITE, relation="private"
    )
    feed = BgpFeed(table, "bgp-site", [neighbor], port=isp.port, workdir=isp.workdir / "feed")
    async with feed:
        await feed.wait_established(timeout=20)
        assert feed.established == {ISP}
        assert _first(steering, V4) == "near-1"

        isp.send(f"announce route 203.0.113.0/24 next-hop {ISP} as-path [ 64500 64501 ] med 10")
        isp.send("announce route 2001:db8:77::/48 next-hop 2001:db8::1 as-path [ 64500 ]")
        await _eventually(lambda: _first(steering, V4) == "bgp-1", "the IPv4 announcement")
        await _eventually(lambda: _first(steering, V6) == "bgp-1", "the IPv6 announcement")
        best = steering.rank(V4, "tt1", "session-1", FLEET)[0]
        assert (best.prefix, best.as_path_len, best.med, best.relation) == (
            "203.0.113.0/24",
            2,
            10,
            "private",
        )
        assert "AS path 64500 64501, MED 10, private peering" in best.reason
        assert table.lookup("203.0.113.7")["bgp-site"].peer == ISP

        isp.send(f"withdraw route 203.0.113.0/24 next-hop {ISP}")
        await _eventually(lambda: _first(steering, V4) == "near-1", "the withdrawal")
        assert _first(steering, V6) == "bgp-1"  # the other prefix stays

        # The ISP's router goes away: its session drops, and with it every route it gave.
        await isp.stop()
        await _eventually(lambda: _first(steering, V6) == "near-1", "the session going down")
        assert feed.established == set()
        assert feed.errors == 0, feed.last_error
    assert len(table) == 0
    assert not feed.running


async def test_routes_learned_are_dropped_when_the_feed_stops(isp: IspRouter) -> None:
    table = RoutingTable()
    neighbor = BgpNeighbor(address=ISP, peer_as=ISP_AS, local_as=SITE_AS, local_address=SITE)
    feed = BgpFeed(table, "bgp-site", [neighbor], port=isp.port)
    await feed.start()
    try:
        await feed.wait_established(timeout=20)
        isp.send(f"announce route 198.51.100.0/24 next-hop {ISP}")
        await _eventually(lambda: "bgp-site" in table.lookup("198.51.100.1"), "the route")
    finally:
        await feed.stop()
    assert table.lookup("198.51.100.1") == {}
    assert not feed.running


async def test_exabgp_missing_or_failing_is_reported(tmp_path: Path) -> None:
    neighbor = BgpNeighbor(address=ISP, peer_as=1, local_as=2, local_address=SITE)
    with pytest.raises(ExabgpNotFound, match="pip install exabgp"):
        await BgpFeed(RoutingTable(), "s", [neighbor], exabgp=tmp_path / "nope").start()
    broken = tmp_path / "exabgp"
    broken.write_text("#!/bin/sh\necho 'configuration error: boom' >&2\nexit 1\n")
    broken.chmod(0o755)
    feed = BgpFeed(RoutingTable(), "s", [neighbor], exabgp=broken, workdir=tmp_path / "w")
    with pytest.raises(BgpError, match=r"(?s)exited with status 1.*configuration error: boom"):
        await feed.start(timeout=5)
    assert not feed.running
