"""The fMP4 reader against ffmpeg's real output and against synthetic box streams."""

from __future__ import annotations

import itertools
import re
import struct
from pathlib import Path

import av
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.media.errors import PackagingError
from streamplane.media.ffmpeg import run_ffmpeg
from streamplane.media.fmp4 import (
    Sample,
    iter_boxes,
    read_fragment,
    read_init,
    read_samples,
    retime_fragment,
    split_fragmented,
    write_fragment,
)
from streamplane.media.package import AUDIO_FLAGS

CMAF_FLAGS = ["-f", "mp4", "-movflags", "cmaf+frag_keyframe+empty_moov+default_base_moof"]
VIDEO_SRC = ["-f", "lavfi", "-i", "testsrc2=s=320x180:r=25"]
GOP = ["-g", "25", "-keyint_min", "25"]

# name -> (ffmpeg arguments, seconds, codec string pattern)
ENCODES: dict[str, tuple[list[str], int, str]] = {
    "h264": (
        [*VIDEO_SRC, "-c:v", "libx264", *GOP, "-sc_threshold", "0"],
        4,
        r"avc1\.64[0-9a-f]{4}",  # x264 picks High profile for 8-bit 4:2:0
    ),
    "hevc": (
        # x265 defaults to open GOPs, whose leading pictures would shift the fragment cuts
        [*VIDEO_SRC, "-c:v", "libx265", "-tag:v", "hvc1", *GOP],
        2,
        r"hvc1\.1\.6\.L\d+(\.[0-9A-F]{1,2})*",  # Main profile
    ),
    "vp9": (
        [*VIDEO_SRC, "-c:v", "libvpx-vp9", *GOP, "-deadline", "realtime", "-cpu-used", "8"],
        2,
        r"vp09\.00\.\d\d\.08",
    ),
    "av1": (
        [*VIDEO_SRC, "-c:v", "libsvtav1", "-preset", "12", "-g", "25"],
        2,
        r"av01\.0\.\d\d[MH]\.08",
    ),
    "aac": (
        [
            *("-f", "lavfi", "-i", "sine=sample_rate=48000"),
            *("-c:a", "aac", "-ac", "2", "-frag_duration", "1000000"),
        ],
        4,
        r"mp4a\.40\.2",
    ),
}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out_dir = tmp_path_factory.mktemp("fmp4")
    paths = {}
    for name, (args, seconds, _) in ENCODES.items():
        out = out_dir / f"{name}.mp4"
        extra = ["-x265-params", "log-level=error:open-gop=0"] if name == "hevc" else []
        run_ffmpeg([*args, *extra, "-t", str(seconds), *CMAF_FLAGS, str(out)], name)
        paths[name] = out
    return paths


@pytest.mark.parametrize("name", list(ENCODES))
def test_real_files_split_and_read(encoded: dict[str, Path], name: str) -> None:
    data = encoded[name].read_bytes()
    init, segments = split_fragmented(data)
    top = [b.type for b in iter_boxes(data)]
    assert top[:2] == ["ftyp", "moov"]
    # Nothing but the trailing index is lost, and the pieces are the file's bytes in order.
    kept = b"".join([init, *segments])
    dropped = [b for b in iter_boxes(data) if b.type in ("mfra", "sidx")]
    assert len(kept) + sum(b.size for b in dropped) == len(data)
    assert [b.type for b in iter_boxes(init)] == ["ftyp", "moov"]

    track = read_init(init)
    assert re.fullmatch(ENCODES[name][2], track.codec_string), track.codec_string
    assert read_init(data) == track  # a whole file reads the same as its init segment

    with av.open(str(encoded[name])) as container:
        stream = container.streams[0]
        assert stream.time_base is not None
        assert stream.time_base.denominator == track.timescale
        if name == "aac":
            assert track.handler == "soun"
            assert track.sample_rate == stream.codec_context.sample_rate == 48000
            assert track.channels == stream.codec_context.channels == 2
        else:
            assert track.handler == "vide"
            assert (track.width, track.height) == (320, 180)

    infos = [
        read_fragment(s, track.default_sample_duration, track.default_sample_flags)
        for s in segments
    ]
    at = 0
    for number, (segment, info) in enumerate(zip(segments, infos, strict=True), start=1):
        assert info.sequence_number == number
        assert info.track_id == track.track_id
        assert info.base_media_decode_time == at  # back to back, from 0
        assert info.first_sample_is_sync and info.starts_with_sync
        assert info.size == len(segment)
        mdat = next(b for b in iter_boxes(segment) if b.type == "mdat")
        assert info.sample_bytes == mdat.size - mdat.header_size
        at += info.duration

    seconds = ENCODES[name][1]
    if name == "aac":
        # whole AAC frames, but ffmpeg shortens the last one to end where the input ends
        assert all(i.duration % 1024 == 0 for i in infos[:-1])
        assert abs(at / track.timescale - seconds) < 0.05
    else:
        assert [i.sample_count for i in infos] == [25] * seconds
        assert [i.duration for i in infos] == [track.timescale] * seconds


def test_avc_codec_string_matches_the_stream(encoded: dict[str, Path]) -> None:
    track = read_init(split_fragmented(encoded["h264"].read_bytes())[0])
    with av.open(str(encoded["h264"])) as container:
        ctx = container.streams.video[0].codec_context
        assert ctx.profile == "High"
        assert track.codec_string == f"avc1.6400{ctx.level:02x}"


def test_truncated_real_file_raises(encoded: dict[str, Path]) -> None:
    data = encoded["h264"].read_bytes()
    boxes = list(iter_boxes(data))
    moof = next(b for b in boxes if b.type == "moof")
    for cut in (10, moof.start - 3, moof.end, moof.end + 20, len(data) - 1):
        with pytest.raises(PackagingError):
            split_fragmented(data[:cut])


# -------------------------------------------------------------------------------------------
# Synthetic boxes


def box(kind: str, payload: bytes = b"", large: bool = False, to_end: bool = False) -> bytes:
    raw = kind.encode("latin-1")
    if to_end:
        return struct.pack(">I4s", 0, raw) + payload
    if large:
        return struct.pack(">I4sQ", 1, raw, 16 + len(payload)) + payload
    return struct.pack(">I4s", 8 + len(payload), raw) + payload


def full(kind: str, version: int, flags: int, payload: bytes = b"") -> bytes:
    return box(kind, struct.pack(">I", version << 24 | flags) + payload)


def moof(
    seq: int,
    base_time: int,
    durations: list[int] | None,
    sizes: list[int],
    *,
    tfhd_duration: int | None = None,
    first_flags: int | None = None,
    sample_flags: list[int] | None = None,
    tfhd_flags_value: int | None = None,
    tfdt_version: int = 1,
) -> bytes:
    tf_flags = 0x020000
    tf_payload = struct.pack(">I", 1)
    if tfhd_duration is not None:
        tf_flags |= 0x08
        tf_payload += struct.pack(">I", tfhd_duration)
    if tfhd_flags_value is not None:
        tf_flags |= 0x20
        tf_payload += struct.pack(">I", tfhd_flags_value)
    tfdt = (
        full("tfdt", 1, 0, struct.pack(">Q", base_time))
        if tfdt_version == 1
        else full("tfdt", 0, 0, struct.pack(">I", base_time))
    )
    tr_flags = 0x01 | 0x200
    header = struct.pack(">I", len(sizes)) + struct.pack(">i", 0)
    if first_flags is not None:
        tr_flags |= 0x04
        header += struct.pack(">I", first_flags)
    if durations is not None:
        tr_flags |= 0x100
    if sample_flags is not None:
        tr_flags |= 0x400
    rows = b""
    for i, size in enumerate(sizes):
        if durations is not None:
            rows += struct.pack(">I", durations[i])
        rows += struct.pack(">I", size)
        if sample_flags is not None:
            rows += struct.pack(">I", sample_flags[i])
    traf = box(
        "traf",
        full("tfhd", 0, tf_flags, tf_payload) + tfdt + full("trun", 0, tr_flags, header + rows),
    )
    return box("moof", full("mfhd", 0, 0, struct.pack(">I", seq)) + traf)


def fragment(seq: int, base_time: int, durations: list[int], styp: bool = False) -> bytes:
    sizes = [3] * len(durations)
    prefix = box("styp", b"msdh\x00\x00\x00\x00msdhmsix") if styp else b""
    return prefix + moof(seq, base_time, durations, sizes) + box("mdat", b"\xab" * sum(sizes))


FTYP = box("ftyp", b"iso6\x00\x00\x02\x00iso6cmfc")


def sample_entry_init(
    entry: str,
    config_box: str,
    config: bytes,
    *,
    audio: bool = False,
    mdhd_version: int = 0,
    tkhd_version: int = 0,
    timescale: int = 90000,
    trex: tuple[int, int] | None = (0, 0),
    edts: bytes = b"",
) -> bytes:
    """A minimal one-track moov, enough for `read_init`."""
    child = box(config_box, config)
    if audio:
        fixed = (
            bytes(6)
            + struct.pack(">H", 1)
            + bytes(8)
            + struct.pack(">HHHHI", 2, 16, 0, 0, 44100 << 16)
        )
    else:
        fixed = (
            bytes(6)
            + struct.pack(">H", 1)
            + bytes(16)
            + struct.pack(">HH", 1920, 1080)
            + struct.pack(">III", 0x00480000, 0x00480000, 0)
            + struct.pack(">H", 1)
            + bytes(32)
            + struct.pack(">Hh", 24, -1)
        )
    stsd = full("stsd", 0, 0, struct.pack(">I", 1) + box(entry, fixed + child))
    if mdhd_version == 1:
        mdhd = full("mdhd", 1, 0, struct.pack(">QQIQ", 0, 0, timescale, 0) + bytes(4))
    else:
        mdhd = full("mdhd", 0, 0, struct.pack(">IIII", 0, 0, timescale, 0) + bytes(4))
    hdlr = full("hdlr", 0, 0, bytes(4) + (b"soun" if audio else b"vide") + bytes(12) + b"\x00")
    times = struct.pack(">QQI", 0, 0, 7) + bytes(4) + bytes(8)
    if tkhd_version == 0:
        times = struct.pack(">III", 0, 0, 7) + bytes(4) + bytes(4)
    tkhd = full(
        "tkhd",
        tkhd_version,
        3,
        times + bytes(8 + 8 + 36) + struct.pack(">II", 1920 << 16, 1080 << 16),
    )
    minf = box("minf", box("stbl", stsd))
    trak = box("trak", tkhd + edts + box("mdia", mdhd + hdlr + minf))
    mvex = b""
    if trex is not None:
        mvex = box("mvex", full("trex", 0, 0, struct.pack(">5I", 7, 1, trex[0], 0, trex[1])))
    return FTYP + box("moov", box("mvhd", bytes(100)) + trak + mvex)


def esds(asc: bytes, oti: int = 0x40) -> bytes:
    def descriptor(tag: int, payload: bytes, long_size: bool = False) -> bytes:
        if long_size:  # ffmpeg writes 4-byte sizes: 0x80 0x80 0x80 n
            return bytes([tag, 0x80, 0x80, 0x80, len(payload)]) + payload
        return bytes([tag, len(payload)]) + payload

    dsi = descriptor(0x05, asc)
    dcd = descriptor(0x04, bytes([oti, 0x15]) + bytes(3) + bytes(8) + dsi, long_size=True)
    es = descriptor(0x03, struct.pack(">HB", 1, 0) + dcd + descriptor(0x06, b"\x02"))
    return bytes(4) + es


@pytest.mark.parametrize(
    ("entry", "config_box", "config", "expected"),
    [
        ("avc1", "avcC", bytes([1, 0x64, 0x00, 0x1F, 0xFF]), "avc1.64001f"),
        ("avc3", "avcC", bytes([1, 0x42, 0xC0, 0x1E, 0xFF]), "avc3.42c01e"),
        # The examples of ISO/IEC 14496-15 Annex E.3
        (
            "hvc1",
            "hvcC",
            bytes([1, 0x01, 0x60, 0, 0, 0, 0xB0, 0, 0, 0, 0, 0, 93]),
            "hvc1.1.6.L93.B0",
        ),
        (
            "hev1",
            "hvcC",
            bytes([1, 0x22, 0x20, 0, 0, 0, 0xB0, 0, 0, 0, 0, 0, 120]),
            "hev1.2.4.H120.B0",
        ),
        (
            "hvc1",
            "hvcC",
            bytes([1, 0x01, 0x60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 93]),
            "hvc1.1.6.L93",  # all-zero constraint bytes are all trailing, so all omitted
        ),
        ("vp09", "vpcC", bytes([1, 0, 0, 0, 2, 31, 0xA2, 1, 16, 9, 0, 0]), "vp09.02.31.10"),
        ("av01", "av1C", bytes([0x81, 0x08, 0x0C, 0]), "av01.0.08M.08"),
        ("av01", "av1C", bytes([0x81, 0x2D, 0xC0, 0]), "av01.1.13H.10"),
        ("av01", "av1C", bytes([0x81, 0x44, 0x60, 0]), "av01.2.04M.12"),
    ],
)
def test_video_codec_strings(entry: str, config_box: str, config: bytes, expected: str) -> None:
    track = read_init(sample_entry_init(entry, config_box, config))
    assert track.codec_string == expected
    assert track.sample_entry == entry
    assert track.config == config
    assert (track.width, track.height, track.track_id) == (1920, 1080, 7)


@pytest.mark.parametrize(
    ("asc", "oti", "expected"),
    [
        (bytes([0x11, 0x90]), 0x40, "mp4a.40.2"),  # AAC LC, 48 kHz, stereo
        (bytes([0x2B, 0x92, 0x08, 0x00]), 0x40, "mp4a.40.5"),  # HE-AAC
        (bytes([0xF9, 0x40, 0x00]), 0x40, "mp4a.40.42"),  # escaped type: 32 + 10 (USAC)
        (b"", 0x6B, "mp4a.6B"),  # MP3
    ],
)
def test_audio_codec_strings(asc: bytes, oti: int, expected: str) -> None:
    track = read_init(sample_entry_init("mp4a", "esds", esds(asc, oti), audio=True))
    assert track.codec_string == expected
    assert (track.channels, track.sample_rate, track.handler) == (2, 44100, "soun")


@pytest.mark.parametrize("mdhd_version", [0, 1])
@pytest.mark.parametrize("tkhd_version", [0, 1])
def test_header_versions(mdhd_version: int, tkhd_version: int) -> None:
    init = sample_entry_init(
        "avc1",
        "avcC",
        bytes([1, 0x4D, 0x40, 0x28]),
        mdhd_version=mdhd_version,
        tkhd_version=tkhd_version,
        timescale=30000,
        trex=(1001, 0x10000),
    )
    track = read_init(init)
    assert (track.timescale, track.track_id) == (30000, 7)
    assert (track.default_sample_duration, track.default_sample_flags) == (1001, 0x10000)


def test_init_errors() -> None:
    with pytest.raises(PackagingError, match="moov"):
        read_init(FTYP)
    with pytest.raises(PackagingError, match="no avcC"):
        read_init(sample_entry_init("avc1", "colr", b"nclx"))
    with pytest.raises(PackagingError, match="unsupported sample entry"):
        read_init(sample_entry_init("mp4v", "esds", esds(b"")))
    with pytest.raises(PackagingError, match="too short"):
        read_init(sample_entry_init("hvc1", "hvcC", bytes(5)))


def test_fragment_duration_sources() -> None:
    mdat = box("mdat", bytes(6))
    per_sample = read_fragment(moof(3, 100, [10, 20], [3, 3], tfdt_version=0) + mdat)
    assert (per_sample.sequence_number, per_sample.base_media_decode_time) == (3, 100)
    assert (per_sample.duration, per_sample.sample_count, per_sample.sample_bytes) == (30, 2, 6)

    from_tfhd = read_fragment(moof(1, 2**40, None, [3, 3], tfhd_duration=512) + mdat)
    assert (from_tfhd.base_media_decode_time, from_tfhd.duration) == (2**40, 1024)

    from_trex = read_fragment(moof(1, 0, None, [3, 3]) + mdat, default_sample_duration=1001)
    assert from_trex.duration == 2002
    with pytest.raises(PackagingError, match="trex"):
        read_fragment(moof(1, 0, None, [3, 3]) + mdat)
    with pytest.raises(PackagingError, match="trex"):  # ffmpeg's trex says 0
        read_fragment(moof(1, 0, None, [3, 3]) + mdat, default_sample_duration=0)


@pytest.mark.parametrize(
    ("kwargs", "trex_flags", "sync"),
    [
        ({}, None, True),
        ({}, 0x01010000, False),
        ({"tfhd_flags_value": 0x01010000}, None, False),
        ({"tfhd_flags_value": 0x01010000, "first_flags": 0x02000000}, None, True),
        ({"tfhd_flags_value": 0x02000000, "first_flags": 0x01010000}, None, False),
        ({"sample_flags": [0x01010000, 0x02000000]}, None, False),
        ({"sample_flags": [0x02000000, 0x01010000]}, 0x01010000, True),
        ({"sample_flags": [0x01010000, 0x0], "first_flags": 0}, None, True),
    ],
)
def test_first_sample_sync(kwargs: dict[str, object], trex_flags: int | None, sync: bool) -> None:
    segment = moof(1, 0, [1, 1], [3, 3], **kwargs) + box("mdat", bytes(6))  # type: ignore[arg-type]
    info = read_fragment(segment, default_sample_flags=trex_flags)
    assert info.first_sample_is_sync is sync


def test_fragment_errors() -> None:
    good = moof(1, 0, [1], [3])
    with pytest.raises(PackagingError, match="no mdat"):
        read_fragment(good)
    with pytest.raises(PackagingError, match="no moof"):
        read_fragment(box("mdat", bytes(3)) + good)
    # a trun that claims a third sample its table does not hold
    lying = bytearray(moof(1, 0, [1, 1], [3, 3]))
    count_at = lying.index(b"trun") + 8
    lying[count_at : count_at + 4] = struct.pack(">I", 3)
    with pytest.raises(PackagingError, match="too short"):
        read_fragment(bytes(lying) + box("mdat", bytes(9)))


Walk = list[tuple[str, int, int, bytes]]  # (type, start, size, payload) per box


@st.composite
def box_streams(draw: st.DrawFn) -> tuple[bytes, Walk]:
    """Side-by-side boxes with 32-bit, 64-bit and to-the-end sizes; also the expected walk."""
    kinds = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ", min_size=4, max_size=4)
    kinds = kinds.filter(lambda k: k != "uuid")  # its header is 16 bytes longer
    items = draw(
        st.lists(st.tuples(kinds, st.binary(max_size=40), st.booleans()), min_size=0, max_size=8)
    )
    last_to_end = draw(st.booleans())
    data = b""
    expected = []
    for i, (kind, payload, large) in enumerate(items):
        to_end = last_to_end and i == len(items) - 1
        raw = box(kind, payload, large=large and not to_end, to_end=to_end)
        expected.append((kind, len(data), len(raw), payload))
        data += raw
    return data, expected


@given(box_streams(), st.binary(max_size=12), st.binary(max_size=12))
def test_iter_boxes_walks_synthetic_streams(
    stream: tuple[bytes, Walk], before: bytes, after: bytes
) -> None:
    data, expected = stream
    boxes = list(iter_boxes(data))
    assert [(b.type, b.start, b.size) for b in boxes] == [e[:3] for e in expected]
    assert [data[b.payload_start : b.end] for b in boxes] == [e[3] for e in expected]
    # the same walk inside a window of a larger buffer, as for a box's children
    shifted = list(iter_boxes(before + data + after, len(before), len(before) + len(data)))
    assert [(b.type, b.start - len(before), b.end - len(before)) for b in shifted] == [
        (b.type, b.start, b.end) for b in boxes
    ]


@given(box_streams(), st.data())
def test_iter_boxes_truncated_raises(stream: tuple[bytes, Walk], data: st.DataObject) -> None:
    raw, expected = stream
    if not raw:
        return
    boundaries = {start for _, start, _, _ in expected} | {len(raw)}
    # a size-0 box has no fixed length, so a cut inside it is just a shorter box
    if struct.unpack_from(">I", raw, expected[-1][1])[0] == 0:
        boundaries |= set(range(expected[-1][1] + 8, len(raw) + 1))
    cut = data.draw(st.integers(0, len(raw)).filter(lambda c: c not in boundaries))
    with pytest.raises(PackagingError):
        list(iter_boxes(raw[:cut]))


@st.composite
def fragmented_files(draw: st.DrawFn) -> tuple[bytes, bytes, list[bytes]]:
    """A synthetic fragmented file with its expected init segment and media segments."""
    init = FTYP + box("moov", box("mvhd", bytes(100)))
    data = init
    segments = []
    at = 0
    for seq in range(1, draw(st.integers(1, 5)) + 1):
        if draw(st.booleans()):
            data += box("free", bytes(draw(st.integers(0, 8))))
        durations = draw(st.lists(st.integers(1, 3000), min_size=1, max_size=5))
        segment = fragment(seq, at, durations, styp=draw(st.booleans()))
        at += sum(durations)
        segments.append(segment)
        data += segment
    if draw(st.booleans()):
        data += box("mfra", box("mfro", bytes(8)))
    return data, init, segments


@settings(max_examples=60)
@given(fragmented_files(), st.data())
def test_split_synthetic_files(file: tuple[bytes, bytes, list[bytes]], data: st.DataObject) -> None:
    raw, init, segments = file
    got_init, got_segments = split_fragmented(raw)
    assert got_init == init
    assert got_segments == segments
    infos = [read_fragment(s) for s in got_segments]
    assert [i.sequence_number for i in infos] == list(range(1, len(segments) + 1))
    assert all(
        a.base_media_decode_time + a.duration == b.base_media_decode_time
        for a, b in itertools.pairwise(infos)
    )

    # A cut anywhere either raises PackagingError or yields a prefix of the real answer.
    cut = data.draw(st.integers(0, len(raw) - 1))
    try:
        cut_init, cut_segments = split_fragmented(raw[:cut])
    except PackagingError:
        return
    assert cut_init == init
    assert cut_segments == segments[: len(cut_segments)]
    assert len(cut_segments) >= 1


def test_split_errors() -> None:
    init = FTYP + box("moov")
    seg = fragment(1, 0, [10])
    cases = {
        b"": "no moov",
        FTYP: "no moov",
        init: "no media fragments",
        FTYP + box("mdat", bytes(4)) + box("moov"): "not fragmented",
        FTYP + seg + box("moov"): "moov",
        init + moof(1, 0, [1], [3]) + moof(2, 1, [1], [3]) + box("mdat", bytes(6)): "no mdat",
        init + seg + box("mdat", bytes(3)): "has no moof",
        init + seg + box("junk"): "unexpected top-level box",
        init + seg[:-1]: "runs past the end",
        init + seg + box("styp"): "not followed by moof",
        init + box("moov") + seg: "more than one moov",
    }
    for raw, message in cases.items():
        with pytest.raises(PackagingError, match=message):
            split_fragmented(raw)


def test_split_rejects_absolute_data_offsets() -> None:
    traf = box("traf", full("tfhd", 0, 0x01, struct.pack(">IQ", 1, 1234)))
    raw = FTYP + box("moov") + box("moof", traf) + box("mdat")
    with pytest.raises(PackagingError, match="default_base_moof"):
        split_fragmented(raw)


def test_large_and_to_end_sizes_in_a_file() -> None:
    seg = fragment(1, 0, [10])
    boxes = list(iter_boxes(seg))
    mdat_payload = seg[boxes[-1].payload_start :]
    raw = (
        FTYP
        + box("moov", large=True)
        + seg[: boxes[-1].start]
        + box("mdat", mdat_payload, to_end=True)
    )
    init, segments = split_fragmented(raw)
    assert init == FTYP + box("moov", large=True)
    assert read_fragment(segments[0]).duration == 10


# -------------------------------------------------------------------------------------------
# Edit lists, samples, and writing fragments


def elst(entries: list[tuple[int, int, int]], version: int = 0) -> bytes:
    """An edts box holding one elst of (segment_duration, media_time, rate) entries."""
    fmt = ">QqI" if version == 1 else ">IiI"
    rows = b"".join(struct.pack(fmt, *e) for e in entries)
    return box("edts", full("elst", version, 0, struct.pack(">I", len(entries)) + rows))


@pytest.mark.parametrize("version", [0, 1])
def test_edit_list_media_time(version: int) -> None:
    def init(edts: bytes) -> bytes:
        return sample_entry_init("mp4a", "esds", esds(b"\x11\x90"), audio=True, edts=edts)

    assert read_init(init(b"")).media_time == 0
    assert read_init(init(elst([(0, 1024, 0x10000)], version))).media_time == 1024
    # a duration covering the whole track is the non-fragmented way of saying the same
    assert read_init(init(elst([(48000, 2112, 0x10000)], version))).media_time == 2112
    for entries, message in (
        ([(0, 1024, 0x10000), (0, 0, 0x10000)], "2 entries"),
        ([(1000, -1, 0x10000)], "empty edit"),
        ([(0, 1024, 0x20000)], "media rate 2"),
    ):
        with pytest.raises(PackagingError, match=message):
            read_init(init(elst(entries, version)))


def test_ffmpeg_audio_mux_has_the_priming_in_its_edit_list(tmp_path: Path) -> None:
    """The packager's audio mux: one fragment per AAC frame, the priming in the edit list, and
    samples that regroup into fragments which read back the same."""
    out = tmp_path / "a.mp4"
    run_ffmpeg(
        [
            *("-f", "lavfi", "-i", "sine=sample_rate=48000:duration=1"),
            *("-c:a", "aac", "-ac", "2", "-f", "mp4", "-movflags", AUDIO_FLAGS),
            *("-use_editlist", "1", str(out)),
        ],
        "audio mux",
    )
    init, fragments = split_fragmented(out.read_bytes())
    track = read_init(init)
    assert (track.handler, track.timescale, track.media_time) == ("soun", 48000, 1024)
    samples = [
        s
        for f in fragments
        for s in read_samples(f, track.default_sample_duration, track.default_sample_flags)
    ]
    assert len(samples) == len(fragments)  # a fragment per frame
    for fragment, sample in zip(fragments, samples, strict=True):
        mdat = next(b for b in iter_boxes(fragment) if b.type == "mdat")
        assert sample.data == fragment[mdat.payload_start : mdat.end]
        assert sample.is_sync and sample.composition_offset == 0
    # priming + one second, the last frame shortened to where the input ends
    assert sum(s.duration for s in samples) == 1024 + 48000
    assert samples[0].decode_time == 0
    regrouped = [
        write_fragment(n, track.track_id, part)
        for n, part in ((1, samples[:20]), (2, samples[20:]))
    ]
    assert [s for f in regrouped for s in read_samples(f)] == samples
    infos = [read_fragment(f) for f in regrouped]
    assert [i.base_media_decode_time for i in infos] == [0, samples[20].decode_time]
    assert [i.sequence_number for i in infos] == [1, 2]
    # what ffmpeg reads back from the regrouped track: every frame, the priming skipped
    whole = tmp_path / "whole.mp4"
    whole.write_bytes(init + b"".join(regrouped))
    with av.open(str(whole)) as container:
        stream = container.streams.audio[0]
        packets = [p for p in container.demux(stream) if p.size]
        assert [bytes(p) for p in packets] == [s.data for s in samples]
        assert packets[0].pts == -1024


samples_strategy = st.lists(
    st.tuples(
        st.integers(1, 5000),  # duration
        st.integers(-3000, 3000),  # composition offset
        st.sampled_from([0x02000000, 0x01010000, 0x00000000]),  # sample flags
        st.binary(min_size=0, max_size=30),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=80)
@given(samples_strategy, st.integers(0, 2**40), st.integers(1, 2**32 - 2), st.booleans())
def test_written_fragments_read_back(
    rows: list[tuple[int, int, int, bytes]], start: int, seq: int, same: bool
) -> None:
    if same:  # all alike: the tfhd defaults carry duration and flags, no offsets
        rows = [(rows[0][0], 0, rows[0][2], data) for _, _, _, data in rows]
    samples, t = [], start
    for duration, offset, flags, data in rows:
        samples.append(Sample(t, duration, offset, flags, data))
        t += duration
    segment = write_fragment(seq, 7, samples)
    assert read_samples(segment) == samples
    info = read_fragment(segment)
    assert (info.sequence_number, info.track_id, info.base_media_decode_time) == (seq, 7, start)
    assert info.duration == t - start and info.sample_count == len(samples)
    assert info.sample_bytes == sum(len(s.data) for s in samples)
    assert info.first_sample_is_sync is samples[0].is_sync
    # a file of such fragments splits back into them
    raw = FTYP + box("moov") + segment + write_fragment(seq + 1, 7, [Sample(t, 5, 0, 0, b"x")])
    assert split_fragmented(raw)[1][0] == segment


def test_write_fragment_errors() -> None:
    with pytest.raises(PackagingError, match="at least one sample"):
        write_fragment(1, 1, [])
    with pytest.raises(PackagingError, match="do not follow"):
        write_fragment(1, 1, [Sample(0, 10, 0, 0, b"a"), Sample(11, 10, 0, 0, b"b")])
    with pytest.raises(PackagingError, match="does not fit 32 bits"):
        write_fragment(2**32, 1, [Sample(0, 10, 0, 0, b"a")])


def test_read_samples_errors() -> None:
    good = write_fragment(1, 1, [Sample(0, 10, 0, 0, b"abc")])
    assert read_samples(good + good)[1] == read_samples(good)[0]  # two moof+mdat pairs
    # the synthetic moof's data offset (0) points at the moof itself, not into the mdat
    with pytest.raises(PackagingError, match="outside its mdat"):
        read_samples(moof(1, 0, [1], [3]) + box("mdat", bytes(3)))
    with pytest.raises(PackagingError, match="no mdat"):
        read_samples(good[: next(b for b in iter_boxes(good) if b.type == "mdat").start])
    with pytest.raises(PackagingError, match="has no moof"):
        read_samples(box("mdat", b"abc"))
    with pytest.raises(PackagingError, match="unexpected box"):
        read_samples(good + box("junk"))
    with pytest.raises(PackagingError, match="no samples"):
        read_samples(b"")
    absolute = box(
        "traf",
        full("tfhd", 0, 0x01, struct.pack(">IQ", 1, 0))
        + full("tfdt", 1, 0, struct.pack(">Q", 0))
        + full("trun", 0, 0, bytes(4)),
    )
    with pytest.raises(PackagingError, match="absolute data offsets"):
        read_samples(box("moof", full("mfhd", 0, 0, bytes(4)) + absolute) + box("mdat"))


@settings(max_examples=50, deadline=None)
@given(
    base=st.integers(0, 2**40),
    shift=st.integers(0, 2**40),
    sequence=st.integers(1, 2**31),
    offsets=st.lists(st.integers(-3000, 3000), min_size=1, max_size=5),
)
def test_a_retimed_fragment_moves_on_the_timeline_and_nothing_else(
    base: int, shift: int, sequence: int, offsets: list[int]
) -> None:
    """A shot's fragment put in its place in the title: renumbered, its decode times moved,
    its samples (sizes, flags, composition offsets, bytes) untouched."""
    samples = [
        Sample(base + 3600 * i, 3600, o, 0 if i == 0 else 0x10000, bytes([i]) * (10 + i))
        for i, o in enumerate(offsets)
    ]
    fragment = write_fragment(7, 1, samples)
    moved = retime_fragment(fragment, sequence, shift)
    assert len(moved) == len(fragment)
    info = read_fragment(moved)
    assert (info.sequence_number, info.base_media_decode_time) == (sequence, base + shift)
    assert [
        (s.decode_time - shift, s.duration, s.composition_offset, s.flags, s.data)
        for s in read_samples(moved)
    ] == [(s.decode_time, s.duration, s.composition_offset, s.flags, s.data) for s in samples]


def test_retiming_past_the_tfdt_or_without_a_moof_is_refused() -> None:
    fragment = write_fragment(1, 1, [Sample(0, 3600, 0, 0, b"x")])
    with pytest.raises(PackagingError, match="does not fit"):
        retime_fragment(fragment, 1, 2**64)
    with pytest.raises(PackagingError, match="no moof"):
        retime_fragment(b"\x00\x00\x00\x08free", 1, 0)
