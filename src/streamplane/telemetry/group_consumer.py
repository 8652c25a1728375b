"""The loop every write-behind consumer runs: fetch, write, and only then acknowledge.

:class:`GroupConsumer` joins a durable consumer group of the stream and, until stopped,
fetches up to ``max_batches`` batches, hands them to :meth:`GroupConsumer.handle` and
acknowledges them once it returns. ``handle`` writes with :meth:`GroupConsumer.retried`: a
write that fails (the store is down) is tried again with backoff while the batches wait,
unacknowledged, in the stream. A consumer killed between a write and its acknowledgement
has the batches redelivered, so every write a subclass makes must be idempotent.

A round that did not fill (``max_batches``) is followed by a pause, until ``linger_s`` after
it began: under a storm the store then takes a few large transactions a second rather than
one per handful of heartbeats (each holding SQLite's write lock, or PostgreSQL's row locks,
while a playback start may be waiting for them), and a quiet stream costs one round per
``linger_s``. A full round is followed by the next at once: a backlog drains at full speed,
unless ``share`` (0 < share <= 1) bounds the consumer's time: after a round that took ``w``
seconds it rests ``w * (1 / share - 1)``. A consumer that shares its process with playback
starts (the QoS consumer in the control plane) then leaves them the rest of the time during a
storm it cannot keep up with; its backlog waits, durable, in the stream, and is written after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from streamplane.telemetry.stream import Delivery, Group, Stream, StreamUnavailable

__all__ = ["GroupConsumer"]

log = logging.getLogger(__name__)


class GroupConsumer:
    """Runs consumer group ``group`` of ``stream`` until :meth:`stop`; subclasses say what
    a fetch's batches become (:meth:`handle`)."""

    def __init__(
        self,
        stream: Stream,
        *,
        group: str,
        max_batches: int = 1024,
        ack_wait_s: float = 30.0,
        retry_max_s: float = 5.0,
        linger_s: float = 0.0,
        share: float = 1.0,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"a consumer's share of the time is in (0, 1], not {share}")
        self._stream = stream
        self._linger_s = linger_s
        self._rest = 1 / share - 1  # seconds of rest per second of work
        self.group_name = group
        self._max = max_batches
        self._ack_wait_s = ack_wait_s
        self._retry_max_s = retry_max_s
        self._group: Group | None = None
        self._task: asyncio.Task[None] | None = None
        self.written_events = 0
        self.failures = 0  # writes that failed and were retried

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        """Write what ``deliveries`` hold (idempotently); they are acknowledged after."""
        raise NotImplementedError

    async def start(self) -> None:
        self._group = await self._stream.group(self.group_name, ack_wait_s=self._ack_wait_s)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop; past ``timeout_s`` say so and go on (a process that is shutting
        down must not wait for ever on a loop a library kept from ending)."""
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
            if not done:
                log.error(
                    "telemetry %s: the consumer did not stop within %.0f s; left behind",
                    self.group_name,
                    timeout_s,
                )
            else:
                with contextlib.suppress(asyncio.CancelledError):
                    self._task.result()
            self._task = None
        if self._group is not None:
            with contextlib.suppress(StreamUnavailable):
                await self._group.close()
            self._group = None

    async def backlog(self) -> int:
        assert self._group is not None, "start() first"
        return await self._group.backlog()

    async def settle(self, timeout_s: float = 10.0) -> None:
        """Wait until everything appended so far is written (tests, shutdown, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if await self.backlog() == 0:
                    return
                behind = "is still behind"
            except StreamUnavailable as err:  # one slow answer of the stream is not the end
                behind = f"cannot tell its backlog ({err})"
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {self.group_name} consumer {behind}")
            await asyncio.sleep(0.005)

    async def retried(self, write: Callable[[], Awaitable[None]], events: int) -> None:
        """``write()`` until it succeeds, backing off between tries; ``events`` is for the log."""
        delay = 0.05
        while True:
            try:
                await write()
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the store is down, or refused: keep them, try again
                self.failures += 1
                log.warning(
                    "telemetry %s: writing %d events failed (%s); retrying in %.2f s",
                    self.group_name,
                    events,
                    err,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)

    async def _run(self) -> None:
        assert self._group is not None
        group = self._group
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            try:
                deliveries = await group.fetch(self._max, timeout_s=1.0)
            except StreamUnavailable as err:
                log.warning("telemetry %s: cannot fetch: %s", self.group_name, err)
                await asyncio.sleep(0.5)
                continue
            if not deliveries:
                continue
            await self.handle(deliveries)
            try:
                await group.ack(deliveries)
            except StreamUnavailable as err:
                # written, not acknowledged: they come back, and writing them again is harmless
                log.warning("telemetry %s: cannot acknowledge: %s", self.group_name, err)
            now = loop.time()
            rest = (now - began) * self._rest
            if len(deliveries) < self._max:
                rest = max(rest, began + self._linger_s - now)
            if rest > 0:
                await asyncio.sleep(rest)
