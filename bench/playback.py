"""Playback starts end to end, on SQLite and on PostgreSQL, beside the framework's own floor.

Method: for each store, run ``streamplane control`` as its own process (uvicorn, one worker,
the CLI's own settings) on a fresh database; register a title, heartbeat ``--edges`` edges
holding it, sign up ``--accounts`` accounts on a plan of ``--devices`` screens, and as many
again whose history holds ``--history`` past (ended) screens each, written straight into the
store as years of viewing would leave them. Then a load generator in a separate process (so
it shares no interpreter and no GIL with the server: a small HTTP/1.1 client on raw
keep-alive sockets, cheap per request) keeps ``--concurrency`` playback starts in flight for
``--seconds`` after ``--warmup``, each from one of the ``--devices`` devices of a random new
account (a device starting again replaces its own screen, as a household's TV and phones
do, so every start is granted and each one ends a screen: the accounts' histories grow as
the run goes). Every start is the whole path: JWT check, the catalog and fleet caches, one
locking transaction (account row lock, the device's earlier screen ended, screen count,
screen insert, resume position), steering's ranking, the EdgeAuth token, the signed
manifest URLs and the session JWT. The same load then runs on the accounts with a long
history (a start must not slow down with it), and hits the same server's ``GET /healthz``
(FastAPI and uvicorn with no work).
The peer, on the same store in the same run, is a minimal FastAPI app served the same way
whose ``POST /v1/playback`` validates the same body and does one INSERT in one write
transaction through the same store class: the floor of framework plus driver for one write.
Reported: requests/s, p50 and p99 latency as the client sees it, the server's CPU time per
request (from /proc: steadier than throughput on a shared machine), errors; and the ratio of
playback starts to the peer's inserts. Each row is the median of ``--runs`` runs (the range
of requests/s is shown), the stores and servers interleaved so that other load on the
machine falls on all of them alike.

    .venv/bin/python bench/playback.py [--runs 3] [--seconds 10] [--concurrency 32] [--record]

``--before CHECKOUT`` runs the control plane of another checkout (``CHECKOUT/src`` first on
its path) on the same load in the same runs, each on a fresh database of its own: a "before"
beside the "after", under the same noise.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import os
import platform
import random
import secrets
import shlex
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
from pydantic import BaseModel, Field

from streamplane.media.title import Rung, Title, encode_title
from streamplane.stack import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import peer_app, serve_peer

PG = os.environ.get("STREAMPLANE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parent.parent


# -- the workload ------------------------------------------------------------------------------


def _title() -> Title:
    rung = Rung(
        id="v0",
        codec="h264",
        codec_string="avc1.64001f",
        width=1280,
        height=720,
        frame_rate="25",
        average_bitrate_bps=2_000_000,
        peak_bitrate_bps=3_000_000,
        vmaf=93.0,
        vmaf_harmonic=92.0,
        psnr_y=41.0,
        init="v/v0/init.mp4",
        playlist="v/v0/index.m3u8",
        segment_bytes=(),
        shots=(),
    )
    return Title(
        schema=1,
        title="bench",
        duration_s=600.0,
        frame_rate="25",
        width=1280,
        height=720,
        video_timescale=12800,
        shots=(),
        segments=(),
        rungs=(rung,),
        audio=(),
    )


def _config(work: Path, url: str, port: int, devices: int) -> Path:
    (work / "catalog" / "bench").mkdir(parents=True, exist_ok=True)
    (work / "catalog" / "bench" / "title.json").write_bytes(encode_title(_title()))
    path = work / "control.toml"
    # Cheap password hashes: signing up the accounts is set-up, not what is measured.
    path.write_text(
        f"""
[tokens]
keys = {{ bench = "{secrets.token_hex(32)}" }}

[control]
database_url = "{url}"
data_dir = "{work}"
catalog_dir = "{work / "catalog"}"
placement = ""
port = {port}
edge_timeout_s = 3600
slow_start_s = 0
password_time_cost = 1
password_memory_kib = 8192
plans = {{ bench = {{ screens = {devices} }} }}
default_plan = "bench"
# its edges are fictional and their heartbeats set-up, not what is measured: sent unsigned
dev_mode = true
"""
    )
    return path


@contextmanager
def _serving(
    command: list[str], port: int, what: str, env: dict[str, str] | None = None
) -> Iterator[int]:
    """Run a server process until the block ends; yields its pid once /healthz answers."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).raise_for_status()
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    err = server.stderr.read().decode() if server.stderr else ""
                    raise SystemExit(f"{what} did not start\n{err}") from None
                time.sleep(0.1)
        yield server.pid
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _set_up(port: int, args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """Edges holding the title and two sets of accounts to start from: their access tokens,
    and the account ids of the second set (to be given a history)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for i in range(args.edges):
            hb = {
                "edge_id": f"edge-{i:03d}",
                "base_url": f"http://10.0.{i // 250}.{i % 250 + 1}:8081",
                "site": f"site-{i % 4}",
                "throughput_bps": 1e8 * (i % 7),
                "capacity_bps": 1e10,
                "connections": 0,
                "disk_used_bytes": 0,
                "disk_total_bytes": 10**12,
                "titles": ["bench"],
                "healthy": True,
                "draining": False,
                "sent_at": time.time(),
            }
            client.post("/v1/fleet/heartbeat", json=hb).raise_for_status()
        tokens: list[list[str]] = [[], []]
        long_lived: list[str] = []
        for i in range(2 * args.accounts):
            creds = {"email": f"bench{i}@example.com", "password": "bench password"}
            client.post("/v1/accounts", json=creds).raise_for_status()
            r = client.post("/v1/auth/login", json=creds)
            r.raise_for_status()
            token = r.json()["access_token"]
            tokens[i >= args.accounts].append(token)
            if i >= args.accounts:
                me = client.get("/v1/account", headers={"authorization": f"Bearer {token}"})
                long_lived.append(me.raise_for_status().json()["account_id"])
        check = client.post(
            "/v1/playback",
            json={"title": "bench", "device": "check"},
            headers={"authorization": f"Bearer {tokens[0][0]}"},
        )
        check.raise_for_status()
        if len(check.json()["edges"]) < 2:
            raise SystemExit(f"the set-up is wrong: {check.text}")
        stop = client.delete(
            f"/v1/playback/{check.json()['session_id']}",
            headers={"authorization": f"Bearer {tokens[0][0]}"},
        )
        stop.raise_for_status()  # its screen is free again for the measured starts
    return tokens[0], tokens[1], long_lived


def _history(account_ids: Sequence[str], per_account: int, now: float) -> list[tuple[Any, ...]]:
    """``per_account`` ended screens for each account, started over the past day (within the
    retention), on a handful of devices: the rows years of viewing leave in ``screens``."""
    rng = random.Random(11)
    rows = []
    for account in account_ids:
        for i in range(per_account):
            started = now - 86_000 * (i + 1) / (per_account + 1)
            device = f"old-{rng.randrange(8)}"
            rows.append((str(uuid.uuid4()), account, "bench", device, started, started + 30, True))
    return rows


_SCREEN_COLUMNS = ("id", "account_id", "title", "device", "started_at", "last_seen", "ended")


def _write_history(url: str, rows: list[tuple[Any, ...]]) -> None:
    """Insert ``rows`` into the control plane's ``screens`` while it runs, as another client."""
    if url.startswith("sqlite"):
        db = sqlite3.connect(url.split("///", 1)[1], timeout=60)
        try:
            with db:
                columns = ", ".join(_SCREEN_COLUMNS)
                marks = ", ".join("?" * len(_SCREEN_COLUMNS))
                db.executemany(f"INSERT INTO screens ({columns}) VALUES ({marks})", rows)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # not left for the server to copy
        finally:
            db.close()
        return

    async def copy() -> None:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.copy_records_to_table("screens", records=rows, columns=_SCREEN_COLUMNS)
            # What autovacuum would have done over the years, rather than during the run.
            await conn.execute("VACUUM (ANALYZE) screens")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    asyncio.run(copy())


# -- the load generator (its own process) ------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What to send: ``body`` with ``{n}`` replaced by a new number per request (modulo
    ``devices`` if given: the device of the account that starts)."""

    port: int
    method: str
    path: str
    body: str = ""
    bodies: tuple[str, ...] = ()  # instead of ``body``: the n-th request sends bodies[n % len]
    tokens: tuple[str, ...] = ()
    devices: int = 0
    concurrency: int = 32
    warmup_s: float = 2.0
    seconds: float = 10.0
    server_pid: int = 0
    cpus: tuple[int, ...] = ()  # the generator runs on these CPUs (empty: any)


@dataclass
class Measured:
    requests: int
    seconds: float
    latencies: list[float]  # of the 2xx answers
    statuses: dict[int, int]
    cpu_s: float | None  # the server's CPU time over the measured window
    client_cpu_s: float = 0.0  # the load generator's own CPU time over the window


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(load: Load) -> Measured:
    """Keep ``concurrency`` requests in flight; measure those completed inside the window."""
    everywhere = os.sched_getaffinity(0)
    if load.cpus:
        os.sched_setaffinity(0, load.cpus)
    try:
        import uvloop

        return uvloop.run(_load(load))
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(_load(load))
    finally:
        os.sched_setaffinity(0, everywhere)  # the pool's process runs other loads after


def _requests(load: Load) -> tuple[list[bytes], bool]:
    """Every distinct request the load sends, whole (head and body), built once; and whether
    the list is exhaustive (False: ``body`` numbers each request anew, built as it goes)."""
    head = f"{load.method} {load.path} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
    auths = [f"authorization: Bearer {t}\r\n" for t in load.tokens] or [""]

    def whole(auth: str, body: bytes) -> bytes:
        length = f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        return (head + auth + (length if body else "") + "\r\n").encode() + body

    if load.bodies:
        bodies = [b.encode() for b in load.bodies]
    elif "{n}" not in load.body or load.devices:
        bodies = [load.body.replace("{n}", str(n)).encode() for n in range(load.devices or 1)]
    else:
        return [whole(auths[0], load.body.encode())], False
    return [whole(a, b) for b in bodies for a in auths], True


class _Client(asyncio.Protocol):
    """One keep-alive connection sending the next request from the callback that completes
    the last answer: no task, no stream reader, no regular expression per request, so the
    generator's own CPU per request (which shares the machine's cores with the server) stays
    small. Answers carry ``content-length`` (every server measured here sends it)."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._buffer = b""
        self._sent = 0.0
        self._waiting = False
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._waiting:  # the server dropped it with a request unanswered: lost, counted
            self._waiting = False
            self._run.answered(0, 0.0)
            self._run.reconnect()
        if not self.closed.done():
            self.closed.set_result(None)

    def _send(self) -> None:
        assert self.transport is not None
        if time.monotonic() >= self._run.stop:
            self.transport.close()
            return
        self._sent = time.perf_counter()
        self._waiting = True
        self.transport.write(self._run.next_request())

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            self._buffer = buffer
            return
        head = buffer[:end].lower()
        length = 0
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            line_end = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : line_end if line_end >= 0 else len(head)])
        if len(buffer) < end + 4 + length:
            self._buffer = buffer
            return
        self._buffer = buffer[end + 4 + length :]  # nothing more is sent before the answer
        self._waiting = False
        self._run.answered(int(head[9:12]), time.perf_counter() - self._sent)
        if b"\r\nconnection: close" in head:
            assert self.transport is not None
            self.transport.close()
            self._run.reconnect()
            return
        self._send()


class _Run:
    def __init__(self, load: Load) -> None:
        self.load = load
        self.requests, self.exhaustive = _requests(load)
        self.numbers = itertools.count()
        self.start = time.monotonic() + load.warmup_s
        self.stop = self.start + load.seconds
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.clients: list[_Client] = []
        self._rng = random.Random(7)
        self._reconnects: set[asyncio.Task[None]] = set()

    def next_request(self) -> bytes:
        n = next(self.numbers)
        if not self.exhaustive:
            auth = ""
            if self.load.tokens:
                auth = f"authorization: Bearer {self._rng.choice(self.load.tokens)}\r\n"
            body = self.load.body.replace("{n}", str(n)).encode()
            return (
                f"{self.load.method} {self.load.path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{auth}"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            ).encode() + body
        if len(self.load.tokens) > 1:  # a random account's, as before; else round robin
            per = len(self.load.tokens)
            return self.requests[(n % (len(self.requests) // per)) * per + self._rng.randrange(per)]
        return self.requests[n % len(self.requests)]

    def answered(self, status: int, elapsed: float) -> None:
        if time.monotonic() >= self.start:
            self.statuses[status] += 1
            if 200 <= status < 300:
                self.latencies.append(elapsed)

    def reconnect(self) -> None:
        if time.monotonic() < self.stop:
            self._reconnects.add(asyncio.get_running_loop().create_task(self.connect()))

    def reconnecting(self) -> bool:
        self._reconnects = {t for t in self._reconnects if not t.done()}
        return bool(self._reconnects)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(lambda: _Client(self), "127.0.0.1", self.load.port)
        self.clients.append(client)


async def _load(load: Load) -> Measured:
    run = _Run(load)
    await asyncio.gather(*(run.connect() for _ in range(load.concurrency)))
    await asyncio.sleep(max(0.0, run.start - time.monotonic()))
    cpu0, mine0 = _cpu_seconds(load.server_pid), time.process_time()
    t0 = time.monotonic()
    await asyncio.sleep(max(0.0, run.stop - time.monotonic()))
    cpu1, mine1 = _cpu_seconds(load.server_pid), time.process_time()
    seconds = time.monotonic() - t0
    while any(not c.closed.done() for c in run.clients) or run.reconnecting():
        await asyncio.sleep(0.01)  # the last answers come in
    return Measured(
        requests=sum(run.statuses.values()),
        seconds=seconds,
        latencies=run.latencies,
        statuses=dict(run.statuses),
        cpu_s=None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        client_cpu_s=mine1 - mine0,
    )


# -- the peer: FastAPI doing one INSERT --------------------------------------------------------


class StartIn(BaseModel):
    title: str = Field(min_length=1, max_length=128)
    device: str = Field(min_length=1, max_length=128)


class StartOut(BaseModel):
    session_id: str


def playback_peer(url: str) -> Any:
    """The peer's ``POST /v1/playback``: the playback body validated, one row per start."""
    from sqlalchemy import Column, Float, String

    def row(body: StartIn) -> dict[str, Any]:
        return {
            "id": str(uuid.uuid4()),
            "title": body.title,
            "device": body.device,
            "started_at": time.time(),
        }

    return peer_app(
        url,
        path="/v1/playback",
        body=StartIn,
        table="peer_starts",
        columns=lambda: [
            Column("id", String(36), primary_key=True),
            Column("title", String(128)),
            Column("device", String(128)),
            Column("started_at", Float),
        ],
        row=row,
        answer=lambda r: StartOut(session_id=r["id"]),
    )


# -- runs --------------------------------------------------------------------------------------


@dataclass
class Row:
    store: str
    what: str
    runs: list[Measured] = field(default_factory=list)

    def _median_run(self) -> Measured:
        return sorted(self.runs, key=lambda m: m.requests / m.seconds)[len(self.runs) // 2]

    @property
    def rate(self) -> float:
        return statistics.median(m.requests / m.seconds for m in self.runs)

    @property
    def cpu(self) -> float:
        """The server's median CPU seconds per request (nan if /proc could not tell)."""
        cpus = [m.cpu_s / m.requests for m in self.runs if m.cpu_s and m.requests]
        return statistics.median(cpus) if cpus else float("nan")

    def cells(self) -> list[str]:
        rates = [m.requests / m.seconds for m in self.runs]
        lats = sorted(self._median_run().latencies)
        p50 = 1000 * statistics.median(lats) if lats else float("nan")
        p99 = 1000 * lats[min(len(lats) - 1, int(0.99 * len(lats)))] if lats else float("nan")
        cpus = [1000 * m.cpu_s / m.requests for m in self.runs if m.cpu_s and m.requests]
        errors = sum(n for m in self.runs for s, n in m.statuses.items() if not 200 <= s < 300)
        return [
            self.store,
            self.what,
            f"{self.rate:,.0f}",
            f"{min(rates):,.0f}-{max(rates):,.0f}",
            f"{p50:.1f}",
            f"{p99:.1f}",
            f"{statistics.median(cpus):.2f}" if cpus else "n/a",
            str(errors),
        ]


def _measure(load: Load, pool: ProcessPoolExecutor) -> Measured:
    return pool.submit(run_load, load).result()


def _measure_control(
    store: str,
    url: str,
    args: argparse.Namespace,
    work: Path,
    pool: ProcessPoolExecutor,
    source: str | None = None,
) -> dict[str, Measured]:
    """The control plane (from ``source``'s ``src`` if given) on ``url``: starts by new
    accounts, by accounts with long histories, and ``/healthz``."""
    out: dict[str, Measured] = {}
    port = free_port()
    config = _config(work, url, port, args.devices)
    control = [sys.executable, "-m", "streamplane", "control", "--config", str(config)]
    env = None
    if source is not None:
        env = {**os.environ, "PYTHONPATH": str(Path(source).resolve() / "src")}
    start = {
        "method": "POST",
        "path": "/v1/playback",
        "body": '{"title": "bench", "device": "d{n}"}',
        "devices": args.devices,
    }
    with _serving(control, port, f"{store}: the control plane", env) as pid:
        tokens, long_tokens, long_lived = _set_up(port, args)
        _write_history(url, _history(long_lived, args.history, time.time()))
        out["playback"] = _measure(
            Load(port=port, tokens=tuple(tokens), server_pid=pid, **start, **_timing(args)), pool
        )
        out["history"] = _measure(
            Load(port=port, tokens=tuple(long_tokens), server_pid=pid, **start, **_timing(args)),
            pool,
        )
        if source is None:
            out["healthz"] = _measure(
                Load(port=port, method="GET", path="/healthz", server_pid=pid, **_timing(args)),
                pool,
            )
    return out


def _measure_peer(url: str, args: argparse.Namespace, pool: ProcessPoolExecutor) -> Measured:
    port = free_port()
    peer = [sys.executable, __file__, "--serve-peer", url, "--port", str(port)]
    with _serving(peer, port, "the peer") as pid:
        return _measure(
            Load(
                port=port,
                method="POST",
                path="/v1/playback",
                body='{"title": "bench", "device": "d{n}"}',
                server_pid=pid,
                **_timing(args),
            ),
            pool,
        )


def _timing(args: argparse.Namespace) -> dict[str, Any]:
    return {"concurrency": args.concurrency, "warmup_s": args.warmup, "seconds": args.seconds}


@contextmanager
def _database(store: str, work: Path, name: str) -> Iterator[str]:
    """A fresh database for one server; its SQLAlchemy URL."""
    if store == "SQLite":
        (work / name).mkdir()
        yield f"sqlite+aiosqlite:///{work / name / 'control.db'}"
        return
    name = f"bench_playback_{os.getpid()}_{name}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        base = PG.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        yield f"{base}/{name}"
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


WHAT = {
    "playback": "control: `POST /v1/playback`",
    "history": "control: `POST /v1/playback`, long histories",
    "before": "before: `POST /v1/playback`",
    "before-history": "before: `POST /v1/playback`, long histories",
    "peer": "peer: FastAPI + one INSERT",
    "healthz": "control: `GET /healthz`",
}


def main(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    kinds = ["playback", "history", "peer", "healthz"]
    if args.before:
        kinds[2:2] = ["before", "before-history"]
    rows = {
        (store, kind): Row(store, WHAT[kind])
        for store in ("SQLite", "PostgreSQL")
        for kind in kinds
    }
    loads: list[str] = []
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        for run in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="bench-playback-") as tmp:
                work = Path(tmp)
                for store in ("SQLite", "PostgreSQL"):
                    with _database(store, work, f"{run}_control") as url:
                        found = _measure_control(store, url, args, work, pool)
                        found["peer"] = _measure_peer(url, args, pool)
                    if args.before:
                        with _database(store, work, f"{run}_before") as url:
                            old = _measure_control(store, url, args, work, pool, args.before)
                        found["before"], found["before-history"] = old["playback"], old["history"]
                    for kind, m in found.items():
                        rows[store, kind].runs.append(m)
            load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
            loads.append(load)
            print(f"run {run + 1}/{args.runs} done; load average {load}", file=sys.stderr)
    return list(rows.values()), loads


def _table(rows: Sequence[Row], args: argparse.Namespace) -> str:
    lines = [
        "| store | server | requests/s | range | p50 ms | p99 ms | server CPU ms/req | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    by = {(r.store, r.what): r for r in rows}
    lines.append("")
    for store in ("SQLite", "PostgreSQL"):
        playback = by[store, WHAT["playback"]].rate
        history = by[store, WHAT["history"]].rate
        peer = by[store, WHAT["peer"]].rate
        healthz = by[store, WHAT["healthz"]].rate
        cpu = by[store, WHAT["peer"]].cpu / by[store, WHAT["playback"]].cpu
        lines.append(
            f"- {store}: playback starts / the peer's inserts = {playback / peer:.2f}"
            f" (with long histories {history / peer:.2f}; in server CPU per request, the"
            f" peer's / a start's = {cpu:.2f}); / the same server's /healthz ="
            f" {playback / healthz:.2f}; long histories / new accounts = {history / playback:.2f}."
        )
        if (store, WHAT["before"]) in by:
            before = by[store, WHAT["before"]].rate
            old_history = by[store, WHAT["before-history"]].rate
            old_cpu = by[store, WHAT["peer"]].cpu / by[store, WHAT["before"]].cpu
            lines.append(
                f"- {store}, before: starts / the peer's inserts = {before / peer:.2f}"
                f" (with long histories {old_history / peer:.2f}; in CPU {old_cpu:.2f});"
                f" long histories / new accounts = {old_history / before:.2f}."
            )
    sqlite = by["SQLite", WHAT["playback"]].rate
    pg = by["PostgreSQL", WHAT["playback"]].rate
    lines.append(f"- Playback starts, SQLite / PostgreSQL = {sqlite / pg:.2f}.")
    lines.append("")
    lines.append(
        f"{args.concurrency} in flight, {args.edges} edges, {args.accounts} accounts of "
        f"{args.devices} devices (and {args.accounts} more with {args.history:,} past screens "
        f"each: the long histories); {args.seconds:g} s measured after {args.warmup:g} s of "
        f"warm-up; median of {args.runs} run{'s' if args.runs != 1 else ''}."
    )
    return "\n".join(lines)


BEGIN, END = "<!-- bench/playback.py: figures -->", "<!-- /bench/playback.py -->"


def _record(table: str, command: str, loads: Sequence[str]) -> None:
    """Replace the figures between the markers in docs/benchmarks.md (the prose stays)."""
    machine = (
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores, load average after each run: {'; '.join(loads)}"
    )
    block = f"{BEGIN}\n`{command}` ({machine}):\n\n{table}\n{END}"
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    at, end = text.find(BEGIN), text.find(END)
    if at < 0 or end < at:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block to replace")
    path.write_text(text[:at] + block + text[end + len(END) :])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--edges", type=int, default=20)
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--devices", type=int, default=4, help="per account (its screens)")
    parser.add_argument("--history", type=int, default=12_800, help="past screens per account")
    parser.add_argument(
        "--before",
        metavar="CHECKOUT",
        help="also run the control plane of another checkout (its src/) on the same load",
    )
    parser.add_argument(
        "--record", action="store_true", help="replace the figures in docs/benchmarks.md"
    )
    parser.add_argument("--serve-peer", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_peer:
        serve_peer(playback_peer(args.serve_peer), args.port)
        raise SystemExit(0)
    command = ".venv/bin/python bench/playback.py " + shlex.join(
        a for a in sys.argv[1:] if a != "--record"
    )
    print(__doc__.split("\n\n")[1].replace("\n", " "))
    rows, loads = main(args)
    table = _table(rows, args)
    print()
    print(table)
    print(f"\nload average after each run: {'; '.join(loads)} ({os.cpu_count()} cores)")
    print(f"reproduce: {command.strip()}")
    if args.record:
        _record(table, command.strip(), loads)
