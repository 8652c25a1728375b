"""What an edge tells the control plane every few seconds: the fleet heartbeat contract.

The edge posts an :class:`EdgeHeartbeat` as JSON to ``<control>/v1/fleet/heartbeat``; the
control plane answers with a :class:`HeartbeatReply`. The control plane stops offering an
edge whose heartbeats stop, that reports itself unhealthy or draining, or whose throughput
runs over its capacity.

Every heartbeat proves which edge sent it. Each edge has a key of its own (registered at the
control plane with the one base URL it may claim), and signs each heartbeat with it::

    Authorization: StreamplaneEdge id=edge-7, ts=1800000000123, sig=<64 hex digits>

``sig`` is the HMAC-SHA256, under the key's bytes, of::

    streamplane-edge-heartbeat/1 LF <id> LF <ts> LF <hex SHA-256 of the exact body>

``ts`` is the edge's clock in milliseconds since the epoch, later than that of any heartbeat
the control plane accepted from this edge before: a recorded heartbeat cannot be sent again,
and one signed long ago (or far ahead) is refused by the control plane's clock.

These are pure functions (hashing only), shared by the edge, which signs, and the control
plane, which verifies, like :mod:`streamplane.edge.tokens`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Final

import msgspec

from streamplane.edge.tokens import key_from_hex

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL_S",
    "EDGE_AUTH_SCHEME",
    "FLEET_HEARTBEAT_PATH",
    "MIN_EDGE_KEY_BYTES",
    "EdgeClaim",
    "EdgeHeartbeat",
    "HeartbeatReply",
    "HeartbeatSigner",
    "body_digest",
    "edge_key",
    "heartbeat_authorization",
    "heartbeat_signature",
    "parse_edge_authorization",
]

FLEET_HEARTBEAT_PATH = "/v1/fleet/heartbeat"
DEFAULT_HEARTBEAT_INTERVAL_S = 2.0
EDGE_AUTH_SCHEME: Final = "StreamplaneEdge"
MIN_EDGE_KEY_BYTES: Final = 16
_SIGNED_PREFIX: Final = b"streamplane-edge-heartbeat/1\n"
_MAX_ID: Final = 64
_TS_RE: Final = re.compile(r"[0-9]{1,18}")  # below 2**63: it goes into a BIGINT column
_SIG_RE: Final = re.compile(r"[0-9a-f]{64}")
_HEADER_EXAMPLE: Final = f"{EDGE_AUTH_SCHEME} id=<edge id>, ts=<epoch ms>, sig=<hex HMAC>"


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


class EdgeClaim(msgspec.Struct, frozen=True):
    """What a heartbeat's Authorization header claims, before the signature is checked."""

    edge_id: str
    ts_ms: int
    sig: str


def edge_key(hex_key: str) -> bytes:
    """An edge's heartbeat key from its hex form; ValueError if it is not hex or too short."""
    key = key_from_hex(hex_key)
    if len(key) < MIN_EDGE_KEY_BYTES:
        raise ValueError(
            f"the key is {len(key)} bytes; an edge key needs at least {MIN_EDGE_KEY_BYTES} "
            "(generate one with: python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return key


def body_digest(body: bytes) -> bytes:
    """The SHA-256 of a heartbeat's exact body, as the signature covers it."""
    return hashlib.sha256(body).digest()


def heartbeat_signature(key: bytes, edge_id: str, ts_ms: int, digest: bytes) -> str:
    """The hex HMAC-SHA256 of a heartbeat from ``edge_id`` at ``ts_ms`` with body ``digest``."""
    message = b"%s%s\n%d\n%s" % (_SIGNED_PREFIX, edge_id.encode(), ts_ms, digest.hex().encode())
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def heartbeat_authorization(key: bytes, edge_id: str, ts_ms: int, body: bytes) -> str:
    """The Authorization header value of a heartbeat ``body`` signed by ``edge_id``."""
    sig = heartbeat_signature(key, edge_id, ts_ms, body_digest(body))
    return f"{EDGE_AUTH_SCHEME} id={edge_id}, ts={ts_ms}, sig={sig}"


def parse_edge_authorization(header: str) -> EdgeClaim:
    """Read ``StreamplaneEdge id=…, ts=…, sig=…``; ValueError saying what is wrong with it."""
    scheme, _, params = header.strip().partition(" ")
    if scheme.lower() != EDGE_AUTH_SCHEME.lower():
        raise ValueError(
            f"the Authorization scheme is {scheme[:32]!r}; heartbeats are signed with the "
            f"edge's own key: {_HEADER_EXAMPLE}"
        )
    fields: dict[str, str] = {}
    for part in params.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in ("id", "ts", "sig") or name in fields:
            raise ValueError(f"the Authorization header is not {_HEADER_EXAMPLE}")
        fields[name] = value.strip()
    missing = [n for n in ("id", "ts", "sig") if n not in fields]
    if missing:
        raise ValueError(f"the Authorization header has no {', '.join(missing)}: {_HEADER_EXAMPLE}")
    edge_id, ts, sig = fields["id"], fields["ts"], fields["sig"]
    if not 0 < len(edge_id) <= _MAX_ID or not edge_id.isascii() or not edge_id.isprintable():
        raise ValueError(f"the Authorization header's id must be 1-{_MAX_ID} printable characters")
    if not _TS_RE.fullmatch(ts):
        raise ValueError("the Authorization header's ts must be epoch milliseconds (digits)")
    if not _SIG_RE.fullmatch(sig):
        raise ValueError("the Authorization header's sig must be 64 lowercase hex digits")
    return EdgeClaim(edge_id, int(ts), sig)


class HeartbeatSigner:
    """Signs one edge's heartbeats, each with a timestamp later than the one before it.

    Two heartbeats in the same millisecond (a drain notice right after a report), or a clock
    stepped back a little, still get increasing timestamps; the control plane refuses any
    that is not after the last it accepted.
    """

    def __init__(self, edge_id: str, key: bytes) -> None:
        self.edge_id = edge_id
        self._key = key
        self._last_ms = 0

    def authorization(self, body: bytes, now: float) -> str:
        """The Authorization header for ``body`` sent at ``now`` (epoch seconds)."""
        ts_ms = max(int(now * 1000), self._last_ms + 1)
        self._last_ms = ts_ms
        return heartbeat_authorization(self._key, self.edge_id, ts_ms, body)
