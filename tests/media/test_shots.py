from __future__ import annotations

import math
import random
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from streamplane.media.errors import MediaError, SourceError
from streamplane.media.ffmpeg import run_ffmpeg
from streamplane.media.samples import SAMPLES, build_sample
from streamplane.media.shots import (
    DETECTORS,
    detect_shots,
    frame_bounds,
    merge_cuts,
    plan_shots,
    sample_true_cuts,
)
from streamplane.media.title import Shot

TOLERANCE = 2  # frames

# ---------------------------------------------------------------------------------------------
# plan_shots: properties

fps_values = st.sampled_from([24.0, 25.0, 30000 / 1001, 30.0, 50.0, 60.0]) | st.floats(1.0, 120.0)


@st.composite
def plans(draw: st.DrawFn) -> tuple[list[int], list[float] | None, int, float, float, float]:
    fps = draw(fps_values)
    min_s = draw(st.floats(0.02, 4.0))
    max_s = min_s * draw(st.floats(1.0, 6.0))
    n = draw(st.integers(1, 2500))
    cuts = draw(st.lists(st.integers(-30, n + 30), max_size=40))
    # Repeats on purpose: detectors can report a frame twice.
    cuts += draw(st.lists(st.sampled_from(cuts), max_size=5)) if cuts else []
    strengths = draw(
        st.none() | st.lists(st.floats(0, 100), min_size=len(cuts), max_size=len(cuts))
    )
    try:
        frame_bounds(fps, min_s, max_s)
    except ValueError:
        assume(False)
    return cuts, strengths, n, fps, min_s, max_s


def _starts(shots: tuple[Shot, ...]) -> list[int]:
    return [s.start_frame for s in shots]


def _equal_split(a: int, b: int, max_f: int) -> list[int]:
    k = math.ceil((b - a) / max_f)
    return [a + (b - a) * j // k for j in range(k)]


@given(plans())
def test_shots_are_contiguous_and_cover_the_title(
    plan: tuple[list[int], list[float] | None, int, float, float, float],
) -> None:
    cuts, strengths, n, fps, min_s, max_s = plan
    shots = plan_shots(cuts, n, fps, min_s, max_s, strengths=strengths)
    assert shots[0].start_frame == 0
    assert shots[-1].end_frame == n
    assert [s.index for s in shots] == list(range(len(shots)))
    for a, b in pairwise(shots):
        assert a.end_frame == b.start_frame
    assert all(s.n_frames > 0 for s in shots)
    assert sum(s.n_frames for s in shots) == n


@given(plans())
def test_shot_lengths_stay_within_bounds(
    plan: tuple[list[int], list[float] | None, int, float, float, float],
) -> None:
    cuts, strengths, n, fps, min_s, max_s = plan
    min_f, max_f = frame_bounds(fps, min_s, max_s)
    shots = plan_shots(cuts, n, fps, min_s, max_s, strengths=strengths)
    lengths = [s.n_frames for s in shots]
    assert max(lengths) <= max_f
    if n < min_f:
        assert len(shots) == 1
        return
    assert min(lengths) >= min(min_f, math.ceil(max_f / 2))
    if max_f >= 2 * min_f - 1:
        assert min(lengths) >= min_f
    # The documented sufficient conditions in seconds really imply the frame condition.
    if max_s >= 2 * min_s + 1 / fps:
        assert max_f >= 2 * min_f - 1
    if max_s >= 2 * min_s and abs(min_s * fps - round(min_s * fps)) < 1e-9:
        assert max_f >= 2 * min_f - 1


@given(plans())
def test_boundaries_are_kept_cuts_or_equal_split_points(
    plan: tuple[list[int], list[float] | None, int, float, float, float],
) -> None:
    cuts, strengths, n, fps, min_s, max_s = plan
    min_f, max_f = frame_bounds(fps, min_s, max_s)
    kept = merge_cuts(cuts, n, min_f, strengths)
    assert set(kept) <= set(cuts)
    anchors = [0, *kept, n]
    expected = [b for a, c in pairwise(anchors) for b in _equal_split(a, c, max_f)]
    assert _starts(plan_shots(cuts, n, fps, min_s, max_s, strengths=strengths)) == expected


@given(plans())
def test_merge_keeps_cuts_apart_and_drops_none_needlessly(
    plan: tuple[list[int], list[float] | None, int, float, float, float],
) -> None:
    cuts, strengths, n, fps, min_s, max_s = plan
    min_f, _ = frame_bounds(fps, min_s, max_s)
    kept = merge_cuts(cuts, n, min_f, strengths)
    anchors = [0, *kept, n]
    assert anchors == sorted(set(anchors))
    if kept:
        assert all(b - a >= min_f for a, b in pairwise(anchors))
    # Maximal: every dropped cut is too close to something kept (or to an end).
    for c in set(cuts) - set(kept):
        if 0 < c < n:
            assert any(abs(c - a) < min_f for a in anchors)


@given(plans(), st.randoms())
def test_plan_ignores_cut_order(
    plan: tuple[list[int], list[float] | None, int, float, float, float],
    rnd: random.Random,
) -> None:
    cuts, strengths, n, fps, min_s, max_s = plan
    pairs = list(zip(cuts, strengths or [0.0] * len(cuts), strict=True))
    rnd.shuffle(pairs)
    shuffled = [c for c, _ in pairs]
    shuffled_strengths = [s for _, s in pairs] if strengths is not None else None
    assert plan_shots(cuts, n, fps, min_s, max_s, strengths=strengths) == plan_shots(
        shuffled, n, fps, min_s, max_s, strengths=shuffled_strengths
    )


@settings(suppress_health_check=[HealthCheck.filter_too_much])  # half the plans carry no strengths
@given(plans())
def test_strongest_fitting_cut_is_always_kept(
    plan: tuple[list[int], list[float] | None, int, float, float, float],
) -> None:
    cuts, strengths, n, fps, min_s, max_s = plan
    assume(strengths is not None)
    assert strengths is not None
    min_f, _ = frame_bounds(fps, min_s, max_s)
    fitting = [(s, c) for c, s in zip(cuts, strengths, strict=True) if min_f <= c <= n - min_f]
    assume(fitting)
    best = max(s for s, _ in fitting)
    earliest_best = min(c for s, c in fitting if s == best)
    assert earliest_best in merge_cuts(cuts, n, min_f, strengths)


@given(plans())
def test_replanning_a_plan_changes_nothing(
    plan: tuple[list[int], list[float] | None, int, float, float, float],
) -> None:
    cuts, strengths, n, fps, min_s, max_s = plan
    min_f, max_f = frame_bounds(fps, min_s, max_s)
    assume(max_f >= 2 * min_f - 1)
    shots = plan_shots(cuts, n, fps, min_s, max_s, strengths=strengths)
    assert plan_shots(_starts(shots)[1:], n, fps, min_s, max_s) == shots


# ---------------------------------------------------------------------------------------------
# plan_shots: examples and argument checks


def test_the_stronger_of_two_close_cuts_survives() -> None:
    # tiny-mix as scdet scores it: bikes' own weak cut at 201 is 24 frames before the strong
    # piece boundary at 225, so with 2 s shots the boundary wins.
    cuts = [75, 125, 155, 201, 225]
    strengths = [20.5, 23.6, 20.4, 8.0, 18.1]
    shots = plan_shots(cuts, 300, 25, 2.0, 10.0, strengths=strengths)
    assert _starts(shots) == [0, 75, 125, 225]
    # Without strengths the earlier cut wins.
    assert _starts(plan_shots(cuts, 300, 25, 2.0, 10.0)) == [0, 75, 125, 201]


def test_long_stretches_split_evenly_and_short_titles_stay_whole() -> None:
    assert [s.n_frames for s in plan_shots([], 1001, 25, 2.0, 10.0)] == [200, 200, 200, 200, 201]
    assert plan_shots([10, 20], 30, 25, 2.0, 10.0) == (Shot(0, 0, 30),)
    assert plan_shots([-5, 0, 300, 999], 300, 25, 2.0, 10.0) == (
        Shot(0, 0, 150),
        Shot(1, 150, 300),
    )


@pytest.mark.parametrize(
    ("fps", "min_s", "max_s"),
    [
        (25, 0.0, 10.0),
        (25, -1.0, 10.0),
        (25, 2.0, 1.0),
        (25, float("nan"), 10.0),
        (25, 2.0, float("inf")),
        (0, 2.0, 10.0),
        (25, 0.05, 0.05),  # 2 frames minimum, 1 frame maximum
    ],
)
def test_bad_bounds_are_rejected(fps: float, min_s: float, max_s: float) -> None:
    with pytest.raises(ValueError):
        plan_shots([10], 100, fps, min_s, max_s)


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError):
        plan_shots([], 0, 25, 2.0, 10.0)
    with pytest.raises(ValueError):
        plan_shots([10, 20], 100, 25, 0.1, 10.0, strengths=[1.0])
    with pytest.raises(ValueError):
        plan_shots([10], 100, 25, 0.1, 10.0, strengths=[float("nan")])


# ---------------------------------------------------------------------------------------------
# Detectors on a real sample


@pytest.fixture(scope="module")
def tiny_mix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sample("tiny-mix", tmp_path_factory.mktemp("shots-samples"))


def test_tiny_mix_truth_includes_the_cuts_inside_bikes() -> None:
    sample = SAMPLES["tiny-mix"]
    assert sample.cut_frames() == [75, 125, 225]
    # bikes.mp4 (frames 125-225) cuts at its own frames 30 and 76.
    assert sample_true_cuts(sample) == [75, 125, 155, 201, 225]


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detectors_find_the_true_cuts(name: str, tiny_mix: Path) -> None:
    sample = SAMPLES["tiny-mix"]
    found = DETECTORS[name](tiny_mix)
    assert found == sorted(set(found))
    for cut in sample.cut_frames():
        assert any(abs(cut - f) <= TOLERANCE for f in found), (cut, found)
    # Nothing false: every other detection is one of bikes.mp4's own cuts.
    truth = sample_true_cuts(sample)
    for f in found:
        assert any(abs(t - f) <= TOLERANCE for t in truth), (f, truth)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detect_shots_gives_the_pieces_of_the_sample(name: str, tiny_mix: Path) -> None:
    sample = SAMPLES["tiny-mix"]
    shots = detect_shots(tiny_mix, sample.n_frames, sample.fps, detector=name)
    expected = [0, *sample.cut_frames()]
    assert len(shots) == len(expected)
    for got, want in zip(_starts(shots), expected, strict=True):
        assert abs(got - want) <= TOLERANCE
    assert shots[-1].end_frame == sample.n_frames


def test_unknown_detector_is_a_value_error(tiny_mix: Path) -> None:
    with pytest.raises(ValueError, match="unknown shot detector"):
        detect_shots(tiny_mix, 300, 25, detector="magic")


@pytest.fixture(scope="module")
def broken_files(tiny_mix: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("broken")
    text = d / "notes.mp4"
    text.write_text("this is not a video\n")
    empty = d / "empty.mp4"
    empty.touch()
    data = tiny_mix.read_bytes()
    # The samples keep their index (moov) at the end: cut in half, the index is gone.
    no_index = d / "no_index.mp4"
    no_index.write_bytes(data[: len(data) // 2])
    # Index first: it still promises 300 frames, but only about a third of them decode.
    faststart = d / "faststart.mp4"
    run_ffmpeg(
        ["-i", str(tiny_mix), "-c", "copy", "-movflags", "+faststart", str(faststart)],
        "remuxing a test file",
    )
    whole = faststart.read_bytes()
    cut_short = d / "cut_short.mp4"
    cut_short.write_bytes(whole[: len(whole) // 2])
    return {
        "text": text,
        "empty": empty,
        "no_index": no_index,
        "cut_short": cut_short,
        "missing": d / "missing.mp4",
    }


@pytest.mark.parametrize("name", sorted(DETECTORS))
@pytest.mark.parametrize("kind", ["text", "empty", "no_index", "cut_short", "missing"])
def test_broken_sources_give_a_clear_error(
    name: str, kind: str, broken_files: dict[str, Path]
) -> None:
    path = broken_files[kind]
    with pytest.raises(SourceError) as info:
        DETECTORS[name](path)
    assert isinstance(info.value, MediaError)
    assert str(path) in str(info.value)
    if kind == "cut_short":
        assert "truncated" in str(info.value)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detect_shots_reports_a_broken_source(name: str, broken_files: dict[str, Path]) -> None:
    with pytest.raises(SourceError, match="truncated"):
        detect_shots(broken_files["cut_short"], 300, 25, detector=name)


def test_detect_shots_checks_its_arguments_before_decoding(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_shot_s"):
        detect_shots(tmp_path / "never-read.mp4", 300, 25, min_shot_s=0)
    with pytest.raises(ValueError, match="n_frames"):
        detect_shots(tmp_path / "never-read.mp4", 0, 25)
