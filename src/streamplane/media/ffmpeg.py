"""The one way streamplane runs ffmpeg: the binary shipped in the imageio-ffmpeg wheel
(it carries libvmaf, x264, x265, libvpx-vp9 and SVT-AV1; Debian's ffmpeg has no libvmaf).

Every run reports the CPU seconds its process used, so benchmarks can count compute.
"""

from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path

from streamplane.lifetime import child_setup
from streamplane.media.errors import DiskFullError, MediaError


@cache
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary, `STREAMPLANE_FFMPEG` first, then the imageio-ffmpeg wheel's."""
    override = os.environ.get("STREAMPLANE_FFMPEG")
    if override:
        return override
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


@dataclass(frozen=True)
class FfmpegRun:
    cpu_seconds: float
    stderr: str


class FfmpegError(MediaError):
    def __init__(self, what: str, returncode: int, stderr: str) -> None:
        tail = "\n".join(stderr.strip().splitlines()[-8:])
        super().__init__(f"{what}: ffmpeg exited with {returncode}\n{tail}")
        self.what = what
        self.returncode = returncode
        self.stderr = stderr

    def __reduce__(self) -> tuple[type[FfmpegError], tuple[str, int, str]]:
        # Errors cross process boundaries (process pool, Dask): rebuild from the same arguments.
        return (FfmpegError, (self.what, self.returncode, self.stderr))


def input_args(path: Path | str, frames: tuple[int, int, Fraction] | None = None) -> list[str]:
    """`-i path`, or with `frames` = (first, count, fps) only those frames of a constant-rate
    source, decoded on the fly: no frame ever lands on disk.

    The seek point and the duration sit half a frame before a frame's time, so ffmpeg's accurate
    seek (its default when decoding) keeps exactly `count` frames from `first` on, whatever
    rounding the container's timestamps carry.
    """
    if frames is None:
        return ["-i", str(path)]
    first, count, fps = frames
    start = Fraction(first) - Fraction(1, 2) if first > 0 else Fraction(0)
    end = Fraction(first + count) - Fraction(1, 2)
    args = ["-ss", f"{float(start / fps):.6f}"] if first > 0 else []
    return [*args, "-t", f"{float((end - start) / fps):.6f}", "-i", str(path)]


_DISK_FULL_MARKERS = ("No space left on device", "ENOSPC")


def run_ffmpeg(args: list[str], what: str, cwd: Path | None = None) -> FfmpegRun:
    """Run ffmpeg with `args`; raise `FfmpegError` (or `DiskFullError`) naming `what` failed."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=child_setup(),
    )
    assert proc.stderr is not None
    try:
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C, SIGTERM: the encode is of no use any more
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        if any(m in stderr for m in _DISK_FULL_MARKERS):
            raise DiskFullError(f"{what}: the disk is full ({os.strerror(errno.ENOSPC)})")
        raise FfmpegError(what, proc.returncode, stderr)
    return FfmpegRun(cpu_seconds=cpu, stderr=stderr)
