"""A small reader for fragmented MP4 (ISO-BMFF / CMAF) as ffmpeg writes it.

It does what the packager needs and nothing more: cut a fragmented file into an init segment
and media segments, read what a manifest must say about the track (timescale, codec string,
picture or audio format, the edit list's media_time), read each fragment's timing, and read a
fragment's samples and write samples back as one fragment (to regroup audio frames into
segments). Everything here is pure: bytes in, dataclasses or bytes out; malformed input raises
`PackagingError`.

References: ISO/IEC 14496-12 (boxes), ISO/IEC 14496-15 (avcC, hvcC and the codec strings of
Annex E), ISO/IEC 14496-1 and -3 (esds, AudioSpecificConfig), the VP Codec ISO Media File Format
Binding (vpcC) and the AV1 Codec ISO Media File Format Binding (av1C), RFC 6381.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from streamplane.media.errors import PackagingError

__all__ = [
    "Box",
    "FragmentInfo",
    "Sample",
    "TrackInit",
    "iter_boxes",
    "read_fragment",
    "read_init",
    "read_samples",
    "split_fragmented",
    "write_fragment",
]


@dataclass(frozen=True)
class Box:
    """One box: `data[start:end]` is the whole box, its payload begins at `start + header_size`."""

    type: str
    start: int
    end: int
    header_size: int

    @property
    def payload_start(self) -> int:
        return self.start + self.header_size

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class TrackInit:
    """What an init segment says about its (single) track."""

    track_id: int
    handler: str  # "vide" or "soun"
    timescale: int
    sample_entry: str  # avc1, avc3, hvc1, hev1, vp09, av01, mp4a, Opus, fLaC
    config: bytes  # payload of the decoder configuration box (avcC, hvcC, vpcC, av1C, esds, ...)
    codec_string: str  # RFC 6381
    width: int = 0
    height: int = 0
    channels: int = 0
    sample_rate: int = 0
    # From the trex box; fragments that carry no durations or flags of their own fall back on them.
    default_sample_duration: int | None = None
    default_sample_flags: int | None = None
    # From the edit list: the composition time presented first, in ticks of the track timescale
    # (an AAC track's priming samples are skipped this way). 0 without an edit list.
    media_time: int = 0


@dataclass(frozen=True)
class FragmentInfo:
    """Timing and size of one media segment (one or more moof+mdat of a single track)."""

    sequence_number: int
    track_id: int
    base_media_decode_time: int  # ticks of the track timescale
    duration: int  # ticks of the track timescale
    sample_count: int
    first_sample_is_sync: bool
    sample_bytes: int  # sum of the sample sizes
    size: int  # bytes of the whole segment

    @property
    def starts_with_sync(self) -> bool:
        """Alias of `first_sample_is_sync`, the name the packager reads."""
        return self.first_sample_is_sync


@dataclass(frozen=True)
class Sample:
    """One sample of a fragment: where it sits on the track's timeline, and its bytes."""

    decode_time: int  # ticks of the track timescale
    duration: int
    composition_offset: int  # composition time = decode_time + composition_offset
    flags: int  # ISO/IEC 14496-12 sample flags
    data: bytes

    @property
    def is_sync(self) -> bool:
        return not self.flags & _SAMPLE_IS_NON_SYNC


_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

# tfhd flags
_TFHD_BASE_DATA_OFFSET = 0x000001
_TFHD_SAMPLE_DESCRIPTION_INDEX = 0x000002
_TFHD_DEFAULT_DURATION = 0x000008
_TFHD_DEFAULT_SIZE = 0x000010
_TFHD_DEFAULT_FLAGS = 0x000020
_TFHD_DEFAULT_BASE_IS_MOOF = 0x020000
# trun flags
_TRUN_DATA_OFFSET = 0x000001
_TRUN_FIRST_SAMPLE_FLAGS = 0x000004
_TRUN_DURATION = 0x000100
_TRUN_SIZE = 0x000200
_TRUN_FLAGS = 0x000400
_TRUN_CTO = 0x000800
# sample flags
_SAMPLE_IS_NON_SYNC = 0x00010000
_ELST_RATE_ONE = 0x00010000  # media_rate_integer 1, media_rate_fraction 0

_VIDEO_ENTRIES = frozenset({"avc1", "avc3", "hvc1", "hev1", "vp09", "av01"})
_AUDIO_ENTRIES = frozenset({"mp4a", "Opus", "fLaC"})
_CONFIG_BOX = {
    "avc1": "avcC",
    "avc3": "avcC",
    "hvc1": "hvcC",
    "hev1": "hvcC",
    "vp09": "vpcC",
    "av01": "av1C",
    "mp4a": "esds",
    "Opus": "dOps",
    "fLaC": "dfLa",
}
# Boxes a fragmented file may carry at top level that belong to neither the init segment nor a
# media segment: indexes (which would point into the whole file, not into our segments) and
# padding.
_DROPPED_TOP_LEVEL = frozenset({"mfra", "sidx", "ssix", "free", "skip"})
# Boxes that may precede a moof and travel with it.
_SEGMENT_PREFIX = frozenset({"styp", "emsg", "prft"})

# A visual sample entry has 78 bytes of fixed fields before its child boxes, an audio one 28.
_VISUAL_ENTRY_FIXED = 78
_AUDIO_ENTRY_FIXED = 28


def iter_boxes(data: bytes, offset: int = 0, end: int | None = None) -> Iterator[Box]:
    """Walk the boxes lying side by side in `data[offset:end]` (not into their children)."""
    limit = len(data) if end is None else end
    if limit > len(data):
        raise PackagingError(f"box range ends at {limit} but the data has only {len(data)} bytes")
    pos = offset
    while pos < limit:
        if limit - pos < 8:
            raise PackagingError(
                f"truncated box header at byte {pos}: {limit - pos} bytes left, 8 needed"
            )
        size, raw_type = struct.unpack_from(">I4s", data, pos)
        box_type = raw_type.decode("latin-1")
        header = 8
        if size == 1:
            if limit - pos < 16:
                raise PackagingError(f"truncated 64-bit size of box {box_type!r} at byte {pos}")
            size = _U64.unpack_from(data, pos + 8)[0]
            header = 16
        elif size == 0:
            size = limit - pos
        if box_type == "uuid":
            header += 16
        if size < header:
            raise PackagingError(
                f"box {box_type!r} at byte {pos} claims {size} bytes, less than its own header"
            )
        if pos + size > limit:
            raise PackagingError(
                f"box {box_type!r} at byte {pos} runs past the end: it claims {size} bytes, "
                f"{limit - pos} are left (truncated or garbled file)"
            )
        yield Box(box_type, pos, pos + size, header)
        pos += size


def split_fragmented(data: bytes) -> tuple[bytes, list[bytes]]:
    """Cut a fragmented MP4 into its init segment (ftyp+moov) and its media segments.

    Each media segment is `[styp|emsg|prft...] moof mdat`, byte for byte as in the file; mfra,
    sidx and padding are dropped. The input must be muxed so that each moof's data offsets are
    relative to the moof (ffmpeg's `default_base_moof`), or cutting the file would break them.
    """
    init: list[bytes] = []
    seen_moov = False
    segments: list[bytes] = []
    prefix: list[Box] = []
    moof: Box | None = None
    for box in iter_boxes(data):
        kind = box.type
        if kind in ("ftyp", "moov"):
            if moof is not None or segments:
                raise PackagingError(f"{kind} after the first moof: not a fragmented MP4 layout")
            if kind == "moov":
                if seen_moov:
                    raise PackagingError("more than one moov box")
                seen_moov = True
            init.append(data[box.start : box.end])
        elif kind in _SEGMENT_PREFIX:
            if moof is not None:
                raise PackagingError(f"{kind} at byte {box.start} between a moof and its mdat")
            prefix.append(box)
        elif kind == "moof":
            if not seen_moov:
                raise PackagingError("moof before any moov: the init segment is missing")
            if moof is not None:
                raise PackagingError(f"moof at byte {moof.start} has no mdat")
            _check_relative_offsets(data, box)
            moof = box
        elif kind == "mdat":
            if moof is None:
                if not seen_moov:
                    raise PackagingError("mdat before moov: the file is not fragmented")
                raise PackagingError(f"mdat at byte {box.start} has no moof")
            first = prefix[0].start if prefix else moof.start
            segments.append(data[first : box.end])
            prefix, moof = [], None
        elif kind in _DROPPED_TOP_LEVEL:
            continue
        else:
            raise PackagingError(f"unexpected top-level box {kind!r} at byte {box.start}")
    if not seen_moov:
        raise PackagingError("no moov box: not an MP4 file, or its init segment is missing")
    if moof is not None:
        raise PackagingError(f"moof at byte {moof.start} has no mdat (truncated file?)")
    if prefix:
        raise PackagingError(f"{prefix[0].type} at byte {prefix[0].start} is not followed by moof")
    if not segments:
        raise PackagingError("no media fragments after the moov (empty or truncated file)")
    return b"".join(init), segments


def _check_relative_offsets(data: bytes, moof: Box) -> None:
    for traf in _children(data, moof, "traf"):
        tfhd = _only_child(data, traf, "tfhd")
        _, flags = _full_box(data, tfhd)
        if flags & _TFHD_BASE_DATA_OFFSET:
            raise PackagingError(
                f"moof at byte {moof.start} uses absolute data offsets, which break when the "
                "file is cut into segments; mux with -movflags default_base_moof"
            )


def read_init(init: bytes) -> TrackInit:
    """Read the single track of an init segment (or of a whole fragmented file)."""
    moov = _only(iter_boxes(init), "moov")
    traks = list(_children(init, moov, "trak"))
    if len(traks) != 1:
        raise PackagingError(f"expected exactly one track in the moov, found {len(traks)}")
    trak = traks[0]
    tkhd = _only_child(init, trak, "tkhd")
    track_id, tkhd_width, tkhd_height = _read_tkhd(init, tkhd)
    mdia = _only_child(init, trak, "mdia")
    timescale = _read_mdhd(init, _only_child(init, mdia, "mdhd"))
    media_time = _read_edit_list(init, trak)
    hdlr = _only_child(init, mdia, "hdlr")
    handler = _read(init, hdlr.payload_start + 8, 4, hdlr).decode("latin-1")
    stbl = _only_child(init, _only_child(init, mdia, "minf"), "stbl")
    entry = _first_sample_entry(init, _only_child(init, stbl, "stsd"))
    kind = entry.type
    defaults = _read_trex(init, moov, track_id)
    default_duration = defaults[0] if defaults else None
    default_flags = defaults[1] if defaults else None

    if kind in _VIDEO_ENTRIES:
        width, height = struct.unpack_from(">HH", _read(init, entry.payload_start + 24, 4, entry))
        children_at = entry.payload_start + _VISUAL_ENTRY_FIXED
        config = _config_payload(init, entry, children_at, _CONFIG_BOX[kind])
        return TrackInit(
            track_id=track_id,
            handler=handler,
            timescale=timescale,
            sample_entry=kind,
            config=config,
            codec_string=_video_codec_string(kind, config),
            width=width or tkhd_width,
            height=height or tkhd_height,
            default_sample_duration=default_duration,
            default_sample_flags=default_flags,
            media_time=media_time,
        )
    if kind in _AUDIO_ENTRIES:
        fixed = _read(init, entry.payload_start, _AUDIO_ENTRY_FIXED, entry)
        (version,) = struct.unpack_from(">H", fixed, 8)
        if version != 0:
            # QuickTime sound description v1/v2 layouts: only the .mov muxer writes them.
            raise PackagingError(f"{kind} sample entry of version {version}: mux as mp4, not mov")
        channels, _, _, _, rate_fixed = struct.unpack_from(">HHHHI", fixed, 16)
        children_at = entry.payload_start + _AUDIO_ENTRY_FIXED
        config = _config_payload(init, entry, children_at, _CONFIG_BOX[kind])
        return TrackInit(
            track_id=track_id,
            handler=handler,
            timescale=timescale,
            sample_entry=kind,
            config=config,
            codec_string=_audio_codec_string(kind, config),
            channels=channels,
            # 16.16 fixed point, so rates above 65535 Hz do not fit; the timescale holds them.
            sample_rate=(rate_fixed >> 16) or timescale,
            default_sample_duration=default_duration,
            default_sample_flags=default_flags,
            media_time=media_time,
        )
    raise PackagingError(f"unsupported sample entry {kind!r} (handler {handler!r})")


def read_fragment(
    segment: bytes,
    default_sample_duration: int | None = None,
    default_sample_flags: int | None = None,
) -> FragmentInfo:
    """Read timing and size of one media segment as `split_fragmented` returns it.

    Sample durations come from the trun, else the tfhd, else `default_sample_duration` (the
    trex default, `TrackInit.default_sample_duration`). Sample flags likewise, with the trex
    default `default_sample_flags`; without any flags at all the first sample counts as sync,
    since 0 is what ffmpeg and the trex default say about sync samples.
    """
    sequence_number: int | None = None
    track_id = 0
    base_time: int | None = None
    duration = 0
    sample_count = 0
    sample_bytes = 0
    first_sync: bool | None = None
    pending_moof: Box | None = None
    for box in iter_boxes(segment):
        if box.type == "moof":
            if pending_moof is not None:
                raise PackagingError(f"moof at byte {pending_moof.start} has no mdat")
            pending_moof = box
            mfhd = _only_child(segment, box, "mfhd")
            if sequence_number is None:
                (sequence_number,) = _U32.unpack(_read(segment, mfhd.payload_start + 4, 4, mfhd))
            trafs = list(_children(segment, box, "traf"))
            if len(trafs) != 1:
                raise PackagingError(f"expected one traf in the moof, found {len(trafs)}")
            run = _read_traf(segment, trafs[0], default_sample_duration, default_sample_flags)
            if base_time is None:
                base_time = run.base_time
                track_id = run.track_id
                first_sync = run.first_sync
            elif run.track_id != track_id:
                raise PackagingError(f"segment mixes tracks {track_id} and {run.track_id}")
            duration += run.duration
            sample_count += run.sample_count
            sample_bytes += run.sample_bytes
        elif box.type == "mdat":
            if pending_moof is None:
                raise PackagingError(f"mdat at byte {box.start} has no moof")
            pending_moof = None
        elif box.type not in _SEGMENT_PREFIX:
            raise PackagingError(f"unexpected box {box.type!r} in a media segment")
    if pending_moof is not None:
        raise PackagingError(f"moof at byte {pending_moof.start} has no mdat (truncated?)")
    if sequence_number is None or base_time is None or first_sync is None:
        raise PackagingError("no moof in the media segment")
    return FragmentInfo(
        sequence_number=sequence_number,
        track_id=track_id,
        base_media_decode_time=base_time,
        duration=duration,
        sample_count=sample_count,
        first_sample_is_sync=first_sync,
        sample_bytes=sample_bytes,
        size=len(segment),
    )


def read_samples(
    segment: bytes,
    default_sample_duration: int | None = None,
    default_sample_flags: int | None = None,
) -> list[Sample]:
    """Every sample of a media segment (one or more moof+mdat of one track), with its bytes.

    Durations and flags fall back on the defaults as in `read_fragment`. Sample data must be
    addressed from the moof (`default_base_moof`, or no base data offset at all) and lie in the
    mdat that follows the moof.
    """
    samples: list[Sample] = []
    pending: tuple[Box, _TrafTable] | None = None
    for box in iter_boxes(segment):
        if box.type == "moof":
            if pending is not None:
                raise PackagingError(f"moof at byte {pending[0].start} has no mdat")
            trafs = list(_children(segment, box, "traf"))
            if len(trafs) != 1:
                raise PackagingError(f"expected one traf in the moof, found {len(trafs)}")
            table = _traf_table(segment, trafs[0], default_sample_duration, default_sample_flags)
            if table.absolute_base:
                raise PackagingError(
                    f"moof at byte {box.start} uses absolute data offsets; "
                    "mux with -movflags default_base_moof"
                )
            pending = (box, table)
        elif box.type == "mdat":
            if pending is None:
                raise PackagingError(f"mdat at byte {box.start} has no moof")
            moof, table = pending
            samples += _samples_of(segment, moof, table, box)
            pending = None
        elif box.type not in _SEGMENT_PREFIX:
            raise PackagingError(f"unexpected box {box.type!r} in a media segment")
    if pending is not None:
        raise PackagingError(f"moof at byte {pending[0].start} has no mdat (truncated?)")
    if not samples:
        raise PackagingError("no samples in the media segment")
    return samples


def _samples_of(data: bytes, moof: Box, table: _TrafTable, mdat: Box) -> list[Sample]:
    out = []
    time = table.base_time
    at = moof.start  # the first run without a data offset starts at the base: the moof
    for run in table.runs:
        if run.data_offset is not None:
            at = moof.start + run.data_offset
        for duration, size, flags, offset in zip(
            run.durations, run.sizes, run.flags, run.composition_offsets, strict=True
        ):
            if at < mdat.payload_start or at + size > mdat.end:
                raise PackagingError(
                    f"a sample of the moof at byte {moof.start} lies at bytes {at}..{at + size}, "
                    f"outside its mdat ({mdat.payload_start}..{mdat.end})"
                )
            out.append(Sample(time, duration, offset, flags, data[at : at + size]))
            time += duration
            at += size
    return out


def write_fragment(sequence_number: int, track_id: int, samples: Sequence[Sample]) -> bytes:
    """One moof+mdat holding `samples`, which must follow each other on the decode timeline.

    The tfhd sets default-base-is-moof (data offsets count from the moof, so the fragment can
    be served on its own) and takes the duration and flags shared by every sample, if any; the
    trun carries the rest. Composition offsets are written signed (trun version 1) when one is
    negative.
    """
    if not samples:
        raise PackagingError("a fragment needs at least one sample")
    if not 0 <= sequence_number <= 0xFFFFFFFF or not 0 <= track_id <= 0xFFFFFFFF:
        raise PackagingError(
            f"sequence number {sequence_number} or track id {track_id} does not fit 32 bits"
        )
    for before, after in itertools.pairwise(samples):
        if after.decode_time != before.decode_time + before.duration:
            raise PackagingError(
                f"samples at decode times {before.decode_time} (lasting {before.duration}) and "
                f"{after.decode_time} do not follow each other"
            )
    durations = {s.duration for s in samples}
    flag_values = {s.flags for s in samples}
    offsets = [s.composition_offset for s in samples]

    tf_flags = _TFHD_DEFAULT_BASE_IS_MOOF
    tfhd = _U32.pack(track_id)
    if len(durations) == 1:
        tf_flags |= _TFHD_DEFAULT_DURATION
        tfhd += _U32.pack(samples[0].duration)
    if len(flag_values) == 1:
        tf_flags |= _TFHD_DEFAULT_FLAGS
        tfhd += _U32.pack(samples[0].flags)

    columns: list[tuple[int, str, list[int]]] = []
    if len(durations) > 1:
        columns.append((_TRUN_DURATION, "I", [s.duration for s in samples]))
    columns.append((_TRUN_SIZE, "I", [len(s.data) for s in samples]))
    if len(flag_values) > 1:
        columns.append((_TRUN_FLAGS, "I", [s.flags for s in samples]))
    signed = any(o < 0 for o in offsets)
    if any(offsets):
        columns.append((_TRUN_CTO, "i" if signed else "I", offsets))
    tr_flags = _TRUN_DATA_OFFSET
    for flag, _, _ in columns:
        tr_flags |= flag
    row_format = ">" + "".join(code for _, code, _ in columns)
    rows = b"".join(
        struct.pack(row_format, *row) for row in zip(*(v for _, _, v in columns), strict=True)
    )
    payload = b"".join(s.data for s in samples)
    mdat_header = 8 if len(payload) + 8 <= 0xFFFFFFFF else 16

    def moof_box(data_offset: int) -> bytes:
        trun = _full(
            "trun",
            1 if signed else 0,
            tr_flags,
            _U32.pack(len(samples)) + struct.pack(">i", data_offset) + rows,
        )
        traf = _box(
            "traf",
            _full("tfhd", 0, tf_flags, tfhd)
            + _full("tfdt", 1, 0, _U64.pack(samples[0].decode_time))
            + trun,
        )
        return _box("moof", _full("mfhd", 0, 0, _U32.pack(sequence_number)) + traf)

    size = len(moof_box(0))  # the moof's size does not depend on the offset it holds
    if mdat_header == 8:
        mdat = struct.pack(">I4s", 8 + len(payload), b"mdat")
    else:
        mdat = struct.pack(">I4sQ", 1, b"mdat", 16 + len(payload))
    return moof_box(size + mdat_header) + mdat + payload


def retime_fragment(segment: bytes, sequence_number: int, shift: int) -> bytes:
    """The media segment with its moofs numbered from `sequence_number` and its decode times
    moved `shift` ticks later: a fragment cut from one shot's encode, put in its place on the
    title's timeline. Only the mfhd and tfdt fields change; the segment keeps its size.
    """
    out = bytearray(segment)
    moofs = 0
    for box in iter_boxes(segment):
        if box.type != "moof":
            continue
        mfhd = _only_child(segment, box, "mfhd")
        _U32.pack_into(out, mfhd.payload_start + 4, sequence_number + moofs)
        moofs += 1
        for traf in _children(segment, box, "traf"):
            tfdt = _only_child(segment, traf, "tfdt")
            version, _ = _full_box(segment, tfdt)
            at = tfdt.payload_start + 4
            field = _U64 if version == 1 else _U32
            (base,) = field.unpack_from(segment, at)
            moved = base + shift
            if not 0 <= moved < 1 << (8 * field.size):
                raise PackagingError(f"decode time {moved} does not fit the tfdt at byte {at}")
            field.pack_into(out, at, moved)
    if not moofs:
        raise PackagingError("no moof in the media segment")
    return bytes(out)


def _box(kind: str, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind.encode("latin-1")) + payload


def _full(kind: str, version: int, flags: int, payload: bytes) -> bytes:
    return _box(kind, _U32.pack(version << 24 | flags) + payload)


@dataclass(frozen=True)
class _TrafRun:
    track_id: int
    base_time: int
    duration: int
    sample_count: int
    sample_bytes: int
    first_sync: bool


@dataclass(frozen=True)
class _TrackRun:
    """One trun, sample by sample (every column filled in from the defaults)."""

    data_offset: int | None  # from the base data offset (the moof, for `default_base_moof`)
    durations: tuple[int, ...]
    sizes: tuple[int, ...]
    flags: tuple[int, ...]
    composition_offsets: tuple[int, ...]


@dataclass(frozen=True)
class _TrafTable:
    track_id: int
    base_time: int
    absolute_base: bool  # the tfhd carries a base data offset (into the whole file)
    runs: tuple[_TrackRun, ...]


def _read_traf(
    data: bytes, traf: Box, trex_duration: int | None, trex_flags: int | None
) -> _TrafRun:
    table = _traf_table(data, traf, trex_duration, trex_flags)
    first_sync: bool | None = None
    duration = count = size_total = 0
    for run in table.runs:
        duration += sum(run.durations)
        size_total += sum(run.sizes)
        count += len(run.sizes)
        if first_sync is None and run.flags:
            first_sync = not run.flags[0] & _SAMPLE_IS_NON_SYNC
    if first_sync is None:
        raise PackagingError(f"fragment of track {table.track_id} has no samples")
    return _TrafRun(table.track_id, table.base_time, duration, count, size_total, first_sync)


def _traf_table(
    data: bytes, traf: Box, trex_duration: int | None, trex_flags: int | None
) -> _TrafTable:
    tfhd = _only_child(data, traf, "tfhd")
    _, tf_flags = _full_box(data, tfhd)
    pos = tfhd.payload_start + 4
    (track_id,) = _U32.unpack(_read(data, pos, 4, tfhd))
    pos += 4
    if tf_flags & _TFHD_BASE_DATA_OFFSET:
        pos += 8
    if tf_flags & _TFHD_SAMPLE_DESCRIPTION_INDEX:
        pos += 4
    default_duration = trex_duration
    default_size: int | None = None
    default_flags = trex_flags
    if tf_flags & _TFHD_DEFAULT_DURATION:
        (default_duration,) = _U32.unpack(_read(data, pos, 4, tfhd))
        pos += 4
    if tf_flags & _TFHD_DEFAULT_SIZE:
        (default_size,) = _U32.unpack(_read(data, pos, 4, tfhd))
        pos += 4
    if tf_flags & _TFHD_DEFAULT_FLAGS:
        (default_flags,) = _U32.unpack(_read(data, pos, 4, tfhd))
        pos += 4

    tfdt = _only_child(data, traf, "tfdt")
    version, _ = _full_box(data, tfdt)
    if version == 1:
        (base_time,) = _U64.unpack(_read(data, tfdt.payload_start + 4, 8, tfdt))
    elif version == 0:
        (base_time,) = _U32.unpack(_read(data, tfdt.payload_start + 4, 4, tfdt))
    else:
        raise PackagingError(f"tfdt of unknown version {version}")

    runs = []
    for trun in _children(data, traf, "trun"):
        tr_version, tr_flags = _full_box(data, trun)
        pos = trun.payload_start + 4
        (n,) = _U32.unpack(_read(data, pos, 4, trun))
        pos += 4
        data_offset: int | None = None
        if tr_flags & _TRUN_DATA_OFFSET:
            (data_offset,) = struct.unpack(">i", _read(data, pos, 4, trun))
            pos += 4
        first_flags: int | None = None
        if tr_flags & _TRUN_FIRST_SAMPLE_FLAGS:
            (first_flags,) = _U32.unpack(_read(data, pos, 4, trun))
            pos += 4
        fields = [f for f in (_TRUN_DURATION, _TRUN_SIZE, _TRUN_FLAGS, _TRUN_CTO) if tr_flags & f]
        table = _read(data, pos, 4 * len(fields) * n, trun)
        # The table is row-major (one row per sample), so column i is every len(fields)th word.
        words = struct.unpack(f">{len(fields) * n}I", table)
        columns = {f: words[i :: len(fields)] for i, f in enumerate(fields)}
        if _TRUN_DURATION in columns:
            durations = columns[_TRUN_DURATION]
        elif not n:
            durations = ()
        elif not default_duration:
            # ffmpeg writes a trex default of 0, which would silently make the fragment empty.
            raise PackagingError(
                "no sample durations in trun or tfhd; pass the trex default from read_init"
            )
        else:
            durations = (default_duration,) * n
        if _TRUN_SIZE in columns:
            sizes = columns[_TRUN_SIZE]
        elif not n:
            sizes = ()
        elif default_size is None:
            raise PackagingError("no sample sizes in trun or tfhd")
        else:
            sizes = (default_size,) * n
        flags = list(columns.get(_TRUN_FLAGS, (default_flags or 0,) * n))
        if n and first_flags is not None:
            flags[0] = first_flags
        offsets: tuple[int, ...] = (0,) * n
        if _TRUN_CTO in columns:
            # version 1 makes the offsets signed (ffmpeg's negative_cts_offsets)
            offsets = columns[_TRUN_CTO]
            if tr_version == 1:
                offsets = tuple(o - (1 << 32) if o & 0x80000000 else o for o in offsets)
        runs.append(_TrackRun(data_offset, tuple(durations), tuple(sizes), tuple(flags), offsets))
    return _TrafTable(track_id, base_time, bool(tf_flags & _TFHD_BASE_DATA_OFFSET), tuple(runs))


def _read(data: bytes, pos: int, length: int, box: Box) -> bytes:
    """`data[pos:pos+length]`, which must lie inside `box`."""
    if pos < box.start or pos + length > box.end:
        raise PackagingError(
            f"box {box.type!r} at byte {box.start} is too short: needs bytes up to "
            f"{pos + length - box.start}, has {box.size}"
        )
    return data[pos : pos + length]


def _full_box(data: bytes, box: Box) -> tuple[int, int]:
    (word,) = _U32.unpack(_read(data, box.payload_start, 4, box))
    return word >> 24, word & 0xFFFFFF


def _children(data: bytes, box: Box, kind: str | None = None) -> Iterator[Box]:
    for child in iter_boxes(data, box.payload_start, box.end):
        if kind is None or child.type == kind:
            yield child


def _only(boxes: Iterator[Box], kind: str) -> Box:
    found = [b for b in boxes if b.type == kind]
    if len(found) != 1:
        raise PackagingError(f"expected one {kind} box, found {len(found)}")
    return found[0]


def _only_child(data: bytes, box: Box, kind: str) -> Box:
    found = list(_children(data, box, kind))
    if len(found) != 1:
        raise PackagingError(
            f"expected one {kind} in the {box.type} at byte {box.start}, found {len(found)}"
        )
    return found[0]


def _read_tkhd(data: bytes, tkhd: Box) -> tuple[int, int, int]:
    version, _ = _full_box(data, tkhd)
    # version 1 widens creation/modification times and duration to 64 bits
    id_at = tkhd.payload_start + (20 if version == 1 else 12)
    (track_id,) = _U32.unpack(_read(data, id_at, 4, tkhd))
    size_at = id_at + (4 + 8 if version == 1 else 4 + 4) + 8 + 2 + 2 + 2 + 2 + 36
    width_fx, height_fx = struct.unpack(">II", _read(data, size_at, 8, tkhd))
    return track_id, width_fx >> 16, height_fx >> 16


def _read_mdhd(data: bytes, mdhd: Box) -> int:
    version, _ = _full_box(data, mdhd)
    at = mdhd.payload_start + (20 if version == 1 else 12)
    (timescale,) = _U32.unpack(_read(data, at, 4, mdhd))
    if timescale == 0:
        raise PackagingError("mdhd timescale is 0")
    return int(timescale)


def _read_edit_list(data: bytes, trak: Box) -> int:
    """The media_time of the track's edit list, or 0 without one.

    Only the edit list a fragmented track can have is accepted: a single edit at normal rate
    that starts presentation at media_time and runs to the end of the track (segment_duration
    0, as in ffmpeg's fragmented output; a whole-track duration is accepted too). Empty edits
    (a delayed start) and cuts inside the track are refused: no manifest could describe them.
    """
    edts = list(_children(data, trak, "edts"))
    if not edts:
        return 0
    if len(edts) > 1:
        raise PackagingError(f"expected at most one edts in the trak, found {len(edts)}")
    elst = _only_child(data, edts[0], "elst")
    version, _ = _full_box(data, elst)
    if version not in (0, 1):
        raise PackagingError(f"elst of unknown version {version}")
    (count,) = _U32.unpack(_read(data, elst.payload_start + 4, 4, elst))
    if count != 1:
        raise PackagingError(
            f"edit list with {count} entries: only one edit that skips the start is supported"
        )
    entry = _read(data, elst.payload_start + 8, 20 if version == 1 else 12, elst)
    _, media_time, rate = struct.unpack(">QqI" if version == 1 else ">IiI", entry)
    if media_time < 0:
        raise PackagingError("the edit list starts with an empty edit (a delayed start)")
    if rate != _ELST_RATE_ONE:
        raise PackagingError(f"edit at media rate {rate / 65536:g}, not 1")
    return int(media_time)


def _read_trex(data: bytes, moov: Box, track_id: int) -> tuple[int, int] | None:
    for mvex in _children(data, moov, "mvex"):
        for trex in _children(data, mvex, "trex"):
            tid, _, duration, _, flags = struct.unpack(
                ">5I", _read(data, trex.payload_start + 4, 20, trex)
            )
            if tid == track_id:
                return duration, flags
    return None


def _first_sample_entry(data: bytes, stsd: Box) -> Box:
    (count,) = _U32.unpack(_read(data, stsd.payload_start + 4, 4, stsd))
    if count != 1:
        raise PackagingError(f"expected one sample entry in stsd, found {count}")
    entries = iter_boxes(data, stsd.payload_start + 8, stsd.end)
    entry = next(entries, None)
    if entry is None:
        raise PackagingError("stsd has no sample entry")
    return entry


def _config_payload(data: bytes, entry: Box, children_at: int, kind: str) -> bytes:
    if children_at > entry.end:
        raise PackagingError(f"{entry.type} sample entry at byte {entry.start} is too short")
    for child in iter_boxes(data, children_at, entry.end):
        if child.type == kind:
            return data[child.payload_start : child.end]
    raise PackagingError(f"{entry.type} sample entry has no {kind} box")


def _need(config: bytes, length: int, what: str) -> None:
    if len(config) < length:
        raise PackagingError(f"{what} is too short: {len(config)} bytes, {length} needed")


def _video_codec_string(kind: str, config: bytes) -> str:
    if kind in ("avc1", "avc3"):
        _need(config, 4, "avcC")
        return f"{kind}.{config[1]:02x}{config[2]:02x}{config[3]:02x}"
    if kind in ("hvc1", "hev1"):
        return f"{kind}.{_hevc_suffix(config)}"
    if kind == "vp09":
        # vpcC is a FullBox; version 1 starts profile, level, bitDepth after the 4-byte header.
        _need(config, 7, "vpcC")
        if config[0] != 1:
            raise PackagingError(f"vpcC version {config[0]} is not supported (expected 1)")
        profile, level, bit_depth = config[4], config[5], config[6] >> 4
        return f"vp09.{profile:02d}.{level:02d}.{bit_depth:02d}"
    if kind == "av01":
        _need(config, 3, "av1C")
        if config[0] != 0x81:
            raise PackagingError(f"av1C marker/version byte is {config[0]:#x}, expected 0x81")
        profile, level = config[1] >> 5, config[1] & 0x1F
        tier = "H" if config[2] & 0x80 else "M"
        high_bitdepth, twelve_bit = bool(config[2] & 0x40), bool(config[2] & 0x20)
        depth = 12 if high_bitdepth and twelve_bit else 10 if high_bitdepth else 8
        return f"av01.{profile}.{level:02d}{tier}.{depth:02d}"
    raise PackagingError(f"no codec string for video sample entry {kind!r}")


def _hevc_suffix(config: bytes) -> str:
    """`P.C.TL.B...` of ISO/IEC 14496-15 Annex E.3 from an HEVCDecoderConfigurationRecord."""
    _need(config, 13, "hvcC")
    space, tier, profile = config[1] >> 6, (config[1] >> 5) & 1, config[1] & 0x1F
    (compat,) = _U32.unpack_from(config, 2)
    constraints = config[6:12]
    level = config[12]
    # The compatibility flags are written in reverse bit order (flag 0 is the stream's MSB).
    reversed_compat = int(f"{compat:032b}"[::-1], 2)
    parts = [
        ("", "A", "B", "C")[space] + str(profile),
        f"{reversed_compat:X}",
        ("H" if tier else "L") + str(level),
    ]
    trimmed = constraints.rstrip(b"\x00")
    parts.extend(f"{b:X}" for b in trimmed)
    return ".".join(parts)


def _audio_codec_string(kind: str, config: bytes) -> str:
    if kind == "mp4a":
        oti, asc = _parse_esds(config)
        if oti == 0x40 and asc:
            return f"mp4a.40.{_audio_object_type(asc)}"
        return f"mp4a.{oti:02X}"
    if kind == "Opus":
        return "opus"
    if kind == "fLaC":
        return "flac"
    raise PackagingError(f"no codec string for audio sample entry {kind!r}")


def _descriptor(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, payload start, payload end) of the MPEG-4 descriptor at `pos`."""
    if pos >= len(buf):
        raise PackagingError("esds ends inside a descriptor header")
    tag = buf[pos]
    pos += 1
    size = 0
    for _ in range(4):  # the size is 7 bits a byte, high bit meaning "more follows"
        if pos >= len(buf):
            raise PackagingError("esds ends inside a descriptor size")
        byte = buf[pos]
        pos += 1
        size = (size << 7) | (byte & 0x7F)
        if not byte & 0x80:
            break
    if pos + size > len(buf):
        raise PackagingError(f"esds descriptor 0x{tag:02x} runs past the end of the box")
    return tag, pos, pos + size


def _parse_esds(config: bytes) -> tuple[int, bytes]:
    """(objectTypeIndication, AudioSpecificConfig) from an esds box payload."""
    tag, pos, end = _descriptor(config, 4)  # skip the FullBox header
    if tag != 0x03:
        raise PackagingError(f"esds does not start with an ES_Descriptor (tag 0x{tag:02x})")
    _need(config[:end], pos + 3, "ES_Descriptor")
    flags = config[pos + 2]
    pos += 3
    if flags & 0x80:  # streamDependenceFlag
        pos += 2
    if flags & 0x40:  # URL_Flag
        _need(config[:end], pos + 1, "ES_Descriptor URL")
        pos += 1 + config[pos]
    if flags & 0x20:  # OCRstreamFlag
        pos += 2
    while pos < end:
        tag, start, stop = _descriptor(config, pos)
        if tag == 0x04:
            _need(config[:stop], start + 13, "DecoderConfigDescriptor")
            oti = config[start]
            inner = start + 13
            while inner < stop:
                dtag, dstart, dstop = _descriptor(config, inner)
                if dtag == 0x05:
                    return oti, config[dstart:dstop]
                inner = dstop
            return oti, b""
        pos = stop
    raise PackagingError("esds has no DecoderConfigDescriptor")


def _audio_object_type(asc: bytes) -> int:
    aot = asc[0] >> 3
    if aot == 31:  # escape: the real type is 32 + the next 6 bits
        _need(asc, 2, "AudioSpecificConfig")
        aot = 32 + (((asc[0] & 0x07) << 3) | (asc[1] >> 5))
    return aot
