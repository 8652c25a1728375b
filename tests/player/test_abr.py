"""Each algorithm on hand-computed cases (ladder 500/1000/2000 kbps, 4 s segments, 30 s buffer)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.player import (
    ALGORITHMS,
    AbrError,
    AbrState,
    Bba,
    Bola,
    BolaE,
    Download,
    Manifest,
    Period,
    Progress,
    RungInfo,
    Streamplane,
    StreamplaneParams,
    ThroughputRule,
    Trace,
    make_abr,
    mpc_choice,
    plan_value,
    simulate,
)
from streamplane.player.abr import (
    RecentRate,
    bola_params,
    checked_choice,
    drop_model,
    drop_time,
    ewma_kbps,
    fetch,
    harmonic_mean_kbps,
    horizon_segments,
    restart_value,
    shortfall_cost,
    streamplane_abandon,
    throughput_estimate_kbps,
)
from tests.player.conftest import state

# BBA with reservoir 25 % (7.5 s) and an upper reservoir of one segment (4 s): cushion 18.5 s,
# f(B) = 500 + (B - 7.5) / 18.5 x 1500 kbps.
F_875 = 7.5 + 18.5 * (375 / 1500)  # f = 875
F_1250 = 7.5 + 18.5 * (750 / 1500)  # f = 1250


@pytest.mark.parametrize(
    ("buffer_s", "last", "expected"),
    [
        (7.0, 2, 0),  # inside the reservoir: lowest, whatever came before
        (7.5, 1, 0),
        (26.0, 0, 2),  # reservoir + cushion reached: highest
        (F_1250, 1, 1),  # 500 < f < 2000 (Rate- and Rate+ of rung 1): stay
        (F_1250, 0, 1),  # f >= Rate+ = 1000: highest rate below f = 1000
        (F_1250, 2, 2),  # f > Rate- = 1000: stay at 2000 (hysteresis)
        (F_875, 2, 1),  # f <= Rate- = 1000: lowest rate above f = 1000
        (F_875, 0, 0),  # f < Rate+ = 1000: stay at 500 (hysteresis)
    ],
)
def test_bba_rate_map_and_hysteresis(buffer_s: float, last: int, expected: int) -> None:
    assert Bba(startup=False).choose(state(buffer_s=buffer_s, last_rung=last)) == expected


def test_bba1_chunk_map_reads_the_next_segments_real_size() -> None:
    # f = 1250 kbps x 4 s = 5 Mb allowed. Rung 2's next segment is small (4.4 Mb): BBA-1 takes
    # it where BBA-0 (on nominal rates, from rung 0) would stop at rung 1.
    sizes = ((2_000_000,), (4_000_000,), (4_400_000,))
    rungs = tuple(RungInfo(r, s) for r, s in zip((500.0, 1000.0, 2000.0), sizes, strict=True))
    s = state(buffer_s=F_1250, last_rung=1, rungs=rungs)
    assert Bba(startup=False).choose(s) == 1
    assert Bba(chunk_map=True, startup=False).choose(s) == 2


def test_bba_startup_ramps_faster_than_the_map_then_hands_over() -> None:
    bba = Bba()
    assert bba.choose(state()) == 0  # nothing measured yet
    # 4 s of video in 0.4 s: dB = 3.6 s > (0.875 - 0.375 x 4/26) x 4 = 3.27 s: one rung up,
    # though the map (4 s < reservoir) says 0.
    fast = state(buffer_s=4.0, last_rung=0, next_segment=1, downloads=(Download(2_000_000, 0.4),))
    assert bba.choose(fast) == 1
    # dB = 2 s: below the threshold, hold the startup rung.
    slow = state(buffer_s=6.0, last_rung=1, next_segment=2, downloads=(Download(4_000_000, 2.0),))
    assert bba.choose(slow) == 1
    # the buffer shrank (download 5 s > 4 s): startup ends, the map rules (f(6) -> rung 0).
    shrink = state(buffer_s=5.0, last_rung=1, next_segment=3, downloads=(Download(4_000_000, 5.0),))
    assert bba.choose(shrink) == 0
    assert bba.choose(fast) == 0  # and it does not come back without a seek
    assert bba.choose(state(buffer_s=0.0, phase="seek", last_rung=0, downloads=fast.downloads)) == 1


def test_bola_parameters_put_the_switch_points_at_minimum_and_target() -> None:
    p = bola_params([1000.0, 2000.0, 4000.0], minimum_s=10.0, target_s=26.0)
    assert p.utilities == pytest.approx((0.0, math.log(2), math.log(4)))
    assert p.v * (p.gamma_p - 1) == pytest.approx(10.0)
    assert p.v * (p.utilities[-1] + p.gamma_p - 1) == pytest.approx(26.0)


@pytest.mark.parametrize(("buffer_s", "expected"), [(10.0, 0), (18.0, 1), (26.0, 2)])
def test_bola_picks_the_best_utility_score(buffer_s: float, expected: int) -> None:
    # gamma_p = 1 + ln 4 / 1.6 = 1.866, V = 10 / 0.866 = 11.54. Scores (V(v+g) - B) / S:
    # B=10: 11.5/1000 > 19.5/2000 > 27.5/4000 -> 0; B=18: 3.5/1000 < 11.5/2000 > 19.5/4000 -> 1;
    # B=26: -4.5/1000 < 3.5/2000 < 11.5/4000 -> 2.
    rungs = (RungInfo(1000.0), RungInfo(2000.0), RungInfo(4000.0))
    assert Bola().choose(state(buffer_s=buffer_s, rungs=rungs)) == expected


def test_bola_e_starts_on_throughput_and_keeps_it_with_a_placeholder() -> None:
    bola = BolaE()
    measured = (Download(4_000_000, 1.0),)  # 4 Mbps x 0.9 sustains 2000 kbps
    assert bola.choose(state(buffer_s=4.0, last_rung=0, downloads=measured)) == 2  # startup
    # buffer 9 s > 2 segments: steady begins with a placeholder that makes BOLA choose rung 2
    # (plain BOLA at 9 s would say 0), insufficient-buffer cap 0.5 x 4000 x 9 / 4 = 4500 kbps.
    s = state(buffer_s=9.0, last_rung=2, downloads=measured, now_s=5.0)
    assert bola.choose(s) == 2
    assert Bola().choose(s) == 0
    assert bola.choose(state(buffer_s=9.0, last_rung=2, downloads=measured, now_s=6.0)) == 2


def test_bola_e_insufficient_buffer_rule_caps_the_rate() -> None:
    bola = BolaE()
    bola._startup = False
    # BOLA alone at 26 s picks 2000 kbps; 0.5 x 1000 kbps x 26 / 4 = 3250 allows it, but a
    # 300 kbps estimate allows 0.5 x 300 x 26 / 4 = 975: only rung 0.
    slow = (Download(300_000, 1.0),)
    assert bola.choose(state(buffer_s=26.0, last_rung=2, downloads=slow)) == 0


def test_bola_e_abandons_a_slow_request_for_a_cheaper_rung() -> None:
    bola = BolaE()
    bola._startup = False
    s = state(buffer_s=6.0, last_rung=2, next_segment=3)
    slow = Progress(rung=2, bits_done=400_000, bits_total=8_000_000, elapsed_s=2.0)
    fast = Progress(rung=2, bits_done=6_000_000, bits_total=8_000_000, elapsed_s=2.0)
    assert bola.should_abandon(s, slow) == 0
    assert bola.should_abandon(s, fast) is None  # 3 Mbps > 2 Mbps: it keeps up


def test_throughput_rule_uses_min_of_two_ewmas_with_safety() -> None:
    # two samples at half-life 1 s: 0.5 x 1000 -> 0.5 x 500 + 0.5 x 3000 = 1750, / 0.75
    samples = (Download(1_000_000, 1.0), Download(3_000_000, 1.0))
    assert ewma_kbps(samples, 1.0) == pytest.approx(1750 / 0.75)
    assert ewma_kbps((), 1.0) is None
    assert harmonic_mean_kbps(samples, 3) == pytest.approx(2 / (1 / 1000 + 1 / 3000))
    assert ThroughputRule().choose(state(downloads=(Download(2_000_000, 1.0),))) == 1  # 1800
    assert ThroughputRule().choose(state(downloads=(Download(2_300_000, 1.0),))) == 2  # 2070
    assert ThroughputRule().choose(state()) == 0


def test_streamplane_keeps_no_state_between_calls() -> None:
    sp = Streamplane()
    s = state(buffer_s=10.0, last_rung=0, downloads=(Download(4_000_000, 1.0),))
    first = sp.choose(s)
    sp.choose(state(buffer_s=2.0, phase="rebuffering"))
    assert sp.choose(s) == first == Streamplane().choose(s)


def test_every_algorithm_is_deterministic_and_in_range() -> None:
    calls = [
        state(phase="startup"),
        state(buffer_s=4.0, last_rung=0, downloads=(Download(3_000_000, 1.2),), now_s=1.5),
        state(buffer_s=12.0, last_rung=1, downloads=(Download(900_000, 1.0),), now_s=9.0),
        state(buffer_s=25.0, last_rung=1, downloads=(Download(9_000_000, 1.0),), now_s=30.0),
    ]
    for name in ALGORITHMS:
        a, b = make_abr(name), make_abr(name)
        got = [a.choose(s) for s in calls]
        assert got == [b.choose(s) for s in calls], name
        assert all(0 <= r < 3 for r in got), name


def test_unknown_names_and_bad_rungs_are_errors() -> None:
    with pytest.raises(AbrError, match="choose one of"):
        make_abr("pensieve")

    class Broken:
        name = "broken"

        def choose(self, state: object) -> int:
            return 7

        def should_abandon(self, state: object, progress: object) -> int | None:
            return None

    with pytest.raises(AbrError, match="rung 7"):
        checked_choice(Broken(), state())  # type: ignore[arg-type]


# --- streamplane's MPC: hand-computed pieces ---------------------------------------------------

# 1000/2000 kbps, two 4 s segments whose real sizes are 4 and 3 Mb at rung 0, 8 and 10 Mb at
# rung 1; 30 s buffer, so the plan aims at 20 s and ending x short costs x^2 / 20.
TWO = (RungInfo(1000.0, (4_000_000, 3_000_000)), RungInfo(2000.0, (8_000_000, 10_000_000)))


def two_segments(buffer_s: float, last: int | None = 0, **kw: object) -> AbrState:
    return state(buffer_s=buffer_s, last_rung=last, rungs=TWO, segment_durations_s=(4.0, 4.0), **kw)


def test_fetch_waits_for_room_then_drains_and_stalls() -> None:
    assert fetch(10.0, 2.0, 4.0, 30.0) == (12.0, 0.0)
    assert fetch(28.0, 1.0, 4.0, 30.0) == (29.0, 0.0)  # waits until 26 s, no stall for that
    assert fetch(1.0, 4.0, 4.0, 30.0) == (4.0, 3.0)  # dry after 1 s: a 3 s stall


def test_shortfall_cost_is_quadratic_below_the_target() -> None:
    assert shortfall_cost(25.0, 20.0, 1.0) == 0.0
    assert shortfall_cost(14.5, 20.0, 1.0) == pytest.approx(5.5**2 / 20)
    assert shortfall_cost(0.0, 20.0, 2.0) == pytest.approx(40.0)  # empty: 2 per second missing
    assert shortfall_cost(5.0, 0.0, 1.0) == 0.0


@pytest.mark.parametrize(
    ("plan", "value"),
    [
        # at 2 Mbps: rung 0 takes 2 s then 1.5 s, rung 1 4 s then 5 s
        ((0, 0), 1 + 1 - 5.5**2 / 20),  # buffer 10 -> 12 -> 14.5
        ((0, 1), 1 + 2 - 2 * 1.0 - 9**2 / 20),  # 10 -> 12 -> 11; the switch costs 2 x 1 Mbps
        ((1, 0), 2 - 2 * 1.0 + 1 - 2 * 1.0 - 7.5**2 / 20),  # 10 -> 10 -> 12.5, two switches
        ((1, 1), 2 - 2 * 1.0 + 2 - 11**2 / 20),  # 10 -> 10 -> 9
    ],
)
def test_plan_value_two_rungs_two_segments(plan: tuple[int, int], value: float) -> None:
    assert plan_value(two_segments(10.0), plan, 2000.0) == pytest.approx(value)


def test_plan_value_charges_stalls_and_no_switch_before_the_first_segment() -> None:
    # 1 Mbps from 1 s of buffer: 4 Mb takes 4 s, a 3 s stall; then 3 Mb in 3 s leaves 5 s
    assert plan_value(two_segments(1.0), (0, 0), 1000.0) == pytest.approx(
        1 - 4.3 * 3 + 1 - 15**2 / 20
    )
    first = two_segments(10.0, last=None)
    assert plan_value(first, (1, 1), 2000.0) == pytest.approx(2 + 2 - 11**2 / 20)
    with pytest.raises(AbrError, match="needs 2 rungs"):
        plan_value(first, (1,), 2000.0)


def test_mpc_choice_takes_the_best_plan() -> None:
    # (0,0) is worth 0.4875, the best of the four above: stay low at 10 s of buffer
    assert mpc_choice(two_segments(10.0), 2000.0) == 0
    # from rung 1 with a full buffer at 8 Mbps: (1,1) keeps it full, 2 + 2 = 4; (0,0) is
    # 1 - 2 x 1 + 1 = 0
    assert mpc_choice(two_segments(26.0, last=1), 8000.0) == 1
    # from 1 s of buffer at 1 Mbps, rung 1 would stall 7 s: down to 0
    assert mpc_choice(two_segments(1.0, last=1), 1000.0) == 0


@settings(max_examples=150, deadline=None)
@given(
    n_rungs=st.integers(1, 4),
    n_seg=st.integers(1, 7),
    next_segment=st.integers(0, 6),
    buffer_s=st.floats(0.0, 26.0),
    last=st.one_of(st.none(), st.integers(0, 3)),
    kbps=st.floats(50.0, 20_000.0),
    data=st.data(),
)
def test_mpc_choice_is_the_argmax_of_plan_value_over_one_switch_plans(
    n_rungs: int,
    n_seg: int,
    next_segment: int,
    buffer_s: float,
    last: int | None,
    kbps: float,
    data: st.DataObject,
) -> None:
    rates = [300.0 * 2**k for k in range(n_rungs)]
    rungs = tuple(
        RungInfo(r, tuple(data.draw(st.integers(1, int(r * 12_000))) for _ in range(n_seg)))
        for r in rates
    )
    s = state(
        buffer_s=buffer_s,
        rungs=rungs,
        segment_durations_s=(4.0,) * n_seg,
        next_segment=min(next_segment, n_seg - 1),
        last_rung=None if last is None else min(last, n_rungs - 1),
    )
    span = len(horizon_segments(s, StreamplaneParams().horizon))
    values = {
        (a, b): plan_value(s, (a,) + (b,) * (span - 1), kbps)
        for a in range(n_rungs)
        for b in range(n_rungs)
    }
    best = max(values.values())
    assert mpc_choice(s, kbps) == min(a for (a, _), v in values.items() if v == best)


def test_throughput_estimate_falls_fast_and_rises_slowly() -> None:
    # one sample: both EWMAs equal it (the zero-start correction)
    assert throughput_estimate_kbps((Download(4_000_000, 2.0),)) == pytest.approx(2000.0)
    # 2 s at 4 Mbps then 2 s at 1 Mbps: the fast EWMA (3 s) has moved further towards 1 Mbps
    drop = (Download(8_000_000, 2.0), Download(2_000_000, 2.0))
    a3, a8 = 0.5 ** (2 / 3), 0.5 ** (2 / 8)
    fast = (a3 * (1 - a3) * 4000 + (1 - a3) * 1000) / (1 - 0.5 ** (4 / 3))
    slow = (a8 * (1 - a8) * 4000 + (1 - a8) * 1000) / (1 - 0.5 ** (4 / 8))
    assert fast < slow
    assert throughput_estimate_kbps(drop) == pytest.approx(fast)
    # the reverse, a spike: now the slow one is lower and rules
    spike = (Download(2_000_000, 2.0), Download(8_000_000, 2.0))
    assert throughput_estimate_kbps(spike) == pytest.approx(
        (a8 * (1 - a8) * 1000 + (1 - a8) * 4000) / (1 - 0.5 ** (4 / 8))
    )


def test_streamplane_uses_real_sizes_of_the_coming_segments() -> None:
    # 4 Mbps, full buffer, three segments: on nominal sizes it steps up (value 4 against 3);
    # when rung 1's next two segments are 40 Mb (10 s each), holding rung 1 would end at 14 s,
    # 6 - 2 - 36/20 = 2.2 < 3: it stays.
    nominal = (RungInfo(1000.0, (4_000_000,) * 3), RungInfo(2000.0, (8_000_000,) * 3))
    heavy = (nominal[0], RungInfo(2000.0, (8_000_000, 40_000_000, 40_000_000)))
    fast = (Download(8_000_000, 2.0),)
    kw = {"buffer_s": 26.0, "last_rung": 0, "segment_durations_s": (4.0,) * 3, "downloads": fast}
    assert Streamplane().choose(state(rungs=nominal, **kw)) == 1
    assert Streamplane().choose(state(rungs=heavy, **kw)) == 0


# --- streamplane's abandonment: the drop model -------------------------------------------------

# 500/1000/2000 kbps, three 4 s segments at nominal sizes (2, 4 and 8 Mb); the second is in
# flight at rung 2; the last finished request ran at 2 Mbps, so after a drop the link is
# expected back at 2 Mbps.
SIZED = tuple(RungInfo(r, (int(r * 4000),) * 3) for r in (500.0, 1000.0, 2000.0))
WAS_2M = (Download(8_000_000, 4.0),)


def in_flight(buffer_s: float) -> AbrState:
    return state(
        buffer_s=buffer_s,
        last_rung=2,
        rungs=SIZED,
        segment_durations_s=(4.0,) * 3,
        next_segment=1,
        downloads=WAS_2M,
    )


def test_drop_time_holds_the_slow_rate_then_recovers() -> None:
    assert drop_time(2e6, 0.0, 4e5, 2e6, 12.0) == pytest.approx(5.0)  # all within the drop
    assert drop_time(8e6, 0.0, 4e5, 2e6, 12.0) == pytest.approx(12 + 3.2 / 2)  # 4.8 Mb, then 2 Mbps
    assert drop_time(4e6, 10.0, 4e5, 2e6, 12.0) == pytest.approx(2 + 3.2 / 2)  # 2 s of drop left
    assert drop_time(4e6, 12.5, 4e5, 2e6, 12.0) == pytest.approx(2.0)  # the drop is over


def test_recent_rate_measures_the_last_second_of_one_request() -> None:
    rr = RecentRate(1.0)
    assert rr.sample("a", 0.5, 200) == (200, 0.5)  # younger than the window: since the start
    assert rr.sample("a", 1.0, 400) == (400, 1.0)
    assert rr.sample("a", 1.5, 450) == (250, 1.0)  # since the sample at 0.5 s
    assert rr.sample("b", 0.25, 10) == (10, 0.25)  # another request starts afresh
    assert rr.sample("b", 0.1, 5) == (5, 0.1)  # so does a clock that went back (a retry)


def test_a_collapse_is_judged_on_the_recent_rate() -> None:
    # 4 of 8 Mb in 2 s (2 Mbps), but only 0.4 Mb in the last second; 6 s buffered. On its
    # average the request finishes in 2 s; at 0.4 Mbps (up to 12 s, then 2 Mbps) in 10 s.
    s = in_flight(6.0)
    collapsed = Progress(2, 4_000_000, 8_000_000, 2.0, recent_bits=400_000, recent_s=1.0)
    # it got its 4 Mb at 2 Mbps: the slow second is new, the usual 12 s hold applies
    model = drop_model(s, collapsed)
    assert model == pytest.approx((4e5, 2e6, 12.0))
    # finish: stall 4 s, 4 s buffered, then the last segment at rung 0 (2 s at 0.4 Mbps + 1.2 Mb
    # at 2 Mbps = 2.6 s): 2 - 4.3 x 4 + 0.5 - 2 x 1.5 - (20 - 5.4)^2 / 20
    finish = 2 - 4.3 * 4 + 0.5 - 3 - 14.6**2 / 20
    assert restart_value(s, 2, 10.0, model) == pytest.approx(finish)
    # restart at rung 0 (2 Mb at 0.4 Mbps: 5 s, 1 s to spare), the last one at rung 0 too (5 s):
    # 0.5 - 2 x 1.5 + 0.5 - 16^2 / 20
    restart = 0.5 - 3 + 0.5 - 16**2 / 20
    assert restart_value(s, 0, 5.0, model) == pytest.approx(restart)
    assert restart > finish + StreamplaneParams().abandon_gain
    assert streamplane_abandon(s, collapsed) == 0
    # the same request judged on its average (no recent rate measured, or a steady one): finish
    assert streamplane_abandon(s, Progress(2, 4_000_000, 8_000_000, 2.0)) is None
    steady = Progress(2, 4_000_000, 8_000_000, 2.0, recent_bits=2_000_000, recent_s=1.0)
    assert streamplane_abandon(s, steady) is None


def _first_abandon(
    buffer_s: float, link: Callable[[float], float], measure_recent: bool
) -> tuple[float, int] | None:
    """Play the in-flight request of `in_flight` in 0.25 s ticks (bits received by t given by
    `link`, the buffer draining meanwhile): the first (time, rung) streamplane abandons at."""
    rr = RecentRate()
    t = 0.0
    while t < 30.0:
        t += 0.25
        done = min(int(link(t)), 8_000_000)
        if done >= 8_000_000:
            return None
        recent_bits, recent_s = rr.sample(0, t, done)
        if not measure_recent:
            recent_bits, recent_s = 0, 0.0
        progress = Progress(2, done, 8_000_000, t, recent_bits, recent_s)
        to = streamplane_abandon(in_flight(max(buffer_s - t, 0.0)), progress)
        if to is not None:
            return t, to
    return None


def test_a_request_whose_rate_collapses_is_abandoned_sooner_than_on_its_average() -> None:
    # 2 Mbps for 2 s, then 0.3 Mbps; 8 s buffered when the request went out.
    def collapse(t: float) -> float:
        return 2e6 * min(t, 2.0) + 3e5 * max(t - 2.0, 0.0)

    recent = _first_abandon(8.0, collapse, measure_recent=True)
    average = _first_abandon(8.0, collapse, measure_recent=False)
    assert recent is not None and average is not None
    # the last second shows the collapse 0.75 s after it began; the average takes 2.5 s longer,
    # by when 2.5 s less buffer is left for the restart
    assert recent[0] == 2.75
    assert average[0] == 5.25
    assert recent[1] == 0


def test_a_slow_but_steady_request_is_judged_as_on_its_average() -> None:
    # 0.4 Mbps from the first byte: the last second says what the average says, tick for tick
    def steady(t: float) -> float:
        return 4e5 * t

    for buffer_s in (10.0, 16.0, 24.0):
        assert _first_abandon(buffer_s, steady, True) == _first_abandon(buffer_s, steady, False)
    # and the drop model lets a long one finish while the buffer covers it: 7.2 Mb left after
    # 2 s is 4.8 Mb in 12 s and 2.4 Mb at 2 Mbps, 13.2 s, 0.8 s under the 14 s buffered
    # (on its own average it would take 18 s)
    slow = Progress(2, 800_000, 8_000_000, 2.0, recent_bits=400_000, recent_s=1.0)
    assert streamplane_abandon(state(buffer_s=14.0, last_rung=2, downloads=WAS_2M), slow) is None


def test_a_drop_that_outlasts_the_hold_is_taken_to_last_as_long_again() -> None:
    # 0.25 Mbps for all of its 14 s (3.5 of 8 Mb), against the 2 Mbps the link carried before:
    # the drop has lasted 14 s, so it is taken to last 14 s more (not the usual 12)
    s = in_flight(14.0)
    long_slow = Progress(2, 3_500_000, 8_000_000, 14.0, recent_bits=250_000, recent_s=1.0)
    model = drop_model(s, long_slow)
    assert model == pytest.approx((2.5e5, 2e6, 14.0))
    # finish: 3.5 Mb in 14 s, 1 Mb at 2 Mbps in 0.5 s: stall 0.5 s, 4 s buffered; then the last
    # segment at 2 Mbps, rung 1 (2 s): 2 - 4.3 x 0.5 + 1 - 2 x 1 - (20 - 6)^2 / 20
    assert restart_value(s, 2, 14.5, model) == pytest.approx(2 - 2.15 + 1 - 2 - 14**2 / 20)
    # restart at rung 0: 8 s, 10 s buffered; the last at rung 0 in 6 s of drop (1.5 Mb) and
    # 0.5 Mb at 2 Mbps (6.25 s): 0.5 - 2 x 1.5 + 0.5 - (20 - 7.75)^2 / 20; worth 1.45 more
    assert restart_value(s, 0, 8.0, model) == pytest.approx(0.5 - 3 + 0.5 - 12.25**2 / 20)
    assert streamplane_abandon(s, long_slow) == 0
    # with the usual 12 s it would finish: 12.75 s, no stall, (2 + 2 - 14.75^2 / 20 = -6.88)
    # against the restart's -7.51
    usual = (2.5e5, 2e6, 12.0)
    assert restart_value(s, 2, 12.75, usual) == pytest.approx(2 + 2 - 14.75**2 / 20)
    assert restart_value(s, 0, 8.0, usual) == pytest.approx(0.5 - 3 + 0.5 - 10.5**2 / 20)


def test_session_clock_weighs_a_sample_by_the_time_since_the_previous_one() -> None:
    # 1 Mbps for 4 s ending at 10 s, then 8 Mbps for 0.5 s ending at 20 s (the player waited)
    ds = (Download(4_000_000, 4.0, 10.0), Download(4_000_000, 0.5, 20.0))
    a = 0.5 ** (4 / 3)
    on_download_time = (0.5 ** (0.5 / 3) * (1 - a) * 1000 + (1 - 0.5 ** (0.5 / 3)) * 8000) / (
        1 - 0.5 ** (4.5 / 3)
    )
    on_session_time = (0.5 ** (10 / 3) * (1 - a) * 1000 + (1 - 0.5 ** (10 / 3)) * 8000) / (
        1 - 0.5 ** (14 / 3)
    )
    assert ewma_kbps(ds, 3.0) == pytest.approx(on_download_time)
    assert ewma_kbps(ds, 3.0, session_clock=True) == pytest.approx(on_session_time)
    # an unknown end, or one closer than the download itself, falls back to download time
    unknown = (Download(4_000_000, 4.0, 10.0), Download(4_000_000, 0.5))
    assert ewma_kbps(unknown, 3.0, session_clock=True) == pytest.approx(on_download_time)
    early = (Download(4_000_000, 4.0, 10.0), Download(4_000_000, 0.5, 10.2))
    assert ewma_kbps(early, 3.0, session_clock=True) == pytest.approx(on_download_time)


def test_ramp_up_after_a_low_phase_is_not_held_back_by_fast_downloads() -> None:
    """40 s at 600 kbps, then 8 Mbps, on a ten-rung ladder up to 6 Mbps. On a fast link a
    segment downloads in a fraction of a second, so an EWMA on download time needs a dozen
    segments to forget the low phase; on the session clock it takes a few."""
    rates = (230, 331, 477, 688, 991, 1427, 2056, 2962, 5027, 6000)
    n = 50
    ladder = tuple(RungInfo(float(r), (r * 4000,) * n) for r in rates)
    manifest = Manifest("ladder", (4.0,) * n, ladder)
    trace = Trace("ramp", (Period(40.0, 600.0, 80.0), Period(200.0, 8000.0, 80.0)))
    segs = simulate(manifest, trace, make_abr("streamplane")).segments
    first_fast = next(s.index for s in segs if s.request_s >= 40.0)
    top = next(s.index for s in segs if s.rung == len(rates) - 1)
    assert top - first_fast <= 4, [s.rung for s in segs]
