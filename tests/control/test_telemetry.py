"""Player heartbeats through the telemetry stream into the store, on SQLite and PostgreSQL, on
the embedded stream and on JetStream: written behind, idempotently, throttled past the limits;
a consumer killed mid-batch has its batch redelivered and nothing is doubled."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, func, select

from streamplane.config import SettingsError
from streamplane.control.heartbeats import StoreSink
from streamplane.control.store import Account, Resume, Screen, Store, migrate
from streamplane.steering import GeoLocator
from streamplane.telemetry import EventBatch, HeartbeatEvent
from streamplane.telemetry.consumers import StoreWrites, WriteBehind
from streamplane.telemetry.stream_embedded import EmbeddedStream

from ..telemetry.conftest import SHARED_NATS, _nats_reachable
from .conftest import ADMIN, T0, Clock, Control, Db, free_port, running, write_title


async def _start(control: Control, device: str = "tv") -> tuple[dict[str, Any], dict[str, str]]:
    auth = await control.account()
    await control.edge("e1", ("demo",))
    r = await control.play(auth, "demo", device=device)
    assert r.status_code == 200, r.text
    session = r.json()
    return session, {"Authorization": f"Bearer {session['heartbeat']['token']}"}


async def _beat(
    control: Control, session: dict[str, Any], hb: dict[str, str], *events: Any
) -> httpx.Response:
    body = {"session_id": session["session_id"], "events": list(events)}
    return await control.client.post("/v1/heartbeat", json=body, headers=hb)


def _store(control: Control) -> Store:
    return control.app.state.plane.store  # type: ignore[no-any-return]


async def _resume_rows(store: Store) -> list[tuple[float, float]]:
    def read(conn: Connection) -> list[tuple[float, float]]:
        return [(r.position_s, r.event_at) for r in conn.execute(select(Resume))]

    return await store.transaction(read)


async def test_heartbeats_are_written_behind_latest_wins_and_bad_events_refused(
    control: Control,
) -> None:
    session, hb = await _start(control)
    r = await _beat(
        control,
        session,
        hb,
        {"at": T0 + 1, "position_s": 10.0, "seq": 1, "edge": "e1", "bitrate_kbps": 800},
        {"at": T0 + 2, "position_s": -3.0, "seq": 2},  # refused: a negative position
        {"at": T0 + 1, "position_s": 10.0, "seq": 1},  # a duplicate
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["accepted"] == 2 and answer["resume_position_s"] == 10.0
    assert [x["index"] for x in answer["refused"]] == [1]
    assert "$.position_s" in answer["refused"][0]["reason"]
    # a late event and one from a clock an hour fast: the latest by (corrected) time wins
    r = await _beat(control, session, hb, {"at": T0 - 50, "position_s": 3.0})
    assert r.json()["resume_position_s"] == 10.0
    # an hour fast: moved back to the server's clock (T0), older than the event at T0 + 1
    r = await _beat(control, session, hb, {"at": T0 + 3600, "position_s": 20.0})
    assert r.json()["resume_position_s"] == 10.0
    r = await _beat(control, session, hb, {"at": T0 + 5, "position_s": 25.0})
    assert r.json()["resume_position_s"] == 25.0  # the fast clock's event did not poison it
    await control.settled()
    assert await _resume_rows(_store(control)) == [(25.0, T0 + 5)]


async def test_a_storm_is_throttled_with_429_and_retry_after(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    limits = {"device_rate": 1.0, "device_burst": 3.0, "global_rate": 0.01, "global_burst": 5}
    async with running(db, catalog, geo, telemetry=limits) as control:
        session, hb = await _start(control)
        answers = [await _beat(control, session, hb) for _ in range(5)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
        refused = answers[3]
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == "slow_down" and refused.json()["retry_after_s"] > 0
        # the global bucket running low asks every player for a longer interval
        assert answers[2].json()["min_interval_s"] > control.settings.control.player_heartbeat_s
        # another device still gets through (its own bucket), and a start is never throttled
        other, other_hb = await _start(control, device="phone")
        assert (await _beat(control, other, other_hb)).status_code == 200


async def test_a_stop_frees_the_screen_and_later_heartbeats_learn_it_ended(
    control: Control,
) -> None:
    session, hb = await _start(control)
    r = await _beat(control, session, hb, {"at": T0, "position_s": 5.0, "kind": "stop"})
    assert r.status_code == 200 and r.json()["active"] is False
    r = await _beat(control, session, hb)
    assert r.status_code == 410 and r.json()["error"] == "session_ended"

    def ended(conn: Connection) -> bool:
        return bool(conn.execute(select(Screen.ended)).scalar())

    assert await _store(control).transaction(ended)


def _batch(account: str, session: str, n: int, at: float) -> EventBatch:
    event = HeartbeatEvent(
        account=account,
        session=session,
        device="tv",
        title="demo",
        received_at=at,
        at=at,
        seq=n,
        kind="position",
        position_s=float(n),
    )
    return EventBatch(
        device="tv", events=[event], account=account, session=session, title="demo", received_at=at
    )


class _Dying:
    """A sink that writes and then dies before the consumer can acknowledge (kill -9 of the
    consumer between its store commit and its ack), or dies before writing."""

    def __init__(self, sink: StoreSink, after_write: bool) -> None:
        self.sink = sink
        self.after_write = after_write
        self.died = asyncio.Event()

    async def write(self, writes: StoreWrites) -> None:
        if self.after_write:
            await self.sink.write(writes)
        self.died.set()
        await asyncio.Event().wait()  # never returns: the consumer is killed here


@pytest.mark.parametrize("after_write", [False, True])
async def test_a_consumer_killed_mid_batch_has_it_redelivered_and_nothing_doubles(
    db: Db, tmp_path: Path, after_write: bool
) -> None:
    store = Store(db.url, schema=db.schema)
    await migrate(store)
    account = str(uuid.uuid4())

    def setup(conn: Connection) -> None:
        conn.execute(
            Account.__table__.insert().values(  # type: ignore[attr-defined]
                id=account, email=f"{account}@x.io", password_hash="x", plan="basic", created_at=T0
            )
        )
        conn.execute(
            Screen.__table__.insert().values(  # type: ignore[attr-defined]
                id="s1",
                account_id=account,
                title="demo",
                device="tv",
                started_at=T0,
                last_seen=T0,
                ended=False,
            )
        )

    await store.transaction(setup)
    stream = EmbeddedStream(tmp_path / "stream", partitions=2)
    for n in range(1, 21):
        await stream.append(_batch(account, "s1", n, T0 + n))
    sink = StoreSink(store, screen_timeout_s=90, touch_s=0)
    dying = _Dying(sink, after_write)
    first = WriteBehind(stream, dying, ack_wait_s=0.5, touch_s=0)
    await first.start()
    await asyncio.wait_for(dying.died.wait(), 5)
    await first.stop()  # killed mid-batch: nothing acknowledged
    second = WriteBehind(stream, sink, ack_wait_s=0.5, touch_s=0)
    await second.start()
    await second.settle(timeout_s=10)
    await second.stop()

    def read(conn: Connection) -> tuple[int, float, float, float]:
        count = conn.execute(select(func.count()).select_from(Resume)).scalar_one()
        position, at = conn.execute(select(Resume.position_s, Resume.event_at)).one()
        seen = conn.execute(select(Screen.last_seen).where(Screen.id == "s1")).scalar_one()
        return count, position, at, seen

    assert await store.transaction(read) == (1, 20.0, T0 + 20, T0 + 20)
    await stream.close()
    await store.dispose()


async def test_heartbeats_through_jetstream_into_the_store(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    if not _nats_reachable():
        pytest.skip("no NATS server at 127.0.0.1:4222")
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    name = f"T{uuid.uuid4().hex[:16]}"
    nats = {"engine": "nats", "nats_url": SHARED_NATS, "stream_name": name, "partitions": 2}
    try:
        async with running(db, catalog, geo, telemetry=nats) as control:
            session, hb = await _start(control)
            r = await _beat(control, session, hb, {"at": T0 + 1, "position_s": 7.0})
            assert r.status_code == 200, r.text
            await control.settled()
            assert await _resume_rows(_store(control)) == [(7.0, T0 + 1)]
    finally:
        from streamplane.telemetry.stream_nats import NatsStream

        stream = await NatsStream.open(SHARED_NATS, name=name, partitions=2)
        await stream.delete()
        await stream.close()


async def test_the_lean_listener_answers_as_the_control_plane_does(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    port = free_port()
    async with running(db, catalog, geo, telemetry={"ingest_port": port}) as control:
        session, hb = await _start(control)
        url = session["heartbeat"]["url"]
        assert url == f"http://127.0.0.1:{port}/v1/heartbeat"
        body = {"session_id": session["session_id"], "events": [{"at": T0, "position_s": 9.0}]}
        async with httpx.AsyncClient() as client:
            r = await client.post(url, json=body, headers=hb)
            assert r.status_code == 200 and r.json()["resume_position_s"] == 9.0, r.text
            # the same refusals as the framework's route
            r = await client.post(url, json=body)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            r = await client.post(url, content=b"{", headers=hb)
            assert r.status_code == 400 and r.json()["error"] == "bad_json", r.text
            r = await client.post(url, content=b"x" * (65 * 1024), headers=hb)
            assert r.status_code == 413, r.text
            r = await client.get(url)
            assert r.status_code == 405
            r = await client.post(url.replace("/v1/heartbeat", "/v1/playback"), json={})
            assert r.status_code == 404
        # a request that is not HTTP is answered 400 and the connection closed
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NONSENSE\r\n\r\n")
        head = await asyncio.wait_for(reader.read(100), 5)
        assert head.startswith(b"HTTP/1.1 400"), head
        assert await asyncio.wait_for(reader.read(), 5) is not None  # closed by the server
        writer.close()
        await control.settled()
        assert await _resume_rows(_store(control)) == [(9.0, T0)]


async def test_the_lean_listener_refuses_hostile_heartbeats_and_stores_none_of_them(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    port = free_port()
    async with running(db, catalog, geo, telemetry={"ingest_port": port}) as control:
        session, hb = await _start(control)
        other, _ = await _start(control, device="phone")
        url = session["heartbeat"]["url"]
        sid = session["session_id"]
        token = session["heartbeat"]["token"]
        forged = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")

        def body(
            session_id: str = sid, events: str = f'[{{"at": {T0!r}, "position_s": 9.0}}]'
        ) -> bytes:
            return b'{"session_id": "%s", "events": %s}' % (session_id.encode(), events.encode())

        hostile: list[tuple[bytes, dict[str, str], str, int, str]] = [
            # (body, headers, query, status, error)
            (body(), {"Authorization": f"Bearer {forged}"}, "", 401, "unauthorised"),
            (body(), {"Authorization": "Bearer garbage.garbage.garbage"}, "", 401, "unauthorised"),
            (body(), {"Authorization": "Bearer"}, "", 401, "unauthorised"),
            (body(), {"Authorization": f"Basic {token}"}, "", 401, "unauthorised"),
            (body(), {}, f"?access_token={token}", 401, "unauthorised"),  # never from the URL
            (body(other["session_id"]), hb, "", 403, "forbidden"),
            (body("../../etc/passwd"), hb, "", 403, "forbidden"),
            (body(events="[" * 5000 + "]" * 5000), hb, "", 400, "bad_json"),
            (
                body(events='[{"at": 1, "position_s": 1, "edge": "\\ud800"}]'),
                hb,
                "",
                400,
                "bad_json",
            ),
            (body(events='[{"at": NaN, "position_s": 1}]'), hb, "", 400, "bad_json"),
            (body(events="[" + ",".join(["0"] * 30_000) + "]"), hb, "", 422, "invalid"),
            (body("x" * 65_000), hb, "", 422, "invalid"),  # 64 KB of session id
        ]
        async with httpx.AsyncClient() as client:
            for content, headers, query, status, error in hostile:
                r = await client.post(url + query, content=content, headers=headers)
                assert (r.status_code, r.json()["error"]) == (status, error), (content[:60], r.text)
            # an account's own token, for a session that is nobody's
            r = await client.post(url, content=body("../../etc"), headers=await control.account())
            assert r.status_code == 404 and r.json()["error"] == "no_session", r.text
            r = await client.post(url, content=body(), headers=hb)  # the player is unaffected
            assert r.status_code == 200, r.text
        await control.settled()
        assert await _resume_rows(_store(control)) == [(9.0, T0)]
        assert control.app.state.plane.heartbeats.ingest.appended == 1


async def _networks_heard(control: Control, headers: dict[str, str]) -> list[str]:
    """The client networks the QoS rows put a lean-listener heartbeat sent with ``headers`` in
    (the rows of the network kind that it added)."""

    async def networks() -> set[str]:
        r = await control.client.get(
            "/v1/qos", params={"by": "network"}, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert r.status_code == 200, r.text
        return {row["network"] for row in r.json()["rows"]}

    before = await networks()
    session, hb = await _start(control)
    body = {
        "session_id": session["session_id"],
        "events": [{"at": time.time(), "position_s": 1.0, "startup_s": 0.5}],
    }
    async with httpx.AsyncClient() as client:
        r = await client.post(session["heartbeat"]["url"], json=body, headers={**hb, **headers})
        assert r.status_code == 200, r.text
    plane = control.app.state.plane
    for consumer in plane.qos.consumers:
        await consumer.settle()
    return sorted(await networks() - before)


async def test_the_lean_listener_believes_forwarded_for_only_from_trusted_proxies(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    # The heartbeat comes from 127.0.0.1 saying it forwards for 203.0.113.9 (the client
    # wrote 198.51.100.66 to its left). By default nobody is trusted: the header is ignored
    # and the peer is the client; with 127.0.0.1 trusted, the client is the first hop it
    # does not trust, as the control plane's own routes read it.
    forged = {"X-Forwarded-For": "198.51.100.66, 203.0.113.9"}
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    telemetry = {"ingest_port": free_port()}
    async with running(db, catalog, geo, telemetry=telemetry) as control:
        assert await _networks_heard(control, forged) == ["127.0.0.0/24"]
    telemetry = {"ingest_port": free_port()}
    later = Clock(T0 + 60)  # the edge's heartbeats are not taken for replays of the first's
    async with running(
        db, catalog, geo, later, telemetry=telemetry, trusted_proxies=("127.0.0.1/32",)
    ) as control:
        assert await _networks_heard(control, forged) == ["203.0.113.0/24"]


async def test_control_planes_with_their_own_data_dirs_keep_their_own_streams(
    db: Db, tmp_path: Path, geo: GeoLocator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two control planes on one store, started in one working directory: each keeps its
    # embedded stream in its own data directory, and both take heartbeats at once (one
    # stream is refused to a second process: had they shared it, one would not start).
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    no_dir = {"stream_dir": ""}
    async with (
        running(db, catalog, geo, telemetry=no_dir, data_dir=str(tmp_path / "a")) as a,
        running(
            db, catalog, geo, Clock(T0 + 60), telemetry=no_dir, data_dir=str(tmp_path / "b")
        ) as b,
    ):
        for control in (a, b):
            session, hb = await _start(control)
            r = await _beat(control, session, hb, {"at": T0, "position_s": 3.0})
            assert r.status_code == 200, r.text
            await control.settled()
        assert (tmp_path / "a" / "telemetry-stream" / "stream.db").is_file()
        assert (tmp_path / "b" / "telemetry-stream" / "stream.db").is_file()
    assert list(work.iterdir()) == []  # nothing in the working directory
    if db.engine == "postgresql":
        # no data directory and no SQLite file to sit beside: refused, saying what to set
        with pytest.raises(SettingsError, match=r"control\.data_dir"):
            async with running(db, catalog, geo, telemetry=no_dir):
                pass


async def test_an_expired_heartbeat_token_is_refused_though_it_was_good_before(
    control: Control,
) -> None:
    session, hb = await _start(control)
    assert (await _beat(control, session, hb)).status_code == 200
    control.clock.advance(3601)  # past the token's expiry (the tests' ttl is an hour)
    r = await _beat(control, session, hb)
    assert r.status_code == 401 and "expired" in r.json()["detail"], r.text


async def test_heartbeats_taken_by_an_ingest_process_of_their_own(
    db: Db, tmp_path: Path, geo: GeoLocator
) -> None:
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    port = free_port()
    telemetry = {
        "ingest_port": port,
        "ingest_process": True,
        "stream_dir": str(tmp_path / "s"),
        "ingest_nice": 7,
        "ingest_cpus": [0],
    }
    settings = tmp_path / "ingest.toml"
    settings.write_text(
        "[control]\n"
        f'database_url = "{db.url}"\ndatabase_schema = "{db.schema}"\njwt_secret = "{"b2" * 32}"\n'
        "[telemetry]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in telemetry.items())
    )
    ingest = subprocess.Popen(
        [sys.executable, "-m", "streamplane", "ingest", "--config", str(settings)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with running(db, catalog, geo, telemetry=telemetry) as control:
            session, hb = await _start(control)
            assert session["heartbeat"]["url"] == f"http://127.0.0.1:{port}/v1/heartbeat"
            # the ingest process runs on the real clock (the test's control plane on T0)
            at = time.time() - 1
            body = {"session_id": session["session_id"], "events": [{"at": at, "position_s": 4.0}]}
            async with httpx.AsyncClient() as client:
                # until the process listens: a Python start takes seconds on a busy machine
                deadline = time.monotonic() + 60
                while True:
                    try:
                        r = await client.post(session["heartbeat"]["url"], json=body, headers=hb)
                        break
                    except httpx.TransportError:
                        assert ingest.poll() is None, ingest.stderr.read() if ingest.stderr else ""
                        assert time.monotonic() < deadline, "the ingest process never listened"
                        await asyncio.sleep(0.05)
            assert r.status_code == 200 and r.json()["resume_position_s"] == 4.0, r.text
            # it yields the CPU to the control plane's playback starts (a test run under nice
            # already yields more: its niceness is never lowered)
            assert os.getpriority(os.PRIO_PROCESS, ingest.pid) == max(
                7, os.getpriority(os.PRIO_PROCESS, 0)
            )
            # on the CPUs it was given, every thread of it
            threads = os.listdir(f"/proc/{ingest.pid}/task")
            assert {frozenset(os.sched_getaffinity(int(t))) for t in threads} == {frozenset({0})}
            # the control plane's own route points there
            r = await _beat(control, session, hb)
            assert r.status_code == 503 and str(port) in r.json()["detail"], r.text
            for _ in range(100):  # written behind by the ingest process
                if await _resume_rows(_store(control)) == [(4.0, at)]:
                    break
                await asyncio.sleep(0.05)
            assert await _resume_rows(_store(control)) == [(4.0, at)]
    finally:
        ingest.terminate()
        assert ingest.wait(10) == 0, ingest.stderr.read() if ingest.stderr else ""


async def test_a_screen_is_touched_once_per_touch_interval_not_per_heartbeat(
    control: Control,
) -> None:
    session, hb = await _start(control)

    async def last_seen() -> float:
        await control.settled()

        def read(conn: Connection) -> float:
            return float(conn.execute(select(Screen.last_seen)).scalar_one())

        return await _store(control).transaction(read)

    assert (await _beat(control, session, hb)).status_code == 200
    first = await last_seen()
    assert first == T0  # the start's clock, and the first heartbeat's
    for _ in range(4):  # four more within screen_touch_s (15 s): no write
        control.clock.advance(3)
        assert (await _beat(control, session, hb)).status_code == 200
    assert await last_seen() == first
    control.clock.advance(4)  # 16 s after the last write: this one is written
    assert (await _beat(control, session, hb)).status_code == 200
    assert await last_seen() == T0 + 16


def test_an_ingest_process_given_cpus_the_machine_lacks_says_so(tmp_path: Path) -> None:
    settings = tmp_path / "ingest.toml"
    settings.write_text(
        "[control]\n"
        f'database_url = "sqlite+aiosqlite:///{tmp_path / "c.db"}"\njwt_secret = "{"b2" * 32}"\n'
        "[telemetry]\n"
        f"ingest_port = {free_port()}\ningest_process = true\ningest_cpus = [4095]\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "streamplane", "ingest", "--config", str(settings)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done
    assert "telemetry.ingest_cpus" in done.stderr + done.stdout, done
