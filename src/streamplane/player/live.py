"""Playing a live channel (LL-HLS) headless: the pure core. No I/O, no clock.

What hls.js does in low-latency mode, reduced to decisions over plain data, so the headless
viewer (`player/viewer.py`), the swarm and `bench/live.py` drive the same rules:

- `parse_live_playlist` / `parse_variants`: a media playlist's parts (with their segment
  numbers, durations, independence and program dates), its preload hint, PART-HOLD-BACK and
  end; the master playlist's variants and the audio rendition they play with.
- `join_part`: where a viewer starts, the newest independent part at least PART-HOLD-BACK
  behind the live edge (RFC 8216bis 6.2.5.2 / 4.4.3.8: a client should not play closer).
- `part_after`: the part that follows one, from the playlist or, at the live edge, the
  number the next blocking reload (`_HLS_msn` / `_HLS_part`) asks for.
- `playback_rate`: hold a target latency with small rate changes (hls.js's
  `maxLiveSyncPlaybackRate`), never faster than 1.25 or slower than 0.9.
- `live_rung`: step down rather than stall: a rung whose parts took longer than their
  duration to arrive, or a buffer under one part, moves down one rung at once; a rung moves
  up only after several parts that came at well under half their duration.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from streamplane.player.errors import ManifestError

__all__ = [
    "AudioRendition",
    "LivePart",
    "LivePlaylist",
    "Variant",
    "join_part",
    "live_rung",
    "next_number",
    "parse_audio_rendition",
    "parse_live_playlist",
    "parse_variants",
    "part_after",
    "playback_rate",
]

MAX_RATE: Final = 1.25
MIN_RATE: Final = 0.9
_ATTR: Final = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^,]*)')


@dataclass(frozen=True)
class LivePart:
    msn: int
    index: int
    duration: float
    uri: str
    independent: bool
    program_date: float | None  # wall-clock seconds (UNIX) of its first frame, if said

    @property
    def number(self) -> tuple[int, int]:
        return self.msn, self.index


@dataclass(frozen=True)
class LivePlaylist:
    parts: tuple[LivePart, ...]  # the parts listed, oldest first
    part_target: float
    part_hold_back: float
    map_uri: str | None  # the init segment of the newest part
    preload: tuple[int, int] | None  # (msn, index) the preload hint names
    ended: bool

    @property
    def newest(self) -> LivePart | None:
        return self.parts[-1] if self.parts else None


@dataclass(frozen=True)
class Variant:
    uri: str
    bandwidth: int
    height: int


@dataclass(frozen=True)
class AudioRendition:
    uri: str  # its media playlist
    group: str
    name: str


def _attrs(text: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in _ATTR.findall(text)}


def _date(text: str) -> float:
    return datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()


def parse_live_playlist(text: str) -> LivePlaylist:
    """The parts of an LL-HLS media playlist. ManifestError when it is not one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != "#EXTM3U":
        raise ManifestError("not a playlist (no #EXTM3U)")
    msn = 0
    index = 0
    part_target = hold_back = None
    map_uri: str | None = None
    segment_date: float | None = None
    offset = 0.0  # seconds into the segment of the next part
    parts: list[LivePart] = []
    preload: tuple[int, int] | None = None
    ended = False
    try:
        for line in lines[1:]:
            tag, _, value = line.partition(":")
            if tag == "#EXT-X-MEDIA-SEQUENCE":
                msn = int(value)
            elif tag == "#EXT-X-PART-INF":
                part_target = float(_attrs(value)["PART-TARGET"])
            elif tag == "#EXT-X-SERVER-CONTROL":
                hold = _attrs(value).get("PART-HOLD-BACK")
                hold_back = float(hold) if hold is not None else None
            elif tag == "#EXT-X-MAP":
                map_uri = _attrs(value)["URI"]
            elif tag == "#EXT-X-PROGRAM-DATE-TIME":
                segment_date = _date(value)
            elif tag == "#EXT-X-PART":
                a = _attrs(value)
                duration = float(a["DURATION"])
                date = segment_date + offset if segment_date is not None else None
                parts.append(
                    LivePart(msn, index, duration, a["URI"], a.get("INDEPENDENT") == "YES", date)
                )
                index += 1
                offset += duration
            elif tag == "#EXTINF":
                pass
            elif tag == "#EXT-X-PRELOAD-HINT":
                a = _attrs(value)
                if a.get("TYPE") == "PART":
                    preload = (msn, index)
            elif tag == "#EXT-X-ENDLIST":
                ended = True
            elif not line.startswith("#"):  # a whole segment's URI: the next one begins
                msn += 1
                index = 0
                offset = 0.0
                segment_date = None
    except (KeyError, ValueError) as exc:
        raise ManifestError(f"a live playlist line is malformed: {exc}") from None
    if part_target is None:
        raise ManifestError("not a low-latency playlist (no EXT-X-PART-INF)")
    return LivePlaylist(
        parts=tuple(parts),
        part_target=part_target,
        part_hold_back=hold_back if hold_back is not None else 3 * part_target,
        map_uri=map_uri,
        preload=preload,
        ended=ended,
    )


def parse_variants(text: str) -> list[Variant]:
    """The video variants of a master playlist, lowest bandwidth first."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != "#EXTM3U":
        raise ManifestError("not a playlist (no #EXTM3U)")
    out = []
    for line, uri in itertools.pairwise(lines):
        if line.startswith("#EXT-X-STREAM-INF:") and not uri.startswith("#"):
            a = _attrs(line.partition(":")[2])
            try:
                height = int(a.get("RESOLUTION", "0x0").split("x")[1])
                out.append(Variant(uri, int(a["BANDWIDTH"]), height))
            except (KeyError, ValueError, IndexError):
                raise ManifestError(f"a variant is malformed: {line}") from None
    if not out:
        raise ManifestError("the master playlist lists no variant")
    return sorted(out, key=lambda v: v.bandwidth)


def parse_audio_rendition(text: str) -> AudioRendition | None:
    """The audio rendition a player plays beside the lowest variant: of the EXT-X-MEDIA
    TYPE=AUDIO entries in the group that variant names (AUDIO=), the DEFAULT=YES one, else the
    first. None when the variant names no audio group, or the rendition has no URI (its audio
    is in the variant's own stream). ManifestError when it is not a master playlist, an audio
    entry lacks GROUP-ID or NAME, or a variant names a group no entry defines."""
    variants = parse_variants(text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    groups: dict[str, list[dict[str, str]]] = {}
    for line in lines:
        if not line.startswith("#EXT-X-MEDIA:"):
            continue
        a = _attrs(line.partition(":")[2])
        if a.get("TYPE") != "AUDIO":
            continue
        if not a.get("GROUP-ID") or not a.get("NAME"):
            raise ManifestError(f"an audio rendition lacks GROUP-ID or NAME: {line}")
        groups.setdefault(a["GROUP-ID"], []).append(a)
    named: dict[str, str] = {}  # variant URI -> the audio group it names
    for line, uri in itertools.pairwise(lines):
        if line.startswith("#EXT-X-STREAM-INF:") and not uri.startswith("#"):
            group = _attrs(line.partition(":")[2]).get("AUDIO")
            if group is not None:
                if group not in groups:
                    raise ManifestError(f"a variant names audio group {group!r}, never defined")
                named[uri] = group
    group = named.get(variants[0].uri)
    if group is None:
        return None
    entries = groups[group]
    chosen = next((a for a in entries if a.get("DEFAULT") == "YES"), entries[0])
    if not chosen.get("URI"):
        return None
    return AudioRendition(chosen["URI"], group, chosen["NAME"])


def join_part(playlist: LivePlaylist, hold_back_s: float | None = None) -> LivePart | None:
    """The part a viewer joins at: the newest independent one starting at least
    ``hold_back_s`` (the playlist's PART-HOLD-BACK) before the end of the newest part; else
    the oldest independent part; None when no part is independent."""
    hold = playlist.part_hold_back if hold_back_s is None else hold_back_s
    ends = 0.0
    behind = []  # (seconds from this part's start to the live edge, part)
    for part in reversed(playlist.parts):
        ends += part.duration
        behind.append((ends, part))
    chosen = None
    for seconds, part in behind:  # newest first
        if part.independent:
            chosen = part
            if seconds >= hold - 1e-9:
                return part
    return chosen


def part_after(playlist: LivePlaylist, current: tuple[int, int]) -> LivePart | None:
    """The listed part after ``current``, or None when ``current`` is the newest (ask with a
    blocking reload for the next) or is no longer listed (the viewer fell behind the parts)."""
    for k, part in enumerate(playlist.parts):
        if part.number == current:
            return playlist.parts[k + 1] if k + 1 < len(playlist.parts) else None
    return None


def next_number(current: tuple[int, int]) -> tuple[int, int]:
    """What to ask a blocking reload for after ``current``: the next part of its segment (the
    origin answers as well when the next segment's first part comes instead)."""
    return current[0], current[1] + 1


def playback_rate(latency_s: float, target_s: float, buffer_s: float, part_s: float) -> float:
    """The rate that brings ``latency_s`` back to ``target_s``: faster when behind (only with
    more than a part buffered, so catching up never stalls), slower when ahead, in
    proportion to the distance, within [MIN_RATE, MAX_RATE]."""
    if not (math.isfinite(latency_s) and math.isfinite(target_s)):
        return 1.0
    error = latency_s - target_s
    if abs(error) < 0.05:
        return 1.0
    if error > 0:
        if buffer_s <= part_s:
            return 1.0
        return min(MAX_RATE, 1.0 + error / 2)
    return max(MIN_RATE, 1.0 + error / 2)


def live_rung(
    rung: int,
    bandwidths: Sequence[int],
    recent: Sequence[tuple[float, float, int]],
    buffer_s: float,
    part_s: float,
    up_after: int = 4,
) -> int:
    """The rung for the next part. ``recent``: (seconds the part took, its duration, its
    rung), newest last. Down one at once when the last part came slower than it plays or
    the buffer is under a part; up one after ``up_after`` parts of this rung in a row that
    came in under half their duration, when the measured rate covers the next rung."""
    if not bandwidths:
        raise ValueError("no rungs")
    rung = max(0, min(rung, len(bandwidths) - 1))
    if recent:
        took, duration, last = recent[-1]
        if last == rung and rung > 0 and (took > duration or buffer_s < part_s):
            return rung - 1
    if rung + 1 < len(bandwidths) and len(recent) >= up_after:
        tail = recent[-up_after:]
        if all(r == rung and took < duration / 2 for took, duration, r in tail):
            # a part of `duration` at rung's bandwidth took `took`: the link's rate, at least
            rate = min(bandwidths[rung] * duration / max(took, 1e-6) for took, duration, _ in tail)
            if rate > 1.5 * bandwidths[rung + 1]:
                return rung + 1
    return rung
