"""The telemetry stream on NATS JetStream, for a service that spans machines.

One JetStream stream with file storage, a subject per partition (``<stream>.<n>``), limits
retention (``max_age_s``: an outage of the store shorter than that loses nothing). ``append``
publishes and returns on the server's acknowledgement, which JetStream sends once the message
is stored. A consumer group is a durable pull consumer over every partition with explicit
acknowledgement and ``ack_wait``; processes (or machines) that join the same group share its
batches. The offset of a delivery is the JetStream stream sequence: increasing within a
partition, not contiguous.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from streamplane.lifetime import cancellable
from streamplane.telemetry.events import EventBatch, decode_record, encode_record
from streamplane.telemetry.stream import (
    Appended,
    Delivery,
    StreamError,
    StreamUnavailable,
    check_group_name,
    partition_of,
)

__all__ = ["NatsStream"]

_DESCRIPTION: Final = "streamplane telemetry, partitions={}"
_TRANSIENT: Final = (
    nats.errors.Error,
    nats.js.errors.Error,
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
)


class NatsStream:
    """Connect with :meth:`open`."""

    def __init__(
        self, nc: Nats, js: JetStreamContext, name: str, partitions: int, timeout_s: float
    ) -> None:
        self._nc = nc
        self._js = js
        self._name = name
        self._partitions = partitions
        self._timeout_s = timeout_s

    @classmethod
    async def open(
        cls,
        url: str,
        name: str = "TELEMETRY",
        partitions: int = 8,
        max_age_s: float = 7 * 86_400.0,
        timeout_s: float = 5.0,
    ) -> NatsStream:
        """Connect to ``url`` and create (or check) the stream ``name``."""
        if not 1 <= partitions <= 1024:
            raise StreamError(f"telemetry partitions must be 1..1024, not {partitions}")
        if not name or any(c in name for c in ". *>"):
            raise StreamError(f"a JetStream stream name has no '.', ' ', '*' or '>': {name!r}")
        try:
            nc = await nats.connect(
                url,
                connect_timeout=timeout_s,
                max_reconnect_attempts=-1,  # ride out a restart of the server
                reconnect_time_wait=0.5,
                allow_reconnect=True,
            )
        except _TRANSIENT as err:
            raise StreamUnavailable(f"cannot reach NATS at {url}: {err}") from err
        js = nc.jetstream(timeout=timeout_s)
        description = _DESCRIPTION.format(partitions)
        try:
            try:
                info = await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                await js.add_stream(
                    StreamConfig(
                        name=name,
                        description=description,
                        subjects=[f"{name}.*"],
                        storage=StorageType.FILE,
                        retention=RetentionPolicy.LIMITS,
                        max_age=max_age_s,
                    )
                )
            else:
                if info.config.description != description:
                    await nc.close()
                    raise StreamError(
                        f"the JetStream stream {name} is {info.config.description!r}, not"
                        f" {description!r}: a device's batches would change partition"
                    )
        except _TRANSIENT as err:
            await nc.close()
            raise StreamUnavailable(f"cannot set up the JetStream stream {name}: {err}") from err
        return cls(nc, js, name, partitions, timeout_s)

    @property
    def partitions(self) -> int:
        return self._partitions

    @property
    def name(self) -> str:
        return self._name

    async def append(self, batch: EventBatch) -> Appended:
        part = partition_of(batch.device, self._partitions)
        try:
            ack = await self._js.publish(
                f"{self._name}.{part}", encode_record(batch), timeout=self._timeout_s
            )
        except _TRANSIENT as err:
            raise StreamUnavailable(f"JetStream did not store the batch: {err!r}") from err
        return Appended(part, ack.seq)

    async def group(self, name: str, ack_wait_s: float = 30.0) -> _NatsMember:
        check_group_name(name)
        try:
            sub = await self._js.pull_subscribe(
                f"{self._name}.*",
                durable=name,
                stream=self._name,
                config=ConsumerConfig(
                    durable_name=name,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=ack_wait_s,
                    deliver_policy=DeliverPolicy.ALL,
                    max_ack_pending=100_000,
                ),
            )
        except _TRANSIENT as err:
            raise StreamUnavailable(f"cannot join consumer group {name}: {err!r}") from err
        return _NatsMember(self, name, sub)

    async def delete(self) -> None:
        """Delete the stream and its consumers (tests and benchmarks clean up with it)."""
        try:
            await self._js.delete_stream(self._name)
        except _TRANSIENT as err:
            raise StreamUnavailable(f"cannot delete the stream {self._name}: {err!r}") from err

    async def close(self) -> None:
        if not self._nc.is_closed:
            await self._nc.close()


class _NatsMember:
    def __init__(self, stream: NatsStream, name: str, sub: JetStreamContext.PullSubscription):
        self._stream = stream
        self._name = name
        self._sub = sub
        self._held: dict[int, Msg] = {}  # stream sequence -> the message to acknowledge

    @property
    def name(self) -> str:
        return self._name

    async def fetch(self, max_batches: int = 256, timeout_s: float = 1.0) -> list[Delivery]:
        try:
            msgs = await cancellable(self._sub.fetch(max_batches, timeout=max(timeout_s, 0.01)))
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except _TRANSIENT as err:
            raise StreamUnavailable(f"cannot fetch from JetStream: {err!r}") from err
        out: list[Delivery] = []
        for msg in msgs:
            meta = msg.metadata
            seq = meta.sequence.stream
            part = int(msg.subject.rsplit(".", 1)[1])
            self._held[seq] = msg
            out.append(Delivery(part, seq, decode_record(msg.data), meta.num_delivered))
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        msgs = [m for m in (self._held.pop(d.offset, None) for d in deliveries) if m is not None]
        if not msgs:
            return
        try:
            for msg in msgs[:-1]:
                await msg.ack()
            # The server takes a consumer's acks in order: its answer to the last one means it
            # has recorded them all (a plain ack is fire-and-forget).
            await cancellable(msgs[-1].ack_sync(timeout=self._stream._timeout_s))
        except _TRANSIENT as err:
            raise StreamUnavailable(f"cannot acknowledge to JetStream: {err!r}") from err

    async def backlog(self) -> int:
        try:
            info: Any = await cancellable(self._sub.consumer_info())
        except _TRANSIENT as err:
            raise StreamUnavailable(f"cannot read the consumer's state: {err!r}") from err
        return int(info.num_pending) + int(info.num_ack_pending)

    async def close(self) -> None:
        self._held.clear()
        with contextlib.suppress(*_TRANSIENT):  # gone with the connection already
            await self._sub.unsubscribe()
