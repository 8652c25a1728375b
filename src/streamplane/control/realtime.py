"""Realtime tokens for viewers: the control plane signs, the gateways check (same key).

A viewer of an event (a title) gets, for that event: chat (read and publish), the event channel
(counts, presence, announcements: read) and its state channel (the live score or odds: read
only; the sources that write it hold tokens the operator signs with ``streamplane
realtime-token``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from streamplane.config import RealtimeSettings, SettingsError
from streamplane.live import LEAD_S, LIVE_S, Event, GatewayNeeds, gateway_needs
from streamplane.realtime import (
    ADMISSION_CHANNEL,
    Admission,
    AdmissionPlan,
    AdmissionWindow,
    FrameError,
    rights_on,
    sign_realtime_token,
    verify_realtime_token,
)

__all__ = [
    "RealtimeInfo",
    "RealtimeIssuer",
    "admission_plan",
    "process_limits",
    "viewer_channels",
]


class RealtimeInfo(msgspec.Struct, kw_only=True):
    url: str  # the gateway's WebSocket URL: connect to url + "?token=" + token
    token: str
    expires_at: int
    channels: dict[str, list[str]]


def viewer_channels(event: str) -> dict[str, list[str]]:
    return {
        f"chat:{event}": ["publish", "read"],
        f"event:{event}": ["read"],
        f"state:{event}": ["read"],
    }


class RealtimeIssuer:
    def __init__(self, settings: RealtimeSettings) -> None:
        try:
            self._key = bytes.fromhex(settings.token_key) if settings.token_key else None
        except ValueError:
            raise SettingsError("realtime.token_key must be hex") from None
        self._ttl = settings.token_ttl_s
        self._url = settings.url() + "/connect"

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def is_gateway(self, token: str, now: float) -> bool:
        """Whether ``token`` was signed with the gateways' key for reading the admission plan
        (no viewer is granted that channel)."""
        if self._key is None:
            return False
        try:
            grant = verify_realtime_token(token, self._key, now=int(now))
        except FrameError:
            return False
        return "read" in rights_on(grant, ADMISSION_CHANNEL)

    def issue(self, user: str, event: str, now: float) -> RealtimeInfo | None:
        """A viewer's token for ``event``; None when realtime is not configured."""
        if self._key is None:
            return None
        channels = viewer_channels(event)
        token = sign_realtime_token(
            self._key, user=user, channels=channels, now=int(now), ttl_s=self._ttl
        )
        return RealtimeInfo(
            url=self._url, token=token, expires_at=int(now) + self._ttl, channels=channels
        )


def process_limits(needs: GatewayNeeds, processes: int) -> Admission:
    """One gateway process's share of what an event needs of the gateways."""
    if processes < 1:
        raise ValueError("the gateway processes must be at least 1")
    return Admission(
        rate=math.ceil(needs.admission_per_s / processes),
        burst=math.ceil(needs.admission_burst / processes),
        max_connections=math.ceil(needs.max_connections / processes),
    )


def admission_plan(events: Sequence[Event], processes: int) -> AdmissionPlan:
    """Every gateway process's raised limits for each scheduled event, from its warm-up until
    it is over: the audience's needs (``live.gateway_needs``) split among ``processes``."""
    windows = [
        AdmissionWindow(
            channel=event.channel,
            start=event.start - LEAD_S,
            end=event.start + LIVE_S,
            limits=process_limits(gateway_needs(event), processes),
        )
        for event in events
    ]
    return AdmissionPlan(processes=processes, windows=windows)
