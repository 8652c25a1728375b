"""Player heartbeats taken by the telemetry plane, beside a framework endpoint writing inline.

Method: for each engine (the embedded stream with a SQLite store; JetStream with PostgreSQL),
run ``streamplane control`` as its own process with the lean heartbeat listener on
(``telemetry.ingest_port``), register a title held by a few edges, and start ``--sessions``
playback sessions (one account, one device each). A load generator in a separate process
(bench/playback.py's: raw keep-alive HTTP/1.1, no GIL shared with the server) keeps
``--concurrency`` heartbeats in flight for ``--seconds``, each one player's heartbeat as players
send it (a batch of one event, the session's access token), round robin over the sessions:
first to the lean listener, then to the same control plane's framework route
(``POST /v1/heartbeat`` through FastAPI). An answer is a 200 only once the batch is durable in
the stream. The peer, on the same store in the same run, is a bare FastAPI app doing what the
control plane did before: validate the heartbeat and write one row, inline, per request.

Playback starts during a storm: 4 starts in flight from a second account, alone, and then while
the heartbeat load runs against the lean listener (two load processes at once), alternately
``--pairs`` times (what else the machine does then falls on both alike): the rise of the
starts' p50 and p99 is what a heartbeat storm costs playback, and the control plane's CPU per
start whether the storm adds work to a start or only makes it wait. ``-pinned`` variants put
the ingest process (``telemetry.ingest_cpus``) and the storm's generator on CPU 1, the control
plane and the starts' generator on CPU 0: the storm then cannot take a start's CPU, and what
rise is left comes through what they share (the store, the kernel, NATS).

The generator's own CPU per request is reported beside the server's: on one machine it takes
from the same cores. ``--before CHECKOUT`` runs the control plane and ingest of another
checkout (its ``src``) on the same loads, interleaved.

Per-device admission is raised for the run (each of the few hundred sessions sends far more
than a real player's one heartbeat a second); the global limit is the default.

    .venv/bin/python bench/telemetry.py [--engines embedded nats] [--seconds 10] [--runs 1]

The backlog a store outage leaves: ``--drain`` heartbeats of ``--sessions`` sessions appended
to an embedded stream while no consumer ran, then the write-behind consumer started on a fresh
store (SQLite, PostgreSQL): heartbeats/s written until the backlog is empty.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import secrets
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field

from streamplane.stack import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import peer_app, serve_peer
from playback import (
    Load,
    Measured,
    _config,
    _database,
    _serving,
    _set_up,
    run_load,
)

NATS = os.environ.get("STREAMPLANE_BENCH_NATS", "nats://127.0.0.1:4222")


def _telemetry_config(
    config: Path,
    engine: str,
    work: Path,
    ingest_port: int,
    separate: bool,
    nice: int | None,
    cpus: tuple[int, ...] = (),
) -> str:
    stream = f"BENCH{uuid.uuid4().hex[:12]}"
    lines = [
        "",
        "[telemetry]",
        f'engine = "{engine}"',
        f'stream_dir = "{work / "stream"}"',
        f'nats_url = "{NATS}"',
        f'stream_name = "{stream}"',
        f"ingest_port = {ingest_port}",
        f"ingest_process = {'true' if separate else 'false'}",
        "device_rate = 100000.0",
        "device_burst = 100000.0",
    ]
    if nice is not None:
        lines.append(f"ingest_nice = {nice}")
    if cpus:
        lines.append(f"ingest_cpus = {list(cpus)}")
    with config.open("a") as f:
        f.write("\n".join(lines) + "\n")
    return stream


def _sessions(port: int, token: str, n: int) -> list[str]:
    headers = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        return [
            client.post(
                "/v1/playback", json={"title": "bench", "device": f"hb{i}"}, headers=headers
            )
            .raise_for_status()
            .json()["session_id"]
            for i in range(n)
        ]


def _bodies(sessions: list[str]) -> tuple[str, ...]:
    now = time.time()
    return tuple(
        json.dumps(
            {
                "session_id": s,
                "events": [
                    {
                        "at": now,
                        "position_s": 61.5,
                        "kind": "position",
                        "buffer_s": 18.2,
                        "rung": 3,
                        "bitrate_kbps": 2400.0,
                        "throughput_kbps": 8100.0,
                        "edge": "edge-001",
                    }
                ],
            }
        )
        for s in sessions
    )


def _timing(args: argparse.Namespace, concurrency: int | None = None) -> dict[str, Any]:
    return {
        "concurrency": concurrency or args.concurrency,
        "warmup_s": args.warmup,
        "seconds": args.seconds,
    }


def _measure_control(
    engine: str,
    url: str,
    args: argparse.Namespace,
    work: Path,
    pool: ProcessPoolExecutor,
    separate: bool = False,
    nice: int | None = None,
    source: str | None = None,
    pinned: bool = False,
) -> dict[str, Measured]:
    """The control plane (and ingest process), from ``source``'s ``src`` if given.
    ``pinned``: the control plane and the starts' generator on CPU 0, the ingest process
    (``telemetry.ingest_cpus``) and the heartbeats' generators on CPU 1."""
    out: dict[str, Measured] = {}
    port, ingest = free_port(), free_port()
    config = _config(work, url, port, args.sessions + 4)
    storm_cpus, starts_cpus = ((1,), (0,)) if pinned else ((), ())
    stream = _telemetry_config(config, engine, work, ingest, separate, nice, storm_cpus)
    # one secret for both processes: the ingest process verifies the control plane's tokens
    env = {**os.environ, "STREAMPLANE_CONTROL_JWT_SECRET": secrets.token_hex(32)}
    if source is not None:
        env["PYTHONPATH"] = str(Path(source).resolve() / "src")
    control = [sys.executable, "-m", "streamplane", "control", "--config", str(config)]
    if pinned:
        control = ["taskset", "-c", "0", *control]  # exec'd: the same pid
    try:
        with (
            _serving(control, port, f"{engine}: the control plane", env) as pid,
            _ingesting(config, ingest, env, separate) as ingest_pid,
        ):
            tokens, _, _ = _set_up(port, argparse.Namespace(edges=4, accounts=2, history=0))
            bodies = _bodies(_sessions(port, tokens[0], args.sessions))
            beat = {"method": "POST", "path": "/v1/heartbeat", "bodies": bodies}
            start = {
                "method": "POST",
                "path": "/v1/playback",
                "body": '{"title": "bench", "device": "start{n}"}',
                "devices": 4,
            }
            lean = Load(
                port=ingest,
                tokens=(tokens[0],),
                server_pid=ingest_pid or pid,
                cpus=storm_cpus,
                **beat,
                **_timing(args),
            )
            out["lean"] = pool.submit(run_load, lean).result()
            if not separate:
                framework = Load(
                    port=port, tokens=(tokens[0],), server_pid=pid, **beat, **_timing(args)
                )
                out["framework"] = pool.submit(run_load, framework).result()
            starts = Load(
                port=port,
                tokens=(tokens[1],),
                server_pid=pid,
                cpus=starts_cpus,
                **start,
                **_timing(args, 4),
            )
            # alone and during a storm, alternately: what else the machine does falls on both
            alone, during, storms = [], [], []
            for _ in range(args.pairs):
                alone.append(pool.submit(run_load, starts).result())
                storm = pool.submit(run_load, lean)
                during.append(pool.submit(run_load, starts).result())
                storms.append(storm.result())
            out["starts"], out["starts-storm"] = _pooled(alone), _pooled(during)
            out["storm"] = _pooled(storms)
    finally:
        if engine == "nats":
            _delete_stream(stream)
    return out


def _pooled(runs: list[Measured]) -> Measured:
    """Several windows of the same load as one."""
    statuses: dict[int, int] = {}
    for m in runs:
        for status, n in m.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
    cpus = [m.cpu_s for m in runs]
    return Measured(
        requests=sum(m.requests for m in runs),
        seconds=sum(m.seconds for m in runs),
        latencies=[x for m in runs for x in m.latencies],
        statuses=statuses,
        cpu_s=None if None in cpus else sum(c for c in cpus if c is not None),
        client_cpu_s=sum(m.client_cpu_s for m in runs),
    )


@contextmanager
def _ingesting(config: Path, port: int, env: dict[str, str], separate: bool) -> Iterator[int]:
    """``streamplane ingest`` beside the control plane when ``separate``; its pid (0: none)."""
    if not separate:
        yield 0
        return
    command = [sys.executable, "-m", "streamplane", "ingest", "--config", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("streamplane ingest did not start") from None
                time.sleep(0.1)
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _delete_stream(name: str) -> None:
    import asyncio

    from streamplane.telemetry.stream_nats import NatsStream

    async def delete() -> None:
        stream = await NatsStream.open(NATS, name=name)
        await stream.delete()
        await stream.close()

    asyncio.run(delete())


# -- the peer: FastAPI writing each heartbeat inline -------------------------------------------


class Event(BaseModel):
    at: float = Field(ge=0, le=1e11)
    position_s: float = Field(ge=0, le=1e7)


class Beat(BaseModel):
    session_id: str = Field(min_length=1, max_length=64)
    events: list[Event] = Field(default_factory=list, max_length=1000)


def heartbeat_peer(url: str) -> Any:
    """The peer's ``POST /v1/heartbeat``: the heartbeat body validated, one row per request."""
    from sqlalchemy import Column, Float, String

    def row(body: Beat) -> dict[str, Any]:
        last = body.events[-1] if body.events else Event(at=time.time(), position_s=0)
        return {
            "id": str(uuid.uuid4()),
            "session_id": body.session_id,
            "at": last.at,
            "position_s": last.position_s,
        }

    return peer_app(
        url,
        path="/v1/heartbeat",
        body=Beat,
        table="peer_heartbeats",
        columns=lambda: [
            Column("id", String(36), primary_key=True),
            Column("session_id", String(64)),
            Column("at", Float),
            Column("position_s", Float),
        ],
        row=row,
        answer=lambda _row: {"active": True},
    )


def _measure_peer(
    url: str, bodies: tuple[str, ...], args: argparse.Namespace, pool: ProcessPoolExecutor
) -> Measured:
    port = free_port()
    peer = [sys.executable, __file__, "--serve-peer", url, "--port", str(port)]
    with _serving(peer, port, "the peer") as pid:
        load = Load(
            port=port,
            method="POST",
            path="/v1/heartbeat",
            bodies=bodies,
            server_pid=pid,
            **_timing(args),
        )
        return pool.submit(run_load, load).result()


# -- the backlog an outage leaves, drained -----------------------------------------------------


def _drain(url: str, work: Path, batches: int, sessions: int) -> tuple[float, float]:
    """(batches/s, events/s) the write-behind consumer writes a backlog of ``batches`` heartbeats
    of ``sessions`` sessions into the store at ``url``: what a store outage leaves waiting in
    the (embedded) stream, written when the store is back."""
    import asyncio

    from sqlalchemy import insert

    from streamplane.control.heartbeats import StoreSink
    from streamplane.control.store import Account, Store, migrate
    from streamplane.telemetry import EventBatch, HeartbeatEvent
    from streamplane.telemetry.consumers import WriteBehind
    from streamplane.telemetry.stream_embedded import EmbeddedStream

    async def run() -> tuple[float, float]:
        store = Store(url)
        await migrate(store)
        accounts = [
            {
                "id": f"a{i}",
                "email": f"a{i}@x.io",
                "password_hash": "-",
                "plan": "bench",
                "created_at": 0.0,
            }
            for i in range(sessions)
        ]
        await store.transaction(lambda conn: conn.execute(insert(Account), accounts))
        stream = EmbeddedStream(work / "drain-stream", partitions=8)
        now = time.time()
        appends = []
        for n in range(batches):
            session = f"s{n % sessions}"
            event = HeartbeatEvent(
                account=f"a{n % sessions}",
                session=session,
                device=f"d{n % sessions}",
                title="bench",
                received_at=now + n / 1000,
                at=now + n / 1000,
                seq=n,
                kind="position",
                position_s=n / 10,
            )
            batch = EventBatch(
                device=event.device,
                events=[event],
                account=event.account,
                session=session,
                title="bench",
                received_at=event.received_at,
            )
            appends.append(stream.append(batch))
        group = await stream.group("store")  # the outage: nothing was written yet
        await asyncio.gather(*appends)
        await group.close()
        consumer = WriteBehind(stream, StoreSink(store, 90.0, 15.0))
        t0 = time.perf_counter()
        await consumer.start()
        await consumer.settle(timeout_s=600)
        seconds = time.perf_counter() - t0
        await consumer.stop()
        await stream.close()
        await store.dispose()
        return batches / seconds, consumer.written_events / seconds

    return asyncio.run(run())


# -- the report --------------------------------------------------------------------------------


def _stats(m: Measured) -> tuple[float, float, float, float, int, float]:
    """requests/s, p50 and p99 ms, the server's and the generator's CPU ms per request,
    errors (a request whose connection the server dropped counts: it was lost)."""
    lats = sorted(m.latencies)
    p50 = 1000 * statistics.median(lats) if lats else float("nan")
    p99 = 1000 * lats[min(len(lats) - 1, int(0.99 * len(lats)))] if lats else float("nan")
    cpu = 1000 * m.cpu_s / m.requests if m.cpu_s and m.requests else float("nan")
    client = 1000 * m.client_cpu_s / m.requests if m.requests else float("nan")
    errors = sum(n for s, n in m.statuses.items() if not 200 <= s < 300)
    return m.requests / m.seconds, p50, p99, cpu, errors, client


WHAT = {
    "lean": "heartbeats, lean listener",
    "framework": "heartbeats, FastAPI route",
    "peer": "peer: FastAPI + one INSERT per heartbeat",
    "storm": "heartbeats, lean, with starts running",
    "starts": "playback starts, alone",
    "starts-storm": "playback starts, during the storm",
}


def _variant(
    variant: str, args: argparse.Namespace, pool: ProcessPoolExecutor, source: str | None
) -> tuple[str, dict[str, Measured]]:
    """One engine variant measured: its label and what was found."""
    stores = {"embedded": "SQLite", "nats": "PostgreSQL"}
    # "-pinned": the ingest process and the storm on a core of their own
    pinned = variant.endswith("-pinned")
    variant = variant.removesuffix("-pinned")
    # "-nice10": the ingest process at niceness 10, beside the default (ingest_nice)
    nice = 10 if variant.endswith("-nice10") else None
    variant = variant.removesuffix("-nice10")
    engine, separate = variant.removesuffix("-process"), variant.endswith("-process")
    store = stores[engine]
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
        work = Path(tmp)
        with _database(store, work, "control") as url:
            found = _measure_control(engine, url, args, work, pool, separate, nice, source, pinned)
        if not args.no_peer and source is None:
            with _database(store, work, "peer") as url:
                bodies = _bodies([str(uuid.uuid4()) for _ in range(args.sessions)])
                found["peer"] = _measure_peer(url, bodies, args, pool)
    label = f"{'JetStream' if engine == 'nats' else 'embedded'} + {store}"
    if separate:
        label += ", ingest process" + (f", nice {nice}" if nice else "")
        label += ", pinned" if pinned else ""
    if source is not None:
        label = f"before: {label}"
    return label, found


def main(args: argparse.Namespace) -> str:
    lines = [
        "| engine + store | what | requests/s | p50 ms | p99 ms | server CPU ms/req"
        " | generator CPU ms/req | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    spawn = multiprocessing.get_context("spawn")
    sources = [None, args.before] if args.before else [None]
    with ProcessPoolExecutor(2, mp_context=spawn) as pool:
        for variant in args.engines:
            for source in sources:  # before and after interleaved: the same noise on both
                label, found = _variant(variant, args, pool, source)
                for kind in WHAT:
                    if kind not in found:
                        continue
                    rate, p50, p99, cpu, errors, client = _stats(found[kind])
                    lines.append(
                        f"| {label} | {WHAT[kind]} | {rate:,.0f} | {p50:.1f} | {p99:.1f} |"
                        f" {cpu:.3f} | {client:.3f} | {errors} |"
                    )
                alone, storm = _stats(found["starts"]), _stats(found["starts-storm"])
                against = ""
                if "peer" in found:
                    lean, peer = _stats(found["lean"]), _stats(found["peer"])
                    against = (
                        f" lean heartbeats / the peer's inline inserts = {lean[0] / peer[0]:.2f}"
                        f" (server CPU per request, the peer's / lean = {peer[3] / lean[3]:.2f});"
                    )
                notes.append(
                    f"- {label}:{against}"
                    f" playback starts during the storm: p50 {storm[1] / alone[1] - 1:+.0%},"
                    f" p99 {storm[2] / alone[2] - 1:+.0%}."
                )
                print(f"{label} done; load average {os.getloadavg()}", file=sys.stderr)
        for store in args.drain_stores:
            with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
                work = Path(tmp)
                with _database(store, work, "drain") as url:
                    batches_s, events_s = _drain(url, work, args.drain, args.sessions)
            notes.append(
                f"- Backlog drain into {store}: {args.drain:,} heartbeats waiting in the"
                f" embedded stream (an outage's backlog) written at {events_s:,.0f} heartbeats/s"
                f" ({batches_s:,.0f} batches/s) by the write-behind consumer."
            )
    return "\n".join(
        [
            *lines,
            "",
            *notes,
            "",
            f"{args.concurrency} heartbeats in flight over {args.sessions} sessions,"
            f" {args.seconds:g} s measured after {args.warmup:g} s of warm-up; one run;"
            f" load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
            f" ({os.cpu_count()} cores).",
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--no-peer",
        action="store_true",
        help="skip the inline-INSERT peer (when only playback starts during a storm matter)",
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["embedded", "nats", "embedded-process"],
        choices=[
            "embedded",
            "nats",
            "embedded-process",
            "nats-process",
            "embedded-process-nice10",
            "nats-process-nice10",
            "embedded-process-pinned",
            "nats-process-pinned",
        ],
        help="-process: heartbeats taken by `streamplane ingest`, a process of its own; -pinned:"
        " it and the storm on CPU 1, the control plane and the starts on CPU 0",
    )
    parser.add_argument(
        "--before",
        metavar="CHECKOUT",
        help="also run the control plane and ingest of another checkout (its src/), interleaved",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=1,
        help="playback starts alone and during a storm, alternately, this many times each",
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--drain", type=int, default=50_000, help="backlog heartbeats to drain")
    parser.add_argument(
        "--drain-stores", nargs="*", default=["SQLite", "PostgreSQL"], help="stores to drain into"
    )
    parser.add_argument("--serve-peer", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_peer:
        serve_peer(heartbeat_peer(args.serve_peer), args.port)
        raise SystemExit(0)
    print(__doc__.split("\n\n")[1].replace("\n", " "))
    table = main(args)
    print()
    print(table)
    print(f"\nreproduce: .venv/bin/python bench/telemetry.py {shlex.join(sys.argv[1:])}")
