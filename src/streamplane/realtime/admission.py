"""A gateway process's admission limits over time: its normal ones, raised for planned events.

A scheduled event's audience arrives within minutes of its start, faster than anyone could
raise limits by hand. The control plane turns each event's expected audience into a window
(``GET /v1/live/admission``: from the event's warm-up until it is over, with per-process
limits); every gateway process polls it and, by its own clock, takes the limits of the windows
open now. Pure: the shell (``serve.py``) fetches, the gateway asks :func:`admission_at`.

Windows open at the same time add up (two events' audiences arrive side by side), and a window
never lowers a limit below the normal one.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

__all__ = [
    "ADMISSION_CHANNEL",
    "Admission",
    "AdmissionPlan",
    "AdmissionWindow",
    "admission_at",
    "decode_admission_plan",
]

# The grant a gateway's token carries to read the plan: no viewer token is ever given it.
ADMISSION_CHANNEL = "control:admission"


class Admission(msgspec.Struct, frozen=True, kw_only=True):
    """One process's limits on new connections."""

    rate: float  # new connections per second
    burst: int  # taken at once, before the rate paces the rest
    max_connections: int


class AdmissionWindow(msgspec.Struct, frozen=True, kw_only=True):
    """An event's raise of every gateway process's limits, from ``start`` until ``end``."""

    channel: str
    start: float  # UNIX seconds
    end: float
    limits: Admission  # per process


class AdmissionPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What ``GET /v1/live/admission`` answers."""

    processes: int  # the gateway processes the events' audiences are split among
    windows: list[AdmissionWindow]


def decode_admission_plan(body: bytes) -> AdmissionPlan:
    """The plan in ``body``; ValueError says what is wrong with it."""
    try:
        return msgspec.json.decode(body, type=AdmissionPlan)
    except msgspec.DecodeError as err:
        raise ValueError(f"not an admission plan: {err}") from None


def admission_at(normal: Admission, windows: Sequence[AdmissionWindow], now: float) -> Admission:
    """The limits at ``now``: the normal ones, raised by the windows open then (added up)."""
    open_now = [w.limits for w in windows if w.start <= now < w.end]
    if not open_now:
        return normal
    return Admission(
        rate=max(normal.rate, sum(a.rate for a in open_now)),
        burst=max(normal.burst, sum(a.burst for a in open_now)),
        max_connections=max(normal.max_connections, sum(a.max_connections for a in open_now)),
    )
