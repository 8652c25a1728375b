"""The media plane's job, end to end: source → shots → encode matrix → hulls → ladder →
final encodes → CMAF HLS + DASH package → report.

Work that costs minutes lives in a work directory beside the output (`.<title>.work`) and is
reused by a rerun, so an interrupted run resumes. The package is built in `.<title>.partial`
and renamed into place only when complete: a title directory that exists is a whole title.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import msgspec

from streamplane.media import manifest
from streamplane.media.bdrate import BdRate, bd_rate, monotone_curve
from streamplane.media.codecs import QP_CODECS, h264_level
from streamplane.media.codecs import codec as codec_info
from streamplane.media.errors import DiskFullError, EncodeError, MediaError, PackagingError
from streamplane.media.fastpath import grid_point, predicted_grid, probe_quantisers
from streamplane.media.ffmpeg import input_args, run_ffmpeg
from streamplane.media.fmp4 import read_init
from streamplane.media.ladder import LadderRung, build_ladder, fixed_ladder, matrix_resolutions
from streamplane.media.matrix import (
    EncodeJob,
    EncodeResult,
    MatrixOutcome,
    cut_bytes,
    require_all,
    run_matrix,
)
from streamplane.media.package import (
    PackagedTrack,
    check_alignment,
    pack_shot,
    package_audio,
    peak_and_average_bps,
    video_timescale,
    write_atomic,
)
from streamplane.media.probe import probe
from streamplane.media.quality import pool_psnr
from streamplane.media.report import FixedRung, ReportData, write_report
from streamplane.media.segments import keyframes_in_shot, plan_segments
from streamplane.media.shots import detect_shots
from streamplane.media.title import (
    SCHEMA_VERSION,
    AudioRendition,
    AudioSegment,
    EncodeSummary,
    Rung,
    Segment,
    SegmentTiming,
    Shot,
    ShotChoice,
    SourceInfo,
    Title,
    encode_title,
)


class Progress(Protocol):
    """What the pipeline tells whoever watches it (the CLI draws rich progress bars)."""

    def stage(self, name: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def note(self, text: str) -> None: ...
    def status(self, text: str) -> None: ...


class QuietProgress:
    def stage(self, name: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def status(self, text: str) -> None:
        pass


class EncodeSettings(msgspec.Struct, frozen=True):
    codec: str = "h264"
    mode: str = "fast"  # fast: hulls from probe encodes, final rungs re-encoded; full: one pass
    preset: str = "medium"  # the preset of the shipped encodes
    probe_preset: str = "veryfast"  # the preset of the matrix in fast mode
    # VMAF on every 8th frame: the same ladder as every 4th at 180p, 10 % less probe VMAF CPU
    # (28 % at 720p); benchmarks.md, "The fast path's probes"
    probe_vmaf_subsample: int = 8
    # sparse: probe `probe_count` quantisers of the grid per shot and resolution and predict
    # the rest (fastpath.py); full: probe every grid point
    probe_grid: str = "sparse"
    probe_count: int = 3
    # the share of each shot's frames (from its middle) a probe encodes and scores, its bits
    # scaled to the whole shot; never fewer than PROBE_MIN_FRAMES frames. Half: within 1 %
    # BD-rate of the full matrix on every benchmark title for 6 to 8 points less CPU than
    # whole shots (benchmarks.md, "The fast path's probes").
    probe_share: float = 0.5
    heights: tuple[int, ...] = ()  # matrix resolutions by height; () = scales of the source
    quantisers: tuple[int, ...] = ()  # () = the codec's default grid
    rungs: int = 6
    top_quality: float = 95.0
    bottom_quality: float = 40.0
    segment_target_s: float = 4.0
    segment_min_s: float = 2.0
    segment_max_s: float = 6.0
    max_shot_s: float = 10.0
    shot_detector: str = "auto"
    audio_kbps: int = 128
    baseline: bool = True  # encode the fixed ladder and report BD-rate against it
    qp_anchor: bool = False  # encode whole-title constant-QP anchors and report BD-rate
    # Capped CRF: a rung's shots that would push its peak up are encoded with a VBV of
    # maxrate = vbv_maxrate x the rung's measured average and a buffer of vbv_buffer_s seconds
    # at maxrate (0 = plain CRF).
    vbv_maxrate: float = 1.5
    vbv_buffer_s: float = 2.0
    workers: int = 0  # 0 = one per core
    cluster: str | None = None
    retries: int = 2
    keep_work: bool = False

    def check(self) -> None:
        codec_info(self.codec)
        if self.mode not in ("fast", "full"):
            raise ValueError(f"mode must be 'fast' or 'full', not {self.mode!r}")
        if self.probe_grid not in ("sparse", "full"):
            raise ValueError(f"probe_grid must be 'sparse' or 'full', not {self.probe_grid!r}")
        if not 0 < self.probe_share <= 1:
            raise ValueError("probe_share is a share of each shot's frames: above 0, at most 1")
        if self.probe_count < 2:
            raise ValueError("probe_count must be at least 2 (a curve is predicted from them)")
        if self.rungs < 1:
            raise ValueError("rungs must be at least 1")
        if not 0 < self.segment_min_s <= self.segment_target_s <= self.segment_max_s:
            raise ValueError("segment lengths need 0 < min <= target <= max")
        if self.segment_max_s < 2 * self.segment_min_s:
            raise ValueError("the maximum segment must be at least twice the minimum")
        if self.vbv_maxrate != 0 and not 1 <= self.vbv_maxrate <= 4:
            raise ValueError("vbv_maxrate is a multiple of the rung's average: 0 or 1 to 4")
        if self.vbv_maxrate and not 0 < self.vbv_buffer_s <= 4 * self.segment_max_s:
            raise ValueError("vbv_buffer_s must be positive and at most four segments")
        if self.qp_anchor and self.codec not in QP_CODECS:
            raise ValueError(f"the constant-QP anchor needs one of {', '.join(QP_CODECS)}")

    @property
    def matrix_preset(self) -> str:
        return self.probe_preset if self.mode == "fast" else self.preset

    @property
    def matrix_subsample(self) -> int:
        return self.probe_vmaf_subsample if self.mode == "fast" else 1


@dataclass
class EncodeOutcome:
    title: Title
    directory: Path
    report: Path
    bd_vs_fixed_ladder: BdRate | None
    bd_vs_fixed_qp: BdRate | None
    bd_mixed_vs_shipped: BdRate | None
    bd_vs_constant_qp: BdRate | None = None
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    encodes_run: int = 0
    resumed: int = 0
    fixed_ladder: list[FixedRung] = field(default_factory=list)
    fixed_qp: list[tuple[float, float]] = field(default_factory=list)
    constant_qp: list[tuple[float, float]] = field(default_factory=list)
    mixed: list[tuple[float, float]] = field(default_factory=list)


class _Plan(msgspec.Struct, frozen=True):
    """What the work directory was made for; a rerun reuses it only for the same source."""

    source: str
    source_size: int
    source_mtime_ns: int
    shot_detector: str
    max_shot_s: float
    segment: tuple[float, float, float]
    info: SourceInfo
    shots: tuple[Shot, ...]
    segments: tuple[Segment, ...]


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def encode(
    source: Path,
    out: Path,
    settings: EncodeSettings | None = None,
    progress: Progress | None = None,
    work: Path | None = None,
) -> EncodeOutcome:
    """Encode `source` into the title package `out` (e.g. catalog/my-title).

    `work` holds what a rerun resumes from (default: `.<title>.work` beside `out`).
    """
    settings = settings or EncodeSettings()
    settings.check()
    progress = progress or QuietProgress()
    name = out.name
    if not name or name.startswith("."):
        raise MediaError(f"{out}: a title directory needs a name not starting with '.'")
    work = work or work_dir_for(out)
    work.mkdir(parents=True, exist_ok=True)
    cpu: dict[str, float] = {}

    plan = _plan(source, work, settings, progress)
    info, shots, segments = plan.info, plan.shots, plan.segments
    progress.note(
        f"{info.width}x{info.height} {info.fps:.3f} fps, {info.duration_s:.1f} s: "
        f"{len(shots)} shots, {len(segments)} segments"
    )

    # 1. the encode matrix. Each job decodes its shot's frames from the source itself and, on
    # the fast path, keeps only its score, so scratch space is bounded by the jobs in flight.
    # Full mode ships matrix encodes as they are, so it keeps them until the ladder is chosen.
    keep = settings.mode == "full"
    grid = _quantisers(settings)
    sparse = settings.mode == "fast" and settings.probe_grid == "sparse"
    probed = probe_quantisers(grid, settings.probe_count) if sparse else grid
    jobs = _matrix_jobs(source, info, shots, segments, work / "matrix", settings, keep, probed)
    matrix = _run(jobs, work, settings, progress, "encode matrix")
    require_all(matrix, "encode matrix")
    cpu["matrix"] = sum(r.cpu_seconds for r in matrix.results.values())
    points = tuple(_choice(r) for r in matrix.results.values())
    encoded = {grid_point(p) for p in points}
    if len(probed) < len(set(grid)):
        # the grid points not probed, predicted from those that were (fastpath.py)
        points = tuple(predicted_grid(points, grid))

    # 2. hulls and the ladder
    shot_frames = [s.n_frames for s in shots]
    ladder = build_ladder(
        points, shot_frames, settings.rungs, settings.top_quality, settings.bottom_quality
    )
    progress.note(f"ladder: {len(ladder.rungs)} rungs")

    # 3. the final encodes of every rung's chosen points at the shipped preset, then capped
    # CRF where a shot's segments would push the rung's peak up. Each encode goes into its
    # rungs' segments as soon as it is scored and is deleted, so no encode waits for the title.
    partial = out.parent / f".{name}.partial"
    packer = _Packer(partial, plan, settings)
    final_jobs: dict[tuple[int, int], EncodeJob] = {}
    for i, rung in enumerate(ladder.rungs):
        for c in rung.choices:
            point = (c.shot, c.width, c.height, c.quantiser)
            job = _shot_job(source, info, shots[c.shot], segments, work / "final", settings, point)
            job = msgspec.structs.replace(job, preset=settings.preset, vmaf_subsample=1)
            final_jobs[(i, c.shot)] = _named(job, work / "final")
    shipped = {j.key for j in final_jobs.values()}
    for job in jobs if keep else ():
        if job.key not in shipped:
            Path(job.output).unlink(missing_ok=True)
    try:
        final = _run_packed(final_jobs, packer, work, settings, progress, "final encodes")
        require_all(final, "final encodes")
        if settings.vbv_maxrate:
            final_jobs, final = _cap_peaks(
                final_jobs, final, info, work, settings, progress, packer
            )
    except DiskFullError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    reused = {j.key for j in jobs} & set(final.results)  # full mode ships matrix encodes
    cpu["final"] = sum(r.cpu_seconds for k, r in final.results.items() if k not in reused)

    # 4. the anchors: Apple's fixed ladder and constant-QP encodes of the whole title
    baseline: list[FixedRung] = []
    if settings.baseline:
        baseline, cpu["baseline"] = _fixed_ladder(source, info, segments, work, settings, progress)
    constant_qp: list[tuple[float, float]] = []
    anchor_encodes = 0
    if settings.qp_anchor:
        sizes = sorted({(r.width, r.height) for r in ladder.rungs})
        constant_qp, cpu["qp anchor"], anchor_encodes = _constant_qp(
            source, info, segments, sizes, work, settings, progress
        )

    # 5. package: the audio, the manifests, the report
    encodes_run = len(matrix.results) + len(final.results) - len(reused) + len(baseline)
    encodes_run += anchor_encodes
    try:
        title = _package(
            name,
            source,
            info,
            shots,
            segments,
            ladder.rungs,
            final_jobs,
            final,
            packer,
            settings,
            progress,
            cpu,
            encodes_run,
        )
        title = msgspec.structs.replace(title, artwork=(_poster(source, info, shots, partial),))
        # The fixed-QP anchor comes from matrix encodes, so it is only comparable when the
        # matrix ran at the shipped preset (full mode); fast mode's probes would flatter it.
        fixed_qp = _fixed_qp_curve(points, shots, info) if settings.mode == "full" else []
        ladder_curve = [(r.average_bitrate_bps, r.vmaf) for r in title.rungs]
        mixed_curve = [(a.bits / info.duration_s, a.quality) for a in ladder.mixed if a.feasible]
        fixed_curve = [(f.bitrate_bps, f.vmaf) for f in baseline]
        bd_fixed = bd_rate(fixed_curve, ladder_curve) if fixed_curve else None
        bd_qp = bd_rate(fixed_qp, ladder_curve) if fixed_qp else None
        bd_constant_qp = bd_rate(constant_qp, ladder_curve) if constant_qp else None
        predicted = [
            (a.bits / info.duration_s, a.quality) for a in (r.allocation for r in ladder.rungs)
        ]
        several_sizes = len({(p.width, p.height) for p in points}) > 1
        bd_mixed = bd_rate(predicted, mixed_curve) if mixed_curve and several_sizes else None
        report_dir = partial / "report"
        write_report(
            ReportData(
                title=title,
                matrix=points,
                shot_seconds=tuple(s.n_frames / info.fps for s in shots),
                mixed=tuple(mixed_curve),
                fixed_ladder=tuple(baseline),
                fixed_qp=tuple(fixed_qp),
                constant_qp=tuple(constant_qp),
                bd_vs_constant_qp=bd_constant_qp,
                bd_vs_fixed_ladder=bd_fixed,
                bd_vs_fixed_qp=bd_qp,
                bd_mixed_vs_shipped=bd_mixed,
                mode=settings.mode,
                encodes_run=encodes_run,
                cpu_seconds=cpu,
                predicted=frozenset(grid_point(p) for p in points) - encoded,
            ),
            report_dir,
        )
        (partial / "title.json").write_bytes(encode_title(title))
        packer.finish(len(ladder.rungs))
        _publish(partial, out)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"writing {out}: the disk is full; nothing was published") from exc
        raise
    except KeyboardInterrupt:
        raise  # the packed rungs stay for the rerun
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if not settings.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return EncodeOutcome(
        title=title,
        directory=out,
        report=out / "report",
        bd_vs_fixed_ladder=bd_fixed,
        bd_vs_fixed_qp=bd_qp,
        bd_mixed_vs_shipped=bd_mixed,
        cpu_seconds=cpu,
        encodes_run=encodes_run,
        resumed=matrix.resumed + final.resumed,
        fixed_ladder=baseline,
        fixed_qp=fixed_qp,
        constant_qp=constant_qp,
        bd_vs_constant_qp=bd_constant_qp,
        mixed=mixed_curve,
    )


def _plan(source: Path, work: Path, settings: EncodeSettings, progress: Progress) -> _Plan:
    info = probe(source)
    stat = source.stat()
    seg = (settings.segment_min_s, settings.segment_target_s, settings.segment_max_s)
    saved = work / "plan.json"
    if saved.exists():
        try:
            old = msgspec.json.decode(saved.read_bytes(), type=_Plan)
        except msgspec.DecodeError:
            old = None
        if (
            old is not None
            and (old.source, old.source_size, old.source_mtime_ns)
            == (str(source.resolve()), stat.st_size, stat.st_mtime_ns)
            and (old.shot_detector, old.max_shot_s, old.segment)
            == (settings.shot_detector, settings.max_shot_s, seg)
        ):
            progress.note("resuming: reusing the shot plan and finished encodes of the last run")
            return old
        # Another source or other settings: nothing in the work directory can be trusted.
        shutil.rmtree(work)
        work.mkdir(parents=True)
    progress.stage("detecting shots", 1)
    detector = {} if settings.shot_detector == "auto" else {"detector": settings.shot_detector}
    shots = detect_shots(
        source,
        info.n_frames,
        info.fps,
        min_shot_s=settings.segment_min_s,
        max_shot_s=settings.max_shot_s,
        **detector,
    )
    progress.advance()
    segments = plan_segments(shots, info.fps, seg[1], seg[0], seg[2])
    plan = _Plan(
        str(source.resolve()),
        stat.st_size,
        stat.st_mtime_ns,
        settings.shot_detector,
        settings.max_shot_s,
        seg,
        info,
        shots,
        segments,
    )
    saved.write_bytes(msgspec.json.encode(plan))
    return plan


def scratch_bound(info: SourceInfo, shots: Sequence[Shot], workers: int) -> int:
    """The most scratch space the fast path's work directory takes beyond its plan and result
    files (a few kB per job): per worker, the raw cut of the shot it encodes and its encode in
    flight, which is smaller than those raw frames. Cuts and encodes are removed as soon as no
    job needs them and final encodes go into the package as they finish, so this does not grow
    with the title: only with its largest shot, its picture size and the workers.
    """
    largest = max(s.n_frames for s in shots)
    return 2 * workers * cut_bytes(info.width, info.height, largest)


def _quantisers(settings: EncodeSettings) -> tuple[int, ...]:
    return settings.quantisers or codec_info(settings.codec).quantisers


def _shot_job(
    source: Path,
    info: SourceInfo,
    shot: Shot,
    segments: Sequence[Segment],
    directory: Path,
    settings: EncodeSettings,
    point: tuple[int, int, int, int],
    keep_output: bool = True,
) -> EncodeJob:
    _, width, height, q = point
    job = EncodeJob(
        shot=shot.index,
        reference=str(source),
        reference_frames=shot.n_frames,
        reference_start=shot.start_frame,
        frame_rate=f"{info.fps_num}/{info.fps_den}",
        display_width=info.width,
        display_height=info.height,
        width=width,
        height=height,
        codec=settings.codec,
        preset=settings.matrix_preset,
        output="",
        crf=q,
        keyframes=keyframes_in_shot(shot, tuple(segments)),
        vmaf_subsample=settings.matrix_subsample,
        keep_output=keep_output,
        cuts=str(directory.parent / "cuts"),
    )
    return _named(job, directory)


def _named(job: EncodeJob, directory: Path) -> EncodeJob:
    """The job with its output named by its key in `directory`."""
    return msgspec.structs.replace(job, output=str(directory / f"{job.key}.mp4"))


def title_job(
    source: Path,
    info: SourceInfo,
    keyframes: tuple[int, ...],
    settings: EncodeSettings,
    size: tuple[int, int],
    **rate: int | bool,
) -> EncodeJob:
    """A whole-title encode at the shipped preset, e.g. for an anchor: by default only its bits
    and score are kept (`output` is left for the caller to name)."""
    return EncodeJob(
        shot=-1,
        reference=str(source),
        reference_frames=info.n_frames,
        frame_rate=f"{info.fps_num}/{info.fps_den}",
        display_width=info.width,
        display_height=info.height,
        width=size[0],
        height=size[1],
        codec=settings.codec,
        preset=settings.preset,
        output="",
        keyframes=keyframes,
        keep_output=False,
        **rate,  # type: ignore[arg-type]
    )


def _matrix_jobs(
    source: Path,
    info: SourceInfo,
    shots: Sequence[Shot],
    segments: Sequence[Segment],
    directory: Path,
    settings: EncodeSettings,
    keep_output: bool,
    quantisers: Sequence[int],
) -> list[EncodeJob]:
    sizes = matrix_resolutions(info.width, info.height, settings.heights or None)
    jobs = [
        _shot_job(
            source, info, shot, segments, directory, settings, (shot.index, w, h, q), keep_output
        )
        for shot in shots
        for (w, h) in sizes
        for q in quantisers
    ]
    if settings.mode != "fast" or settings.probe_share >= 1:
        return jobs
    return [
        _named(
            msgspec.structs.replace(j, probe_frames=probe_frames(j.reference_frames, settings)),
            directory,
        )
        for j in jobs
    ]


PROBE_MIN_FRAMES = 24


def probe_frames(shot_frames: int, settings: EncodeSettings) -> int:
    """How many of a shot's frames its probes encode (0: all of them)."""
    n = max(PROBE_MIN_FRAMES, round(settings.probe_share * shot_frames))
    return 0 if n >= shot_frames else n


_CAP_ROUNDS = 4
# The packaged segments carry fragment headers the encode's packets do not, so the rounds aim a
# little under the 2x the manifests must honour.
_PEAK_LIMIT = 1.8


def _video_bits(results: Sequence[EncodeResult]) -> int:
    """The video bits of the encodes, without their containers (as the segments carry them)."""
    return sum(8 * sum(r.segment_bytes) if r.segment_bytes else r.bits for r in results)


def _cap_peaks(
    final_jobs: dict[tuple[int, int], EncodeJob],
    final: MatrixOutcome,
    info: SourceInfo,
    work: Path,
    settings: EncodeSettings,
    progress: Progress,
    packer: _Packer,
) -> tuple[dict[tuple[int, int], EncodeJob], MatrixOutcome]:
    """Capped CRF: re-encode a rung's shots with a VBV cap derived from the rung's average.

    The cap comes from the rung's measured average (the probe encodes of the fast path
    mispredict the shipped preset's bits), so the rung is first encoded at plain CRF. A shot
    whose segments all stay under the cap keeps that encode (the cap would not bind); the others
    are encoded again with maxrate = `vbv_maxrate` x the average and a buffer of `vbv_buffer_s`
    seconds at maxrate. A buffer lets a segment burst past maxrate (a shot's encode starts with
    it nearly full), and capping lowers the average, so rounds follow for any shot whose segment
    still exceeds twice the rung's average, its cap scaled by the limit over its last peak: the
    declared peak (HLS BANDWIDTH) stays within 2x the average.
    """
    fps = info.fps
    outcome = MatrixOutcome(dict(final.results), {}, final.resumed)
    jobs = dict(final_jobs)
    for round_ in range(_CAP_ROUNDS):
        redo: dict[tuple[int, int], EncodeJob] = {}
        for i in sorted({i for i, _ in jobs}):
            keys = [k for k in jobs if k[0] == i]
            results = [outcome.results[jobs[k].key] for k in keys]
            average = _video_bits(results) / info.duration_s
            maxrate = settings.vbv_maxrate * average
            limit = maxrate if round_ == 0 else _PEAK_LIMIT * average
            for k, r in zip(keys, results, strict=True):
                peak = max(r.segment_rates_bps(fps), default=0.0)
                if peak <= limit:
                    continue
                if r.job.maxrate_kbps is not None:
                    # still too high: aim the cap so the last peak would have met the limit
                    maxrate = min(maxrate, 1000 * r.job.maxrate_kbps * limit / peak)
                kbps = max(1, round(maxrate / 1000))
                capped = msgspec.structs.replace(
                    jobs[k],
                    maxrate_kbps=kbps,
                    bufsize_kbps=max(1, round(kbps * settings.vbv_buffer_s)),
                )
                redo[k] = _named(capped, work / "final")
        pinned, raised = _one_level_per_rung(jobs, redo, fps, work)
        redo.update(pinned)
        for i in raised:
            packer.new_headers(i)
        if not redo:
            break
        capped_run = _run_packed(
            redo, packer, work, settings, progress, f"capped CRF, round {round_ + 1}"
        )
        require_all(capped_run, "capped CRF encodes")
        outcome.results.update(capped_run.results)
        outcome.resumed += capped_run.resumed
        jobs.update(redo)
    for i in sorted({i for i, _ in jobs}):
        results = [outcome.results[j.key] for k, j in jobs.items() if k[0] == i]
        average = _video_bits(results) / info.duration_s
        peak = max(max(r.segment_rates_bps(fps), default=0.0) for r in results)
        if peak > 2 * average:
            # the encoder's floor (its highest quantiser) for the hardest shot is above the cap
            progress.note(
                f"capped CRF: rung v{i}'s peak stays at {peak / average:.1f}x its average: "
                "its hardest shot does not fit under the cap at this resolution"
            )
    return jobs, outcome


def _one_level_per_rung(
    jobs: dict[tuple[int, int], EncodeJob],
    redo: dict[tuple[int, int], EncodeJob],
    fps: float,
    work: Path,
) -> tuple[dict[tuple[int, int], EncodeJob], set[int]]:
    """The encodes to (re)run so that every shot of a rung with capped H.264 encodes declares
    one level, the highest its caps need (a rung has one init segment), and the rungs whose
    packed shots this raises above their level (every shot of theirs is then among the
    encodes, so the rung takes new headers).

    Only where a cap raises the level above the one the frame size gives are the rung's
    encodes pinned to it, plain ones encoded again; otherwise x264 picks the same level for
    capped and plain encodes itself, and pinning could only disagree with its choice (which
    also weighs its reference frames against the level's picture buffer).
    `jobs` are the encodes packed so far, `redo` this round's capped ones.
    """
    pinned: dict[tuple[int, int], EncodeJob] = {}
    raised_rungs: set[int] = set()
    for i in sorted({i for i, _ in redo}):
        rung = {k: redo.get(k, j) for k, j in jobs.items() if k[0] == i}
        first = next(iter(rung.values()))
        if first.codec != "h264":
            continue
        size = (first.width, first.height, fps)
        levels = [h264_level(*size)]
        levels += [j.level for j in rung.values() if j.level is not None]
        levels += [
            h264_level(*size, (j.maxrate_kbps, j.bufsize_kbps or 0))
            for j in rung.values()
            if j.maxrate_kbps is not None
        ]
        level = max(levels, key=float)
        raised = float(level) > float(levels[0])
        pinned.update(
            (k, _named(msgspec.structs.replace(job, level=level), work / "final"))
            for k, job in rung.items()
            if job.level != level and raised
        )
        packed = [j.level for k, j in jobs.items() if k[0] == i and j.level is not None]
        if float(level) > float(max([levels[0], *packed], key=float)):
            raised_rungs.add(i)
    return pinned, raised_rungs


class _Tally:
    """What the progress line says while a stage runs: shots whose jobs are all done, encodes
    done, CPU spent, and the CPU the rest should take at the mean so far."""

    def __init__(self, jobs: Sequence[EncodeJob], workers: int) -> None:
        self.left_by_shot: dict[int, int] = {}
        for job in jobs:
            self.left_by_shot[job.shot] = self.left_by_shot.get(job.shot, 0) + 1
        self.shots = sum(1 for s in self.left_by_shot if s >= 0)
        self.total = len(jobs)
        self.done = 0
        self.cpu = 0.0
        self.workers = workers

    def add(self, job: EncodeJob, result: EncodeResult | None) -> str:
        self.done += 1
        self.left_by_shot[job.shot] -= 1
        if result is not None:
            self.cpu += result.cpu_seconds
        return self.line()

    def line(self) -> str:
        shots_done = sum(1 for s, n in self.left_by_shot.items() if s >= 0 and n == 0)
        parts = [f"{self.done}/{self.total} encodes"]
        if self.shots:
            parts.insert(0, f"{shots_done}/{self.shots} shots")
        parts.append(f"{self.cpu:.0f} CPU s")
        if self.done and self.done < self.total:
            left = self.cpu / self.done * (self.total - self.done)
            parts.append(f"~{left:.0f} CPU s left (~{left / self.workers:.0f} s on {self.workers})")
        return ", ".join(parts)


def _run(
    jobs: list[EncodeJob],
    work: Path,
    settings: EncodeSettings,
    progress: Progress,
    what: str,
    then: Callable[[EncodeResult], None] | None = None,
) -> MatrixOutcome:
    """Run the jobs; `then` is called with each result, in this process, as it arrives."""
    jobs = list({j.key: j for j in jobs}.values())  # one run per distinct encode
    progress.stage(what, len(jobs))
    workers = settings.workers or os.cpu_count() or 1
    tally = _Tally(jobs, workers)
    progress.status(tally.line())

    def done(job: EncodeJob, result: EncodeResult | None) -> None:
        if result is not None and then is not None:
            then(result)
        progress.status(tally.add(job, result))
        progress.advance()

    return run_matrix(
        jobs,
        work / "results",
        workers=settings.workers or None,
        cluster=settings.cluster,
        retries=settings.retries,
        on_result=done,
    )


class _Packed(msgspec.Struct, frozen=True):
    """What one shot's encode became in one rung: the ledger entry of `_Packer`."""

    key: str  # the encode packed
    point: str  # the same encode without a VBV cap: the point of the ladder it stands for
    first_segment: int
    starts: tuple[int, ...]
    durations: tuple[int, ...]
    sizes: tuple[int, ...]


def _point(job: EncodeJob) -> str:
    return msgspec.structs.replace(job, maxrate_kbps=None, bufsize_kbps=None, level=None).key


class _Packer:
    """Builds the rungs' segments in the package directory (`.TITLE.partial`) while the final
    encodes run: each encode is packed into every rung that uses it as soon as it is scored,
    then deleted. Scratch space then holds only the encodes in flight.

    A ledger beside the segments (`.packing/`) says which encode each rung's shot holds, so a
    rerun after a kill or Ctrl-C keeps what was packed; it belongs to one shot plan and
    settings, and anything else found there is discarded.
    """

    def __init__(self, directory: Path, plan: _Plan, settings: EncodeSettings) -> None:
        self.directory = directory
        self.ledger = directory / ".packing"
        info = plan.info
        self.timescale = video_timescale(info.fps_num, info.fps_den)
        ticks_per_frame = Fraction(self.timescale * info.fps_den, info.fps_num)
        self.start_ticks = {s.index: int(s.start_frame * ticks_per_frame) for s in plan.shots}
        self.first_segment: dict[int, int] = {}
        for seg in plan.segments:
            self.first_segment.setdefault(seg.shot, seg.index)
        identity = msgspec.json.encode((plan, settings.codec, settings.preset))
        stamp = self.ledger / "plan.json"
        if not stamp.exists() or stamp.read_bytes() != identity:
            shutil.rmtree(directory, ignore_errors=True)
            self.ledger.mkdir(parents=True)
            write_atomic(stamp, identity)

    def _entry(self, rung: int, shot: int) -> Path:
        return self.ledger / f"v{rung}_s{shot:03d}.json"

    def packed(self, rung: int, shot: int) -> _Packed | None:
        try:
            return msgspec.json.decode(self._entry(rung, shot).read_bytes(), type=_Packed)
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def holds(self, use: tuple[int, int], job: EncodeJob) -> bool:
        """Whether the rung's shot holds this encode, or one that replaced it (capped)."""
        entry = self.packed(*use)
        return entry is not None and (job.key == entry.key or job.key == entry.point)

    def pack(self, use: tuple[int, int], result: EncodeResult) -> None:
        rung, shot = use
        done = pack_shot(
            Path(result.job.output),
            self.directory / "v" / f"v{rung}",
            self.first_segment[shot],
            self.start_ticks[shot],
            self.timescale,
        )
        entry = _Packed(
            result.job.key,
            _point(result.job),
            done.first_segment,
            done.starts,
            done.durations,
            done.sizes,
        )
        write_atomic(self._entry(rung, shot), msgspec.json.encode(entry))

    def new_headers(self, rung: int) -> None:
        """Let the rung take a new init segment: every one of its shots is being encoded again
        at a raised level (`_one_level_per_rung`), and the first packed sets the headers."""
        (self.directory / "v" / f"v{rung}" / "init.mp4").unlink(missing_ok=True)

    def track(self, rung: int, jobs: Sequence[EncodeJob]) -> PackagedTrack:
        """The rung as packed, checked to hold exactly `jobs` (its shots' final encodes)."""
        entries = []
        for job in jobs:
            entry = self.packed(rung, job.shot)
            if entry is None or entry.key != job.key:
                raise PackagingError(
                    f"rung v{rung}: shot {job.shot + 1} holds {entry and entry.key}, not {job.key}"
                )
            entries.append(entry)
        entries.sort(key=lambda e: e.first_segment)
        directory = self.directory / "v" / f"v{rung}"
        init = read_init((directory / "init.mp4").read_bytes())
        n = sum(len(e.sizes) for e in entries)
        return PackagedTrack(
            codec_string=init.codec_string,
            timescale=init.timescale,
            init_path=directory / "init.mp4",
            segment_paths=tuple(directory / f"seg_{k}.m4s" for k in range(1, n + 1)),
            starts=tuple(t for e in entries for t in e.starts),
            durations=tuple(d for e in entries for d in e.durations),
            sizes=tuple(b for e in entries for b in e.sizes),
            width=init.width,
            height=init.height,
        )

    def finish(self, rungs: int) -> None:
        """Drop the ledger, and the rungs of an earlier ladder this one no longer has."""
        shutil.rmtree(self.ledger)
        for old in (self.directory / "v").iterdir():
            if (
                not (old.name.startswith("v") and old.name[1:].isdigit())
                or int(old.name[1:]) >= rungs
            ):
                shutil.rmtree(old)


def _run_packed(
    jobs: dict[tuple[int, int], EncodeJob],
    packer: _Packer,
    work: Path,
    settings: EncodeSettings,
    progress: Progress,
    what: str,
) -> MatrixOutcome:
    """Run final encodes (keyed by (rung, shot)), each packed into its rungs as it arrives.

    Jobs run shot by shot, so a shot's jobs share its cut. A job whose result survives from an
    earlier run but whose encode is gone unpacked (packed into a package since discarded) is
    run again.
    """
    uses: dict[str, list[tuple[int, int]]] = {}
    for use, job in sorted(jobs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        uses.setdefault(job.key, []).append(use)
    by_key = {j.key: j for j in jobs.values()}
    results = work / "results"
    for key, used in uses.items():
        saved = results / f"{key}.json"
        if not saved.exists() or all(packer.holds(u, by_key[key]) for u in used):
            continue
        try:
            old = msgspec.json.decode(saved.read_bytes(), type=EncodeResult)
        except msgspec.DecodeError:
            continue  # run_matrix redoes a torn result
        if not Path(old.job.output).exists():
            saved.unlink()

    def pack(result: EncodeResult) -> None:
        todo = [u for u in uses[result.job.key] if not packer.holds(u, result.job)]
        for use in todo:
            packer.pack(use, result)
        Path(result.job.output).unlink(missing_ok=True)

    return _run([by_key[k] for k in uses], work, settings, progress, what, then=pack)


def _choice(result: EncodeResult) -> ShotChoice:
    job = result.job
    assert job.crf is not None
    return ShotChoice(
        job.shot, job.width, job.height, job.crf, result.shot_bits, round(result.vmaf, 4)
    )


def _fixed_ladder(
    source: Path,
    info: SourceInfo,
    segments: Sequence[Segment],
    work: Path,
    settings: EncodeSettings,
    progress: Progress,
) -> tuple[list[FixedRung], float]:
    keys = tuple(s.start_frame for s in segments)
    two_pass = settings.codec in ("h264", "vp9")
    jobs = [
        _named(
            title_job(source, info, keys, settings, (w, h), bitrate_kbps=kbps, two_pass=two_pass),
            work / "baseline",
        )
        for w, h, kbps in fixed_ladder(info.width, info.height)
    ]
    outcome = _run(jobs, work, settings, progress, "fixed ladder (baseline)")
    require_all(outcome, "fixed ladder")
    rungs = []
    for job in jobs:
        r = outcome.results[job.key]
        assert job.bitrate_kbps is not None
        rungs.append(
            FixedRung(job.width, job.height, job.bitrate_kbps, r.bits / info.duration_s, r.vmaf)
        )
    return rungs, sum(outcome.results[j.key].cpu_seconds for j in jobs)


def _constant_qp(
    source: Path,
    info: SourceInfo,
    segments: Sequence[Segment],
    sizes: Sequence[tuple[int, int]],
    work: Path,
    settings: EncodeSettings,
    progress: Progress,
) -> tuple[list[tuple[float, float]], float, int]:
    """The fixed-QP anchor of Netflix's dynamic optimizer paper: whole-title encodes at the
    encoder's constant quantiser (one QP for every frame of the title, no adaptive
    quantisation), at each resolution the ladder ships and each QP of the grid, at the shipped
    preset; the curve is their upper hull across resolutions."""
    keys = tuple(s.start_frame for s in segments)
    jobs = [
        _named(title_job(source, info, keys, settings, size, qp=q), work / "qp-anchor")
        for size in sizes
        for q in _quantisers(settings)
    ]
    outcome = _run(jobs, work, settings, progress, "constant-QP anchor")
    require_all(outcome, "constant-QP anchor")
    results = [outcome.results[j.key] for j in jobs]
    curve = monotone_curve([r.bits / info.duration_s for r in results], [r.vmaf for r in results])
    return curve, sum(r.cpu_seconds for r in results), len(jobs)


def _fixed_qp_curve(
    points: Sequence[ShotChoice], shots: Sequence[Shot], info: SourceInfo
) -> list[tuple[float, float]]:
    """Whole-title fixed-quantiser encodes, derived from the matrix: one (resolution, CRF) for
    every shot. The curve is the hull across resolutions, as in Netflix's fixed-QP anchor."""
    by_setting: dict[tuple[int, int, int], list[ShotChoice]] = {}
    for p in points:
        by_setting.setdefault((p.width, p.height, p.quantiser), []).append(p)
    total = sum(s.n_frames for s in shots)
    curve = []
    for group in by_setting.values():
        if len(group) != len(shots):
            continue
        bits = sum(p.bits for p in group)
        vmaf = sum(p.vmaf * shots[p.shot].n_frames for p in group) / total
        curve.append((bits / info.duration_s, vmaf))
    return monotone_curve([r for r, _ in curve], [q for _, q in curve])


def _package(
    name: str,
    source: Path,
    info: SourceInfo,
    shots: Sequence[Shot],
    segments: Sequence[Segment],
    rungs: Sequence[LadderRung],
    final_jobs: dict[tuple[int, int], EncodeJob],
    final: MatrixOutcome,
    packer: _Packer,
    settings: EncodeSettings,
    progress: Progress,
    cpu: dict[str, float],
    encodes_run: int,
) -> Title:
    fps = Fraction(info.fps_num, info.fps_den)
    timescale = packer.timescale
    directory = packer.directory
    progress.stage("packaging CMAF HLS + DASH", len(rungs) + len(info.audio))
    tracks: list[PackagedTrack] = []
    video_rungs: list[tuple[str, LadderRung, list[EncodeResult]]] = []
    for i, rung in enumerate(rungs):
        rung_id = f"v{i}"
        rung_jobs = [final_jobs[(i, c.shot)] for c in rung.choices]
        results = [final.results[j.key] for j in rung_jobs]
        tracks.append(packer.track(i, rung_jobs))
        video_rungs.append((rung_id, rung, results))
        progress.advance()
    check_alignment(tracks, segments, fps)
    ticks = tracks[0]
    timings = tuple(
        SegmentTiming(
            index=s.index,
            shot=s.shot,
            start_ticks=start,
            duration_ticks=dur,
            start_s=start / timescale,
            duration_s=dur / timescale,
        )
        for s, start, dur in zip(segments, ticks.starts, ticks.durations, strict=True)
    )
    seg_seconds = [t.duration_s for t in timings]
    total_frames = sum(s.n_frames for s in shots)
    out_rungs = []
    for (rung_id, rung, results), track in zip(video_rungs, tracks, strict=True):
        peak, avg = peak_and_average_bps(track.sizes, seg_seconds)
        frames = [shots[r.job.shot].n_frames for r in results]
        vmaf = sum(r.vmaf * n for r, n in zip(results, frames, strict=True)) / total_frames
        # Harmonic and MSE pooling over all frames, rebuilt exactly from the per-shot pools.
        hmean = (
            total_frames
            / sum(n / (1 + r.vmaf_harmonic) for r, n in zip(results, frames, strict=True))
            - 1
        )
        psnr = pool_psnr([r.psnr_y for r, n in zip(results, frames, strict=True) for _ in range(n)])
        by_shot = {r.job.shot: r for r in results}
        out_rungs.append(
            Rung(
                id=rung_id,
                codec=settings.codec,
                codec_string=track.codec_string,
                width=rung.width,
                height=rung.height,
                frame_rate=f"{info.fps_num}/{info.fps_den}",
                average_bitrate_bps=avg,
                peak_bitrate_bps=peak,
                vmaf=round(vmaf, 3),
                vmaf_harmonic=round(hmean, 3),
                psnr_y=round(psnr, 3),
                init=f"v/{rung_id}/init.mp4",
                playlist=f"v/{rung_id}/playlist.m3u8",
                segment_bytes=track.sizes,
                segment_vmaf=tuple(
                    segment_vmaf(by_shot[s.shot], s, shots[s.shot]) for s in segments
                ),
                shots=tuple(
                    ShotChoice(
                        r.job.shot,
                        r.job.width,
                        r.job.height,
                        r.job.crf or 0,
                        r.bits,
                        round(r.vmaf, 3),
                    )
                    for r in results
                ),
            )
        )
    audio = []
    for track_info in info.audio:
        aid = f"a{track_info.index}"
        atrack = package_audio(
            source,
            track_info.index,
            directory / "a" / aid,
            [Fraction(t.start_ticks, timescale) for t in timings],
            Fraction(sum(t.duration_ticks for t in timings), timescale),
            settings.audio_kbps,
        )
        durations_s = [d / atrack.timescale for d in atrack.durations]
        peak, avg = peak_and_average_bps(atrack.sizes, durations_s)
        audio.append(
            AudioRendition(
                id=aid,
                codec="aac",
                codec_string=atrack.codec_string,
                channels=atrack.channels,
                sample_rate=atrack.sample_rate,
                language=track_info.language,
                average_bitrate_bps=avg,
                peak_bitrate_bps=peak,
                timescale=atrack.timescale,
                init=f"a/{aid}/init.mp4",
                playlist=f"a/{aid}/playlist.m3u8",
                segments=tuple(
                    AudioSegment(s, d, b)
                    for s, d, b in zip(atrack.starts, atrack.durations, atrack.sizes, strict=True)
                ),
            )
        )
        progress.advance()
    title = Title(
        schema=SCHEMA_VERSION,
        title=name,
        duration_s=round(sum(seg_seconds), 6),
        frame_rate=f"{info.fps_num}/{info.fps_den}",
        width=info.width,
        height=info.height,
        video_timescale=timescale,
        shots=tuple(shots),
        segments=timings,
        rungs=tuple(out_rungs),
        audio=tuple(audio),
        encode=EncodeSummary(
            mode=settings.mode,
            codec=settings.codec,
            preset=settings.preset,
            probe_preset=settings.matrix_preset,
            encodes_run=encodes_run,
            cpu_seconds=round(sum(cpu.values()), 2),
        ),
    )
    _write_manifests(title, directory)
    return title


def segment_vmaf(result: EncodeResult, segment: Segment, shot: Shot) -> float:
    """Mean VMAF of the segment's frames, from the per-frame scores of its shot's encode."""
    step = result.job.vmaf_subsample
    first = segment.start_frame - shot.start_frame
    scores = [
        v for i, v in enumerate(result.frame_vmaf) if first <= i * step < first + segment.n_frames
    ]
    if not scores:
        raise EncodeError(f"{result.job.key}: no VMAF scores for segment {segment.index + 1}")
    return round(sum(scores) / len(scores), 3)


def _poster(source: Path, info: SourceInfo, shots: Sequence[Shot], directory: Path) -> str:
    """A still for the catalog: the middle frame of the longest shot, 640 pixels wide."""
    shot = max(shots, key=lambda s: s.n_frames)
    name = "poster.jpg"
    frame = (shot.start_frame + shot.n_frames // 2, 1, Fraction(info.fps_num, info.fps_den))
    run_ffmpeg(
        [
            *input_args(source, frame),
            *["-vf", "scale=640:-2", "-frames:v", "1", "-q:v", "3", str(directory / name)],
        ],
        what="extracting the poster frame",
    )
    return name


def _write_manifests(title: Title, directory: Path) -> None:
    seg_names = [f"seg_{n}.m4s" for n in range(1, len(title.segments) + 1)]
    for rung in title.rungs:
        text = manifest.hls_media_playlist(
            [s.duration_s for s in title.segments], "init.mp4", seg_names
        )
        (directory / rung.playlist).write_text(text)
    for a in title.audio:
        names = [f"seg_{n}.m4s" for n in range(1, len(a.segments) + 1)]
        text = manifest.hls_media_playlist(
            [s.duration_ticks / a.timescale for s in a.segments], "init.mp4", names
        )
        (directory / a.playlist).write_text(text)
    (directory / title.hls).write_text(manifest.hls_master(title))
    (directory / title.dash).write_text(manifest.dash_mpd(title))


def _publish(partial: Path, out: Path) -> None:
    """Swap the finished package into place; a reader sees the old title or the new, whole."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)
