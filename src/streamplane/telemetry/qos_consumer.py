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

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from streamplane.telemetry.events import EventBatch
from streamplane.telemetry.group_consumer import GroupConsumer
from streamplane.telemetry.qos import QosSample
from streamplane.telemetry.stream import Delivery, Stream

__all__ = ["NetworkOf", "QosConsumer", "QosSink", "samples"]

NetworkOf = Callable[[str], tuple[str, int]]
"""A client address -> its network (prefix, origin AS); ValueError if it is no address."""


class QosSink(Protocol):
    """Where the samples go. ``write`` is one transaction; it raises if nothing was written,
    and is retried with the same samples."""

    async def write(self, samples: Sequence[QosSample]) -> None: ...


def samples(
    batches: Iterable[EventBatch],
    network_of: NetworkOf,
    known_edge: Callable[[str], bool] | None = None,
) -> list[QosSample]:
    """The QoS samples of ``batches``' events (an address that is no address: no network).

    The edge is what the player says; with ``known_edge``, one the fleet does not know counts
    for its title and network only (a player cannot fill the store with edges of its own
    naming)."""
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
                    edge=e.edge if e.edge and (known_edge is None or known_edge(e.edge)) else None,
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


class QosConsumer(GroupConsumer):
    """Runs consumer group ``group`` of ``stream`` into ``sink`` until :meth:`stop`."""

    def __init__(
        self,
        stream: Stream,
        sink: QosSink,
        network_of: NetworkOf,
        *,
        known_edge: Callable[[str], bool] | None = None,
        group: str = "qos",
        max_batches: int = 1024,
        ack_wait_s: float = 30.0,
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
        self._network_of = network_of
        self._known_edge = known_edge

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        batch = samples((d.batch for d in deliveries), self._network_of, self._known_edge)
        await self.retried(lambda: self._sink.write(batch), len(batch))
        self.written_events += len(batch)
