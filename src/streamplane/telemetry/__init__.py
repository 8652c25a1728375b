"""The telemetry plane: player heartbeats validated at ingest, appended to a durable
partitioned stream, and written behind into the store by idempotent consumers."""

from __future__ import annotations

from streamplane.telemetry.events import (
    MAX_BODY_BYTES,
    MAX_EVENTS,
    BatchError,
    EventBatch,
    HeartbeatEvent,
    HeartbeatRequest,
    ParsedBatch,
    PlayerEvent,
    Refusal,
    SessionIdentity,
    decode_record,
    encode_record,
    parse_batch,
    to_events,
)
from streamplane.telemetry.stream import (
    Appended,
    Delivery,
    Group,
    Stream,
    StreamError,
    StreamUnavailable,
    partition_of,
)

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_EVENTS",
    "Appended",
    "BatchError",
    "Delivery",
    "EventBatch",
    "Group",
    "HeartbeatEvent",
    "HeartbeatRequest",
    "ParsedBatch",
    "PlayerEvent",
    "Refusal",
    "SessionIdentity",
    "Stream",
    "StreamError",
    "StreamUnavailable",
    "decode_record",
    "encode_record",
    "parse_batch",
    "partition_of",
    "to_events",
]
