"""Shot detection: find where the source cuts, then plan the shots the encoder works on.

Two detectors report cut frames (frame indices where a new shot starts) with a strength each;
`plan_shots`, which is pure, turns them into contiguous shots between a minimum and a maximum
length. `detect_shots` chains the two.

How the defaults were chosen (`bench/shots.py` reproduces the figures): the three samples
("tiny-mix", "demo-mix", "bench-mix") carry 15 known cuts between their pieces. bikes.mp4, a
real clip they reuse, is itself a montage with hard cuts at its frames 30, 76, 137, 187 and 242
(checked frame by frame in PNG dumps), which puts 10 more true cuts inside the samples; the
bigbuckbunny and carphone excerpts have none (their largest scdet score is 2.3). Scored against
all 25 cuts at +-2 frames:

* scdet (score = mean absolute frame difference in %, on frames at most 320 wide): the weakest
  true cut (bikes frame 76, taxi to cyclist, similar colours; it is in all three samples)
  scores 8.0, the next weakest 12.6. Frames more than 2 before or 5 after a cut score at most
  1.7, mandelbrot, game of life and the noisy pattern included. Threshold 5 leaves 1.6x below
  the weakest cut and 3x above that motion; every threshold from 3 to 8 finds all 25 cuts with
  no false one. ffmpeg's own default, 10, misses bikes frame 76.
* PySceneDetect: ContentDetector cannot separate the two sets here. With its minimum scene
  length off, its default threshold 27 marks every one of the 75 game-of-life frames as a
  cut (content_val up to 40, above the weakest true cut at 28.7); it gets the samples right
  only because its min_scene_len merging swallows them. AdaptiveDetector divides by the
  neighbouring frames' change, which is what fast synthetic motion needs: true cuts have a
  ratio >= 3.01, non-cut frames with content_val >= 15 at most 1.30. Its default threshold 3.0
  is at the edge of the weakest cut; 2.0 (the middle on a log scale) finds all 25, as does any
  value from 2.0 to 3.0.
* The first frames after a cut into fast motion (game of life, the noise pattern) change a lot
  too: up to 5.7 with scdet, content_val 40. That is the tail of one change, not a new shot,
  so both detectors ignore a cut less than 0.2 s after the previous one (then any scdet
  threshold from 3 to 8 works; without it, only 6 to 8). PySceneDetect's default of 15 frames
  is too long: two real cuts in the samples are 12 and 13 frames apart.

Both find the same 25 cuts; `bench/shots.py` found scdet about 8 % cheaper in CPU (both are
mostly H.264 decoding), so scdet is the default. It also numbers frames with ffmpeg's own
decode counter, the decoder the rest of the pipeline uses, with no timestamp arithmetic.
"""

from __future__ import annotations

import bisect
import math
import re
import tempfile
from collections.abc import Callable, Sequence
from fractions import Fraction
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

from streamplane.media.errors import SourceError
from streamplane.media.ffmpeg import FfmpegError, run_ffmpeg
from streamplane.media.probe import check_complete, open_video
from streamplane.media.samples import Sample
from streamplane.media.title import Shot

SCDET_THRESHOLD = 5.0
SCENEDETECT_THRESHOLD = 2.0
MIN_CUT_GAP_S = 0.2
# Shots feed per-shot encoding and segments never straddle a shot, so the minimum matches the
# pipeline's minimum segment length and the maximum bounds the work of one encode.
MIN_SHOT_S = 2.0
MAX_SHOT_S = 10.0
DEFAULT_DETECTOR = "scdet"

# Frames are analysed at most this wide: the thresholds above were measured there, and a fixed
# analysis size keeps them meaning the same at 4K as at 360p.
_ANALYSIS_WIDTH = 320


class Cut(NamedTuple):
    frame: int
    strength: float


# ---------------------------------------------------------------------------------------------
# Planning (pure)


def frame_bounds(fps: float, min_shot_s: float, max_shot_s: float) -> tuple[int, int]:
    """The shortest and longest shot in whole frames: (ceil(min * fps), floor(max * fps)).

    Raises ValueError unless fps > 0, 0 < min_shot_s <= max_shot_s (all finite) and the maximum
    still holds at least the minimum once both are rounded to whole frames.
    """
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    if not (math.isfinite(min_shot_s) and min_shot_s > 0):
        raise ValueError(f"min_shot_s must be a positive number of seconds, got {min_shot_s}")
    if not (math.isfinite(max_shot_s) and max_shot_s >= min_shot_s):
        raise ValueError(f"max_shot_s must be >= min_shot_s ({min_shot_s}), got {max_shot_s}")
    # The epsilon keeps 0.1 s * 30 fps (3.0000000000000004) from becoming 4 frames.
    min_f = max(1, math.ceil(min_shot_s * fps - 1e-9))
    max_f = math.floor(max_shot_s * fps + 1e-9)
    if max_f < min_f:
        raise ValueError(
            f"at {fps} fps, shots of {min_shot_s} s to {max_shot_s} s would need between "
            f"{min_f} and {max_f} frames: widen the range"
        )
    return min_f, max_f


def merge_cuts(
    cuts: Sequence[int],
    n_frames: int,
    min_frames: int,
    strengths: Sequence[float] | None = None,
) -> list[int]:
    """The cuts kept so that no shot is shorter than `min_frames`, sorted.

    Only 0 < cut < n_frames counts; repeats count once (with their largest strength). Cuts are
    considered strongest first (all equal without `strengths`), earlier first among equals; a
    cut is kept when it lies at least `min_frames` from every boundary kept so far, the title's
    start and end included. A too-short shot thus merges into the neighbour across its weaker
    boundary, and the strongest cut that fits at all is always kept. Without strengths this is
    the earliest-first greedy rule, which keeps the largest possible number of cuts.
    """
    if min_frames < 1:
        raise ValueError(f"min_frames must be at least 1, got {min_frames}")
    if strengths is not None and len(strengths) != len(cuts):
        raise ValueError(f"{len(strengths)} strengths for {len(cuts)} cuts")
    if strengths is not None and not all(math.isfinite(s) for s in strengths):
        raise ValueError("strengths must be finite numbers")
    strongest: dict[int, float] = {}
    for i, cut in enumerate(cuts):
        if 0 < cut < n_frames:
            s = 0.0 if strengths is None else float(strengths[i])
            strongest[cut] = max(s, strongest.get(cut, s))
    kept = [0, n_frames]
    for cut in sorted(strongest, key=lambda c: (-strongest[c], c)):
        i = bisect.bisect(kept, cut)
        if cut - kept[i - 1] >= min_frames and kept[i] - cut >= min_frames:
            kept.insert(i, cut)
    return kept[1:-1]


def plan_shots(
    cuts: list[int],
    n_frames: int,
    fps: float,
    min_shot_s: float,
    max_shot_s: float,
    *,
    strengths: Sequence[float] | None = None,
) -> tuple[Shot, ...]:
    """Contiguous shots covering frames [0, n_frames), starting at detected cuts where possible.

    `cuts` may be unsorted, repeated or out of range. `strengths`, if given, is one number per
    cut (larger = bigger change); it decides which of two too-close cuts survives.

    With min_f, max_f = frame_bounds(fps, min_shot_s, max_shot_s):
    1. `merge_cuts(cuts, n_frames, min_f, strengths)` picks the boundaries to keep (see there).
    2. A stretch between kept boundaries longer than max_f frames is split into
       k = ceil(len / max_f) parts of equal length (to one frame), at start + (j * len) // k.

    What holds:
      * the shots are contiguous, cover [0, n_frames) and are numbered 0, 1, ...;
      * every boundary is a kept input cut or a split point as above;
      * every shot has at most max_f frames;
      * a title shorter than min_f frames is one shot;
      * otherwise every shot has at least min(min_f, ceil(max_f / 2)) frames, which is min_f
        exactly when max_f >= 2 * min_f - 1. That holds whenever max_shot_s >= 2 * min_shot_s
        and min_shot_s is a whole number of frames, and always when max_shot_s >=
        2 * min_shot_s + 1 / fps. Below that the maximum wins: a split part may be shorter
        than the minimum (never shorter than half the maximum).
    """
    min_f, max_f = frame_bounds(fps, min_shot_s, max_shot_s)
    if n_frames < 1:
        raise ValueError(f"a title needs at least one frame, got n_frames={n_frames}")
    kept = [0, *merge_cuts(cuts, n_frames, min_f, strengths), n_frames]
    starts: list[int] = []
    for a, b in pairwise(kept):
        k = math.ceil((b - a) / max_f)
        starts += [a + (b - a) * j // k for j in range(k)]
    return tuple(Shot(i, a, b) for i, (a, b) in enumerate(pairwise([*starts, n_frames])))


# ---------------------------------------------------------------------------------------------
# Detection


def _video_rate(path: Path) -> tuple[Fraction, int]:
    """The first video stream's frame rate and the frame count its header claims (0 unknown)."""
    with open_video(path) as (_, _, rate, claimed):
        return rate, claimed


def _min_gap(rate: Fraction) -> int:
    return max(1, round(MIN_CUT_GAP_S * rate))


def _suppress_close(cuts: list[Cut], gap: int) -> list[Cut]:
    """Drop cuts closer than `gap` frames to the previous kept cut (or to frame 0), as
    PySceneDetect's min_scene_len does, so both detectors answer the same question."""
    kept: list[Cut] = []
    last = 0
    for cut in sorted(cuts):
        if cut.frame - last >= gap:
            kept.append(cut)
            last = cut.frame
    return kept


_METADATA_FRAME = re.compile(r"^frame:(\d+)\s")
_METADATA_SCORE = re.compile(r"^lavfi\.scd\.score=([0-9.eE+-]+)")


def scdet_cuts(path: Path, threshold: float = SCDET_THRESHOLD) -> list[Cut]:
    """Cuts found by ffmpeg's `scdet` filter, with its score (0-100) as strength."""
    if not 0 <= threshold < 100:
        raise ValueError(f"scdet scores run from 0 to 100, got threshold {threshold}")
    rate, claimed = _video_rate(path)
    # Frames come from the metadata filter's frame counter (the decode index, exact even if
    # timestamps are not), not from timestamps. `metadata=print` rather than scdet's log lines,
    # because run_ffmpeg sets -loglevel error: a second -loglevel info would override it, but
    # then every line of ffmpeg chatter would need parsing. The file names are relative to cwd
    # so no path needs filtergraph escaping.
    graph = (
        f"scale=w='min({_ANALYSIS_WIDTH},iw)':h=-2:flags=area,"
        f"scdet=threshold={threshold},"
        f"metadata=mode=print:key=lavfi.scd.score:value={threshold}:function=greater"
        ":file=cuts.txt"
    )
    with tempfile.TemporaryDirectory(prefix="streamplane-scdet-") as tmp:
        work = Path(tmp)
        args = [
            *["-i", str(path.resolve()), "-map", "0:v:0", "-vf", graph],
            *["-fps_mode", "passthrough", "-progress", "progress.txt", "-f", "null", "-"],
        ]
        try:
            run_ffmpeg(args, f"detecting shots in {path.name} with scdet", cwd=work)
        except FfmpegError as exc:
            raise SourceError(f"{path}: cannot be decoded for shot detection\n{exc}") from exc
        decoded = 0
        progress = work / "progress.txt"
        if progress.exists():
            for line in progress.read_text().splitlines():
                if line.startswith("frame="):
                    decoded = int(line.removeprefix("frame=").strip() or 0)
        check_complete(path, decoded, claimed)
        cuts: list[Cut] = []
        frame: int | None = None
        printed = work / "cuts.txt"
        for line in printed.read_text().splitlines() if printed.exists() else []:
            if m := _METADATA_FRAME.match(line):
                frame = int(m.group(1))
            elif (m := _METADATA_SCORE.match(line)) and frame is not None:
                cuts.append(Cut(frame, float(m.group(1))))
    return _suppress_close(cuts, _min_gap(rate))


def scenedetect_cuts(
    path: Path, threshold: float = SCENEDETECT_THRESHOLD, *, strengths: bool = True
) -> list[Cut]:
    """Cuts found by PySceneDetect's AdaptiveDetector, content_val as strength.

    Strengths need PySceneDetect's stats manager, which costs about 5 % more CPU (it makes the
    detector compute edge maps too); `strengths=False` skips it and reports 0.0 for each cut.
    """
    from scenedetect import SceneManager, StatsManager, VideoOpenFailure, open_video
    from scenedetect.detectors import AdaptiveDetector

    if not threshold > 0:
        raise ValueError(f"the adaptive ratio threshold must be positive, got {threshold}")

    rate, claimed = _video_rate(path)
    try:
        # The OpenCV backend (the default) decodes on its own threads: 1.7x less wall time
        # than the PyAV backend on bench-mix for the same CPU.
        video = open_video(str(path), backend="opencv")
    except VideoOpenFailure as exc:
        raise SourceError(f"{path}: PySceneDetect cannot open it ({exc})") from exc
    manager = SceneManager(StatsManager() if strengths else None)
    # Left at its library defaults: min_content_val=15, window_width=2, frames downscaled
    # to about 256 wide. Our own gap suppression replaces min_scene_len.
    detector = AdaptiveDetector(adaptive_threshold=threshold, min_scene_len=1)
    manager.add_detector(detector)
    decoded = manager.detect_scenes(video)
    check_complete(path, decoded, claimed)
    scenes = manager.get_scene_list(start_in_scene=True)
    if not scenes:
        return []
    first = scenes[0][0]
    cuts: list[Cut] = []
    for start, _end in scenes[1:]:
        # OpenCV positions are timestamps; the source rate turns them back into frame indices.
        frame = round((start.seconds - first.seconds) * rate)
        strength = 0.0
        if strengths:
            [value] = manager.stats_manager.get_metrics(start, ["content_val"])
            strength = float(value or 0.0)
        cuts.append(Cut(frame, strength))
    return _suppress_close(cuts, _min_gap(rate))


def detect_cuts_scdet(path: Path, threshold: float = SCDET_THRESHOLD) -> list[int]:
    """Frames where a new shot starts, by ffmpeg's scdet (score > `threshold`, 0-100)."""
    return [c.frame for c in scdet_cuts(path, threshold)]


def detect_cuts_scenedetect(path: Path, threshold: float = SCENEDETECT_THRESHOLD) -> list[int]:
    """Frames where a new shot starts, by PySceneDetect's AdaptiveDetector (ratio `threshold`)."""
    return [c.frame for c in scenedetect_cuts(path, threshold, strengths=False)]


DETECTORS: dict[str, Callable[[Path], list[int]]] = {
    "scenedetect": detect_cuts_scenedetect,
    "scdet": detect_cuts_scdet,
}
_SCORED: dict[str, Callable[[Path], list[Cut]]] = {
    "scenedetect": scenedetect_cuts,
    "scdet": scdet_cuts,
}


def detect_shots(
    path: Path,
    n_frames: int,
    fps: float,
    detector: str = DEFAULT_DETECTOR,
    min_shot_s: float = MIN_SHOT_S,
    max_shot_s: float = MAX_SHOT_S,
) -> tuple[Shot, ...]:
    """Detect cuts in `path` and plan its shots (see `plan_shots`); "auto" = the default."""
    name = DEFAULT_DETECTOR if detector == "auto" else detector
    if name not in _SCORED:
        raise ValueError(f"unknown shot detector {detector!r}; choose from {sorted(_SCORED)}")
    # Fail on bad arguments before spending a decode of the whole source.
    plan_shots([], n_frames, fps, min_shot_s, max_shot_s)
    cuts = _SCORED[name](path)
    return plan_shots(
        [c.frame for c in cuts],
        n_frames,
        fps,
        min_shot_s,
        max_shot_s,
        strengths=[c.strength for c in cuts],
    )


# ---------------------------------------------------------------------------------------------
# Ground truth for scoring detectors on the samples

# Hard cuts inside the real clips the samples reuse, as frame numbers of the clip itself
# (found by scdet, confirmed by looking at the frames on both sides). The other clips
# (bigbuckbunny's first 5.3 s, carphone) are single shots.
CLIP_CUTS: dict[str, tuple[int, ...]] = {"bikes.mp4": (30, 76, 137, 187, 242)}
_CLIP_FPS = 25


def sample_true_cuts(sample: Sample) -> list[int]:
    """Every true cut of a sample: `cut_frames()` plus the real clips' own cuts it contains."""
    cuts = set(sample.cut_frames())
    at = 0
    for piece in sample.pieces:
        length = round(piece.seconds * sample.fps)
        own = CLIP_CUTS.get(piece.name, ()) if piece.lavfi is None else ()
        # The sample trims with an accurate -ss, so its first frame is the clip's first frame
        # at or after `start`; at equal rates clip frames then map one to one.
        first = math.ceil(piece.start * _CLIP_FPS - 1e-9)
        for clip_frame in own:
            if sample.fps == _CLIP_FPS:
                offset = clip_frame - first
            else:
                offset = round((clip_frame / _CLIP_FPS - piece.start) * sample.fps)
            if 0 < offset < length:
                cuts.add(at + offset)
        at += length
    return sorted(cuts)
