"""Proactive fill: an edge told to hold titles pulls every file of their packages, and says so."""

from __future__ import annotations

import http.server
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from streamplane.media import load_title, package_files
from tests.edge.conftest import Edge, start_edge


@pytest.fixture
def control() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Records the fleet heartbeats an edge sends (the control plane's side of the contract)."""
    beats: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            beats.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", beats
    server.shutdown()


def wait_fill(
    edge: Edge, headers: dict[str, str] | None = None, deadline_s: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        status: dict[str, Any] = httpx.get(edge.url + "/fill", headers=headers).json()
        if status["state"] in ("done", "failed") and status.get("titles_total"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"fill did not finish: {status}")


def test_fill_pulls_whole_titles_and_heartbeats_them(
    tmp_path: Path, tiny_package: Path, control: tuple[str, list[dict[str, Any]]]
) -> None:
    url, beats = control
    admin = {"Authorization": "Bearer fill-secret"}
    e = start_edge(
        tmp_path,
        tiny_package.parent,
        control_url=url,
        heartbeat_s=0.5,
        admin_token="fill-secret",
    )
    try:
        assert httpx.post(e.url + "/fill", json={"titles": ["tiny"]}).status_code == 403
        bad = httpx.post(e.url + "/fill", content=b"{not json", headers=admin)
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]
        bad = httpx.post(e.url + "/fill", json={"titles": ["../etc"]}, headers=admin)
        assert bad.status_code == 400
        # the placement plane's fill plan, with a title the origin does not have
        plan = {
            "format": "streamplane.fill/1",
            "server": "edge-1",
            "site": "local",
            "storage_bytes": 10**9,
            "hold_bytes": 0,
            "add_bytes": 0,
            "drop_bytes": 0,
            "add": [{"title": "tiny", "size_bytes": 1}, {"title": "not-here", "size_bytes": 1}],
            "drop": [],
            "hold": [],
        }
        r = httpx.post(e.url + "/fill", json=plan, headers=admin)
        assert r.status_code == 202 and r.json()["accepted"] == 2
        status = wait_fill(e, admin)
        assert status["titles_done"] == ["tiny"]
        assert len(status["errors"]) == 1 and "not-here" in status["errors"][0]
        files = package_files(load_title(tiny_package))
        for name in files:
            cached = e.cache / "tiny" / name
            assert cached.read_bytes() == (tiny_package / name).read_bytes(), name
        deadline = time.monotonic() + 10
        while not (beats and "tiny" in beats[-1]["titles"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "tiny" in beats[-1]["titles"]
        assert beats[-1]["disk_used_bytes"] >= sum((tiny_package / f).stat().st_size for f in files)
        assert e.stop() == 0
        # after a restart the edge still knows what it holds, with the origin gone
        empty = tmp_path / "gone"
        empty.mkdir()
        beats.clear()
        again = start_edge(tmp_path, empty, cache_dir=e.cache, control_url=url, heartbeat_s=0.5)
        try:
            deadline = time.monotonic() + 10
            while not beats and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "tiny" in beats[-1]["titles"]
        finally:
            again.stop(signal.SIGKILL)
    finally:
        e.stop(signal.SIGKILL)
