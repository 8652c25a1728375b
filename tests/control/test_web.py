"""The control plane serves the browser player: /watch and its assets under /static."""

from __future__ import annotations

import pytest

from tests.control.conftest import Control


async def test_watch_serves_the_player_page(control: Control) -> None:
    r = await control.client.get("/watch")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/watch.js">' in r.text
    # shown by the page when hls.js is not vendored yet
    assert "make install" in r.text


@pytest.mark.parametrize("name", ["abr.js", "player.js", "watch.js", "watch.css"])
async def test_static_assets_are_served(control: Control, name: str) -> None:
    r = await control.client.get(f"/static/{name}")
    assert r.status_code == 200
    kind = "text/css" if name.endswith(".css") else "javascript"
    assert kind in r.headers["content-type"]


async def test_a_missing_asset_is_a_json_404(control: Control) -> None:
    r = await control.client.get("/static/vendor/no-such-file.mjs")
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"


async def test_the_pages_are_not_in_the_api_description(control: Control) -> None:
    paths = (await control.client.get("/openapi.json")).json()["paths"]
    assert "/watch" not in paths
    assert not [p for p in paths if p.startswith("/static")]


async def test_heartbeats_may_carry_the_players_telemetry(control: Control) -> None:
    """The browser player sends buffer, rung, throughput, ... with each event; the control
    plane records the position and accepts (ignores) the rest."""
    auth = await control.account()
    await control.edge("edge-1", ("demo",))
    started = await control.play(auth, "demo")
    assert started.status_code == 200, started.text
    answer = started.json()
    event = {
        "at": control.clock() + 1,
        "position_s": 12.5,
        "kind": "failover",
        "format": "dash",
        "buffer_s": 8.2,
        "rung": 1,
        "rung_id": "v1",
        "bitrate_kbps": 600.0,
        "throughput_kbps": 2400.5,
        "rebuffers": 0,
        "rebuffer_s": 0.0,
        "startup_s": 0.7,
        "edge": "edge-2",
        "errors": 2,
        "failovers": 1,
    }
    r = await control.client.post(
        "/v1/heartbeat",
        json={"session_id": answer["session_id"], "events": [event]},
        headers={"authorization": f"Bearer {answer['heartbeat']['token']}"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["resume_position_s"] == 12.5
