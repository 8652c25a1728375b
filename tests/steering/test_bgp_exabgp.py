"""Two real ExaBGP speakers on loopback: an ISP router announces, the edge site's BgpFeed
learns, and Steering's ranking follows within seconds; a router that hangs loses its routes
when the hold timer expires, and a speaker that dies is restarted."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamplane.config import BgpPeer
from streamplane.steering import (
    BgpError,
    BgpFeed,
    BgpNeighbor,
    Client,
    EdgeCandidate,
    ExabgpNotFound,
    RoutingTable,
    Steering,
)
from tests.steering.exabgp_peers import (
    ISP,
    ISP_AS,
    SITE,
    SITE_AS,
    IspRouter,
    alive,
    children,
    eventually,
    isp_router,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def isp(tmp_path: Path) -> AsyncIterator[IspRouter]:
    async with isp_router(tmp_path) as router:
        yield router


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
        await eventually(lambda: _first(steering, V4) == "bgp-1", "the IPv4 announcement")
        await eventually(lambda: _first(steering, V6) == "bgp-1", "the IPv6 announcement")
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
        await eventually(lambda: _first(steering, V4) == "near-1", "the withdrawal")
        assert _first(steering, V6) == "bgp-1"  # the other prefix stays

        # The ISP's router goes away: its session drops, and with it every route it gave.
        await isp.stop()
        await eventually(lambda: _first(steering, V6) == "near-1", "the session going down")
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
        await eventually(lambda: "bgp-site" in table.lookup("198.51.100.1"), "the route")
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


async def test_a_hung_router_loses_its_routes_when_the_hold_timer_expires(
    isp: IspRouter,
) -> None:
    """The hold time is a setting passed to ExaBGP: a router that stops answering (SIGSTOP)
    has its routes withdrawn once it expires, not kept steering clients for 180 s."""
    table = RoutingTable()
    steering = Steering(table)
    peer = BgpPeer(
        site="bgp-site",
        local_address=SITE,
        peer_address=ISP,
        local_as=SITE_AS,
        peer_as=ISP_AS,
        port=isp.port,
        relation="private",
        hold_time_s=3,
    )
    feed = BgpFeed(table, peer)
    assert (feed.neighbors[0].hold_time, feed.neighbors[0].relation) == (3, "private")
    async with feed:
        await feed.wait_established(timeout=20)
        isp.send(f"announce route 203.0.113.0/24 next-hop {ISP} as-path [ 64500 ]")
        await eventually(lambda: _first(steering, V4) == "bgp-1", "the announcement")
        assert "private peering" in steering.rank(V4, "tt1", "s", FLEET)[0].reason
        [session] = feed.sessions()
        assert (session.state, session.hold_time_s, session.prefixes) == ("established", 3, 1)

        assert isp.process is not None
        os.killpg(isp.process.pid, signal.SIGSTOP)
        try:
            took = await eventually(
                lambda: _first(steering, V4) == "near-1", "the hold timer", timeout=15
            )
            [session] = feed.sessions()
            assert session.state == "connecting" and session.prefixes == 0
            assert "hold timer" in (session.last_error or "").lower(), session.last_error
        finally:
            os.killpg(isp.process.pid, signal.SIGCONT)
    # 3 s of silence, then the timer fires (ExaBGP checks it about once a second).
    assert took < 3 + 3, took


async def test_a_speaker_that_dies_is_restarted_and_learns_again(isp: IspRouter) -> None:
    """ExaBGP killed: its routes go at once, its API process goes with it, and the feed
    starts it again after a back-off; the router re-sends its routes to the new session."""
    table = RoutingTable()
    neighbor = BgpNeighbor(address=ISP, peer_as=ISP_AS, local_as=SITE_AS, local_address=SITE)
    clock_now = [1000.0]
    feed = BgpFeed(
        table,
        "bgp-site",
        [neighbor],
        port=isp.port,
        restart_base_s=0.2,
        clock=lambda: clock_now[0],
    )
    assert [s.state for s in feed.sessions()] == ["idle"]
    async with feed:
        assert [s.state for s in feed.sessions()] in (["connecting"], ["established"])
        await feed.wait_established(timeout=20)
        isp.send(f"announce route 198.51.100.0/24 next-hop {ISP}")
        await eventually(lambda: "bgp-site" in table.lookup("198.51.100.1"), "the route")
        first = feed.pid
        assert first is not None
        relays = children(first)
        assert len(relays) == 1  # ExaBGP's API process, the relay

        clock_now[0] = 2000.0
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: table.lookup("198.51.100.1") == {}, "the routes dropped")
        await eventually(lambda: not any(map(alive, relays)), "the relay dying with ExaBGP")
        await eventually(lambda: feed.restarts == 1, "the restart")
        await feed.wait_established(timeout=20)
        await eventually(lambda: "bgp-site" in table.lookup("198.51.100.1"), "the route again")
        assert feed.pid not in (None, first)
        [session] = feed.sessions()
        assert (session.state, session.restarts, session.prefixes) == ("established", 1, 1)
        assert session.since == 2000.0  # established again since the restart
        assert feed.last_error is not None and "exited with status -9" in feed.last_error
    assert [s.state for s in feed.sessions()] == ["idle"]
    assert table.lookup("198.51.100.1") == {}
