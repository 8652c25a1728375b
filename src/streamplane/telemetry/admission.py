"""Admission of heartbeats: a token bucket per device and one for the whole ingest.

A request costs one token from its device's bucket and one from the global bucket; past
either limit it is refused with how long to wait (429 with Retry-After), and the player waits
that long (``player/cadence.py``'s ``not_before_s``). When the global bucket runs low the
answers also ask every player for a longer interval (:func:`advised_interval`), so a surge
(a reconnect storm, an incident where every player rebuffers at once and heartbeats every
second) slows itself before anyone is refused.

The buckets are pure (:func:`take`); :class:`Admission` keeps them in memory, one process's
share of the limits.
"""

from __future__ import annotations

import math
from typing import Final

import msgspec

__all__ = ["Admission", "Bucket", "Limit", "advised_interval", "take"]

_DEVICES_KEPT: Final = 200_000  # buckets held; past it the full ones are forgotten


class Limit(msgspec.Struct, frozen=True):
    rate: float  # tokens per second
    burst: float  # the bucket's size

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"a rate must be positive and finite, not {self.rate}")
        if not (self.burst >= 1 and math.isfinite(self.burst)):
            raise ValueError(f"a burst must be at least 1, not {self.burst}")


class Bucket(msgspec.Struct, frozen=True):
    tokens: float
    at: float  # when ``tokens`` was counted


def take(
    bucket: Bucket | None, limit: Limit, now: float, cost: float = 1.0
) -> tuple[Bucket, float]:
    """The bucket after asking for ``cost`` tokens at ``now``, and how long to wait first
    (0: taken). A refused request takes nothing. A clock going backwards refills nothing."""
    if bucket is None:
        tokens = limit.burst
    else:
        tokens = min(limit.burst, bucket.tokens + max(now - bucket.at, 0.0) * limit.rate)
    if tokens >= cost:
        return Bucket(tokens - cost, now), 0.0
    return Bucket(tokens, now), (cost - tokens) / limit.rate


def advised_interval(base_s: float, fill: float) -> float:
    """The heartbeat interval to ask for when the global bucket is ``fill`` (0..1) full:
    ``base_s`` above half full, up to four times it as the bucket empties."""
    if fill >= 0.5:
        return base_s
    return base_s * (1.0 + 6.0 * (0.5 - max(fill, 0.0)))


class Admission:
    """The buckets of one ingest process."""

    def __init__(self, per_device: Limit, overall: Limit) -> None:
        self.per_device = per_device
        self.overall = overall
        self._devices: dict[str, Bucket] = {}
        self._global: Bucket | None = None

    def admit(self, device: str, now: float) -> float:
        """0 if a request of ``device`` may go on now, else the seconds to wait."""
        mine, wait = take(self._devices.get(device), self.per_device, now)
        if wait > 0:
            self._devices[device] = mine
            return wait
        overall, wait = take(self._global, self.overall, now)
        self._global = overall
        if wait > 0:
            return wait  # the device's token is not spent
        if len(self._devices) >= _DEVICES_KEPT and device not in self._devices:
            self._forget(now)
        self._devices[device] = mine
        return 0.0

    def fill(self, now: float) -> float:
        """How full the global bucket is now, 0..1."""
        if self._global is None:
            return 1.0
        tokens = self._global.tokens + max(now - self._global.at, 0.0) * self.overall.rate
        return min(tokens / self.overall.burst, 1.0)

    def _forget(self, now: float) -> None:
        # a bucket that has refilled is the same as none
        full = [
            d
            for d, b in self._devices.items()
            if b.tokens + (now - b.at) * self.per_device.rate >= self.per_device.burst
        ]
        for d in full:
            del self._devices[d]
        if len(self._devices) >= _DEVICES_KEPT:
            self._devices.clear()  # all busy at once: forgetting gives each a full bucket
