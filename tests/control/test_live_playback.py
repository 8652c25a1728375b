"""Playback of a live channel: ranked edges and signed URLs, as for a title."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from streamplane.edge import PathNotAllowed, key_from_hex, verify
from streamplane.steering import GeoLocator

from .conftest import KEY_HEX, KEY_ID, Db, running, write_title

KEYRING = {KEY_ID: key_from_hex(KEY_HEX)}


async def test_a_channel_plays_from_every_healthy_edge(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    async with running(db, catalog, geo, live_channels=("ch1",)) as control:
        auth = await control.account()
        await control.edge("e1", ("demo",), site="site-a")
        await control.edge("e2", (), site="site-b")  # holds no title: still a live edge
        r = await control.play(auth, "ch1")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["live"] is True and body["title"] == "ch1"
        assert sorted(e["edge_id"] for e in body["edges"]) == ["e1", "e2"]
        assert [e["rank"] for e in body["edges"]] == [1, 2]
        for edge in body["edges"]:
            assert edge["reason"]
            assert edge["hls"].startswith(f"{edge['base_url']}/ch1/master.m3u8?__token__=")
            assert edge["dash"].startswith(f"{edge['base_url']}/ch1/manifest.mpd?__token__=")
        url = urlsplit(body["hls"])
        token = parse_qs(url.query)["__token__"][0]
        now = int(control.clock.now)
        grant = verify(token, path="/ch1/v240/index.m3u8", now=now, client_ip=None, keyring=KEYRING)
        assert grant.acl == ("/ch1/*",)
        try:
            verify(token, path="/demo/master.m3u8", now=now, client_ip=None, keyring=KEYRING)
        except PathNotAllowed:
            pass
        else:
            raise AssertionError("a channel's token opened a title")

        # a title stays a title: only its holders, and it is not live
        title = (await control.play(auth, "demo", device="phone")).json()
        assert title["live"] is False
        assert [e["edge_id"] for e in title["edges"]] == ["e1"]
        # a channel that is not configured is unknown
        assert (await control.play(auth, "ch2")).status_code == 404
