"""The encode matrix runner: one job = encode one shot (or the whole title) once and score it.

Jobs run on a local process pool, or on a Dask cluster when given its address: the same function
is submitted to either. Each finished job leaves a result file named by the job's key, so an
interrupted run resumes where it stopped; a failed job is retried, then reported. With a Dask
cluster spread over machines, the work directory must be on storage every worker sees.
"""

from __future__ import annotations

import fcntl
import os
import signal
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import msgspec

from streamplane.lifetime import die_with_parent
from streamplane.media.codecs import rate_args
from streamplane.media.errors import DiskFullError, EncodeError
from streamplane.media.ffmpeg import input_args, run_ffmpeg
from streamplane.media.package import write_atomic
from streamplane.media.quality import measure


class EncodeJob(msgspec.Struct, frozen=True):
    """Encode frames of `reference` at `width`x`height` by CRF (optionally VBV-capped), constant
    QP or bitrate, then score it.

    The job's frames are `reference_frames` of the source from `reference_start` on, at
    `frame_rate`. A shot's job with `cuts` set reads them from the shot's cut: the shot decoded
    once into raw frames in that directory by whichever of its jobs runs first, shared by the
    rest (encode and VMAF reference) and removed by `run_matrix` when none of them needs it.
    Without `cuts` (whole-title encodes) the job seeks into the source and decodes its frames
    on the fly, for the encode and again for VMAF.
    """

    shot: int  # -1 for a whole-title encode
    reference: str  # the source file
    reference_frames: int
    display_width: int
    display_height: int
    width: int
    height: int
    codec: str
    preset: str
    output: str
    crf: int | None = None
    bitrate_kbps: int | None = None
    keyframes: tuple[int, ...] = (0,)
    vmaf_subsample: int = 1
    two_pass: bool = False
    reference_start: int = 0
    frame_rate: str = "25/1"
    qp: int | None = None
    maxrate_kbps: int | None = None  # a VBV cap on a CRF encode
    bufsize_kbps: int | None = None
    level: str | None = None  # an H.264 level pinned for the rung (`codecs.h264_level`)
    keep_output: bool = True  # False: only the score is wanted; the encode is deleted after it
    cuts: str = ""  # the directory of the per-shot cuts; not part of the key (same frames)
    # a probe of part of the shot: encode and score only this many of its frames, from its
    # middle (0: all of them); its bits are scaled to the whole shot (`EncodeResult.shot_bits`)
    probe_frames: int = 0
    # score at the encode's own size against the reference scaled down to it, not at the
    # display size: a probe standing for a larger rung (bench/probes.py, lower-resolution probes)
    vmaf_at_encode_size: bool = False

    @property
    def key(self) -> str:
        if self.crf is not None:
            rate = f"q{self.crf}"
        elif self.qp is not None:
            rate = f"qp{self.qp}"
        else:
            rate = f"b{self.bitrate_kbps}"
        if self.maxrate_kbps is not None:
            rate += f"_cap{self.maxrate_kbps}-{self.bufsize_kbps}"
        if self.level is not None:
            rate += f"_L{self.level}"
        shot = "title" if self.shot < 0 else f"s{self.shot:03d}"
        part = f"_part{self.probe_frames}" if self.probe_frames else ""
        own = "_own" if self.vmaf_at_encode_size else ""
        return (
            f"{shot}_{self.codec}_{self.width}x{self.height}_{rate}_{self.preset}"
            f"_vs{self.vmaf_subsample}{part}{own}"
        )

    @property
    def span(self) -> tuple[int, int] | None:
        """(first, end) of the frames a probe of part of the shot reads, from the shot's start;
        None when the job reads them all."""
        if not self.probe_frames or self.probe_frames >= self.reference_frames:
            return None
        first = (self.reference_frames - self.probe_frames) // 2
        return first, first + self.probe_frames

    @property
    def frames_encoded(self) -> int:
        span = self.span
        return self.reference_frames if span is None else span[1] - span[0]

    @property
    def encoded_keyframes(self) -> tuple[int, ...]:
        span = self.span
        if span is None:
            return self.keyframes
        return tuple(sorted({0} | {k - span[0] for k in self.keyframes if span[0] <= k < span[1]}))

    @property
    def cut(self) -> Path | None:
        """The shot's cut this job reads its frames from, if it uses one."""
        if not self.cuts or self.shot < 0:
            return None
        return Path(self.cuts) / f"s{self.shot:03d}.nut"

    def source_input(self) -> list[str]:
        """ffmpeg input arguments that decode exactly this job's frames of the source."""
        span = (self.reference_start, self.reference_frames, Fraction(self.frame_rate))
        return input_args(self.reference, span)

    def reference_input(self) -> list[str]:
        """ffmpeg input arguments that read this job's frames: its shot's cut, or the source."""
        cut = self.cut
        return ["-i", str(cut)] if cut is not None else self.source_input()


class EncodeResult(msgspec.Struct, frozen=True):
    job: EncodeJob
    bytes: int
    vmaf: float
    vmaf_harmonic: float
    psnr_y: float
    encode_cpu_seconds: float
    vmaf_cpu_seconds: float
    # decoding the shot into its cut, charged to the job that made it (0 for the shot's others)
    cut_cpu_seconds: float = 0.0
    frame_vmaf: tuple[float, ...] = ()  # per scored frame (every `vmaf_subsample`-th)
    segment_bytes: tuple[int, ...] = ()  # video bytes from each keyframe to the next

    def segment_rates_bps(self, fps: float) -> list[float]:
        """Bit rate of each of the encode's segments (they start at `job.keyframes`)."""
        if not self.segment_bytes:
            return []
        starts = sorted(set(self.job.keyframes))
        ends = [*starts[1:], self.job.reference_frames]
        return [
            8 * b * fps / (e - s) for b, s, e in zip(self.segment_bytes, starts, ends, strict=True)
        ]

    @property
    def bits(self) -> int:
        return self.bytes * 8

    @property
    def shot_bits(self) -> int:
        """The bits of the whole shot: those of a probe of part of it scaled by its frames."""
        return round(self.bits * self.job.reference_frames / self.job.frames_encoded)

    @property
    def cpu_seconds(self) -> float:
        return self.cut_cpu_seconds + self.encode_cpu_seconds + self.vmaf_cpu_seconds


def encode_and_score(job: EncodeJob) -> EncodeResult:
    """Run one job in this process: encode (unless a complete encode is already there), score."""
    out = Path(job.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    cut_cpu = make_cut(job)
    encode_cpu = run_encode(job, out) if not out.exists() else 0.0
    own = job.vmaf_at_encode_size
    score = measure(
        out,
        job.reference_input(),
        job.width if own else job.display_width,
        job.height if own else job.display_height,
        job.frames_encoded,
        subsample=job.vmaf_subsample,
        reference_span=job.span,
        scale_reference=own,
    )
    size = out.stat().st_size
    segments = segment_bytes(out) if job.keep_output else ()
    if not job.keep_output:
        out.unlink()
    return EncodeResult(
        job=job,
        bytes=size,
        segment_bytes=segments,
        vmaf=score.vmaf,
        vmaf_harmonic=score.vmaf_harmonic,
        psnr_y=score.psnr_y,
        encode_cpu_seconds=encode_cpu,
        vmaf_cpu_seconds=score.cpu_seconds,
        cut_cpu_seconds=cut_cpu,
        frame_vmaf=score.frame_vmaf,
    )


def make_cut(job: EncodeJob) -> float:
    """Decode the job's shot from the source into its cut, unless another job of the shot has
    (or is doing it: they wait on a lock); return the CPU seconds it took this job.

    Raw 8-bit 4:2:0 frames (what every encode and VMAF work in) in NUT: reading them back
    costs a few percent of decoding the CRF-10 sample sources, where FFV1, UT Video or lossless
    x264 cost 27 to 200 % (docs/media.md).
    """
    cut = job.cut
    if cut is None:
        return 0.0
    cut.parent.mkdir(parents=True, exist_ok=True)
    with open(cut.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cut.exists():
            return 0.0
        partial = cut.with_name(f"{cut.stem}.{os.getpid()}.partial.nut")
        try:
            run = run_ffmpeg(
                [*job.source_input(), "-map", "0:v:0", "-pix_fmt", "yuv420p"]
                + ["-c:v", "rawvideo", "-f", "nut", str(partial)],
                what=f"cutting shot {job.shot + 1} from the source",
            )
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.rename(cut)
        return run.cpu_seconds


# NUT's header of a raw frame is under 64 bytes (50 measured at 720p)
_CUT_FRAME_OVERHEAD = 64


def cut_bytes(width: int, height: int, frames: int) -> int:
    """The size of a cut of `frames` frames at `width`x`height`, at most."""
    return frames * (width * height * 3 // 2 + _CUT_FRAME_OVERHEAD) + 4096


def remove_cut(cut: Path) -> None:
    cut.unlink(missing_ok=True)
    cut.with_suffix(".lock").unlink(missing_ok=True)


def segment_bytes(path: Path) -> tuple[int, ...]:
    """Video bytes of each run of packets from one keyframe to the next, by demuxing."""
    import av

    sizes: list[int] = []
    with av.open(str(path)) as container:
        for packet in container.demux(container.streams.video[0]):
            if packet.size == 0:
                continue
            if packet.is_keyframe or not sizes:
                sizes.append(0)
            sizes[-1] += packet.size
    return tuple(sizes)


def _trim(span: tuple[int, int] | None) -> str:
    """The filter that keeps a probe's frames of its shot, or nothing."""
    if span is None:
        return ""
    return f"trim=start_frame={span[0]}:end_frame={span[1]},setpts=PTS-STARTPTS,"


def run_encode(job: EncodeJob, out: Path) -> float:
    """Encode `job` into `out` (atomically: a partial file never has the final name); return
    the CPU seconds the encoder used."""
    partial = out.with_name(out.stem + ".partial" + out.suffix)
    video = rate_args(
        job.codec,
        job.preset,
        job.encoded_keyframes,
        crf=job.crf,
        qp=job.qp,
        bitrate_kbps=job.bitrate_kbps,
        cap_kbps=None if job.maxrate_kbps is None else (job.maxrate_kbps, job.bufsize_kbps or 0),
        level=job.level,
    )
    head = [
        *job.reference_input(),
        "-vf",
        f"{_trim(job.span)}scale={job.width}:{job.height}:flags=bicubic",
    ]
    head += ["-pix_fmt", "yuv420p", "-an", *video]
    what = f"encoding {job.key}"
    cpu = 0.0
    if job.two_pass:
        passlog = str(out.with_suffix(".pass"))
        first = [*head, "-pass", "1", "-passlogfile", passlog, "-f", "null", "-"]
        cpu += run_ffmpeg(first, what + " (first pass)").cpu_seconds
        head += ["-pass", "2", "-passlogfile", passlog]
    try:
        cpu += run_ffmpeg([*head, "-f", "mp4", str(partial)], what).cpu_seconds
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.rename(out)
    for stats in out.parent.glob(out.with_suffix(".pass").name + "*"):
        stats.unlink()
    return cpu


@dataclass
class MatrixOutcome:
    results: dict[str, EncodeResult] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    resumed: int = 0  # jobs whose results were already on disk


def _worker_setup(parent: int) -> None:
    """A pool worker dies with the driver, and SIGTERM kills it (it would otherwise inherit
    whatever handler the driver had, e.g. the CLI's, and carry on)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent)


class _Executor:
    """The two engines behind one small surface: submit a job, iterate finished futures."""

    def __init__(self, workers: int, cluster: str | None) -> None:
        self._client: Any = None
        self._pool: ProcessPoolExecutor | None = None
        if cluster:
            from distributed import Client

            try:
                self._client = Client(cluster, timeout="10s")  # type: ignore[no-untyped-call]
            except OSError as exc:
                raise EncodeError(f"cannot reach the Dask scheduler at {cluster}: {exc}") from exc
        else:
            self._workers = workers
            self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # Workers die with this process, and their ffmpegs with them (`die_with_parent`).
        return ProcessPoolExecutor(
            max_workers=self._workers, initializer=_worker_setup, initargs=(os.getpid(),)
        )

    def submit(self, job: EncodeJob) -> Any:
        if self._client is not None:
            # A fresh key per attempt: Dask would hand back the failed future of a reused key.
            key = f"{job.key}-{uuid.uuid4().hex[:12]}"
            return self._client.submit(encode_and_score, job, pure=False, key=key)
        assert self._pool is not None
        try:
            return self._pool.submit(encode_and_score, job)
        except BrokenProcessPool:
            # A worker died (killed, out of memory): its jobs fail and are retried on a new pool.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(encode_and_score, job)

    def first_done(self, futures: Iterable[Any]) -> set[Any]:
        """Block until at least one future is done; return the done ones."""
        if self._client is not None:
            from distributed import wait

            done = wait(list(futures), return_when="FIRST_COMPLETED").done  # type: ignore[no-untyped-call]
            return set(done)
        return set(futures_wait(list(futures), return_when=FIRST_COMPLETED).done)

    def close(self, abort: bool = False) -> None:
        """Release the engine; `abort` (an error, Ctrl-C, SIGTERM) stops running jobs too,
        rather than waiting minutes for encodes nobody will use."""
        if self._client is not None:
            self._client.close()
        if self._pool is not None:
            if abort:
                # No public way to stop a running task: SIGTERM the workers (their ffmpegs
                # die with them).
                for process in list(getattr(self._pool, "_processes", {}).values()):
                    process.terminate()
            self._pool.shutdown(wait=not abort, cancel_futures=True)


def run_matrix(
    jobs: list[EncodeJob],
    results_dir: Path,
    *,
    workers: int | None = None,
    cluster: str | None = None,
    retries: int = 2,
    on_result: Callable[[EncodeJob, EncodeResult | None], None] | None = None,
) -> MatrixOutcome:
    """Run `jobs` (skipping those with a result on disk), retrying each failure `retries` times.

    A shot's cut is removed as soon as no job of this run needs it any more, and on the way out
    whatever happens, so the cuts on disk are those of the shots being encoded: with jobs
    ordered shot by shot, at most about one per worker.
    """
    results_dir.mkdir(parents=True, exist_ok=True)
    outcome = MatrixOutcome()
    pending: list[EncodeJob] = []
    for job in jobs:
        saved = results_dir / f"{job.key}.json"
        if saved.exists():
            try:
                outcome.results[job.key] = msgspec.json.decode(
                    saved.read_bytes(), type=EncodeResult
                )
                outcome.resumed += 1
                if on_result:
                    on_result(job, outcome.results[job.key])
                continue
            except msgspec.DecodeError:
                saved.unlink()  # a torn write from an interrupted run: redo that job
        pending.append(job)
    if not pending:
        return outcome
    needed: dict[Path, int] = {}
    for job in pending:
        if job.cut is not None:
            needed[job.cut] = needed.get(job.cut, 0) + 1

    def release(job: EncodeJob) -> None:
        if job.cut is not None:
            needed[job.cut] -= 1
            if not needed[job.cut]:
                remove_cut(job.cut)

    executor = _Executor(workers or os.cpu_count() or 1, cluster)
    attempts: dict[str, int] = {}
    finished = False
    try:
        futures: dict[Any, EncodeJob] = {}
        for job in pending:
            futures[executor.submit(job)] = job
            attempts[job.key] = 1
        while futures:
            for fut in executor.first_done(futures):
                job = futures.pop(fut)
                try:
                    result: EncodeResult = fut.result()
                except DiskFullError:
                    raise
                except Exception as exc:  # an encode crashed: retry, then report
                    if attempts[job.key] <= retries:
                        attempts[job.key] += 1
                        futures[executor.submit(job)] = job
                    else:
                        release(job)
                        outcome.failures[job.key] = f"{type(exc).__name__}: {exc}"
                        if on_result:
                            on_result(job, None)
                    continue
                release(job)
                write_atomic(results_dir / f"{job.key}.json", msgspec.json.encode(result))
                outcome.results[job.key] = result
                if on_result:
                    on_result(job, result)
        finished = True
    finally:
        executor.close(abort=not finished)
        for cut, count in needed.items():
            if count:
                remove_cut(cut)
    return outcome


def require_all(outcome: MatrixOutcome, what: str) -> None:
    if outcome.failures:
        lines = "\n".join(f"  {k}: {v}" for k, v in outcome.failures.items())
        raise EncodeError(f"{what}: {len(outcome.failures)} encodes failed after retries\n{lines}")
