"""Realtime: chat, presence, viewer counts and live state over WebSockets for live events."""

from streamplane.realtime.broker import (
    Broker,
    BrokerError,
    BrokerUnavailable,
    Position,
    PresenceEntry,
    Publication,
    StateValue,
)
from streamplane.realtime.memory import MemoryBroker, MemoryHub
from streamplane.realtime.redis import RedisBroker
from streamplane.realtime.tokens import RealtimeGrant, sign_realtime_token, verify_realtime_token

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "MemoryBroker",
    "MemoryHub",
    "Position",
    "PresenceEntry",
    "Publication",
    "RealtimeGrant",
    "RedisBroker",
    "StateValue",
    "sign_realtime_token",
    "verify_realtime_token",
]
