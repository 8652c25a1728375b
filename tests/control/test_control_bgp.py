"""The control plane's BGP speakers and czmap file, from outside: ``GET /v1/fleet/bgp``,
``/healthz``, ``/metrics`` and playback answers, against real ExaBGP routers; and a real
``streamplane control`` process killed with SIGKILL, whose speakers must go with it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from streamplane.config import BgpPeer
from streamplane.steering import GeoLocator
from tests.control.conftest import ADMIN, KEY_HEX, KEY_ID, T0, Control, Db, running, write_title
from tests.steering.exabgp_peers import (
    ISP,
    ISP_AS,
    SITE,
    SITE_AS,
    IspRouter,
    alive,
    children,
    isp_router,
)

pytestmark = pytest.mark.timeout(120)

ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
CLIENT_NET = "198.51.100.0/24"  # the test client is 198.51.100.7


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def isp(tmp_path: Path) -> AsyncIterator[IspRouter]:
    (tmp_path / "isp").mkdir()
    async with isp_router(tmp_path / "isp") as router:
        yield router


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    return catalog


def _sqlite(tmp_path: Path) -> Db:
    # The speakers do not touch the store: one engine is enough here.
    return Db("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'control.db'}")


async def _json(control: Control, path: str, **kw: Any) -> Any:
    r = await control.client.get(path, **kw)
    assert r.status_code == 200, r.text
    return r.json()


async def test_sessions_health_metrics_and_steering_follow_the_speaker(
    tmp_path: Path, catalog: Path, geo: GeoLocator, isp: IspRouter
) -> None:
    peer = BgpPeer(
        site="bgp-site",
        local_address=SITE,
        peer_address=ISP,
        local_as=SITE_AS,
        peer_as=ISP_AS,
        port=isp.port,
        relation="private",
        hold_time_s=30,
    )
    async with running(_sqlite(tmp_path), catalog, geo, bgp=(peer,), slow_start_s=0.0) as control:
        c = control.client
        assert (await c.get("/v1/fleet/bgp")).status_code == 401
        assert (
            await c.get("/v1/fleet/bgp", headers={"Authorization": "Bearer no"})
        ).status_code == 403
        assert (await c.get("/metrics")).status_code == 401

        async def healthy() -> bool:
            return bool((await _json(control, "/healthz"))["status"] == "ok")

        await until(healthy, "the session established")
        assert await _json(control, "/healthz") == {
            "status": "ok",
            "store": {"status": "ok"},
            "bgp": {"status": "ok", "sessions": 1, "established": 1, "prefixes": 0},
        }

        isp.send(f"announce route {CLIENT_NET} next-hop {ISP} as-path [ 64500 64501 ]")

        async def learned() -> bool:
            return bool((await _json(control, "/v1/fleet/bgp", headers=ADMIN_AUTH))["prefixes"])

        await until(learned, "the announcement")
        bgp = await _json(control, "/v1/fleet/bgp", headers=ADMIN_AUTH)
        assert bgp == {
            "established": 1,
            "prefixes": 1,
            "sessions": [
                {
                    "site": "bgp-site",
                    "address": ISP,
                    "peer_as": ISP_AS,
                    "local_address": SITE,
                    "local_as": SITE_AS,
                    "relation": "private",
                    "hold_time_s": 30,
                    "state": "established",
                    "since": T0,  # the control plane's clock
                    "restarts": 0,
                    "prefixes": 1,
                    "last_error": None,
                }
            ],
        }
        await control.edge("e-bgp", ("demo",), site="bgp-site")
        await control.edge("e-other", ("demo",), site="other")
        auth = await control.account()
        first = (await control.play(auth, "demo")).json()["edges"][0]
        assert first["edge_id"] == "e-bgp"
        assert "via AS path 64500 64501, MED 0, private peering" in first["reason"]

        r = await c.get("/metrics", headers=ADMIN_AUTH)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        labels = f'site="bgp-site",peer="{ISP}",peer_as="{ISP_AS}"'
        assert f"streamplane_bgp_session_up{{{labels}}} 1" in r.text.splitlines()
        assert f"streamplane_bgp_prefixes{{{labels}}} 1" in r.text.splitlines()

        # The speaker dies: /healthz says so, its routes stop steering, and it comes back.
        feed = control.app.state.plane.sources.feeds[0]
        assert feed.pid is not None
        os.kill(feed.pid, signal.SIGKILL)

        async def degraded() -> bool:
            return bool((await _json(control, "/healthz"))["status"] == "degraded")

        await until(degraded, "/healthz noticing the speaker died")
        bgp_health = (await _json(control, "/healthz"))["bgp"]
        assert bgp_health["established"] == 0
        assert "exited with status -9" in bgp_health["problems"][0]
        [session] = (await _json(control, "/v1/fleet/bgp", headers=ADMIN_AUTH))["sessions"]
        assert (session["state"], session["prefixes"]) == ("down", 0)
        # "down" lasts at least half the first back-off (0.5 s): this request falls in it.
        first = (await control.play(auth, "demo", device="phone")).json()["edges"][0]
        assert "private peering" not in first["reason"]

        await until(healthy, "the speaker restarted and established")
        [session] = (await _json(control, "/v1/fleet/bgp", headers=ADMIN_AUTH))["sessions"]
        assert session["restarts"] == 1
        await until(learned, "the routes learned again")


def _czmap(path: Path, zones: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"coverageZones": zones}))
    tmp.replace(path)


async def test_the_czmap_file_is_reloaded_and_a_bad_one_refused(
    tmp_path: Path, catalog: Path, geo: GeoLocator
) -> None:
    czmap = tmp_path / "czmap.json"
    _czmap(czmap, {"near": {"network": [CLIENT_NET]}, "far": {"network": ["203.0.113.0/24"]}})
    async with running(
        _sqlite(tmp_path), catalog, geo, czmap=str(czmap), czmap_poll_s=0.05, slow_start_s=0.0
    ) as control:
        await control.edge("a-far", ("demo",), site="far")
        await control.edge("z-near", ("demo",), site="near")
        auth = await control.account()

        async def first() -> dict[str, Any]:
            r = await control.play(auth, "demo")  # one device: each start replaces the last
            assert r.status_code == 200, r.text
            return dict(r.json()["edges"][0])

        assert (await first())["edge_id"] == "z-near"
        assert "via czmap file route, public peering" in (await first())["reason"]

        async def czmap_health() -> dict[str, Any]:
            return dict((await _json(control, "/healthz"))["czmap"])

        # The zones move: no restart needed.
        _czmap(czmap, {"near": {"network": ["203.0.113.0/24"]}, "far": {"network": [CLIENT_NET]}})

        async def reloaded() -> bool:
            return bool((await czmap_health())["reloads"] == 1)

        await until(reloaded, "the changed file read")
        assert (await first())["edge_id"] == "a-far"

        # A misspelt key: refused, the table in use kept, /healthz says why.
        _czmap(czmap, {"near": {"networks": [CLIENT_NET]}})

        async def refused() -> bool:
            return bool((await czmap_health())["status"] == "degraded")

        await until(refused, "the bad file refused")
        health = await _json(control, "/healthz")
        assert health["status"] == "degraded"
        [problem] = health["czmap"]["problems"]
        assert f"{czmap}: cache group 'near': unknown key 'networks'" in problem
        assert (await first())["edge_id"] == "a-far"

        _czmap(czmap, {"near": {"network": [CLIENT_NET]}})

        async def recovered() -> bool:
            return bool((await czmap_health())["status"] == "ok")

        await until(recovered, "the fixed file read")
        assert (await first())["edge_id"] == "z-near"


# -- a real process, killed -------------------------------------------------------------------


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # The feeds' work directories go here (TMPDIR): short, for their Unix socket paths.
    path = Path(tempfile.mkdtemp(prefix="spk-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _descendants(pid: int) -> set[int]:
    found = children(pid)
    for child in list(found):
        found |= _descendants(child)
    return found


def _wait_ended(pids: set[int], timeout: float) -> set[int]:
    """Wait for every process in ``pids`` to end; those still running after ``timeout``."""
    fds = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[os.pidfd_open(pid)] = pid
    try:
        loop_deadline = timeout
        waiting = set(fds)
        while waiting and loop_deadline > 0:
            readable, _, _ = select.select(list(waiting), [], [], loop_deadline)
            if not readable:
                break
            waiting -= set(readable)
        return {fds[fd] for fd in waiting}
    finally:
        for fd in fds:
            os.close(fd)


async def test_speakers_die_with_a_killed_control_plane_and_the_next_start_binds(
    tmp_path: Path, catalog: Path, isp: IspRouter, short_tmp: Path
) -> None:
    czmap = tmp_path / "czmap.json"
    _czmap(czmap, {"near": {"network": [CLIENT_NET]}})
    port = _free_tcp_port()
    settings = tmp_path / "streamplane.toml"
    settings.write_text(
        f"""
[tokens]
signing_kid = "{KEY_ID}"
[tokens.keys]
{KEY_ID} = "{KEY_HEX}"

[control]
database_url = "sqlite+aiosqlite:///{tmp_path / "control.db"}"
catalog_dir = "{catalog}"
host = "127.0.0.1"
port = {port}
admin_token = "{ADMIN}"
czmap = "{czmap}"
czmap_poll_s = 0

[[control.bgp]]
site = "bgp-site"
local_address = "{SITE}"
peer_address = "{ISP}"
local_as = {SITE_AS}
peer_as = {ISP_AS}
port = {isp.port}
"""
    )
    program = Path(sys.executable).with_name("streamplane")
    env = {**os.environ, "TMPDIR": str(short_tmp)}
    url = f"http://127.0.0.1:{port}"
    started: list[subprocess.Popen[bytes]] = []

    def start(n: int) -> subprocess.Popen[bytes]:
        with (tmp_path / f"control-{n}.log").open("wb") as log:
            process = subprocess.Popen(
                [str(program), "control", "--config", str(settings)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        return process

    async def health(process: subprocess.Popen[bytes], n: int) -> dict[str, Any]:
        """/healthz once the session is established; fails if the process exits."""
        async with httpx.AsyncClient(base_url=url, timeout=2) as client:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while loop.time() < deadline:
                if process.poll() is not None:
                    log = (tmp_path / f"control-{n}.log").read_text(errors="replace")
                    pytest.fail(f"control plane {n} exited ({process.returncode}):\n{log[-3000:]}")
                with contextlib.suppress(httpx.TransportError):
                    r = await client.get("/healthz")
                    if r.status_code == 200 and r.json()["bgp"]["established"] == 1:
                        return dict(r.json())
                await asyncio.sleep(0.1)
        pytest.fail(f"control plane {n}: no established session within 60 s")

    speakers: set[int] = set()
    try:
        first = start(1)
        assert (await health(first, 1))["czmap"]["routes"] == 1
        speakers = _descendants(first.pid)
        exabgp = {p for p in speakers if b"exabgp" in Path(f"/proc/{p}/cmdline").read_bytes()}
        assert len(exabgp) == 1 and len(speakers) == 2  # ExaBGP and its API process
        workdirs = list(short_tmp.glob(f"sp-bgp-{first.pid}-*"))
        assert len(workdirs) == 1

        # SIGHUP reloads the czmap file (it is not polled here).
        _czmap(czmap, {"near": {"network": [CLIENT_NET, "203.0.113.0/24"]}, "far": {}})
        first.send_signal(signal.SIGHUP)
        async with httpx.AsyncClient(base_url=url, timeout=2) as client:

            async def reread() -> bool:
                return bool((await client.get("/healthz")).json()["czmap"]["reloads"] == 1)

            await until(reread, "the czmap file reloaded on SIGHUP")
            zones = (await client.get("/healthz")).json()["czmap"]
            assert (zones["routes"], zones["cache_groups"]) == (2, 2)

        first.kill()
        first.wait()
        left = await asyncio.to_thread(_wait_ended, speakers, 3.0)
        assert not left, f"ExaBGP processes outlived the control plane: {sorted(left)}"
        assert workdirs[0].exists()  # nobody could remove it: the next start does

        second = start(2)
        await health(second, 2)  # bound its port, peered again
        assert not workdirs[0].exists()
        assert len(list(short_tmp.glob(f"sp-bgp-{second.pid}-*"))) == 1
        second.terminate()
        # uvicorn shuts down cleanly, then ends by the signal it was sent
        assert second.wait(timeout=20) == -signal.SIGTERM
        assert list(short_tmp.glob("sp-bgp-*")) == []  # a clean stop leaves nothing
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
        for pid in speakers:  # what the old control plane left running
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
