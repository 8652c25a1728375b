"""One rendition of a live channel as a state machine: CMAF fragments in, files and a window out.

The encoder writes one fragment about every part target (half a second); each becomes a part
file, and fragments are grouped into segments of about the segment target, a new segment
starting only on a fragment that starts with a sync sample (for video, the keyframes the
encoder forces every segment target). A segment's file is its parts end to end, so a player
that reads whole segments and one that reads parts get the same bytes. Segments older than the
DVR window expire with their parts. A new encoder run (the feed came back, a slate took over)
starts a new init segment and marks a discontinuity.

Pure: :class:`TrackPackager` never touches a file or a clock; it answers each notice with the
:data:`Effect` list the shell carries out, and its :meth:`~TrackPackager.window` is what the
playlist is written from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from streamplane.live.playlist import Part, Segment, Window, part_name, segment_name

__all__ = ["Effect", "Fragment", "RemoveObject", "TrackPackager", "WriteObject", "init_name"]


@dataclass(frozen=True)
class Fragment:
    """One CMAF fragment as the encoder wrote it (moof + mdat)."""

    start: float  # seconds on the encoder run's timeline
    duration: float
    independent: bool  # its first sample is a sync sample
    data: bytes


@dataclass(frozen=True)
class WriteObject:
    name: str
    data: bytes


@dataclass(frozen=True)
class RemoveObject:
    name: str


Effect = WriteObject | RemoveObject


def init_name(epoch: int) -> str:
    """The init segment of encoder run ``epoch``."""
    return f"init_{epoch}.mp4"


@dataclass
class _Open:
    msn: int
    start: float
    map_uri: str
    program_date_time: float
    discontinuity: bool
    parts: list[Part] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)

    def segment(self, duration: float | None) -> Segment:
        return Segment(
            msn=self.msn,
            uri=segment_name(self.msn),
            parts=tuple(self.parts),
            map_uri=self.map_uri,
            program_date_time=self.program_date_time,
            discontinuity=self.discontinuity,
            duration=duration,
            start=self.start,
        )


class TrackPackager:
    """The segments and parts of one rendition, within its DVR window."""

    def __init__(self, part_target: float, segment_target: float, dvr_seconds: float) -> None:
        if not 0 < part_target <= segment_target:
            raise ValueError("the part target must be positive and at most the segment target")
        if dvr_seconds < segment_target:
            raise ValueError("the DVR window must hold at least one segment")
        self.part_target = part_target
        self.segment_target = segment_target
        self.dvr_seconds = dvr_seconds
        self._done: list[Segment] = []
        self._open: _Open | None = None
        self._next_msn = 0
        self._epoch = -1
        self._map_uri = ""
        self._discontinuity = False
        self._discontinuity_sequence = 0
        self._ended = False

    @property
    def epoch(self) -> int:
        return self._epoch

    def begin(self, init: bytes) -> list[Effect]:
        """A new encoder run with this init segment: what follows is discontinuous."""
        effects = self._close()
        self._epoch += 1
        self._map_uri = init_name(self._epoch)
        self._discontinuity = self._next_msn > 0
        self._ended = False
        effects.append(WriteObject(self._map_uri, init))
        return effects

    def push(self, fragment: Fragment, wall: float) -> list[Effect]:
        """A fragment arrived at wall-clock ``wall`` (its end; UNIX seconds)."""
        if self._epoch < 0:
            raise ValueError("a fragment before the init segment")
        effects: list[Effect] = []
        current = self._open
        if current is not None and fragment.independent:
            elapsed = fragment.start - current.start
            if elapsed >= self.segment_target - self.part_target / 2:
                effects += self._close()
                current = None
        if current is None:
            current = self._open = _Open(
                msn=self._next_msn,
                start=fragment.start,
                map_uri=self._map_uri,
                program_date_time=wall - fragment.duration,
                discontinuity=self._discontinuity,
            )
            self._next_msn += 1
            self._discontinuity = False
        name = part_name(current.msn, len(current.parts))
        current.parts.append(Part(fragment.duration, fragment.independent, name))
        current.data.append(fragment.data)
        effects.append(WriteObject(name, fragment.data))
        return effects

    def interrupt(self) -> list[Effect]:
        """The encoder run stopped (the feed was lost): its open segment is closed with the
        parts it has, and the channel waits for the next run without ending."""
        return self._close()

    def end(self) -> list[Effect]:
        """The channel stopped: the playlist ends after the last segment."""
        effects = self._close()
        self._ended = True
        return effects

    def _close(self) -> list[Effect]:
        current = self._open
        if current is None:
            return []
        self._open = None
        segment = current.segment(sum(p.duration for p in current.parts))
        self._done.append(segment)
        effects: list[Effect] = [WriteObject(segment.uri, b"".join(current.data))]
        return effects + self._expire()

    def _expire(self) -> list[Effect]:
        """Drop the oldest segments while the rest still fill the DVR window."""
        effects: list[Effect] = []
        done = self._done
        total = sum(s.duration or 0.0 for s in done)
        while len(done) > 1 and total - (done[0].duration or 0.0) >= self.dvr_seconds:
            gone = done.pop(0)
            total -= gone.duration or 0.0
            effects.append(RemoveObject(gone.uri))
            effects += [RemoveObject(p.uri) for p in gone.parts]
            # The next segment now carries the count of the discontinuity it followed.
            if done[0].discontinuity:
                self._discontinuity_sequence += 1
                done[0] = replace(done[0], discontinuity=False)
            if gone.map_uri not in {s.map_uri for s in done} and gone.map_uri != self._map_uri:
                effects.append(RemoveObject(gone.map_uri))
        return effects

    def window(self) -> Window:
        segments = list(self._done)
        current = self._open
        if current is not None:
            segments.append(current.segment(None))
        return Window(
            segments=tuple(segments),
            part_target=self.part_target,
            segment_target=self.segment_target,
            discontinuity_sequence=self._discontinuity_sequence,
            ended=self._ended and current is None,
        )
