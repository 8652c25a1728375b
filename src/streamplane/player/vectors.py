"""Shared test vectors for streamplane's ABR and the heartbeat cadence: state -> decision.

`vectors.json` next to this file holds hand-checked cases (the expected value worked out on
paper, with the reasoning in `why`) and a seeded set whose expected values are what the Python
implementation decides: ABR decisions and plan values, the player's recent-rate measurement
(`RecentRate`) and the heartbeat cadence. Both the Python tests and the JavaScript port
(`web/static/abr.js`, run by node in tests/player) must reproduce every one, so the two
implementations cannot drift.

After a deliberate change to the algorithm, regenerate and review the diff:

    .venv/bin/python -m streamplane.player.vectors
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from streamplane.player.abr import (
    PHASES,
    RECENT_WINDOW_S,
    AbrState,
    Download,
    Progress,
    RecentRate,
    RungInfo,
    StreamplaneParams,
    horizon_segments,
    plan_value,
    streamplane_abandon,
    streamplane_choose,
)
from streamplane.player.cadence import CadenceState, heartbeat_interval, next_heartbeat_s

VECTORS_PATH = Path(__file__).with_name("vectors.json")
SEED = 20240605

_LADDER = (RungInfo(500.0), RungInfo(1000.0), RungInfo(2000.0))


def _s(**kw: Any) -> AbrState:
    base: dict[str, Any] = {
        "buffer_s": 0.0,
        "max_buffer_s": 30.0,
        "segment_s": 4.0,
        "rungs": _LADDER,
        "next_segment": 0,
    }
    base.update(kw)
    return AbrState(**base)


def _nominal(rates: tuple[float, ...], n: int, seg_s: float = 4.0) -> tuple[RungInfo, ...]:
    return tuple(RungInfo(r, (int(r * 1000 * seg_s),) * n) for r in rates)


def _hand_abr() -> list[tuple[str, str, AbrState, Progress | None, int | None]]:
    """(why, call, state, progress, expected). 4 s segments, 30 s buffer: the plan aims to end at
    20 s (2/3 of it), ending short by x costs x^2 / 20; a planned switch costs 2 x its change
    in Mbps; a second of stall 4.3. Plans are (rung of the next segment, rung of the rest)."""
    flat = tuple(
        RungInfo(r.bitrate_kbps, (int(r.bitrate_kbps * 4000),) * 5, (v,) * 5)
        for r, v in zip(_LADDER, (80.0, 90.0, 90.3), strict=True)
    )
    two = (1000.0, 2000.0)
    big = (
        RungInfo(1000.0, (4_000_000,) * 3),
        RungInfo(2000.0, (8_000_000, 40_000_000, 40_000_000)),
    )
    at_2m = (Download(4_000_000, 2.0),)  # 2 Mbps
    at_4m = (Download(8_000_000, 2.0),)  # 4 Mbps
    three = (4.0, 4.0, 4.0)
    inflight = Progress(rung=2, bits_done=1_000_000, bits_total=8_000_000, elapsed_s=2.0)
    # the drop model's cases: three 4 s segments at nominal sizes (2, 4, 8 Mb), the second in
    # flight, the last finished request at 2 Mbps (so the link returns to 2 Mbps after 12 s)
    sized = _nominal((500.0, 1000.0, 2000.0), 3)
    was_2m = (Download(8_000_000, 4.0),)
    second_of_three = _s(
        buffer_s=6.0,
        last_rung=2,
        rungs=sized,
        segment_durations_s=three,
        next_segment=1,
        downloads=was_2m,
    )
    collapsed = Progress(2, 4_000_000, 8_000_000, 2.0, recent_bits=400_000, recent_s=1.0)
    steady_slow = Progress(2, 800_000, 8_000_000, 2.0, recent_bits=400_000, recent_s=1.0)
    return [
        (
            "startup without a throughput sample: lowest rung",
            "choose",
            _s(phase="startup"),
            None,
            0,
        ),
        (
            "startup at 4000 kbps: x0.9 = 3.6 Mbps; 4 Mb (rung 1) takes 1.11 s <= half a "
            "segment, 8 Mb (rung 2) 2.22 s > 2 s",
            "choose",
            _s(phase="startup", downloads=(Download(8_000_000, 2.0),)),
            None,
            1,
        ),
        (
            "seek after a wait: 4 Mb in 4 s (1 Mbps) ending at 10 s, then 4 Mb in 0.5 s "
            "(8 Mbps) ending at 20 s. On the session clock the second sample stands for the "
            "10 s since the first: fast EWMA 7564, slow 6773 kbps, x0.9 = 6.1 Mbps, 8 Mb "
            "(rung 2) in 1.31 s <= 2 s. On download time it would stand for 0.5 s: min(2181, "
            "1919) x 0.9 = 1.73 Mbps, rung 0",
            "choose",
            _s(
                phase="seek",
                downloads=(Download(4_000_000, 4.0, 10.0), Download(4_000_000, 0.5, 20.0)),
            ),
            None,
            2,
        ),
        (
            "steady without a throughput sample: lowest rung",
            "choose",
            _s(buffer_s=26.0, last_rung=1),
            None,
            0,
        ),
        (
            "ladder 1 and 2 Mbps, 2 segments left, 2 Mbps, buffer 10 s, from rung 0: (0,0) "
            "ends at 14 s: 2 - 36/20 = 0.2; (0,1) 12 s: 3 - 2 - 64/20 = -2.2; (1,0) 12 s: "
            "3 - 4 - 3.2 = -4.2; (1,1) 10 s: 4 - 2 - 5 = -3: stay at 0",
            "choose",
            _s(
                buffer_s=10.0,
                last_rung=0,
                rungs=_nominal(two, 2),
                segment_durations_s=(4.0, 4.0),
                downloads=at_2m,
            ),
            None,
            0,
        ),
        (
            "ladder 1 and 2 Mbps, 3 segments left, 4 Mbps, buffer 26 s (full: 30 - 4), from "
            "rung 0: (0,0) stays full: 3; (1,1) ends at 28 s: 6 - 2 = 4; (0,1): 5 - 2 = 3: "
            "step up",
            "choose",
            _s(
                buffer_s=26.0,
                last_rung=0,
                rungs=_nominal(two, 3),
                segment_durations_s=three,
                downloads=at_4m,
            ),
            None,
            1,
        ),
        (
            "the same, but rung 1's next two segments are 40 Mb (10 s each at 4 Mbps): (1,1) "
            "ends at 14 s: 6 - 2 - 36/20 = 2.2 < (0,0)'s 3: the real sizes keep it at 0",
            "choose",
            _s(
                buffer_s=26.0,
                last_rung=0,
                rungs=big,
                segment_durations_s=three,
                downloads=at_4m,
            ),
            None,
            0,
        ),
        (
            "ladder 1 and 2 Mbps, 2 segments, 2 Mbps, buffer 3 s, from rung 1: (1,1) stalls 1 s: "
            "4 - 4.3 - 256/20 = -13.1; (0,0) ends at 7 s: 2 - 2 - 169/20 = -8.45: step down",
            "choose",
            _s(
                buffer_s=3.0,
                last_rung=1,
                rungs=_nominal(two, 2),
                segment_durations_s=(4.0, 4.0),
                downloads=at_2m,
            ),
            None,
            0,
        ),
        (
            "VMAF trim: at 16 Mbps with a full buffer the plan takes rung 2, but rung 2 adds "
            "0.3 VMAF over rung 1 (< 0.5)",
            "choose",
            _s(
                buffer_s=26.0,
                last_rung=1,
                rungs=flat,
                segment_durations_s=(4.0,) * 5,
                downloads=(Download(16_000_000, 1.0),),
            ),
            None,
            1,
        ),
        (
            "abandon: 0.5 Mbps in flight (no recent rate, nothing measured before: 0.5 Mbps "
            "throughout), 7 Mb left = 14 s with 5 s of buffer. Over five segments, rest at one "
            "rung: finish, then rung 0 (4 s a segment, buffer held at 4 s): 2 - 4.3 x 9 + 2 - "
            "2 x 1.5 - 16^2/20 = -50.5; restart at rung 0 (4 s, buffer 5 s): 0.5 - 2 x 1.5 + 2 "
            "- 15^2/20 = -11.75; at rung 1 (8 s): 1 - 4.3 x 3 - 2 + 2 - 1 - 12.8 = -25.7: rung 0",
            "should_abandon",
            _s(buffer_s=5.0, last_rung=2),
            inflight,
            0,
        ),
        (
            "no abandon: 20 s of buffer covers the 14 s left",
            "should_abandon",
            _s(buffer_s=20.0, last_rung=2),
            inflight,
            None,
        ),
        (
            "collapse: 4 of 8 Mb in 2 s (2 Mbps) but 0.4 Mb in the last second. On the average "
            "the 4 Mb left take 2 s of the 6 s buffered; at 0.4 Mbps (for up to 12 s) 10 s. "
            "Two segments left: finish (stall 4 s, buffer 4 s), then rung 0 (2 s at 0.4 Mbps, "
            "2 Mb at 2 Mbps: 2.6 s): 2 - 17.2 + 0.5 - 3 - 14.6^2/20 = -28.36 (rung 1 -28.37); "
            "restart at rung 0 (5 s, buffer 5 s), then rung 0 (5 s): 0.5 - 3 + 0.5 - 12.8 = "
            "-14.8; rung 1 in 10 s stalls 4 s too: rung 0",
            "should_abandon",
            second_of_three,
            collapsed,
            0,
        ),
        (
            "the same request without the collapse (the last second at its 2 Mbps average): "
            "2 s left, 4 s of buffer to spare: finish",
            "should_abandon",
            second_of_three,
            Progress(2, 4_000_000, 8_000_000, 2.0, recent_bits=2_000_000, recent_s=1.0),
            None,
        ),
        (
            "slow but steady: 0.4 Mbps from the start, 7.2 Mb left; 4.8 Mb in 12 s at 0.4 Mbps, "
            "2.4 Mb at 2 Mbps after: 13.2 s, 0.8 s of the 14 s buffered to spare: finish (at "
            "its own average it would take 18 s)",
            "should_abandon",
            _s(buffer_s=14.0, last_rung=2, downloads=was_2m),
            steady_slow,
            None,
        ),
        (
            "a long drop: 0.25 Mbps for all of its 14 s (3.5 of 8 Mb) where the link carried 2 "
            "Mbps: taken to last 14 s more. Finish: 14.5 s, stall 0.5 s, then the last segment "
            "at rung 1: 2 - 2.15 + 1 - 2 - 14^2/20 = -10.95; restart at rung 0: 8 s, then rung 0 "
            "in 6.25 s: 0.5 - 3 + 0.5 - 12.25^2/20 = -9.50, 1.45 better: rung 0 (with a 12 s "
            "hold it would finish: -6.88 against -7.51)",
            "should_abandon",
            msgspec.structs.replace(second_of_three, buffer_s=14.0),
            Progress(2, 3_500_000, 8_000_000, 14.0, recent_bits=250_000, recent_s=1.0),
            0,
        ),
        (
            "no abandon before 1 s of download",
            "should_abandon",
            _s(buffer_s=5.0, last_rung=2),
            Progress(rung=2, bits_done=250_000, bits_total=8_000_000, elapsed_s=0.5),
            None,
        ),
    ]


def _hand_plans() -> list[tuple[str, AbrState, tuple[int, ...], float, float]]:
    """(why, state, plan, kbps, value) for `plan_value`: ladder 1 and 2 Mbps, 2 segments of 4 s
    whose real sizes are 4 and 3 Mb at rung 0, 8 and 10 Mb at rung 1; 30 s buffer, target 20 s."""
    rungs = (RungInfo(1000.0, (4_000_000, 3_000_000)), RungInfo(2000.0, (8_000_000, 10_000_000)))
    s = _s(buffer_s=10.0, last_rung=0, rungs=rungs, segment_durations_s=(4.0, 4.0))
    low = _s(buffer_s=1.0, last_rung=0, rungs=rungs, segment_durations_s=(4.0, 4.0))
    return [
        ("(0,0) at 2 Mbps: 10 -> 12 -> 14.5 s; 1 + 1 - 5.5^2/20", s, (0, 0), 2000.0, 0.4875),
        ("(0,1): 12 -> 11 s; 1 + 2 - 2 x 1 - 9^2/20", s, (0, 1), 2000.0, -3.05),
        ("(1,0): 10 -> 12.5 s; 2 - 2 + 1 - 2 - 7.5^2/20", s, (1, 0), 2000.0, -3.8125),
        ("(1,1): 10 -> 9 s; 2 - 2 + 2 - 11^2/20", s, (1, 1), 2000.0, -4.05),
        (
            "(0,0) at 1 Mbps from 1 s: stall 3 s, 4 -> 5 s; 1 - 12.9 + 1 - 15^2/20",
            low,
            (0, 0),
            1000.0,
            -22.15,
        ),
    ]


def _hand_recent() -> list[tuple[str, list[tuple[str, float, int]], list[tuple[int, float]]]]:
    """(why, calls (key, elapsed_s, bits_done), answers (recent_bits, recent_s)) for a
    `RecentRate` with a 1 s window."""
    return [
        (
            "ticks of 0.25 s: the whole request until it is 1 s old, then the last second; a "
            "new key, then a clock that went back, start again",
            [
                ("a", 0.25, 100),
                ("a", 0.5, 200),
                ("a", 1.0, 400),
                ("a", 1.25, 420),
                ("a", 1.5, 440),
                ("b", 0.25, 50),
                ("b", 0.1, 10),
            ],
            [(100, 0.25), (200, 0.5), (400, 1.0), (320, 1.0), (240, 1.0), (50, 0.25), (10, 0.1)],
        ),
    ]


def _seeded_recent(rng: np.random.Generator) -> list[tuple[str, float, int]]:
    calls: list[tuple[str, float, int]] = []
    key, t, bits = "k0", 0.0, 0
    for _ in range(int(rng.integers(4, 16))):
        u = rng.random()
        if u < 0.1:
            key, t, bits = f"k{int(rng.integers(0, 3))}", 0.0, 0
        elif u < 0.15:
            t, bits = t / 2, bits // 2
        t = round(t + float(rng.uniform(0.05, 0.6)), 3)
        bits += int(rng.uniform(0, 2e6))
        calls.append((key, t, bits))
    return calls


def _hand_cadence() -> list[tuple[str, CadenceState, float, float]]:
    """(why, state, interval, next heartbeat)."""
    return [
        ("startup: every second", CadenceState(10.5, "startup", None, 10.0), 1.0, 11.0),
        ("rebuffering: every second", CadenceState(300.0, "rebuffering", 10.0, 299.5), 1.0, 300.5),
        ("5 s after an event: 2 s", CadenceState(105.0, "steady", 100.0, 104.0), 2.0, 106.0),
        ("60 s after an event: 30 s", CadenceState(60.0, "steady", 0.0, 40.0), 30.0, 70.0),
        ("500 s of calm: capped at 60 s", CadenceState(500.0, "steady", 0.0, 450.0), 60.0, 510.0),
        ("no event yet counts from 0: 15 s", CadenceState(30.0, "steady", None, 20.0), 15.0, 35.0),
        (
            "a switch after a quiet minute: due at once (150 + 2 <= 200)",
            CadenceState(200.0, "steady", 195.0, 150.0),
            2.0,
            152.0,
        ),
        ("none sent yet: due now", CadenceState(3.0, "steady", 0.0, None), 2.0, 3.0),
        (
            "the control plane's floor holds even while starting",
            CadenceState(10.5, "startup", None, 10.0, min_interval_s=45.0),
            45.0,
            55.0,
        ),
        (
            "a 429 said not before 40: not before 40",
            CadenceState(30.0, "steady", 28.0, 29.0, not_before_s=40.0),
            2.0,
            40.0,
        ),
        (
            "a Retry-After already past changes nothing",
            CadenceState(30.0, "steady", 28.0, 29.0, not_before_s=20.0),
            2.0,
            31.0,
        ),
    ]


def _random_state(rng: np.random.Generator) -> AbrState:
    n_rungs = int(rng.integers(1, 7))
    rates = np.cumprod(rng.uniform(1.4, 2.2, n_rungs)) * float(rng.uniform(80, 400))
    n_seg = int(rng.integers(3, 13))
    seg_s = float(rng.choice([2.0, 4.0, 6.0]))
    durations = (
        tuple(round(float(x), 3) for x in rng.uniform(0.5, 1.0, n_seg) * seg_s)
        if rng.random() < 0.5
        else ()
    )
    sizes_known = rng.random() < 0.7
    vmaf_known = rng.random() < 0.5
    base_q = np.sort(rng.uniform(30, 99, n_rungs))
    rungs = []
    for k, rate in enumerate(rates):
        sizes: tuple[int, ...] = ()
        if sizes_known:
            d = durations or (seg_s,) * n_seg
            sizes = tuple(int(rate * 1000 * dk * float(rng.lognormal(0, 0.35))) + 1 for dk in d)
        vmafs: tuple[float, ...] = ()
        if vmaf_known:
            vmafs = tuple(
                round(min(100.0, float(base_q[k] + k * rng.uniform(0, 1.5))), 2)
                for _ in range(n_seg)
            )
        rungs.append(RungInfo(round(float(rate), 1), sizes, vmafs))
    max_buffer = float(rng.choice([10.0, 20.0, 30.0, 60.0]))
    max_buffer = max(max_buffer, 2 * seg_s)
    downloads = tuple(
        Download(int(rng.uniform(5e4, 2e7)), round(float(rng.uniform(0.05, 8.0)), 3))
        for _ in range(int(rng.integers(0, 9)))
    )
    if rng.random() < 0.7:  # the session clock at each last byte: waits between some requests
        ends, clock = [], float(rng.uniform(0, 5))
        for dl in downloads:
            clock += dl.seconds + (float(rng.uniform(0, 6)) if rng.random() < 0.5 else 0.0)
            ends.append(round(clock, 3))
        downloads = tuple(
            Download(dl.bits, dl.seconds, e) for dl, e in zip(downloads, ends, strict=True)
        )
    return AbrState(
        buffer_s=round(float(rng.uniform(0, max_buffer - seg_s)), 3),
        max_buffer_s=max_buffer,
        segment_s=seg_s,
        rungs=tuple(rungs),
        next_segment=int(rng.integers(0, n_seg)),
        last_rung=None if rng.random() < 0.15 else int(rng.integers(0, n_rungs)),
        phase=PHASES[int(rng.integers(0, 4))] if rng.random() < 0.5 else "steady",
        downloads=downloads,
        now_s=round(float(rng.uniform(0, 600)), 3),
        segment_durations_s=durations,
    )


def _to_builtins(x: object) -> Any:
    return msgspec.to_builtins(x)


def build_vectors(
    seed: int = SEED, n_choose: int = 240, n_abandon: int = 120, n_plans: int = 80
) -> dict[str, Any]:
    """All vectors as JSON-ready data (seeded expectations computed by the Python side)."""
    abr: list[dict[str, Any]] = []
    for why, call, state, progress, expected in _hand_abr():
        abr.append(
            {
                "source": "hand",
                "why": why,
                "call": call,
                "state": _to_builtins(state),
                "progress": None if progress is None else _to_builtins(progress),
                "expected": expected,
            }
        )
    for why, state, plan, kbps, value in _hand_plans():
        abr.append(
            {
                "source": "hand",
                "why": why,
                "call": "plan_value",
                "state": _to_builtins(state),
                "plan": list(plan),
                "kbps": kbps,
                "expected": value,
            }
        )
    rng = np.random.default_rng(seed)
    for _ in range(n_choose):
        state = _random_state(rng)
        abr.append(
            {
                "source": "seeded",
                "call": "choose",
                "state": _to_builtins(state),
                "progress": None,
                "expected": streamplane_choose(state),
            }
        )
    # the recent rate of each abandonment case from a stream of its own: adding it moved no
    # other seeded case
    recent = np.random.default_rng(seed + 2)
    for _ in range(n_abandon):
        state = _random_state(rng)
        rung = int(rng.integers(0, len(state.rungs)))
        total = int(rng.uniform(1e5, 2e7))
        done = int(total * float(rng.uniform(0, 0.95)))
        elapsed = round(float(rng.uniform(0, 12)), 3)
        recent_bits, recent_s = 0, 0.0
        if elapsed > 0 and recent.random() < 0.8:  # else: not measured
            recent_s = round(min(elapsed, float(recent.uniform(0.9, 1.2))), 3)
            rate = done / elapsed * float(recent.lognormal(-0.7, 1.0))
            recent_bits = min(done, int(rate * recent_s))
        progress = Progress(
            rung=rung,
            bits_done=done,
            bits_total=total,
            elapsed_s=elapsed,
            recent_bits=recent_bits,
            recent_s=recent_s,
        )
        abr.append(
            {
                "source": "seeded",
                "call": "should_abandon",
                "state": _to_builtins(state),
                "progress": _to_builtins(progress),
                "expected": streamplane_abandon(state, progress),
            }
        )
    # plan values from a stream of their own, so adding them moved no other seeded case
    plans = np.random.default_rng(seed + 1)
    for _ in range(n_plans):
        state = _random_state(plans)
        n = len(horizon_segments(state, StreamplaneParams().horizon))
        seq = [int(x) for x in plans.integers(0, len(state.rungs), n)]
        kbps = round(float(plans.uniform(50, 20000)), 1)
        abr.append(
            {
                "source": "seeded",
                "call": "plan_value",
                "state": _to_builtins(state),
                "plan": seq,
                "kbps": kbps,
                "expected": plan_value(state, seq, kbps),
            }
        )
    recent_cases: list[dict[str, Any]] = [
        {"source": "hand", "why": why, "window_s": RECENT_WINDOW_S, "calls": calls, "expected": out}
        for why, calls, out in _hand_recent()
    ]
    streams = np.random.default_rng(seed + 3)
    for _ in range(20):
        calls = _seeded_recent(streams)
        tracker = RecentRate()
        recent_cases.append(
            {
                "source": "seeded",
                "window_s": RECENT_WINDOW_S,
                "calls": calls,
                "expected": [tracker.sample(k, t, b) for k, t, b in calls],
            }
        )
    cadence: list[dict[str, Any]] = [
        {
            "source": "hand",
            "why": why,
            "state": _to_builtins(state),
            "interval": interval,
            "next": nxt,
        }
        for why, state, interval, nxt in _hand_cadence()
    ]
    for _ in range(100):
        now = round(float(rng.uniform(0, 900)), 3)
        ev = None if rng.random() < 0.2 else round(now - float(rng.exponential(40)), 3)
        hb = None if rng.random() < 0.1 else round(now - float(rng.uniform(0, 70)), 3)
        phase = PHASES[int(rng.integers(0, 4))] if rng.random() < 0.4 else "steady"
        cs = CadenceState(now, phase, ev, hb)
        cadence.append(
            {
                "source": "seeded",
                "state": _to_builtins(cs),
                "interval": heartbeat_interval(cs),
                "next": next_heartbeat_s(cs),
            }
        )
    return {
        "seed": seed,
        "abr": abr,
        "recent": recent_cases,
        "cadence": cadence,
    }


def write_vectors(path: Path = VECTORS_PATH) -> Path:
    """One vector per line, so a change to the algorithm reads as a diff of the cases it moved."""
    data = build_vectors()
    compact = {"separators": (",", ":")}
    lines = [f'{{"seed":{data["seed"]},', '"abr":[']
    lines += [json.dumps(c, **compact) + "," for c in data["abr"]]  # type: ignore[arg-type]
    lines[-1] = lines[-1].rstrip(",")
    lines.append('],"recent":[')
    lines += [json.dumps(c, **compact) + "," for c in data["recent"]]  # type: ignore[arg-type]
    lines[-1] = lines[-1].rstrip(",")
    lines.append('],"cadence":[')
    lines += [json.dumps(c, **compact) + "," for c in data["cadence"]]  # type: ignore[arg-type]
    lines[-1] = lines[-1].rstrip(",")
    lines.append("]}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_vectors(path: Path = VECTORS_PATH) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


if __name__ == "__main__":
    print(write_vectors())
