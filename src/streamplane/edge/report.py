"""What an edge tells the control plane every few seconds: the fleet heartbeat contract.

The edge posts an :class:`EdgeHeartbeat` as JSON to ``<control>/v1/fleet/heartbeat``; the
control plane answers with a :class:`HeartbeatReply`. The control plane stops offering an
edge whose heartbeats stop, that reports itself unhealthy or draining, or whose throughput
runs over its capacity.
"""

from __future__ import annotations

import msgspec

FLEET_HEARTBEAT_PATH = "/v1/fleet/heartbeat"
DEFAULT_HEARTBEAT_INTERVAL_S = 2.0


class EdgeHeartbeat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One edge's state at ``sent_at`` (epoch seconds, the edge's clock)."""

    edge_id: str
    base_url: str  # scheme://host:port that players fetch from
    site: str  # the site (cache group) whose prefixes steer clients here
    lat: float | None = None
    lon: float | None = None
    throughput_bps: float  # bytes served per second, averaged over the last interval, x8
    capacity_bps: float  # what the edge is rated to serve
    connections: int
    disk_used_bytes: int
    disk_total_bytes: int
    titles: tuple[str, ...]  # titles held complete in the cache
    healthy: bool
    draining: bool
    sent_at: float


class HeartbeatReply(msgspec.Struct, frozen=True, kw_only=True):
    """The control plane's answer: when to send the next heartbeat."""

    interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
