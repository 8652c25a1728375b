"""The feed's capture clock: stamped into each frame as it is made, read back after x264."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import av
import imageio_ffmpeg

from streamplane.live.feed import clock_code_graph, read_clock_code


def test_every_frame_carries_the_wall_clock_it_was_made_at_through_a_lossy_encode(
    tmp_path: Path,
) -> None:
    out = tmp_path / "clock.mp4"
    before = time.time()
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-re", "-f", "lavfi",
         "-i", "testsrc2=s=426x240:r=25", "-t", "1.2", "-filter_complex",
         clock_code_graph("0:v", "v") + ";[v]scale=-2:144[small]", "-map", "[small]",
         "-c:v", "libx264", "-preset", "ultrafast", "-b:v", "150k", str(out)],
        check=True,
    )  # fmt: skip
    after = time.time()
    with av.open(str(out)) as container:
        made = [
            read_clock_code(frame.to_ndarray(format="gray"), int(before * 1000)) / 1000
            for frame in container.decode(video=0)
        ]
    assert len(made) == 30
    # each frame's instant lies within the run, in order, each its own (-re paces them)
    assert all(before <= t <= after for t in made), (before, made, after)
    assert made == sorted(made)
    assert len(set(made)) > 20


def test_the_clock_unwraps_to_the_instant_nearest_the_reference() -> None:
    now_ms = 1_800_000_000_123
    low = now_ms % (1 << 32)
    rows = 240
    strip = [255 if low >> (x * 30 // rows) & 1 else 0 for x in range(426)]
    luma = [[0] * 426 for _ in range(rows)]
    luma[rows - int(rows / 60) - 1] = strip
    for near in (now_ms - 5_000, now_ms, now_ms + 86_400_000):
        assert read_clock_code(luma, near) == now_ms
