"""Each algorithm on hand-computed cases (ladder 500/1000/2000 kbps, 4 s segments, 30 s buffer)."""

from __future__ import annotations

import math

import pytest

from streamplane.player import (
    ALGORITHMS,
    AbrError,
    Bba,
    Bola,
    BolaE,
    Download,
    Progress,
    RungInfo,
    Streamplane,
    ThroughputRule,
    make_abr,
)
from streamplane.player.abr import bola_params, checked_choice, ewma_kbps, harmonic_mean_kbps
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
