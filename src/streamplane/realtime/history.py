"""The recovery rules of a channel's stream, pure: which publications a reconnecting client gets.

A stream is ``(epoch, offsets 1..top)`` of which the engine keeps the newest ones. A client that
last applied ``since`` gets exactly ``since.offset + 1 .. top`` when all of them are still kept,
and nothing otherwise: a partial answer would leave a hole the client cannot see.

:class:`RecentTail` is the same rule over what one gateway process has itself delivered: in a
reconnect storm every client asks for what it missed, and a process that holds the channel's
newest publications answers from memory instead of sending one history read per client to the
engine.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from streamplane.realtime.broker import Position, Publication

__all__ = ["RecentTail", "missed_range"]


def missed_range(since: Position, top: Position, oldest: int, limit: int) -> range | None:
    """The offsets a client at ``since`` missed, or None when they cannot all be given.

    ``oldest`` is the offset of the oldest publication still kept (``top.offset + 1`` when the
    history is empty); ``limit`` the most a client may be sent at once. A position in another
    epoch, ahead of the stream, or negative, is not recoverable."""
    if since.epoch != top.epoch or since.offset < 0 or since.offset > top.offset:
        return None
    if top.offset - since.offset > limit:
        return None
    if since.offset + 1 < oldest:
        return None
    return range(since.offset + 1, top.offset + 1)


class RecentTail:
    """The newest publications of one channel, contiguous and in ``(epoch, offset)`` order.

    It holds at most ``size`` publications, none older than ``ttl_ms`` before the newest (the
    limits the engine's history keeps, so an answer from here is never more generous than the
    engine's would be). ``top`` is the position the tail is complete up to; None until
    :meth:`reset` says where the stream stands. A publication that does not follow ``top`` (a
    hole, another epoch) starts the tail afresh from it: what was kept before it can no longer
    be shown to join up with what comes after."""

    __slots__ = ("_kept", "_top", "size", "ttl_ms")

    def __init__(self, size: int, ttl_ms: int) -> None:
        self.size = max(size, 0)
        self.ttl_ms = ttl_ms
        self._kept: deque[Publication] = deque()
        self._top: Position | None = None

    @property
    def top(self) -> Position | None:
        return self._top

    def __len__(self) -> int:
        return len(self._kept)

    def reset(self, top: Position | None, publications: Iterable[Publication] = ()) -> None:
        """Start again at ``top`` (None: unknown), keeping the newest of ``publications`` (a
        history page, oldest first) that run without a hole up to ``top``."""
        self._kept.clear()
        self._top = top
        if top is None:
            return
        run: list[Publication] = []
        for pub in publications:
            if pub.epoch != top.epoch or pub.offset > top.offset:
                continue
            if run and pub.offset != run[-1].offset + 1:
                run = []
            run.append(pub)
        if run and run[-1].offset == top.offset:
            for pub in run:
                self._keep(pub)

    def append(self, pub: Publication) -> None:
        """A publication delivered after ``top``: kept when it is the next one, a fresh start
        when it is not, ignored when it is one already passed."""
        top = self._top
        if top is not None and pub.epoch == top.epoch and pub.offset <= top.offset:
            return  # a repeat
        if top is None or pub.epoch != top.epoch or pub.offset != top.offset + 1:
            self._kept.clear()
        self._top = pub.position
        self._keep(pub)

    def _keep(self, pub: Publication) -> None:
        kept = self._kept
        kept.append(pub)
        cutoff = pub.time_ms - self.ttl_ms
        while kept and (len(kept) > self.size or kept[0].time_ms < cutoff):
            kept.popleft()

    def recover(self, since: Position, *, limit: int) -> list[Publication] | None:
        """Exactly the publications after ``since`` up to ``top``, or None when the tail does
        not hold all of them (the caller asks the engine)."""
        top = self._top
        if top is None:
            return None
        kept = self._kept
        oldest = kept[0].offset if kept else top.offset + 1
        wanted = missed_range(since, top, oldest, limit)
        if wanted is None:
            return None
        skip = wanted.start - oldest
        return [kept[i] for i in range(skip, len(kept))]
