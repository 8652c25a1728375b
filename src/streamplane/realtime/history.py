"""The recovery rules of a channel's stream, pure: which publications a reconnecting client gets.

A stream is ``(epoch, offsets 1..top)`` of which the engine keeps the newest ones. A client that
last applied ``since`` gets exactly ``since.offset + 1 .. top`` when all of them are still kept,
and nothing otherwise: a partial answer would leave a hole the client cannot see.
"""

from __future__ import annotations

from streamplane.realtime.broker import Position

__all__ = ["missed_range"]


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
