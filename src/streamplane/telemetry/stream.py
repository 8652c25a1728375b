"""The telemetry stream: batches appended durably, read by durable consumer groups.

One interface, one file per engine (``stream_embedded.py``: no server, local disk;
``stream_nats.py``: NATS JetStream). The rules every engine keeps, checked by one behaviour
suite run on each:

- ``append(batch)`` returns only once the batch is durable (on disk, or stored by the
  server): that is when the player is told its heartbeat was taken. A failure raises
  :class:`StreamUnavailable` and nothing is acknowledged.
- The stream has ``partitions`` partitions; a batch goes to ``partition_of(batch.device)``, so
  one device's batches stay in order.
- A consumer group is durable under its name: what it acknowledged stays acknowledged across
  restarts, and it resumes after the last batch it acknowledged. ``fetch`` hands out batches
  not yet acknowledged; each is acknowledged explicitly (``ack``). A batch handed out and not
  acknowledged within ``ack_wait_s`` is handed out again (``Delivery.attempt`` counts), so a
  consumer that dies mid-batch loses nothing: delivery is at least once, and consumers make
  their writes idempotent.
- Groups are independent: each sees every batch.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Protocol

import msgspec

from streamplane.telemetry.events import EventBatch

__all__ = [
    "Appended",
    "Delivery",
    "Group",
    "Stream",
    "StreamError",
    "StreamUnavailable",
    "check_group_name",
    "partition_of",
]


def partition_of(device: str, partitions: int) -> int:
    """The partition of ``device``'s batches: CRC-32 of its id, stable across processes and
    versions (Python's ``hash`` is salted per process)."""
    return zlib.crc32(device.encode()) % partitions


def check_group_name(name: str) -> str:
    """``name`` if it can name a consumer group on every engine (a JetStream durable name)."""
    if not 1 <= len(name) <= 64 or any(c in name for c in ". *>\t\n"):
        raise StreamError(
            f"a consumer group's name is 1 to 64 characters without '.', '*', '>' or blanks,"
            f" not {name!r}"
        )
    return name


class StreamError(Exception):
    """A stream misused or misconfigured (a message a person can act on)."""


class StreamUnavailable(StreamError):
    """The stream cannot take or hand out batches now (disk, server); try again later."""


class Appended(msgspec.Struct, frozen=True):
    partition: int
    offset: int  # increasing within the partition (contiguous on the embedded engine only)


class Delivery(msgspec.Struct, frozen=True):
    partition: int
    offset: int
    batch: EventBatch
    attempt: int  # 1 the first time it is handed out, 2 after one redelivery, ...


class Group(Protocol):
    """One member of a durable consumer group."""

    @property
    def name(self) -> str: ...

    async def fetch(self, max_batches: int = 256, timeout_s: float = 1.0) -> list[Delivery]:
        """Up to ``max_batches`` batches, waiting up to ``timeout_s`` for the first; []."""
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge ``deliveries``: they are never handed to this group again."""
        ...

    async def backlog(self) -> int:
        """Batches appended and not yet acknowledged by this group."""
        ...

    async def close(self) -> None:
        """Leave the group (its acknowledgements stay; unacknowledged batches are redelivered
        to the group after their ack wait)."""
        ...


class Stream(Protocol):
    @property
    def partitions(self) -> int: ...

    async def append(self, batch: EventBatch) -> Appended:
        """Store ``batch`` durably in its device's partition; where it went."""
        ...

    async def group(self, name: str, ack_wait_s: float = 30.0) -> Group:
        """Join (creating it if new) the durable consumer group ``name``."""
        ...

    async def close(self) -> None: ...
