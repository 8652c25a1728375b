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

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Final, Protocol

import msgspec

from streamplane.telemetry.events import EventBatch
from streamplane.telemetry.stream import Group, Stream, StreamUnavailable

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


class WriteBehind:
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
    ) -> None:
        self._stream = stream
        self._sink = sink
        self.group_name = group
        self._max = max_batches
        self._ack_wait_s = ack_wait_s
        self._touch_s = touch_s
        self._retry_max_s = retry_max_s
        self._touched: dict[str, float] = {}  # session -> last_seen written
        self._group: Group | None = None
        self._task: asyncio.Task[None] | None = None
        self.written_events = 0
        self.failures = 0  # sink writes that failed and were retried

    async def start(self) -> None:
        self._group = await self._stream.group(self.group_name, ack_wait_s=self._ack_wait_s)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._group is not None:
            with contextlib.suppress(StreamUnavailable):
                await self._group.close()

    async def backlog(self) -> int:
        assert self._group is not None, "start() first"
        return await self._group.backlog()

    async def settle(self, timeout_s: float = 10.0) -> None:
        """Wait until everything appended so far is written (tests, shutdown, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while await self.backlog() > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {self.group_name} consumer is still behind")
            await asyncio.sleep(0.005)

    async def _run(self) -> None:
        assert self._group is not None
        group = self._group
        while True:
            try:
                deliveries = await group.fetch(self._max, timeout_s=1.0)
            except StreamUnavailable as err:
                log.warning("telemetry %s: cannot fetch: %s", self.group_name, err)
                await asyncio.sleep(0.5)
                continue
            if not deliveries:
                continue
            writes = self._throttled(fold(d.batch for d in deliveries))
            await self._write(writes)
            for session, at in writes.seen.items():
                self._touched[session] = at
            self.written_events += writes.events
            try:
                await group.ack(deliveries)
            except StreamUnavailable as err:
                # written but not acknowledged: they come back, and writing them again is
                # harmless
                log.warning("telemetry %s: cannot acknowledge: %s", self.group_name, err)

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

    async def _write(self, writes: StoreWrites) -> None:
        delay = 0.05
        while True:
            try:
                await self._sink.write(writes)
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the store is down, or refused: keep them, try again
                self.failures += 1
                log.warning(
                    "telemetry %s: writing %d events failed (%s); retrying in %.2f s",
                    self.group_name,
                    writes.events,
                    err,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
