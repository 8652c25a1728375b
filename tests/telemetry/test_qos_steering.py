"""QoS moves an edge's rank and back, end to end: a real control plane and two real edges
(LocalStack), headless viewers whose heartbeats go through ingest, the stream and the QoS
consumer into the store, and steering's judgement.

The edge is made slow by pausing its process group most of the time (SIGSTOP for 0.5 s,
SIGCONT for 0.05 s): a real edge serving real bytes, late. Not ``tc`` on a veth into a
network namespace: that would put the edge on a private-range address, and LocalStack runs
every process on loopback. The heartbeats it sends the control plane are late by at most
the pause, well inside ``edge_timeout_s``, so the fleet keeps offering it: what moves its
rank is its viewers' quality of experience, and nothing else.

Both sites cover the viewers' network equally (a czmap of the same prefix), so the title
hash alone decides between the edges: one title's viewers play from edge-1, the other's from
edge-2, all in one network, so each edge has peers. Rows are 2 s long (``qos_bucket_s``) and
the window 6 s, so the test waits seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from streamplane.player import SwarmConfig, run_swarm
from streamplane.stack import LocalStack
from streamplane.steering import title_score

NETWORK = "127.0.0.0/16"


def _titles() -> tuple[str, str]:
    """Two names the title hash puts first on edge-1 and on edge-2 respectively."""
    names = [f"qos{i}" for i in range(64)]
    first = next(n for n in names if title_score(n, "edge-1") < title_score(n, "edge-2"))
    second = next(n for n in names if title_score(n, "edge-2") < title_score(n, "edge-1"))
    return first, second


@contextlib.contextmanager
def slowed(pgid: int, pause_s: float = 0.5, run_s: float = 0.05) -> Iterator[None]:
    """The process group ``pgid`` paused ``pause_s`` out of every ``pause_s + run_s``."""
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set():
            os.killpg(pgid, signal.SIGSTOP)
            done.wait(pause_s)
            os.killpg(pgid, signal.SIGCONT)
            done.wait(run_s)

    worker = threading.Thread(target=cycle, daemon=True)
    worker.start()
    try:
        yield
    finally:
        done.set()
        worker.join()
        os.killpg(pgid, signal.SIGCONT)


@pytest.fixture(scope="module")
def stack(tiny_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    catalog = tmp_path_factory.mktemp("qos-catalog")
    for name in _titles():
        shutil.copytree(tiny_package, catalog / name)
    work = tmp_path_factory.mktemp("qos-stack")
    czmap = work / "qos-czmap.json"
    zones = {
        site: {"coordinates": {"latitude": lat, "longitude": lon}, "network": [NETWORK]}
        for site, lat, lon in (("lon-1", 51.51, -0.13), ("ams-1", 52.37, 4.90))
    }
    czmap.write_text(json.dumps({"coverageZones": zones}))
    s = LocalStack(
        catalog,
        work,
        edges=2,
        control_settings={
            "czmap": str(czmap),
            "password_time_cost": 1,
            "password_memory_kib": 8192,
        },
        telemetry_settings={
            "qos_bucket_s": 2,
            "qos_window_s": 6,
            "qos_min_watch_s": 1.0,
            "qos_hold_s": 3.0,
            "qos_judge_every_s": 0.25,
        },
    )
    s.__enter__()
    try:
        s.fill(list(_titles()))
        yield s
    finally:
        s.stop()


def _first(stack: LocalStack, title: str) -> tuple[str, dict[str, str]]:
    edges = stack.playback(title, device="probe")["edges"]
    return edges[0]["edge_id"], {e["edge_id"]: e["reason"] for e in edges}


def _wait_first(stack: LocalStack, title: str, edge: str, deadline_s: float) -> dict[str, str]:
    deadline = time.monotonic() + deadline_s
    while True:
        first, reasons = _first(stack, title)
        if first == edge or time.monotonic() > deadline:
            assert first == edge, reasons
            return reasons
        time.sleep(0.2)


async def _watch(stack: LocalStack, viewers: int) -> None:
    """``viewers`` of each title at once, looping it, with little buffer: a late edge stalls."""
    configs = [
        SwarmConfig(
            control_url=stack.control_url,
            title=title,
            viewers=viewers,
            speed=8.0,
            duration_s=36.0,
            max_buffer_s=6.0,
            audio=False,
        )
        for title in _titles()
    ]
    reports = await asyncio.wait_for(asyncio.gather(*(run_swarm(c) for c in configs)), 90)
    for r in reports:
        assert r.summary.failed == 0, [v.error for v in r.viewers]


async def test_an_edge_whose_viewers_rebuffer_loses_rank_and_regains_it(
    stack: LocalStack,
) -> None:
    calm, hit = _titles()  # hit: the title whose viewers edge-2 serves
    assert _first(stack, hit)[0] == "edge-2"
    assert _first(stack, calm)[0] == "edge-1"

    with slowed(stack.edges[1].process.pid):
        await _watch(stack, viewers=4)
    reasons = _wait_first(stack, hit, "edge-1", deadline_s=10)
    assert f"ranked after the edges not demoted: viewers in {NETWORK} rebuffer" in reasons["edge-2"]
    assert "rebuffer" not in reasons["edge-1"]
    # what steering read, as the API and /metrics show it
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    r = httpx.get(
        stack.control_url + "/v1/qos",
        params={"by": "edge_network", "since": time.time() - 60},
        headers=admin,
        timeout=10,
    )
    totals: dict[str, list[float]] = {}
    for row in r.json()["rows"]:
        assert row["network"] == NETWORK
        pair = totals.setdefault(row["edge"], [0.0, 0.0])
        pair[0] += row["watch_s"]
        pair[1] += row["rebuffer_s"]
    assert totals["edge-2"][1] / totals["edge-2"][0] > 3 * totals["edge-1"][1] / totals["edge-1"][0]
    metrics = httpx.get(stack.control_url + "/metrics", headers=admin, timeout=10).text
    assert f'streamplane_qos_demoted{{network="{NETWORK}",edge="edge-2"}} 1' in metrics

    # The edge is well again; with no fresh evidence the demotion is let go once the slow
    # rows leave the window and the hold passes, and viewers served well keep it there.
    reasons = _wait_first(stack, hit, "edge-2", deadline_s=20)
    assert "rebuffer" not in reasons["edge-2"]
    await _watch(stack, viewers=2)
    time.sleep(1.0)  # a few judgements
    assert _first(stack, hit)[0] == "edge-2"
