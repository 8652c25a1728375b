"""Write-behind: the stream's batches folded into a few idempotent store writes.

:func:`fold` (pure) turns any number of batches into what the store must hold afterwards:
per (account, title) the latest position by event time (resume and viewing history), per
session the last time it was heard from (its screen stays taken), and the sessions that
stopped. Every write is "latest wins" or "set once", so a batch written twice, late or out of
order changes nothing: delivery is at least once, the result is exactly once.

:class:`WriteBehind` (the shell) runs one consumer group: fetch up to ``max_batches``, fold,
hand the writes to a :class:`Sink` (one transaction), and only then acknowledge. A sink that
fails (the store is down) is retried with backoff while the batches wait, unacknowledged, in
the stream; a consumer killed between the write and the acknowledgement has its batches
redelivered, and the idempotent writes make that harmless.

A session's screen is touched at most every ``touch_s`` (not on every heartbeat): the store
sees one write per session per ``touch_s``, and a screen is freed between ``screen_timeout_s``
and ``screen_timeout_s + touch_s`` after its last heartbeat.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

import msgspec

from streamplane.telemetry.events import EventBatch
from streamplane.telemetry.group_consumer import GroupConsumer
from streamplane.telemetry.stream import Delivery, Stream

__all__ = ["Position", "Sink", "StoreWrites", "WriteBehind", "fold"]

log = logging.getLogger(__name__)

_TOUCHES_KEPT: Final = 500_000


class Position(msgspec.Struct, frozen=True, order=True):
    at: float  # event time
    position_s: float


class StoreWrites(msgspec.Struct, kw_only=True):
    resume: dict[tuple[str, str], Position]  # (account, title) -> the latest position
    seen: dict[str, float]  # session -> last heard from (server clock)
    stopped: set[str]  # sessions that sent "stop"
    events: int = 0

    def __bool__(self) -> bool:
        return bool(self.resume or self.seen or self.stopped)


def fold(batches: Iterable[EventBatch]) -> StoreWrites:
    """What ``batches`` leave in the store, in any order and with any duplicates."""
    out = StoreWrites(resume={}, seen={}, stopped=set())
    for batch in batches:
        if batch.session:
            out.seen[batch.session] = max(out.seen.get(batch.session, 0.0), batch.received_at)
        for e in batch.events:
            out.events += 1
            key = (e.account, e.title)
            here = Position(e.at, e.position_s)
            known = out.resume.get(key)
            if known is None or here > known:
                out.resume[key] = here
            if e.kind == "stop":
                out.stopped.add(e.session)
    return out


class Sink(Protocol):
    """Where the writes go (the control plane's store). ``write`` is one transaction; it
    raises if nothing was written, and is retried with the same writes."""

    async def write(self, writes: StoreWrites) -> None: ...


class WriteBehind(GroupConsumer):
    """Runs consumer group ``group`` of ``stream`` into ``sink`` until :meth:`stop`."""

    def __init__(
        self,
        stream: Stream,
        sink: Sink,
        *,
        group: str = "store",
        max_batches: int = 1024,
        ack_wait_s: float = 30.0,
        touch_s: float = 15.0,
        retry_max_s: float = 5.0,
        linger_s: float = 0.0,
        share: float = 1.0,
    ) -> None:
        super().__init__(
            stream,
            group=group,
            max_batches=max_batches,
            ack_wait_s=ack_wait_s,
            retry_max_s=retry_max_s,
            linger_s=linger_s,
            share=share,
        )
        self._sink = sink
        self._touch_s = touch_s
        self._touched: dict[str, float] = {}  # session -> last_seen written

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        writes = self._throttled(fold(d.batch for d in deliveries))
        await self.retried(lambda: self._sink.write(writes), writes.events)
        for session, at in writes.seen.items():
            self._touched[session] = at
        self.written_events += writes.events

    def _throttled(self, writes: StoreWrites) -> StoreWrites:
        """``writes`` less the screen touches made less than ``touch_s`` ago."""
        if len(self._touched) > _TOUCHES_KEPT:
            self._touched.clear()  # at worst one extra touch per session
        writes.seen = {
            s: at
            for s, at in writes.seen.items()
            if s in writes.stopped or at - self._touched.get(s, -1e300) >= self._touch_s
        }
        return writes
