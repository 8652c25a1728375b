"""Warming a scheduled event's planned edges: while the event is warming, the control plane
asks each planned edge (a real edge process in front of a live origin) for what the first
viewers will fetch, so the first viewer's requests are edge hits, and reports each edge's
warmth on GET /v1/live/plan."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import m3u8
import pytest
from rich.console import Console

from streamplane.cli import _live_plan_tables
from streamplane.config import TokenSettings
from streamplane.live import Rendition, SyntheticOrigin, master_playlist
from streamplane.player.live import join_part, parse_live_playlist
from streamplane.stack import free_port
from streamplane.steering import GeoLocator
from tests.edge.conftest import KEY_HEX, KEY_ID, start_edge, token

from .conftest import ADMIN, Clock, Db, running
from .test_live_plan import _events

pytestmark = pytest.mark.timeout(120)


async def test_a_warmed_edge_answers_the_first_viewer_without_asking_the_origin(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    origin = SyntheticOrigin(tmp_path / "origin")
    for _ in range(12):  # three segments of four parts
        origin.land(size=64)
    # the master playlist a channel writes once every rendition has a part
    master = master_playlist([Rendition("v240/index.m3u8", "avc1.64001e", 400_000, 426, 240)])
    (origin.settings.directory / "master.m3u8").write_text(master)
    edge = start_edge(tmp_path, origin.url, workers=1, live_playlist_ttl_s=0.5)
    dead = f"http://127.0.0.1:{free_port()}"  # a planned edge that heartbeats but answers nothing
    now = time.time()
    events = _events(tmp_path / "events.toml", 1000, now + 600)  # warming now
    (tmp_path / "catalog").mkdir()
    try:
        async with running(
            db,
            tmp_path / "catalog",
            geo,
            Clock(now),
            live_channels=("ch1",),
            live_events=str(events),
            live_warm_every_s=0.2,
            tokens=TokenSettings(keys={KEY_ID: KEY_HEX}, signing_kid=KEY_ID, ttl_s=3600),
        ) as control:
            await control.edge("w1", (), site="site-a", base_url=edge.url, sent_at=now)
            await control.edge("w2", (), site="site-b", base_url=dead, sent_at=now)
            admin = {"authorization": f"Bearer {ADMIN}"}

            async def plan() -> dict[str, object]:
                r = await control.client.get("/v1/live/plan", headers=admin)
                assert r.status_code == 200, r.text
                [event] = r.json()["events"]
                return event  # type: ignore[no-any-return]

            deadline = time.monotonic() + 60
            while True:
                event = await plan()
                edges = {e["edge"]: e for e in event["edges"]}  # type: ignore[attr-defined]
                if edges["w1"]["warm"] and edges["w2"]["warmed_at"] is not None:
                    break
                assert time.monotonic() < deadline, f"the edges were not warmed: {event}"
                await asyncio.sleep(0.2)

            # readiness per edge: w1 warm, w2 up (it heartbeats) but could not be warmed
            assert edges["w1"]["objects"] >= 4, edges["w1"]  # master, media, init, parts
            assert edges["w2"]["up"] is True and edges["w2"]["warm"] is False
            assert "master.m3u8" in edges["w2"]["why"]
            assert event["ready"] is False and event["edges_cold"] == ["w2"]
            assert "not warm yet: w2" in event["why"]
            # `streamplane live plan --control` prints the same, an edge a line, and fails
            body = (await control.client.get("/v1/live/plan", headers=admin)).json()
            tables, unready = _live_plan_tables(body)
            console = Console(record=True, width=200)
            for table in tables:
                console.print(table)
            rows = {
                cells[0]: cells
                for line in console.export_text().splitlines()
                if (cells := [c.strip() for c in line.split("│")[1:-1]])
            }
            assert rows["w1"][1:4] == ["site-a", "yes", "yes"]
            assert "objects fetched through the edge" in rows["w1"][4]
            assert rows["w2"][1:4] == ["site-b", "yes", "no"] and "master.m3u8" in rows["w2"][4]
            assert unready == ["ch1"]

        # The first viewer, after the warm-up: playlists, the init segment and the part it
        # joins at, through the warmed edge
        async with httpx.AsyncClient(timeout=10) as http:
            sig = f"__token__={token('/ch1/*')}"
            media_url = f"{edge.url}/ch1/{origin.rendition}/index.m3u8?{sig}"
            media = m3u8.loads((await http.get(media_url)).text)
            init = f"/ch1/{origin.rendition}/{media.segment_map[0].uri.split('?')[0]}"
            assert origin.requests[init] == 1, "the warm-up took the init segment from the origin"
            before = dict(origin.requests)
            r = await http.get(f"{edge.url}{init}?{sig}")
            assert r.status_code == 200 and r.content == b"\0\0\0\x08moov"
            assert origin.requests[init] == 1, "the first viewer's init segment is an edge hit"
            # ... and so is the part it joins at (PART-HOLD-BACK behind the live edge)
            joined = join_part(parse_live_playlist((await http.get(media_url)).text))
            assert joined is not None
            part = f"/ch1/{origin.rendition}/{joined.uri.split('?')[0]}"
            assert (await http.get(f"{edge.url}{part}?{sig}")).status_code == 200
            assert origin.requests[part] == 1
            assert {k: v for k, v in origin.requests.items() if "m3u8" not in k} == {
                k: v for k, v in before.items() if "m3u8" not in k
            }, "only playlists (cached for a part) went to the origin again"
    finally:
        edge.stop()
        origin.stop()
