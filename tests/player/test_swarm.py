"""Headless viewers: the pure bookkeeping on hand-computed cases, then a swarm of 200 viewers
and a failover against a real control plane and real edges (LocalStack)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from streamplane.cli import app
from streamplane.player import (
    Ledger,
    Period,
    Playout,
    SwarmConfig,
    SwarmError,
    SwarmStatus,
    Trace,
    TraceBucket,
    percentile,
    run_swarm,
    summarise,
)
from streamplane.player.headless import (
    SegmentRecord,
    audio_plan,
    heartbeat_event,
    parse_edge_metrics,
    viewer_result,
)
from streamplane.player.swarm import encode_report, load_traces, report_tables
from streamplane.stack import LocalStack, free_port

# --- the play-out clock ------------------------------------------------------------------------


def test_startup_waits_for_the_first_segment_and_counts_from_the_session_start() -> None:
    p = Playout(max_buffer_s=30, startup_buffer_s=3)
    p.advance(0.4)  # the control plane and title.json took 0.4 s: nothing plays yet
    assert (p.phase, p.buffer_s, p.startup_s) == ("startup", 0.0, None)
    p.arrived(0.9, 3.0)
    assert (p.phase, p.buffer_s, p.startup_s) == ("steady", 3.0, 0.9)
    p.advance(2.4)
    assert p.buffer_s == pytest.approx(1.5)
    assert p.played_s == pytest.approx(1.5)
    assert p.position_s == pytest.approx(1.5)


def test_startup_needs_the_whole_startup_buffer() -> None:
    p = Playout(max_buffer_s=30, startup_buffer_s=4)
    p.arrived(1.0, 2.0)
    assert p.phase == "startup"
    p.advance(5.0)  # not playing: the buffer does not drain, no stall
    assert (p.buffer_s, p.rebuffer_s) == (2.0, 0.0)
    p.arrived(6.0, 2.0)
    assert (p.phase, p.startup_s) == ("steady", 6.0)


def test_a_stall_is_one_event_lasting_until_the_next_segment() -> None:
    p = Playout(max_buffer_s=30, startup_buffer_s=2)
    p.arrived(1.0, 2.0)  # plays from t = 1 with 2 s buffered
    p.advance(4.0)  # dry at t = 3: 1 s stalled
    assert (p.phase, p.buffer_s, p.rebuffer_s, p.rebuffer_events) == ("rebuffering", 0, 1.0, 1)
    p.advance(5.5)
    assert (p.rebuffer_s, p.rebuffer_events) == (2.5, 1)
    p.arrived(6.0, 2.0)  # 3 s stalled in all; playing again
    assert (p.phase, p.buffer_s, p.rebuffer_s, p.rebuffer_events) == ("steady", 2.0, 3.0, 1)
    assert p.played_s == pytest.approx(2.0)
    p.advance(9.0)  # the second stall is a second event
    assert (p.rebuffer_s, p.rebuffer_events) == (4.0, 2)
    r = viewer_result(0, p, Ledger(), session_id="s", error=None)
    assert r.rebuffer_ratio == pytest.approx(4.0 / (4.0 + 4.0))
    assert (r.media_s, r.session_s, r.startup_s) == (4.0, 9.0, 1.0)


def test_a_full_buffer_waits_and_starts_playback() -> None:
    p = Playout(max_buffer_s=10, startup_buffer_s=12 / 2)
    p.arrived(0.0, 4.0)
    p.arrived(0.0, 4.0)  # 8 s buffered: playback starts at 6 s (startup buffer)
    assert p.phase == "steady"
    assert p.make_room(4.0) == pytest.approx(2.0)  # 8 + 4 - 10
    q = Playout(max_buffer_s=10, startup_buffer_s=10)
    q.arrived(0.0, 4.0)
    q.arrived(0.5, 4.0)
    assert q.phase == "startup"
    assert q.make_room(4.0) == pytest.approx(2.0)  # will not fit: playback begins now
    assert (q.phase, q.startup_s) == ("steady", 0.5)
    assert q.make_room(2.0) == 0.0


def test_the_end_of_the_stream_is_not_a_stall() -> None:
    p = Playout(max_buffer_s=30, startup_buffer_s=3, position_s=60.0)
    p.arrived(0.5, 3.0)
    p.arrived(1.0, 3.0)
    assert p.finish(2.0) == pytest.approx(2.0 + 4.5)
    p.advance(7.25)  # woke late: the buffer ran dry at 6.5, which is the end
    assert (p.rebuffer_s, p.rebuffer_events, p.ended) == (0.0, 0, True)
    assert p.position_s == pytest.approx(66.0)


def test_finish_starts_a_stream_shorter_than_the_startup_buffer() -> None:
    p = Playout(max_buffer_s=30, startup_buffer_s=5)
    p.arrived(1.0, 2.0)
    assert p.finish(1.5) == pytest.approx(3.5)
    assert p.startup_s == 1.5


# --- the throttle ------------------------------------------------------------------------------

TWO = Trace("two", (Period(1.0, 1000.0, 50.0), Period(1.0, 3000.0, 100.0)))  # kbps, ms


def test_bucket_follows_the_trace_and_loops() -> None:
    b = TraceBucket(TWO, burst_bits=0)
    assert b.delivered(1.0) == pytest.approx(1e6)
    assert b.delivered(2.0) == pytest.approx(4e6)
    assert b.delivered(2.5) == pytest.approx(4.5e6)  # looped into the first period
    assert b.take(0.0, 5e5) == pytest.approx(0.5)
    # 0.5 s left at 1 Mbps (500 kbit), then 500 kbit at 3 Mbps: 1/6 s
    assert b.take(0.5, 1e6) == pytest.approx(1.0 + 1 / 6)
    # asked for at 1.0 but the link is busy until 1 1/6: queued behind, 1/6 s at 3 Mbps
    assert b.take(1.0, 0.5e6) == pytest.approx(1.0 + 2 / 6)
    # 4 Mbit is one whole loop, from wherever it starts: 2 s
    assert b.take(2.0, 4e6) == pytest.approx(4.0)
    assert (b.latency_s(0.2), b.latency_s(1.2), b.latency_s(2.2)) == (0.05, 0.1, 0.05)


def test_bucket_lets_a_burst_through_after_idling() -> None:
    b = TraceBucket(TWO, burst_bits=2e5)
    assert b.take(0.0, 2e5) == 0.0  # starts full
    assert b.take(0.0, 1e5) == pytest.approx(0.1)
    assert b.take(0.9, 2e5) == pytest.approx(0.9)  # refilled to the cap while idle
    assert b.take(0.9, 1e5) == pytest.approx(1.0)


def test_bucket_skips_dead_periods() -> None:
    dead = Trace("dead", (Period(1.0, 1000.0), Period(2.0, 0.0)))
    b = TraceBucket(dead, burst_bits=0)
    assert b.take(0.0, 1.5e6) == pytest.approx(3.5)  # 1 Mbit, 2 s of nothing, 0.5 Mbit
    with pytest.raises(ValueError, match="delivers nothing"):
        TraceBucket(Trace("none", (Period(1.0, 0.0),)))


# --- the rest of the bookkeeping ---------------------------------------------------------------


def test_audio_plan_fetches_audio_due_before_each_video_segment() -> None:
    # audio cut near 4 s, as titles packaged before audio followed the video's segments
    assert audio_plan([3, 5, 9, 12], [0, 4.011, 8.021]) == [(0,), (1,), (2,), ()]
    assert audio_plan([2, 4], [0, 1, 2, 3, 4.5]) == [(0, 1), (2, 3, 4)]


def _seg(rung: int, edge: str = "edge-1", vmaf: float | None = 80.0) -> SegmentRecord:
    return SegmentRecord(0, rung, 100.0 * (rung + 1), 1000, vmaf, 0.5, edge, 0)


def test_ledger_counts_switches_bytes_per_edge_and_builds_heartbeats() -> None:
    led = Ledger()
    assert not led.segment(_seg(0))
    assert not led.segment(_seg(0))
    assert led.segment(_seg(2))
    assert led.switches == 1
    led.request("edge-1", 1000)
    led.request("edge-1", 500)
    led.request("edge-2", 7)
    led.error("edge-1", "edge-1: ConnectError")
    led.failovers += 1
    assert (led.bytes, led.requests, led.last_rung) == (1507, 3, 2)
    assert led.last_throughput_kbps == pytest.approx(1000 * 8 / 0.5 / 1000)
    p = Playout(30, 2)
    p.arrived(1.0, 4.0)
    ev = heartbeat_event("bitrate", 1.8e9, p, led)
    assert ev["at"] == 1.8e9 and ev["kind"] == "bitrate" and ev["position_s"] == 0.0
    assert (ev["rung"], ev["bitrate_kbps"], ev["buffer_s"]) == (2, 300.0, 4.0)
    assert (ev["errors"], ev["failovers"], ev["edge"], ev["startup_s"]) == (1, 1, "edge-1", 1.0)
    json.dumps(ev, allow_nan=False)  # the control plane takes strict JSON
    led.last_throughput_kbps = math.inf
    assert heartbeat_event("position", 1.0, p, led)["throughput_kbps"] is None


def test_percentile_interpolates_between_ranks() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert (percentile(xs, 0), percentile(xs, 100)) == (1.0, 4.0)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_summary_takes_qoe_over_finished_viewers_and_counts_failures() -> None:
    results = []
    for k, startup in enumerate((1.0, 2.0, 3.0)):
        p = Playout(30, 2)
        p.arrived(startup, 4.0)
        p.advance(startup + 4.0 + k)  # viewer k stalls k seconds
        led = Ledger()
        led.segment(_seg(k % 2))
        results.append(viewer_result(k, p, led, session_id=f"s{k}", error=None))
    results.append(
        viewer_result(3, Playout(30, 2), Ledger(), session_id=None, error="playback refused\nx")
    )
    s = summarise(results)
    assert (s.viewers, s.finished, s.failed, s.failures) == (4, 3, 1, {"playback refused": 1})
    assert (s.startup_s.count, s.startup_s.p50, s.startup_s.mean) == (3, 2.0, 2.0)
    assert s.rebuffer_ratio.p50 == pytest.approx(1 / 5)
    assert s.avg_bitrate_kbps.mean == pytest.approx(400 / 3)
    assert (s.rebuffer_events, s.viewers_rebuffered) == (2, 2)


def test_edge_metrics_are_read_from_prometheus_text() -> None:
    text = (
        "# HELP streamplane_edge_requests_total Responses sent, by status code.\n"
        "# TYPE streamplane_edge_requests_total counter\n"
        'streamplane_edge_requests_total{code="200"} 1200\n'
        'streamplane_edge_requests_total{code="403"} 3\n'
        "streamplane_edge_bytes_sent_total 5.5e+07\n"
        "streamplane_edge_origin_bytes_total 9\n"
    )
    assert parse_edge_metrics(text) == (55_000_000, 1203)


def test_trace_sets_one_per_viewer() -> None:
    mixed = load_traces("mixed", 5, seed=3)
    assert [t.name.split("-")[0] for t in mixed] == ["3g", "lte", "broadband", "3g", "lte"]
    assert len({t.name for t in mixed}) == 5
    with pytest.raises(SwarmError, match="neither a kind"):
        load_traces("5g", 2, seed=0)


# --- against a real stack ----------------------------------------------------------------------


def _started(tiny_package: Path, work: Path) -> LocalStack:
    # cheap password hashing: 50 sign-ups are not what is measured
    cheap = {"password_time_cost": 1, "password_memory_kib": 8192}
    s = LocalStack(tiny_package.parent, work, edges=2, control_settings=cheap)
    s.__enter__()
    try:
        s.fill([tiny_package.name])
    except BaseException:
        s.stop()
        raise
    return s


@pytest.fixture(scope="module")
def stack(tiny_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Shared by the tests below; the last of them kills its first edge."""
    s = _started(tiny_package, tmp_path_factory.mktemp("stack"))
    yield s
    s.stop()


def _control_db(stack: LocalStack) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{stack.work / 'control.db'}?mode=ro", uri=True)


async def test_a_swarm_of_200_viewers(stack: LocalStack, tiny_package: Path) -> None:
    config = SwarmConfig(
        control_url=stack.control_url,
        title=tiny_package.name,
        viewers=200,
        ramp_s=3.0,
        speed=8.0,
        sources=("127.0.0.1", "127.1.0.1"),  # two client networks: steering splits them
        account_concurrency=8,
    )
    seen: list[SwarmStatus] = []
    report = await asyncio.wait_for(
        run_swarm(config, seen.append, admin_token=stack.admin_token), 120
    )
    s = report.summary
    problems = {r.viewer: r.error for r in report.viewers if not r.ok}
    assert (s.finished, s.failed, s.failovers) == (200, 0, 0), problems
    assert not any(e != "control" for r in report.viewers for e in r.edge_errors)
    assert report.accounts == 50  # premium: 4 screens each
    assert all(r.segments == 4 and r.position_s == pytest.approx(12.0) for r in report.viewers)
    assert s.startup_s.count == 200 and s.avg_vmaf.count == 200
    assert seen[-1].done == 200

    edges = {e.edge_id: e for e in report.edges}
    assert set(edges) == {"edge-1", "edge-2"}
    for e in edges.values():
        assert e.first_choice >= 80 and e.finished_on >= 80
        assert e.bytes > 0 and e.requests >= e.first_choice * 5
        # what the edge itself counted: at least the viewers' bytes (others may add some)
        assert e.metrics_bytes is not None and e.metrics_bytes >= e.bytes
        assert e.metrics_requests is not None and e.metrics_requests >= e.requests
    assert sum(e.bytes for e in edges.values()) == s.bytes

    # heartbeats reached the control plane: acknowledged, and recorded in its store
    assert all(r.heartbeats_ok >= 2 for r in report.viewers)  # at least the first and the stop
    assert all(r.acknowledged_position_s is not None for r in report.viewers)
    with _control_db(stack) as db:
        ended = db.execute(
            "SELECT count(*), sum(ended) FROM screens WHERE device LIKE 'swarm-%'"
        ).fetchone()
        positions = db.execute(
            "SELECT position_s FROM resume JOIN accounts ON accounts.id = resume.account_id"
            " WHERE accounts.email LIKE 'swarm-%'"
        ).fetchall()
    control = [m for r in report.viewers for m in r.error_log if "heartbeat" in m or "stop" in m]
    assert tuple(ended) == (200, 200), control  # every session started, and ended by its stop
    assert len(positions) == 50 and all(p == pytest.approx(12.0) for (p,) in positions)

    # The control plane's QoS aggregates of the run, from the same heartbeats: every viewer's
    # startup once, near the viewers' own figures (the sketch is within 1 %).
    assert report.qos_note is None, report.qos_note
    figures = {q.of: q for q in report.qos}
    title = figures[f"title {tiny_package.name}"]
    assert title.startups == 200 and title.errors == 0
    assert s.startup_s.p10 is not None and s.startup_s.p90 is not None
    assert title.startup_p50_s is not None
    assert 0.99 * s.startup_s.p10 <= title.startup_p50_s <= 1.01 * s.startup_s.p90
    assert {"edge edge-1", "edge edge-2"} <= set(figures)
    assert sum(figures[f"edge {e}"].startups for e in ("edge-1", "edge-2")) == 200

    text = "".join(str(t) for t in report_tables(report))
    assert text
    decoded = json.loads(encode_report(report))
    assert decoded["summary"]["finished"] == 200 and len(decoded["viewers"]) == 200


def test_cli_errors_name_the_problem() -> None:
    runner = CliRunner()
    dead = f"http://127.0.0.1:{free_port()}"
    base = ["swarm", "--viewers", "2", "--title", "tiny"]
    r = runner.invoke(app, [*base, "--control", dead])
    assert r.exit_code == 1 and "cannot reach the control plane" in r.output
    r = runner.invoke(app, [*base, "--control", dead, "--abr", "nope"])
    assert r.exit_code == 1 and "no ABR algorithm 'nope'" in r.output
    r = runner.invoke(app, [*base, "--control", dead, "--speed", "0"])
    assert r.exit_code == 1 and "speed must be a positive number" in r.output


def test_cli_runs_a_small_swarm(stack: LocalStack, tiny_package: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "swarm.json"
    args = ["swarm", "-n", "3", "--control", stack.control_url, "--speed", "8", "--json", str(out)]
    r = runner.invoke(app, [*args, "--title", "nope"])
    assert r.exit_code == 1 and "has no title 'nope'" in r.output
    r = runner.invoke(app, [*args, "--title", tiny_package.name, "--traces", "lte"])
    assert r.exit_code == 0, r.output
    assert "p99" in r.output and "edge-1" in r.output
    report = msgspec.json.decode(out.read_bytes())
    assert report["summary"]["finished"] == 3
    assert {v["trace"].split("-")[0] for v in report["viewers"]} == {"lte"}


async def test_viewers_fail_over_when_their_edge_is_killed(
    stack: LocalStack, tiny_package: Path
) -> None:
    """The last test of the file: it kills the shared stack's first edge."""
    config = SwarmConfig(
        control_url=stack.control_url,
        title=tiny_package.name,
        viewers=4,
        speed=6.0,
        duration_s=24.0,  # the title twice: 8 segments, 4 s of wall time
        max_buffer_s=8.0,  # so they keep fetching while the edge dies
    )
    first = stack.edges[0]
    killed = asyncio.Event()

    def watch(status: SwarmStatus) -> None:
        if status.playing == 4 and not killed.is_set():
            os.killpg(first.process.pid, signal.SIGKILL)  # the edge and its workers, at once
            killed.set()

    report = await asyncio.wait_for(run_swarm(config, watch, status_every_s=0.1), 60)
    first.stop()  # reap it
    assert killed.is_set()
    s = report.summary
    assert (s.finished, s.failed) == (4, 0), [r.error for r in report.viewers]
    for r in report.viewers:
        assert r.failovers == 1 and r.edge == "edge-2"
        assert r.edge_errors.get("edge-1", 0) >= 1 and r.edge_bytes["edge-2"] > 0
        assert r.segments == 8 and r.position_s == pytest.approx(24.0)
    edges = {e.edge_id: e for e in report.edges}
    assert edges["edge-1"].first_choice == 4 and edges["edge-2"].finished_on == 4
    assert edges["edge-1"].metrics_bytes is None and edges["edge-1"].metrics_note
    assert edges["edge-2"].metrics_bytes is not None and edges["edge-2"].metrics_bytes > 0
