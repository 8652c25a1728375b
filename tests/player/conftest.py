from __future__ import annotations

from typing import Any

import msgspec

from streamplane.media.title import Title
from streamplane.player import AbrState, RungInfo

LADDER = (RungInfo(500.0), RungInfo(1000.0), RungInfo(2000.0))


def state(**kw: Any) -> AbrState:
    """A state on the 500/1000/2000 kbps ladder, 4 s segments, 30 s buffer, unless overridden."""
    base: dict[str, Any] = {
        "buffer_s": 0.0,
        "max_buffer_s": 30.0,
        "segment_s": 4.0,
        "rungs": LADDER,
        "next_segment": 0,
    }
    base.update(kw)
    return AbrState(**base)


def make_title(
    rates_bps: list[int], sizes: list[list[int]], vmaf: list[list[float]], durations: list[float]
) -> Title:
    """A minimal title.json in memory: `sizes[rung][segment]` bytes, `vmaf[rung][segment]`."""
    rungs = [
        {
            "id": f"r{k}",
            "codec": "h264",
            "codec_string": "avc1.64001f",
            "width": 640,
            "height": 360,
            "frame_rate": "25",
            "average_bitrate_bps": rate,
            "peak_bitrate_bps": rate * 2,
            "vmaf": 80.0,
            "vmaf_harmonic": 79.0,
            "psnr_y": 40.0,
            "init": f"v/r{k}/init.mp4",
            "playlist": f"v/r{k}/index.m3u8",
            "segment_bytes": sizes[k],
            "shots": [],
            "segment_vmaf": vmaf[k],
        }
        for k, rate in enumerate(rates_bps)
    ]
    start = 0.0
    segments = []
    for i, d in enumerate(durations):
        segments.append(
            {
                "index": i,
                "shot": 0,
                "start_ticks": int(start * 12800),
                "duration_ticks": int(d * 12800),
                "start_s": start,
                "duration_s": d,
            }
        )
        start += d
    return msgspec.convert(
        {
            "schema": 1,
            "title": "t",
            "duration_s": start,
            "frame_rate": "25",
            "width": 640,
            "height": 360,
            "video_timescale": 12800,
            "shots": [],
            "segments": segments,
            "rungs": rungs,
            "audio": [],
        },
        type=Title,
    )
