"""Realtime: chat, presence, viewer counts and live state over WebSockets for live events."""

from streamplane.realtime.admission import (
    ADMISSION_CHANNEL,
    Admission,
    AdmissionPlan,
    AdmissionWindow,
    admission_at,
)
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
from streamplane.realtime.protocol import FrameError
from streamplane.realtime.redis import RedisBroker
from streamplane.realtime.tokens import (
    RealtimeGrant,
    rights_on,
    sign_realtime_token,
    verify_realtime_token,
)

__all__ = [
    "ADMISSION_CHANNEL",
    "Admission",
    "AdmissionPlan",
    "AdmissionWindow",
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "FrameError",
    "MemoryBroker",
    "MemoryHub",
    "Position",
    "PresenceEntry",
    "Publication",
    "RealtimeGrant",
    "RedisBroker",
    "StateValue",
    "admission_at",
    "rights_on",
    "sign_realtime_token",
    "verify_realtime_token",
]
