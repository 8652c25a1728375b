"""The QoS consumer: the stream's heartbeats into the QoS aggregates, written behind.

A consumer group of its own (``qos``): it sees every batch whatever the other consumers do,
and has its own acknowledgements. Each round fetches up to ``max_batches`` batches, turns
their events into :class:`~streamplane.telemetry.qos.QosSample` values (the client's network
resolved from its address by ``network_of``, steering's view of it), hands them to the
:class:`QosSink` (one store transaction: the sessions' marks read, folded, the rows and marks
written) and only then acknowledges. A sink that fails (the store is down) is retried with
backoff while the batches wait in the stream; a consumer killed between the write and the
acknowledgement has its batches redelivered, and the marks make writing them again add
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from streamplane.telemetry.events import EventBatch
from streamplane.telemetry.qos import QosSample
from streamplane.telemetry.stream import Group, Stream, StreamUnavailable

__all__ = ["NetworkOf", "QosConsumer", "QosSink", "samples"]

log = logging.getLogger(__name__)

NetworkOf = Callable[[str], tuple[str, int]]
"""A client address -> its network (prefix, origin AS); ValueError if it is no address."""


class QosSink(Protocol):
    """Where the samples go. ``write`` is one transaction; it raises if nothing was written,
    and is retried with the same samples."""

    async def write(self, samples: Sequence[QosSample]) -> None: ...


def samples(batches: Iterable[EventBatch], network_of: NetworkOf) -> list[QosSample]:
    """The QoS samples of ``batches``' events (an address that is no address: no network)."""
    networks: dict[str, tuple[str, int] | None] = {}
    out: list[QosSample] = []
    for batch in batches:
        for e in batch.events:
            network: tuple[str, int] | None = None
            if e.client:
                if e.client not in networks:
                    try:
                        networks[e.client] = network_of(e.client)
                    except ValueError:
                        networks[e.client] = None
                network = networks[e.client]
            out.append(
                QosSample(
                    session=e.session,
                    title=e.title,
                    at=e.at,
                    received_at=e.received_at,
                    edge=e.edge,
                    network=network[0] if network else None,
                    asn=network[1] if network else 0,
                    rebuffer_s=e.rebuffer_s,
                    rebuffers=e.rebuffers,
                    switches=e.switches,
                    errors=e.errors,
                    bitrate_kbps=e.bitrate_kbps,
                    startup_s=e.startup_s,
                )
            )
    return out


class QosConsumer:
    """Runs consumer group ``group`` of ``stream`` into ``sink`` until :meth:`stop`."""

    def __init__(
        self,
        stream: Stream,
        sink: QosSink,
        network_of: NetworkOf,
        *,
        group: str = "qos",
        max_batches: int = 1024,
        ack_wait_s: float = 30.0,
        retry_max_s: float = 5.0,
    ) -> None:
        self._stream = stream
        self._sink = sink
        self._network_of = network_of
        self.group_name = group
        self._max = max_batches
        self._ack_wait_s = ack_wait_s
        self._retry_max_s = retry_max_s
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
            self._group = None

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
            batch = samples((d.batch for d in deliveries), self._network_of)
            await self._write(batch)
            self.written_events += len(batch)
            try:
                await group.ack(deliveries)
            except StreamUnavailable as err:
                # written, not acknowledged: they come back and add nothing
                log.warning("telemetry %s: cannot acknowledge: %s", self.group_name, err)

    async def _write(self, batch: Sequence[QosSample]) -> None:
        delay = 0.05
        while True:
            try:
                await self._sink.write(batch)
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the store is down, or refused: keep them, try again
                self.failures += 1
                log.warning(
                    "telemetry %s: writing %d events failed (%s); retrying in %.2f s",
                    self.group_name,
                    len(batch),
                    err,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
