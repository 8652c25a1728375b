"""The encode matrix runner: one job = encode one shot (or the whole title) once and score it.

Jobs run on a local process pool, or on a Dask cluster when given its address: the same function
is submitted to either. Each finished job leaves a result file named by the job's key, so an
interrupted run resumes where it stopped; a failed job is retried, then reported. With a Dask
cluster spread over machines, the work directory must be on storage every worker sees.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from streamplane.media.codecs import rate_args
from streamplane.media.errors import DiskFullError, EncodeError
from streamplane.media.ffmpeg import input_args, run_ffmpeg
from streamplane.media.quality import measure


class EncodeJob(msgspec.Struct, frozen=True):
    """Encode `reference` at `width`x`height`, by CRF or by bitrate, then score it."""

    shot: int  # -1 for a whole-title encode
    reference: str  # mezzanine: lossless frames of the shot (or an ffconcat list of them)
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

    @property
    def key(self) -> str:
        rate = f"q{self.crf}" if self.crf is not None else f"b{self.bitrate_kbps}"
        shot = "title" if self.shot < 0 else f"s{self.shot:03d}"
        return (
            f"{shot}_{self.codec}_{self.width}x{self.height}_{rate}_{self.preset}"
            f"_vs{self.vmaf_subsample}"
        )


class EncodeResult(msgspec.Struct, frozen=True):
    job: EncodeJob
    bytes: int
    vmaf: float
    vmaf_harmonic: float
    psnr_y: float
    encode_cpu_seconds: float
    vmaf_cpu_seconds: float
    frame_vmaf: tuple[float, ...] = ()  # per scored frame (every `vmaf_subsample`-th)

    @property
    def bits(self) -> int:
        return self.bytes * 8

    @property
    def cpu_seconds(self) -> float:
        return self.encode_cpu_seconds + self.vmaf_cpu_seconds


def encode_and_score(job: EncodeJob) -> EncodeResult:
    """Run one job in this process: encode (unless a complete encode is already there), score."""
    out = Path(job.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    encode_cpu = 0.0
    if not out.exists():
        encode_cpu = _encode(job, out)
    score = measure(
        out,
        Path(job.reference),
        job.display_width,
        job.display_height,
        job.reference_frames,
        subsample=job.vmaf_subsample,
    )
    return EncodeResult(
        job=job,
        bytes=out.stat().st_size,
        vmaf=score.vmaf,
        vmaf_harmonic=score.vmaf_harmonic,
        psnr_y=score.psnr_y,
        encode_cpu_seconds=encode_cpu,
        vmaf_cpu_seconds=score.cpu_seconds,
        frame_vmaf=score.frame_vmaf,
    )


def _encode(job: EncodeJob, out: Path) -> float:
    partial = out.with_name(out.stem + ".partial" + out.suffix)
    video = rate_args(
        job.codec, job.preset, job.keyframes, crf=job.crf, bitrate_kbps=job.bitrate_kbps
    )
    head = [*input_args(job.reference), "-vf", f"scale={job.width}:{job.height}:flags=bicubic"]
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
            self._pool = ProcessPoolExecutor(max_workers=workers)

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
            self._pool = ProcessPoolExecutor(max_workers=self._workers)
            return self._pool.submit(encode_and_score, job)

    def first_done(self, futures: Iterable[Any]) -> set[Any]:
        """Block until at least one future is done; return the done ones."""
        if self._client is not None:
            from distributed import wait

            done = wait(list(futures), return_when="FIRST_COMPLETED").done  # type: ignore[no-untyped-call]
            return set(done)
        return set(futures_wait(list(futures), return_when=FIRST_COMPLETED).done)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


def run_matrix(
    jobs: list[EncodeJob],
    results_dir: Path,
    *,
    workers: int | None = None,
    cluster: str | None = None,
    retries: int = 2,
    on_result: Callable[[EncodeJob, EncodeResult | None], None] | None = None,
) -> MatrixOutcome:
    """Run `jobs` (skipping those with a result on disk), retrying each failure `retries` times."""
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
    executor = _Executor(workers or os.cpu_count() or 1, cluster)
    attempts: dict[str, int] = {}
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
                        outcome.failures[job.key] = f"{type(exc).__name__}: {exc}"
                        if on_result:
                            on_result(job, None)
                    continue
                _write_atomic(results_dir / f"{job.key}.json", msgspec.json.encode(result))
                outcome.results[job.key] = result
                if on_result:
                    on_result(job, result)
    finally:
        executor.close()
    return outcome


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == 28:
            raise DiskFullError(f"writing {path}: the disk is full") from exc
        raise
    tmp.replace(path)


def require_all(outcome: MatrixOutcome, what: str) -> None:
    if outcome.failures:
        lines = "\n".join(f"  {k}: {v}" for k, v in outcome.failures.items())
        raise EncodeError(f"{what}: {len(outcome.failures)} encodes failed after retries\n{lines}")
