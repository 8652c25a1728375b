"""The supervisor's side of the cache, in process: what it accepts from its control channel,
and a fill that goes on after failures."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import msgspec
import pytest

from streamplane.config import EdgeSettings
from streamplane.edge.operations import FillRequest
from streamplane.edge.supervisor import Supervisor
from tests.edge.conftest import Edge, start_edge


def supervisor(tmp_path: Path, origin: Path, **settings: object) -> tuple[Supervisor, list[str]]:
    logged: list[str] = []
    config = EdgeSettings(
        cache_dir=str(tmp_path / "cache"),
        origin=str(origin),
        **settings,  # type: ignore[arg-type]
    )
    sup = Supervisor(config, {}, logged.append)
    sup.rebuild_index()
    return sup, logged


@pytest.mark.parametrize(
    "message",
    [
        b'{"admit": "../victim.txt", "size": 1e15}',
        b'{"admit": "../victim.txt", "size": 1000000000000000}',
        b'{"admit": "t/../../victim.txt", "size": 10}',
        b'{"admit": "/etc/passwd", "size": 10}',
        b'{"hits": [["../victim.txt", 1]], "admit": "t/a.m4s", "size": 10}',
        b'{"admit": "t/a.m4s", "size": -1}',
        b'{"room": -5}',
        b'{"admit": 7, "size": 10}',
        b'{"evict": "../victim.txt"}',
        b"not json",
        b"[1, 2]",
    ],
)
def test_nothing_said_on_the_control_channel_reaches_outside_the_cache(
    tmp_path: Path, origin_dir: Path, message: bytes
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    sup, logged = supervisor(tmp_path, origin_dir, capacity_bytes=1000)
    for _ in range(1000):
        sup.on_message(message)
    assert victim.read_text() == "keep me"
    assert sup.policy.used_bytes == 0
    assert len(logged) == 1 and "ignored" in logged[0]  # said once, not a thousand times


def test_an_admitted_object_counts_its_size_on_disk(tmp_path: Path, origin_dir: Path) -> None:
    sup, logged = supervisor(tmp_path, origin_dir)
    (sup.cache.root / "t1").mkdir()
    (sup.cache.root / "t1" / "a.m4s").write_bytes(b"x" * 1234)
    sup.on_message(json.dumps({"admit": "t1/a.m4s", "size": 10**12}).encode())
    sup.on_message(json.dumps({"admit": "t1/not-there.m4s", "size": 5}).encode())
    sup.on_message(json.dumps({"hits": [["t1/a.m4s", 3]]}).encode())
    assert sup.policy.used_bytes == 1234
    assert sup.policy.keys() == ["t1/a.m4s"]
    assert logged == []


async def test_the_fill_takes_later_plans_after_any_failure(
    tmp_path: Path, tiny_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault in one title (here an OSError from pulling it) fails that title only; a fault
    in a whole plan fails that plan only: the next plan is filled."""
    sup, logged = supervisor(tmp_path, tiny_package.parent, fill_offpeak_load=1.0)
    pull = sup._pull

    async def broken_pull(key: str, rate_bps: float, status: object) -> None:
        if key.startswith("broken/"):
            raise OSError(5, "Input/output error")
        await pull(key, rate_bps, status)  # type: ignore[arg-type]

    monkeypatch.setattr(sup, "_pull", broken_pull)
    fill = sup._fill
    calls = 0

    async def fill_failing_once(plan: FillRequest) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected")
        await fill(plan)

    monkeypatch.setattr(sup, "_fill", fill_failing_once)
    task = asyncio.create_task(sup.fill_loop())
    try:
        await _plan(sup, ["tiny"])
        assert sup.fill_status.state == "failed"
        assert "injected" in sup.fill_status.errors[-1]
        await _plan(sup, ["broken", "tiny"])
        status = sup.fill_status
        assert status.state == "failed" and status.titles_done == ("tiny",)
        assert len(status.errors) == 1 and "Input/output" in status.errors[0]
        assert sup.held_titles == {"tiny"}
        assert len(logged) == 2  # each fault said once
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sup.origin.aclose()


async def _plan(sup: Supervisor, titles: list[str]) -> None:
    """Hand the supervisor a plan as /fill does, and wait until it finished with it."""
    sup.fill_status.state = "idle"
    (sup.run_dir / "fill-plan.json").write_bytes(
        msgspec.json.encode(FillRequest(titles=tuple(titles)))
    )
    sup.fill_wake.set()
    deadline = time.monotonic() + 60
    while sup.fill_status.state not in ("done", "failed"):
        assert time.monotonic() < deadline, sup.fill_status
        await asyncio.sleep(0.05)


def test_an_edge_starting_on_a_served_port_resets_none_of_its_connections(
    tmp_path: Path, origin_dir: Path
) -> None:
    """SO_REUSEPORT lets a new edge start beside the one serving a port (an upgrade without
    a gap). The new supervisor's check that the port is usable must not join the port's
    listeners: a connection the kernel handed to its check socket was reset when it closed."""
    for name in ("a", "b0", "b1"):
        (tmp_path / name).mkdir()
    first = start_edge(tmp_path / "a", origin_dir, workers=1)
    stop = threading.Event()
    answered: list[int] = []
    failures: list[str] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", first.port), timeout=10) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n")
                    head = sock.recv(12)
            except OSError as exc:
                failures.append(repr(exc))
                continue
            (answered if head == b"HTTP/1.1 200" else failures).append(head)  # type: ignore[arg-type]

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    others: list[Edge] = []
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        # several starts: each supervisor's check socket would be in the group for a moment
        for n in range(2):
            others.append(start_edge(tmp_path / f"b{n}", origin_dir, workers=2, port=first.port))
            deadline = time.monotonic() + 30
            while "serving" not in others[-1].log():
                assert time.monotonic() < deadline, others[-1].log()
                time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        for edge in [*others, first]:  # a draining edge resets what its queues hold
            edge.process.terminate()
        for edge in [*others, first]:
            edge.stop()
    assert len(answered) > 100
    assert failures == []
