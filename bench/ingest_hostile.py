"""A player's heartbeats to the lean listener while hostile clients hold connections open.

Method: run ``streamplane control`` as its own process (embedded stream, SQLite store) with the
lean listener on (``telemetry.ingest_port``), start one playback session, and send its
heartbeats one after another on one keep-alive connection (raw HTTP/1.1, a batch of one event,
the session's heartbeat token): ``--beats`` of them alone, then again while ``--half-open``
other connections each hold a request that never ends (its head sent, then one more header
byte a second: the slowloris). Reported: the player's answers by status and their latency
(p50, p99, max), and then how the half-open connections ended (answered 408, closed without
an answer, or still open ``--wait`` seconds after they opened).

    .venv/bin/python bench/ingest_hostile.py [--half-open 500] [--beats 300] [--wait 20]
        [--source CHECKOUT]

``--source`` runs another checkout's ``src`` (the listener before a change, say).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from playback import _config, _serving, _set_up
from telemetry import _telemetry_config

from streamplane.stack import free_port


def _session(port: int, token: str) -> tuple[str, str]:
    """A playback session's id and heartbeat token."""
    import httpx

    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/playback",
        json={"title": "bench", "device": "player"},
        headers={"authorization": f"Bearer {token}"},
        timeout=60,
    )
    r.raise_for_status()
    answer = r.json()
    return answer["session_id"], answer["heartbeat"]["token"]


async def _player(port: int, session: str, token: str, beats: int) -> tuple[list[float], dict]:
    """``beats`` heartbeats one after another on one connection: latencies (s), statuses."""
    body = json.dumps(
        {"session_id": session, "events": [{"at": time.time(), "position_s": 61.5}]}
    ).encode()
    head = (
        b"POST /v1/heartbeat HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
    )
    request = head % (token.encode(), len(body)) + body
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    for _ in range(beats):
        t0 = time.perf_counter()
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(length)
        latencies.append(time.perf_counter() - t0)
        status = int(head.split(b" ", 2)[1])
        statuses[status] = statuses.get(status, 0) + 1
    writer.close()
    return latencies, statuses


async def _half_open(port: int, until: float) -> str:
    """A request that never ends: how it ended (408, closed, open) by ``until``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/heartbeat HTTP/1.1\r\nhost: x\r\nx-pad: ")
    answer = asyncio.ensure_future(reader.read())
    try:
        while time.monotonic() < until and not answer.done():
            await asyncio.wait([answer], timeout=1.0)
            if not answer.done():
                writer.write(b"a")  # one byte a second: never idle, never whole
        if not answer.done():
            return "open"
        got = answer.result()
        return got.split(b" ", 2)[1].decode() if got.startswith(b"HTTP/1.1 ") else "closed"
    except OSError:
        return "reset"
    finally:
        answer.cancel()
        writer.close()


def _figures(latencies: list[float], statuses: dict) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (
        f"statuses {dict(sorted(statuses.items()))}, p50 {statistics.median(ms):.1f} ms,"
        f" p99 {p99:.1f} ms, max {ms[-1]:.1f} ms"
    )


async def _attack(ingest: int, session: str, token: str, args: argparse.Namespace) -> None:
    alone = await _player(ingest, session, token, args.beats)
    print(f"player alone: {_figures(*alone)}")
    until = time.monotonic() + args.wait
    hostile = [asyncio.ensure_future(_half_open(ingest, until)) for _ in range(args.half_open)]
    await asyncio.sleep(1.0)  # let them connect and begin trickling
    during = await _player(ingest, session, token, args.beats)
    print(f"player with {args.half_open} half-open requests: {_figures(*during)}")
    ends = await asyncio.gather(*hostile)
    tally = {e: ends.count(e) for e in sorted(set(ends))}
    print(f"half-open requests {args.wait:g} s after they opened: {tally}")


def main(args: argparse.Namespace) -> None:
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "db").mkdir()
        port, ingest = free_port(), free_port()
        config = _config(work, f"sqlite+aiosqlite:///{work / 'db' / 'control.db'}", port, 4)
        _telemetry_config(config, "embedded", work, ingest, False, None)
        env = dict(os.environ)
        if args.source:
            env["PYTHONPATH"] = str(Path(args.source).resolve() / "src")
        command = [sys.executable, "-m", "streamplane", "control", "--config", str(config)]
        with _serving(command, port, "the control plane", env):
            tokens, _, _ = _set_up(port, argparse.Namespace(edges=2, accounts=1, history=0))
            session, token = _session(port, tokens[0])
            asyncio.run(_attack(ingest, session, token, args))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--half-open", type=int, default=500)
    parser.add_argument("--beats", type=int, default=300)
    parser.add_argument("--wait", type=float, default=20.0)
    parser.add_argument("--source", help="another checkout whose src runs the control plane")
    main(parser.parse_args())
