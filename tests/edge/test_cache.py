"""The disk cache on a real filesystem: names, fetchers that die, a full disk, hostile keys."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamplane.edge import cache as cache_module
from streamplane.edge.cache import (
    Arriving,
    Complete,
    DiskCache,
    FetchError,
    ObjectWriter,
    Pending,
    valid_key,
)
from streamplane.edge.fetch import Fetches, Follower
from streamplane.edge.http import BadPath, request_path
from streamplane.edge.origin import DirectoryOrigin
from streamplane.edge.throttle import LogThrottle
from tests.edge.conftest import tmpfs


@pytest.fixture
def cache(tmp_path: Path) -> DiskCache:
    return DiskCache(tmp_path / "cache")


def fetch(cache: DiskCache, key: str, body: bytes, mtime: float = 1_700_000_000.0) -> int:
    """The one fetcher's side, as an origin drives it."""
    writer = cache.begin(key, stall_s=60)
    assert writer is not None
    asyncio.run(writer.start(len(body), mtime))
    writer.write(body)
    return writer.commit()


def flat(cache: DiskCache) -> None:
    """The cache's own directories hold entries named by a digest, never a tree of keys."""
    for sub in (".inflight/body", ".inflight/meta", ".inflight/tmp", ".errors"):
        for entry in (cache.root / sub).iterdir():
            assert not entry.is_dir() or entry.is_symlink(), entry


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["../victim.txt", "a/../b", ".inflight/body/x", "t/.errors", "a//b", "/abs", "a/", "", "."]
    + ["a\x00b", "a\\b", "a%2Fb", "a\nb", "x" * 3000, "a/./b", "\udcff"],
)
def test_keys_no_client_could_ask_for_are_not_keys(key: str) -> None:
    assert not valid_key(key)


@given(st.binary(max_size=80))
@settings(max_examples=500)
def test_every_object_a_client_can_reach_has_a_valid_key(target: bytes) -> None:
    """What the server serves (request_path's path, no hidden segment) is what the supervisor
    accepts from the workers: one rule for both."""
    try:
        path, _ = request_path(b"/" + target)
    except BadPath:
        return
    if path[1:] and "/." not in path:
        assert valid_key(path[1:])


def test_an_object_name_never_becomes_a_directory_of_another(cache: DiskCache) -> None:
    # fetched side by side, failed side by side
    below = cache.begin("t/master.m3u8/x", stall_s=60)
    above = cache.begin("t/master.m3u8", stall_s=60)
    assert below is not None and above is not None
    flat(cache)
    below.abort(404)
    assert cache.recent_error("t/master.m3u8/x") == 404
    assert cache.recent_error("t/master.m3u8") is None
    asyncio.run(above.start(7, 0.0))
    above.write(b"#EXTM3U")
    assert above.commit() == 7
    flat(cache)
    assert cache.open_complete_size("t/master.m3u8") == 7
    # A cached file where a key needs a directory: that key alone fails, cleanly.
    assert cache.open_complete("t/master.m3u8/x") is None
    with pytest.raises(FetchError) as failed:
        fetch(cache, "t/master.m3u8/y", b"abc")
    assert failed.value.status == 502
    assert cache.open_complete_size("t/master.m3u8") == 7


def test_a_directory_where_an_object_belongs(cache: DiskCache) -> None:
    fetch(cache, "t/v/1/seg_1.m4s", b"one")
    fetch(cache, "t/v/2/seg_1.m4s", b"two")
    # cached objects below it: the object that needs the name fails alone
    with pytest.raises(FetchError) as failed:
        fetch(cache, "t/v", b"dir?")
    assert failed.value.status == 502
    assert cache.open_complete("t/v") is None
    # directories that evictions emptied go with their last object
    assert cache.remove("t/v/1/seg_1.m4s") == 3
    assert not (cache.root / "t/v/1").exists()
    assert cache.remove("t/v/2/seg_1.m4s") == 3
    assert fetch(cache, "t/v", b"a file now") == 10
    assert cache.open_complete_size("t/v") == 10


# Text with the characters that make paths interesting, and some that make them impossible.
hostile_keys = st.text(
    alphabet=st.sampled_from(["a", "/", ".", "%", "\\", "\x00", "\n", "é", "?", "#", " ", "~"])
    | st.characters(),
    max_size=40,
) | st.sampled_from(["../x", "a/../../x", ".run/fill-plan.json", "a" * 300, "x/" * 200 + "y"])


@given(st.lists(hostile_keys, min_size=1, max_size=6, unique=True))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_keys_reach_nothing_outside_their_own_entries(keys: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        outside = Path(tmp) / "x"
        outside.write_text("keep")
        cache = DiskCache(Path(tmp) / "cache")
        for key in keys:
            assert cache.open_complete(key) is None
            assert cache.look(key) is None
            assert cache.remove(key) == 0
            try:
                writer = cache.begin(key, stall_s=60)
            except FetchError as exc:
                assert exc.status == 400 and not valid_key(key)
                continue
            assert writer is not None and valid_key(key)
            cache.record_error(key, 502)
            assert cache.recent_error(key) == 502
            writer.abort()
        flat(cache)
        assert outside.read_text() == "keep"
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["cache", "x"]


# -- fetchers that die ---------------------------------------------------------------------


def test_a_partial_whose_fetcher_was_killed_is_taken_over_at_once(cache: DiskCache) -> None:
    key = "t/v/1/seg_1.m4s"
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from streamplane.edge.cache import DiskCache\n"
        f"w = DiskCache(Path({str(cache.root)!r})).begin({key!r}, stall_s=60)\n"
        "asyncio.run(w.start(100, 0.0))\n"
        "w.write(b'half')\n"
        "print('fetching', flush=True)\n"
        "sys.stdin.read()\n"
    )
    fetcher = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert fetcher.stdout is not None and fetcher.stdout.readline() == b"fetching\n"
        # alive: its partial is followed, not taken
        assert cache.begin(key, stall_s=3600) is None
        found = cache.look(key)
        assert isinstance(found, Arriving) and found.meta.length == 100
        os.close(found.fd)
        fetcher.send_signal(signal.SIGKILL)
        fetcher.wait()
        # dead: nobody fetches it, and the next fetcher takes over without waiting stall_s
        assert cache.look(key) is None
        writer = cache.begin(key, stall_s=3600)
        assert writer is not None
        found = cache.look(key)
        assert isinstance(found, Pending)
        os.close(found.fd)
        writer.abort()
    finally:
        fetcher.kill()
        fetcher.wait()


async def test_a_reader_of_a_killed_fetch_goes_on_with_the_fetch_that_took_over(
    tmp_path: Path, cache: DiskCache
) -> None:
    """Half way through the body its fetcher dies: the reader takes the fetch over and reads
    the rest from the new one, the same bytes, never a short object."""
    origin = tmp_path / "origin"
    (origin / "t").mkdir(parents=True)
    body = os.urandom(1_000_000)
    (origin / "t" / "x.m4s").write_bytes(body)
    mtime = (origin / "t" / "x.m4s").stat().st_mtime
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from streamplane.edge.cache import DiskCache\n"
        f"w = DiskCache(Path({str(cache.root)!r})).begin('t/x.m4s', stall_s=60)\n"
        f"asyncio.run(w.start({len(body)}, {mtime!r}))\n"
        f"w.write(Path({str(origin / 't' / 'x.m4s')!r}).read_bytes()[:300_000])\n"
        "print('fetching', flush=True)\n"
        "sys.stdin.read()\n"
    )
    fetcher = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    fetches = Fetches(
        cache, DirectoryOrigin(origin), stall_s=10, stored=lambda k, n: None, warn=print
    )
    try:
        assert fetcher.stdout is not None
        assert await asyncio.to_thread(fetcher.stdout.readline) == b"fetching\n"
        found = await fetches.outcome("t/x.m4s")
        assert isinstance(found, Arriving) and found.meta.length == len(body)
        follower = Follower(fetches, "t/x.m4s", found)
        got = bytearray()
        pos = await follower.available(0)
        got += os.pread(follower.fd, pos, 0)
        fetcher.kill()
        await asyncio.to_thread(fetcher.wait)
        while pos < len(body):
            end = await follower.available(pos)
            got += os.pread(follower.fd, end - pos, pos)
            pos = end
        follower.close()
        assert bytes(got) == body
        assert fetches.counters.origin_fetches == 1  # the takeover, and only it
    finally:
        fetcher.kill()
        fetcher.wait()


def test_a_waiter_keeps_an_object_evicted_the_moment_it_landed(cache: DiskCache) -> None:
    key = "t/seg_9.m4s"
    writer = cache.begin(key, stall_s=60)
    assert writer is not None
    waiting = cache.look(key)
    assert isinstance(waiting, Pending)
    asyncio.run(writer.start(5, 1_700_000_000.0))
    writer.write(b"hello")
    writer.commit()
    assert cache.remove(key) == 5  # a small disk: the policy refused it at once
    assert cache.look(key) is None  # a new request would fetch again...
    found = cache.recheck(key, waiting.fd)  # ...but whoever waited has it
    assert isinstance(found, Complete)
    assert found.obj.size == 5 and found.obj.mtime_ns == 1_700_000_000 * 10**9
    assert os.pread(found.obj.fd, 5, 0) == b"hello"
    os.close(found.obj.fd)


# -- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[tuple[DiskCache, Path]]:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        cache = DiskCache(disk / "cache")
        filler = disk / "filler"
        with filler.open("wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        yield cache, filler


def test_a_full_disk_still_records_errors_and_answers_for_them(
    full_disk: tuple[DiskCache, Path],
) -> None:
    cache, _ = full_disk
    writer = cache.begin("t/a.m4s", stall_s=60)
    assert writer is not None
    writer.abort(503)
    assert cache.recent_error("t/a.m4s") == 503
    # from the disk, not this process's memory: another worker sees it
    assert DiskCache(cache.root).recent_error("t/a.m4s") == 503
    assert cache.look("t/a.m4s") is not None


def test_a_fetch_waits_for_the_room_it_asked_for(
    full_disk: tuple[DiskCache, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, filler = full_disk
    monkeypatch.setattr(cache_module, "ROOM_WAIT_S", 0.3)
    asked: list[int] = []
    cache.ask_room = asked.append
    writer = cache.begin("t/a.m4s", stall_s=60)
    assert writer is not None
    with pytest.raises(FetchError) as failed:
        asyncio.run(writer.start(200_000, 0.0))
    assert failed.value.status == 503 and "room" in str(failed.value)
    assert asked and asked[0] == 200_000
    waiting = cache.look("t/a.m4s")  # no header was promised: the length is not published
    assert isinstance(waiting, Pending)
    os.close(waiting.fd)
    writer.abort(503)
    # the supervisor evicts when asked: the fetch goes on, with its length reserved
    writer = cache.begin("t/b.m4s", stall_s=60)
    assert writer is not None
    cache.ask_room = lambda need: filler.unlink(missing_ok=True)
    asyncio.run(writer.start(200_000, 0.0))
    filler.write_bytes(b"\0" * 4096 * 64)  # someone fills the disk again
    writer.write(os.urandom(200_000))  # the reserved bytes still land
    assert writer.commit() == 200_000


def test_writers_clean_up_after_themselves(cache: DiskCache) -> None:
    writer = cache.begin("t/x", stall_s=60)
    assert isinstance(writer, ObjectWriter)
    asyncio.run(writer.start(3, 0.0))
    writer.write(b"abc")
    writer.commit()
    other = cache.begin("t/y", stall_s=60)
    assert other is not None
    other.abort(404)
    for sub in (".inflight/body", ".inflight/meta", ".inflight/tmp"):
        assert list((cache.root / sub).iterdir()) == []
    # a fetch that finds the object landed meanwhile withdraws
    assert cache.begin("t/x", stall_s=60) is None
    assert cache.begin("t/y", stall_s=60) is None  # and one that finds its fresh error


# -- logs -------------------------------------------------------------------------------------


def test_a_fault_repeating_on_every_request_is_logged_once_in_a_while() -> None:
    now = [0.0]
    lines: list[str] = []
    say = LogThrottle(lines.append, every_s=10, clock=lambda: now[0])
    for n in range(1000):
        now[0] = n * 0.01
        say("full", "the disk is full")
        say("advice", "ignored a message")
    assert lines == ["the disk is full", "ignored a message"]
    now[0] = 10.5
    say("full", "the disk is full")
    assert lines[-1] == "the disk is full (999 more like it since the last report)"
