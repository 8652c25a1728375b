"""The edge's cache under hostile requests and faults, end to end against real edge processes:
object names that would nest inside others, a full disk, a cache on another filesystem than
the origin, a foreign process on the control channel, a worker killed mid-fetch."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from streamplane.media import load_title, package_files
from tests.edge.conftest import (
    CountingOrigin,
    Edge,
    edge_workers,
    start_edge,
    tmpfs,
    token,
)
from tests.edge.test_fill import wait_fill

ADMIN = {"Authorization": "Bearer fill-secret"}


# -- 1. an object's name nested in another's -------------------------------------------------


def test_a_request_naming_a_path_below_or_above_an_object_never_breaks_that_object(
    tmp_path: Path, origin_dir: Path
) -> None:
    # each object is asked for only after its poison, as an attacker would order them
    cases = [
        ("/t1/master.m3u8/x", "/t1/master.m3u8"),  # below a file
        ("/t1/v/1/seg_2.m4s/a/b", "/t1/v/1/seg_2.m4s"),
        ("/t1/v", "/t1/v/1/init.mp4"),  # a directory of the origin, asked for as a file
        ("/t1/" + "n" * 300, "/t1/v/1/seg_1.m4s"),  # a name no filesystem holds
    ]
    e = start_edge(tmp_path, origin_dir)
    try:
        for poison, victim in cases:
            for _ in range(2):
                assert e.get(poison).status_code == 404, poison
                r = e.get(victim)
                assert r.status_code == 200, (poison, r.text)
                assert r.content == (origin_dir / victim.lstrip("/")).read_bytes()
            assert e.get(poison).status_code == 404
        assert e.get("/t1/v/1/seg_3.m4s").status_code == 200  # and everything else serves
    finally:
        e.stop(signal.SIGKILL)


def test_a_title_poisoned_by_nested_names_still_fills(tmp_path: Path, tiny_package: Path) -> None:
    e = start_edge(tmp_path, tiny_package.parent, admin_token="fill-secret")
    try:
        for name in ("title.json", "master.m3u8", "manifest.mpd"):
            assert e.get(f"/tiny/{name}/x").status_code == 404
        r = httpx.post(e.url + "/fill", json={"titles": ["tiny"]}, headers=ADMIN)
        assert r.status_code == 202
        status = wait_fill(e, ADMIN, deadline_s=60)
        assert status["titles_done"] == ["tiny"], status
        for name in package_files(load_title(tiny_package)):
            assert (e.cache / "tiny" / name).read_bytes() == (tiny_package / name).read_bytes()
    finally:
        e.stop(signal.SIGKILL)


# -- 3. a full cache disk ---------------------------------------------------------------------


def test_a_full_disk_costs_one_origin_request_per_object_and_answers_fast(
    tmp_path: Path, http_origin: CountingOrigin
) -> None:
    """The cache's disk (8 MB) is far smaller than its capacity (1 GB): 96 concurrent
    misses on 24 objects of 1 MB fill it. Each object is asked of the origin once; each
    client gets the body or a quick 503; the log stays short."""
    objects = [f"/big/seg_{n}.m4s" for n in range(24)]
    (http_origin.root / "big").mkdir()
    for path in objects:
        (http_origin.root / path.lstrip("/")).write_bytes(os.urandom(1_000_000))
    clients_per_object = 4
    http_origin.gate.clear()  # the origin answers once every request has reached the edge
    with tmpfs(tmp_path / "small-disk", "8m") as disk:
        e = start_edge(tmp_path, http_origin.url, cache_dir=disk / "cache", workers=2)
        try:
            results: list[tuple[str, int, bytes, float]] = []

            async def one(client: httpx.AsyncClient, path: str) -> None:
                started = time.monotonic()
                r = await client.get(e.url + path, params={"__token__": token()})
                results.append((path, r.status_code, r.content, time.monotonic() - started))

            async def storm() -> None:
                async with httpx.AsyncClient(
                    timeout=60, limits=httpx.Limits(max_connections=200)
                ) as client:
                    tasks = [
                        asyncio.create_task(one(client, path))
                        for path in objects
                        for _ in range(clients_per_object)
                    ]
                    await asyncio.to_thread(_wait_misses, e, len(tasks))
                    http_origin.gate.set()
                    await asyncio.gather(*tasks)

            asyncio.run(storm())
            assert http_origin.requests == {path: 1 for path in objects}
            served = 0
            for path, status, body, seconds in results:
                assert status in (200, 503), (path, status, body[:200])
                if status == 200:
                    assert body == (http_origin.root / path.lstrip("/")).read_bytes()
                    served += 1
                else:
                    assert b"cache" in body
                    assert seconds < 10, (path, seconds)
            assert served >= len(results) // 2, [r[1] for r in results]
            # the edge learned what its disk holds: later misses are fetched and served
            for path in ("/t1/v/1/seg_1.m4s", "/t1/v/1/seg_2.m4s", "/t1/v/1/init.mp4"):
                assert e.get(path).content == (http_origin.root / path.lstrip("/")).read_bytes()

            # an object larger than the whole disk: no eviction helps, a quick 503 for it
            async def refused() -> list[httpx.Response]:
                async with httpx.AsyncClient(timeout=60) as client:
                    url = e.url + "/t1/v/1/seg_3.m4s"  # 12 MB
                    return await asyncio.gather(
                        *(client.get(url, params={"__token__": token()}) for _ in range(8))
                    )

            started = time.monotonic()
            answers = asyncio.run(refused())
            assert {r.status_code for r in answers} == {503}, [r.text for r in answers]
            assert "cache" in answers[0].json()["error"]
            assert time.monotonic() - started < 8
            assert http_origin.requests["/t1/v/1/seg_3.m4s"] == 1
            assert len(e.log()) < 8000, e.log()[-3000:]
        finally:
            e.stop(signal.SIGKILL)


def _wait_misses(e: Edge, n: int) -> None:
    """Until the edge's workers counted ``n`` misses (they publish counters every second)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in httpx.get(e.url + "/metrics").text.splitlines():
            name, _, value = line.partition(" ")
            if name == "streamplane_edge_cache_misses_total" and float(value) >= n:
                return
        time.sleep(0.2)
    raise AssertionError("the requests did not reach the edge")


# -- 4. a cache on another filesystem than the origin -----------------------------------------


def test_a_cache_on_another_filesystem_fetches_and_fills(
    tmp_path: Path, origin_dir: Path, tiny_package: Path
) -> None:
    catalog = tiny_package.parent  # on the regular disk, like origin_dir
    for path in (origin_dir / "t1").rglob("*"):
        target = catalog / "t1" / path.relative_to(origin_dir / "t1")
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif not target.exists():
            target.write_bytes(path.read_bytes())
    with tmpfs(tmp_path / "other-fs", "64m") as disk:
        e = start_edge(tmp_path, catalog, cache_dir=disk / "cache", admin_token="fill-secret")
        try:
            for name in ("t1/v/1/seg_1.m4s", "t1/master.m3u8"):
                r = e.get("/" + name)
                assert r.status_code == 200, r.text
                assert r.content == (catalog / name).read_bytes()
            r = httpx.post(e.url + "/fill", json={"titles": ["tiny"]}, headers=ADMIN)
            assert r.status_code == 202
            status = wait_fill(e, ADMIN, deadline_s=60)
            assert status["titles_done"] == ["tiny"], status
            for name in package_files(load_title(tiny_package)):
                assert (e.cache / "tiny" / name).read_bytes() == (tiny_package / name).read_bytes()
        finally:
            e.stop(signal.SIGKILL)


# -- 5. the control channel -------------------------------------------------------------------


def test_no_other_process_can_reach_the_supervisor(tmp_path: Path, origin_dir: Path) -> None:
    victim = tmp_path / "victim.txt"  # the cache is tmp_path / "cache"
    victim.write_text("keep me")
    e = start_edge(tmp_path, origin_dir, capacity_bytes=5_000_000)
    try:
        name = f"\0streamplane-edge-{e.process.pid}-{e.port}"
        hostile = b'{"admit": "../victim.txt", "size": 1e15}'
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, pytest.raises(OSError):
            sock.sendto(hostile, name)
        assert name[1:] not in Path("/proc/net/unix").read_text()  # no such name at all
        # the edge's own workers still reach it: eviction keeps the cache in its capacity
        for n in (1, 3, 2):
            assert e.get(f"/t1/v/1/seg_{n}.m4s").status_code == 200
        deadline = time.monotonic() + 10
        while (e.cache / "t1/v/1/seg_3.m4s").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (e.cache / "t1/v/1/seg_3.m4s").exists()  # 12 MB: larger than the capacity
        assert victim.read_text() == "keep me"
    finally:
        e.stop(signal.SIGKILL)


# -- 6. a worker killed mid-fetch -------------------------------------------------------------


def test_a_worker_killed_mid_fetch_does_not_stall_its_object(
    tmp_path: Path, http_origin: CountingOrigin, origin_dir: Path
) -> None:
    """kill -9 of the worker fetching an object: the next request takes the dead fetch over
    at once and gets the whole object, and a client that was following the dead fetch
    never gets a short body as a complete one."""
    path = "/t1/v/1/seg_3.m4s"  # 12 MB
    body = (origin_dir / path.lstrip("/")).read_bytes()
    http_origin.trickle_s = 0.1  # 64 KB every 100 ms: the first fetch would last ~20 s
    stall_s = 15.0
    e = start_edge(tmp_path, http_origin.url, workers=2, stall_timeout_s=stall_s)
    try:
        followed: list[tuple[int, bytes] | httpx.HTTPError] = []

        def follow() -> None:
            try:
                with httpx.stream(
                    "GET", e.url + path, params={"__token__": token()}, timeout=60
                ) as r:
                    followed.append((r.status_code, r.read()))
            except httpx.HTTPError as exc:
                followed.append(exc)

        threads = [threading.Thread(target=follow)]
        threads[0].start()
        fetcher = _wait_fetcher(e, minimum=256 << 10)
        # more clients following the same fetch, some of them from the other worker
        threads += [threading.Thread(target=follow) for _ in range(3)]
        for thread in threads[1:]:
            thread.start()
        _wait_followers(e, 4)
        os.kill(fetcher, signal.SIGKILL)
        http_origin.trickle_s = 0.0
        started = time.monotonic()
        r = e.get(path)
        took = time.monotonic() - started
        assert r.status_code == 200
        assert r.content == body
        assert took < stall_s / 3, took
        for thread in threads:
            thread.join(60)
        # each client of the dead fetch got the whole body, or a broken connection: never a
        # short body as if it were whole
        for result in followed:
            if not isinstance(result, httpx.HTTPError):
                assert result == (200, body)
        assert http_origin.requests[path] == 2
    finally:
        e.stop(signal.SIGKILL)


def _wait_followers(e: Edge, n: int) -> None:
    """Until ``n`` clients read the partial object (each holds it open)."""
    deadline = time.monotonic() + 20
    while len(_partial_holders(e, "r")) < n:
        assert time.monotonic() < deadline, "the clients did not all follow the fetch"
        time.sleep(0.02)


def _wait_fetcher(e: Edge, minimum: int) -> int:
    """The worker writing a partial object, once it has written ``minimum`` bytes."""
    deadline = time.monotonic() + 20
    while True:
        writers = [pid for pid, size in _partial_holders(e, "w") if size >= minimum]
        if writers:
            return writers[0]
        assert time.monotonic() < deadline, "no worker is fetching"
        time.sleep(0.02)


def _partial_holders(e: Edge, mode: str) -> list[tuple[int, int]]:
    """(worker, bytes so far) for every descriptor a worker holds on a partial object, found
    by inode: a fetcher may have opened its partial under a name since removed."""
    partials = set()
    for path in (e.cache / ".inflight" / "body").rglob("*"):
        with contextlib.suppress(OSError):
            partials.add(path.stat().st_ino)
    found = []
    for pid in edge_workers(e):
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                st = fd.stat()
                if st.st_ino in partials and _fd_mode(pid, fd.name) == mode:
                    found.append((pid, st.st_size))
        except OSError:
            continue
    return found


def _fd_mode(pid: int, fd: str) -> str:
    flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
    return "w" if flags & (os.O_WRONLY | os.O_RDWR) else "r"
