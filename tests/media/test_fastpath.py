"""The fast path's probes: which quantisers are probed, the rest of the grid predicted from
them, and a real encode that ships a valid ladder from them."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.media import encode
from streamplane.media.fastpath import (
    VMAF_CEILING,
    predict_curve,
    predicted_grid,
    probe_quantisers,
)
from streamplane.media.matrix import EncodeResult
from streamplane.media.pipeline import PROBE_MIN_FRAMES, probe_frames
from streamplane.media.title import ShotChoice
from tests.conftest import SMALL

grids = st.lists(st.integers(0, 51), min_size=2, max_size=12, unique=True)


@given(grids, st.integers(2, 4))
def test_probes_are_few_grid_values_spanning_it(grid: list[int], count: int) -> None:
    ordered = sorted(grid)
    probes = probe_quantisers(grid, count)
    assert set(probes) <= set(grid)
    assert len(probes) == min(count, len(ordered))
    # both ends probed: every other grid point is interpolated, never extrapolated
    assert probes[0] == ordered[0] and probes[-1] == ordered[-1]


def test_the_default_grid_is_probed_at_both_ends_and_the_middle() -> None:
    assert probe_quantisers((18, 22, 26, 30, 34, 38, 42)) == (18, 30, 42)
    assert probe_quantisers((18, 22, 26, 30, 34, 38, 42), 2) == (18, 42)
    assert probe_quantisers((22, 30, 38), 2) == (22, 38)
    with pytest.raises(ValueError, match="at least two probes"):
        probe_quantisers((22, 30, 38), 1)


def _law(q: int, bits0: float, halving: float, gap0: float, growth: float) -> tuple[float, float]:
    """An encoder following the two laws exactly: bits halve every `halving` steps, the gap to
    VMAF's ceiling grows by `growth` per step."""
    return bits0 * 2 ** (-q / halving), VMAF_CEILING - gap0 * math.exp(growth * q)


laws = st.tuples(
    st.floats(1e5, 1e8), st.floats(4.0, 10.0), st.floats(0.05, 2.0), st.floats(0.02, 0.1)
)


@given(laws, st.lists(st.integers(10, 50), min_size=2, max_size=4, unique=True))
def test_a_curve_that_follows_the_laws_is_predicted_exactly(
    law: tuple[float, float, float, float], probed: list[int]
) -> None:
    grid = range(10, 51, 4)
    truth = {q: _law(q, *law) for q in [*grid, *probed]}
    if any(not 0 <= v <= 100 for _, v in truth.values()):
        return  # outside VMAF's scale: not an encode
    predicted = predict_curve({q: truth[q] for q in probed}, grid)
    assert sorted(predicted) == sorted(grid)
    for q, (bits, vmaf) in predicted.items():
        assert bits == pytest.approx(truth[q][0], rel=1e-6)
        assert vmaf == pytest.approx(truth[q][1], abs=1e-6)


probe_curves = st.lists(
    st.tuples(st.integers(10, 50), st.floats(1e3, 1e8), st.floats(0.0, 100.0)),
    min_size=2,
    max_size=5,
    unique_by=lambda t: t[0],
)


@given(probe_curves)
def test_probed_points_stay_measured_and_the_rest_lie_between_their_probes(
    probes: list[tuple[int, float, float]],
) -> None:
    known = {q: (b, v) for q, b, v in probes}
    predicted = predict_curve(known, range(10, 51))
    for q, value in known.items():
        assert predicted[q] == value
    qs = sorted(known)
    for q, (bits, vmaf) in predicted.items():
        assert bits > 0 and 0.0 <= vmaf <= 100.0
        if qs[0] < q < qs[-1] and q not in known:
            lo = max(k for k in qs if k < q)
            hi = min(k for k in qs if k > q)
            b = sorted([known[lo][0], known[hi][0]])
            v = sorted([known[lo][1], known[hi][1]])
            assert b[0] * (1 - 1e-9) <= bits <= b[1] * (1 + 1e-9)
            assert v[0] - 1e-9 <= vmaf <= v[1] + 1e-9


def test_a_probe_that_is_not_an_encode_is_refused() -> None:
    with pytest.raises(ValueError, match="two or more"):
        predict_curve({22: (1000.0, 50.0)}, [22, 30])
    with pytest.raises(ValueError, match="not an encode"):
        predict_curve({22: (0.0, 50.0), 38: (100.0, 20.0)}, [30])


def test_the_predicted_grid_covers_every_shot_and_resolution_probed() -> None:
    probes = [
        ShotChoice(s, w, h, q, 10_000 * (s + 1) * w // 320 // (q // 10), 90.0 - q - s)
        for s in range(3)
        for w, h in ((320, 180), (160, 90))
        for q in (22, 38)
    ]
    points = predicted_grid(probes, (18, 22, 26, 30, 34, 38, 42))
    assert len(points) == 3 * 2 * 7
    assert {(p.shot, p.width, p.quantiser) for p in points} == {
        (s, w, q) for s in range(3) for w in (320, 160) for q in (18, 22, 26, 30, 34, 38, 42)
    }
    with pytest.raises(ValueError, match="needs two"):
        predicted_grid(probes[:1], (22, 30, 38))


def test_the_fast_path_probes_part_of_the_grid_and_ships_a_valid_ladder(
    tmp_path: Path, tiny_source: Path
) -> None:
    """A real encode: each shot and resolution is probed at two quantisers of the grid (22 and
    38 of 22, 30, 38) and 30 predicted; the ladder ships encodes made at the shipped preset
    (30 among them when chosen), one resolution per rung, rising in bits and VMAF."""
    work = tmp_path / "work"
    settings = msgspec.structs.replace(
        SMALL,
        heights=(90, 60),
        rungs=2,
        probe_count=2,
        baseline=False,
        vbv_maxrate=0.0,
        keep_work=True,
    )
    outcome = encode(tiny_source, tmp_path / "catalog" / "tiny", settings, work=work)
    results = [
        msgspec.json.decode(f.read_bytes(), type=EncodeResult)
        for f in (work / "results").glob("*.json")
    ]
    probed = {
        (r.job.shot, r.job.height, r.job.crf)
        for r in results
        if r.job.preset == settings.probe_preset
    }
    shots = range(len(outcome.title.shots))
    assert probed == {(s, h, q) for s in shots for h in (90, 60) for q in (22, 38)}
    # the probes read the middle half of each shot, the shipped encodes all of it
    for r in results:
        frames = outcome.title.shots[r.job.shot].n_frames
        if r.job.preset == settings.probe_preset:
            assert r.job.probe_frames == round(frames / 2) and r.job.frames_encoded < frames
        else:
            assert r.job.probe_frames == 0 and r.job.frames_encoded == frames
    at_shipped_preset = {
        (r.job.shot, r.job.height, r.job.crf)
        for r in results
        if r.job.preset == settings.preset and r.job.vmaf_subsample == 1
    }
    rungs = outcome.title.rungs
    assert len(rungs) == 2
    for low, high in itertools.pairwise(rungs):
        assert low.average_bitrate_bps < high.average_bitrate_bps and low.vmaf < high.vmaf
        assert low.height <= high.height
    for rung in rungs:
        assert {(c.width, c.height) for c in rung.shots} == {(rung.width, rung.height)}
        assert {(c.shot, c.height, c.quantiser) for c in rung.shots} <= at_shipped_preset


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"probe_grid": "coarse"}, "probe_grid must be"),
        ({"probe_count": 1}, "probe_count"),
        ({"probe_share": 0.0}, "probe_share"),
        ({"probe_share": 1.5}, "probe_share"),
    ],
)
def test_probe_settings_that_cannot_predict_a_curve_are_refused(
    change: dict[str, object], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        msgspec.structs.replace(SMALL, **change).check()  # type: ignore[arg-type]


@given(st.integers(1, 3000), st.floats(0.01, 1.0))
def test_a_probe_of_part_of_a_shot_keeps_enough_frames(shot_frames: int, share: float) -> None:
    settings = msgspec.structs.replace(SMALL, probe_share=share)
    n = probe_frames(shot_frames, settings)
    if n == 0:  # the whole shot
        assert shot_frames <= max(PROBE_MIN_FRAMES, round(share * shot_frames))
    else:
        assert PROBE_MIN_FRAMES <= n < shot_frames
        assert n == max(PROBE_MIN_FRAMES, round(share * shot_frames))
