"""Encoder settings per codec as ffmpeg arguments. Pure.

Every encode is built to be cut into segments a player can switch between: IDR frames exactly at
the segment starts it is given (`force_key_frames` + forced IDR), no other keyframes (scene-cut
detection off, an unbounded GOP), closed GOPs, and headers that do not depend on the content
(x264 `stitchable`, x265 `repeat-headers`) so per-shot encodes of one rung concatenate into one
valid stream.
"""

from __future__ import annotations

from dataclasses import dataclass

PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower")


@dataclass(frozen=True)
class Codec:
    name: str  # the name streamplane uses (h264, hevc, vp9, av1)
    encoder: str  # ffmpeg encoder
    quantisers: tuple[int, ...]  # default CRF grid of the encode matrix
    quantiser_range: tuple[int, int]


CODECS: dict[str, Codec] = {
    "h264": Codec("h264", "libx264", (18, 22, 26, 30, 34, 38, 42), (0, 51)),
    "hevc": Codec("hevc", "libx265", (20, 24, 28, 32, 36, 40, 44), (0, 51)),
    "vp9": Codec("vp9", "libvpx-vp9", (20, 27, 34, 41, 48, 55, 62), (0, 63)),
    "av1": Codec("av1", "libsvtav1", (20, 27, 34, 41, 48, 55, 62), (1, 63)),
}


# Codecs whose encoder has a true constant-quantiser mode (`-qp`), for the fixed-QP anchor.
QP_CODECS = ("h264", "hevc")


def codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}") from None


def _check_preset(preset: str) -> int:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS.index(preset)


def keyframe_expr(keyframes: tuple[int, ...]) -> str:
    """An ffmpeg `force_key_frames` expression true exactly at these frame numbers."""
    if not keyframes:
        return "expr:eq(n,0)"
    return "expr:" + "+".join(f"eq(n,{k})" for k in sorted(set(keyframes)))


# H.264 levels (ITU-T H.264 Table A-1): (level, MaxMBPS, MaxFS, MaxBR kbit/s, MaxCPB kbit).
_H264_LEVELS = (
    ("1", 1_485, 99, 64, 175),
    ("1.1", 3_000, 396, 192, 500),
    ("1.2", 6_000, 396, 384, 1_000),
    ("1.3", 11_880, 396, 768, 2_000),
    ("2", 11_880, 396, 2_000, 2_000),
    ("2.1", 19_800, 792, 4_000, 4_000),
    ("2.2", 20_250, 1_620, 4_000, 4_000),
    ("3", 40_500, 1_620, 10_000, 10_000),
    ("3.1", 108_000, 3_600, 14_000, 14_000),
    ("3.2", 216_000, 5_120, 20_000, 20_000),
    ("4", 245_760, 8_192, 20_000, 25_000),
    ("4.1", 245_760, 8_192, 50_000, 62_500),
    ("4.2", 522_240, 8_704, 50_000, 62_500),
    ("5", 589_824, 22_080, 135_000, 135_000),
    ("5.1", 983_040, 36_864, 240_000, 240_000),
    ("5.2", 2_073_600, 36_864, 240_000, 240_000),
    ("6", 4_177_920, 139_264, 240_000, 240_000),
    ("6.1", 8_355_840, 139_264, 480_000, 480_000),
    ("6.2", 16_711_680, 139_264, 800_000, 800_000),
)
_HIGH_PROFILE_RATE = 1.25  # High profile's cpbBrVclFactor over Main's (Table A-2)


def h264_level(width: int, height: int, fps: float, cap_kbps: tuple[int, int] | None = None) -> str:
    """The lowest H.264 (High profile) level whose limits hold a `width` x `height` stream at
    `fps` and, for a capped encode, its VBV (maxrate, bufsize): the level x264 picks itself.

    A rung's shots share one init segment, so they must share one level: x264 raises the
    level of a capped encode whose maxrate the frame size's level cannot carry (and with it the
    decoded-picture-buffer fields of the SPS), so the packager pins the rung's shots to this."""
    mbs = -(-width // 16) * -(-height // 16)
    for level, max_mbps, max_fs, max_br, max_cpb in _H264_LEVELS:
        if mbs > max_fs or mbs * fps > max_mbps:
            continue
        if cap_kbps is not None and (
            cap_kbps[0] > max_br * _HIGH_PROFILE_RATE or cap_kbps[1] > max_cpb * _HIGH_PROFILE_RATE
        ):
            continue
        return level
    raise ValueError(f"no H.264 level holds {width}x{height} at {fps:g} fps with VBV {cap_kbps}")


def rate_args(
    name: str,
    preset: str,
    keyframes: tuple[int, ...],
    *,
    crf: int | None = None,
    qp: int | None = None,
    bitrate_kbps: int | None = None,
    cap_kbps: tuple[int, int] | None = None,
    threads: int = 1,
    level: str | None = None,
) -> list[str]:
    """ffmpeg output arguments for one video encode: by quality (crf, optionally capped by a
    VBV of `cap_kbps` = (maxrate, bufsize)), by constant quantiser (qp) or by bitrate; `level`
    pins an H.264 encode's level (otherwise the encoder picks it)."""
    c = codec(name)
    speed = _check_preset(preset)
    if sum(x is not None for x in (crf, qp, bitrate_kbps)) != 1:
        raise ValueError("give exactly one of crf, qp and bitrate_kbps")
    q = crf if crf is not None else qp
    if q is not None and not c.quantiser_range[0] <= q <= c.quantiser_range[1]:
        lo, hi = c.quantiser_range
        raise ValueError(f"{name} quantiser {q} is outside {lo}..{hi}")
    if qp is not None and name not in QP_CODECS:
        raise ValueError(f"a constant-QP encode needs one of {', '.join(QP_CODECS)}, not {name}")
    if cap_kbps is not None and crf is None:
        raise ValueError("a VBV cap applies to a CRF encode")
    args = ["-c:v", c.encoder, "-force_key_frames", keyframe_expr(keyframes)]
    if crf is not None:
        args += ["-crf", str(crf)]
        if cap_kbps is not None:
            maxrate, bufsize = cap_kbps
            if maxrate <= 0 or bufsize <= 0:
                raise ValueError("a VBV cap needs a positive maxrate and bufsize")
            args += ["-maxrate", f"{maxrate}k", "-bufsize", f"{bufsize}k"]
    elif qp is not None:
        args += ["-qp", str(qp)]
    elif bitrate_kbps is not None:
        # Capped VBR with a 200 % peak, as Apple's authoring specification allows.
        args += ["-b:v", f"{bitrate_kbps}k", "-maxrate", f"{2 * bitrate_kbps}k"]
        args += ["-bufsize", f"{2 * bitrate_kbps}k"]
    if level is not None and name != "h264":
        raise ValueError(f"a pinned level applies to an H.264 encode, not {name}")
    if name == "h264":
        args += ["-preset", preset, "-forced-idr", "1", "-threads", str(threads)]
        if level is not None:
            args += ["-level", level]
        args += ["-x264-params", "keyint=infinite:scenecut=0:open-gop=0:stitchable=1"]
    elif name == "hevc":
        args += ["-preset", preset, "-forced-idr", "1", "-tag:v", "hev1"]
        # info=0: x265's settings SEI (its CRF among them) would otherwise sit in the hvcC,
        # making each shot's init segment differ from the rung's
        params = "keyint=-1:scenecut=0:open-gop=0:repeat-headers=1:info=0:log-level=error"
        args += ["-x265-params", f"{params}:pools={threads}:frame-threads={threads}"]
    elif name == "vp9":
        # libvpx speed 0 (slowest) .. 8; map our presets onto 8..1.
        args += ["-deadline", "good", "-cpu-used", str(max(1, 8 - speed)), "-row-mt", "1"]
        args += ["-g", "100000", "-auto-alt-ref", "1", "-lag-in-frames", "16"]
        args += ["-threads", str(threads)]
        if crf is not None and cap_kbps is None:
            args += ["-b:v", "0"]  # constant quality; with a cap, libvpx's -b:v is the ceiling
        elif crf is not None and cap_kbps is not None:
            args += ["-b:v", f"{cap_kbps[0]}k"]
    elif name == "av1":
        # SVT-AV1 preset 13 (fastest) .. 0; map our presets onto 12..5.
        args += ["-preset", str(12 - speed), "-g", "100000"]
        args += ["-svtav1-params", f"scd=0:lp={threads}"]
    return args
