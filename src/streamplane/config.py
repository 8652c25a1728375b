"""One settings object for every plane: a TOML file, then ``STREAMPLANE_*`` environment variables.

The file has one table per section; every key is optional and falls back to the default below::

    [tokens]                       # signed URLs: the control plane signs, edges verify
    signing_kid = "k2"             # the key new tokens are signed with
    ttl_s = 21600                  # how long a playback token is valid, seconds
    [tokens.keys]                  # key id -> hex secret; keep retired keys until their
    k1 = "0a1b..."                 # last token has expired
    k2 = "9f8e..."

    [control]
    database_url = "sqlite+aiosqlite:///streamplane.db"   # or postgresql+asyncpg://...
    host = "127.0.0.1"
    port = 8080
    catalog_dir = "catalog"
    placement = "catalog/placement/placement.json"
    [control.edges.edge-1]         # each edge's own heartbeat key and the URL it may claim
    key = "5be0..."
    base_url = "https://edge-1.example.net"

    [realtime]                     # see RealtimeSettings
    token_key = "77aa..."          # the control plane signs realtime tokens, gateways check them

    [edge]                         # see EdgeSettings
    fleet_key = "5be0..."          # this edge's key: [control.edges.<edge_id>].key

An environment variable overrides one key: ``STREAMPLANE_<SECTION>_<KEY>``, upper case, e.g.
``STREAMPLANE_CONTROL_DATABASE_URL=postgresql+asyncpg://127.0.0.1/streamplane`` or
``STREAMPLANE_TOKENS_SIGNING_KID=k2``. Scalars are written plainly; tables and lists
(``STREAMPLANE_TOKENS_KEYS``, ``STREAMPLANE_CONTROL_PLANS``) as JSON. An unknown section or key,
in the file or the environment, is an error: a misspelt setting must not be silently ignored.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import msgspec

if TYPE_CHECKING:
    from streamplane.edge import Network

__all__ = [
    "ENV_PREFIX",
    "BgpPeer",
    "ControlSettings",
    "EdgeRegistration",
    "EdgeSettings",
    "Plan",
    "RealtimeSettings",
    "Settings",
    "SettingsError",
    "TelemetrySettings",
    "TokenSettings",
    "load_settings",
]

ENV_PREFIX: Final = "STREAMPLANE_"


class SettingsError(ValueError):
    """The settings file or environment holds something unusable; the message says what."""


class TokenSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The signed-URL keyring, shared by the control plane (signs) and every edge (verifies)."""

    keys: dict[str, str] = msgspec.field(default_factory=dict)  # key id -> hex secret
    signing_kid: str = ""  # empty: the only key, if there is exactly one
    ttl_s: int = 6 * 3600  # validity of a playback token

    def keyring(self) -> dict[str, bytes]:
        """Key id -> secret bytes, as ``edge.tokens.verify`` takes it."""
        from streamplane.edge import key_from_hex

        ring: dict[str, bytes] = {}
        for kid, hex_key in self.keys.items():
            try:
                ring[kid] = key_from_hex(hex_key)
            except ValueError as err:
                raise SettingsError(f"tokens.keys.{kid}: {err}") from None
        return ring

    def signing_key(self) -> tuple[str, bytes]:
        """The key id and secret new tokens are signed with."""
        ring = self.keyring()
        kid = self.signing_kid
        if not kid:
            if len(ring) != 1:
                raise SettingsError(
                    "tokens.signing_kid is not set and tokens.keys does not hold exactly one key"
                    " (generate one with: python -c 'import secrets; print(secrets.token_hex(32))')"
                )
            kid = next(iter(ring))
        if kid not in ring:
            raise SettingsError(f"tokens.signing_kid {kid!r} is not in tokens.keys")
        return kid, ring[kid]


class Plan(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A subscription plan: how many screens may play at once."""

    screens: int


class BgpPeer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One BGP session of an edge site with its ISP's router (ExaBGP runs it)."""

    site: str
    local_address: str
    peer_address: str
    local_as: int
    peer_as: int
    port: int = 179
    # What the site's link to this router is; ranks its routes (embedded first, transit last)
    relation: Literal["embedded", "private", "public", "transit"] = "public"
    # Seconds without a message from the router before its session and routes go (BGP's
    # 0, "never", is refused: a hung router would steer clients for ever).
    hold_time_s: Annotated[int, msgspec.Meta(ge=3, le=65535)] = 90


class EdgeRegistration(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An edge allowed to heartbeat: its own key, and the base URL (and site) it may claim.

    The edge signs every heartbeat with ``key`` (its ``edge.fleet_key``); a heartbeat for this
    edge id signed with anything else, or naming another base URL or site, is refused.
    """

    key: str  # hex, at least 16 bytes: python -c 'import secrets; print(secrets.token_hex(32))'
    base_url: str  # the only base_url its heartbeats may carry: http(s)://host[:port]
    site: str = ""  # the only site they may name; empty: any
    previous_key: str = ""  # accepted as well while the edge moves to `key`; empty: none


def _default_plans() -> dict[str, Plan]:
    return {"basic": Plan(screens=1), "standard": Plan(screens=2), "premium": Plan(screens=4)}


class ControlSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The control plane: store, bind address, catalog, fleet and steering inputs."""

    database_url: str = "sqlite+aiosqlite:///streamplane.db"
    database_schema: str = ""  # PostgreSQL schema to use (its search_path); empty: the default
    # This control plane's own files (the embedded telemetry stream, <data_dir>/telemetry-stream).
    # Empty: beside a SQLite store; on PostgreSQL the embedded stream then needs this set.
    data_dir: str = ""
    # A dead store fails requests fast (503) rather than holding them: how long to wait for a
    # PostgreSQL connection to open, and for a pooled connection when all are in use.
    database_connect_timeout_s: float = 5.0
    database_pool_timeout_s: float = 10.0
    # PostgreSQL: a statement that runs (or waits for a lock) longer than this is cancelled
    # and its request answered 503, instead of holding the request and its pooled connection
    # for as long as whatever holds the lock (a hung session, an operator's manual LOCK).
    database_statement_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""  # how players reach this service; empty: http://host:port
    catalog_dir: str = "catalog"  # scanned for */title.json at startup
    placement: str = ""  # placement.json (streamplane.placement/1); empty: none
    czmap: str = ""  # Apache Traffic Control czmap.json; empty: none
    # how often the czmap file is checked for changes (SIGHUP reloads it too); 0: never
    czmap_poll_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    bgp: tuple[BgpPeer, ...] = ()  # BGP sessions feeding the routing table
    origin_url: str = ""  # last-resort edge when no healthy edge holds a title; empty: none
    # Live channels (streamplane live start): played like titles, from every healthy edge,
    # which pull them from the live origin.
    live_channels: tuple[str, ...] = ()
    # Scheduled events (the `streamplane live plan --events` TOML): before each, a channel is
    # placed on the edges its expected audience needs; GET /v1/live/plan reports readiness.
    live_events: str = ""
    # While an event is warming, each planned edge is asked this often for what the first
    # viewers will fetch (master and media playlists, init segments, the newest parts).
    live_warm_every_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    # Proxies (CIDRs) whose word on the client's address is believed: from a TCP peer in one
    # of them, the client is read from trusted_proxy_header, walked right to left past the
    # trusted hops. Empty: the TCP peer is the client, whatever the headers say.
    trusted_proxies: tuple[str, ...] = ()
    trusted_proxy_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    # accounts
    jwt_secret: str = ""  # hex; empty: a random secret per process (tokens die on restart)
    access_ttl_s: int = 900
    refresh_ttl_s: int = 30 * 86400
    password_time_cost: int = 3  # argon2id passes (argon2-cffi's default, RFC 9106 low-memory)
    password_memory_kib: int = 65536  # argon2id memory per hash
    admin_token: str = ""  # bearer token for admin routes; empty: admin routes refuse
    # edges: each its own key (here, or added by PUT /v1/fleet/edges/{id} with admin_token)
    edges: dict[str, EdgeRegistration] = msgspec.field(default_factory=dict)
    edge_clock_skew_s: float = 300.0  # a signed heartbeat's ts may be this far from our clock
    dev_mode: bool = False  # unsigned heartbeats from unregistered edges pass: never in production
    plans: dict[str, Plan] = msgspec.field(default_factory=_default_plans)
    default_plan: str = "standard"
    # sessions and heartbeats
    player_heartbeat_s: float = 30.0  # cadence players are told to heartbeat at
    screen_timeout_s: float = 90.0  # a screen with no heartbeat for this long is released
    screen_retention_s: float = 86400.0  # sessions not heard from for this long are deleted
    edge_heartbeat_s: float = 2.0  # cadence edges are told to heartbeat at
    edge_timeout_s: float = 6.0  # an edge silent for this long is not offered
    slow_start_s: float = 60.0  # a recovered edge's share ramps to 1 over this long
    slow_start_floor: float = 0.1  # its share the moment it recovers
    max_body_bytes: int = 64 * 1024  # larger request bodies are refused with 413
    max_bulk_body_bytes: int = 16 * 1024 * 1024  # ... for title.json and edge heartbeats

    def base_url(self) -> str:
        return self.public_url.rstrip("/") or f"http://{self.host}:{self.port}"


class EdgeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One edge appliance: what it serves, where from, and how it reports to the fleet.

    Its signed-URL keys come from :class:`TokenSettings`, shared with the control plane.
    """

    cache_dir: str = "edge-cache"
    origin: str = "catalog"  # a catalog directory or an http(s):// origin
    capacity_bytes: int = 10 * 10**9  # disk the cache may fill
    host: str = "0.0.0.0"
    port: int = 8081
    workers: int = 2  # processes sharing the port with SO_REUSEPORT
    require_token: bool = True  # off only for a private test edge
    token_name: str = "__token__"  # query parameter and cookie name
    edge_id: str = "edge-1"
    site: str = "local"  # the site (cache group) whose prefixes steer clients here
    base_url: str = ""  # how players reach this edge; empty: http://host:port
    lat: float | None = None
    lon: float | None = None
    capacity_bps: float = 10e9  # rated throughput, reported in heartbeats
    control_url: str = ""  # the control plane; empty: standalone, no heartbeats
    fleet_key: str = ""  # hex: this edge's own key, [control.edges.<edge_id>].key up there
    dev_mode: bool = False  # heartbeat unsigned when there is no fleet_key: development only
    admin_token: str = ""  # bearer token for /fill; empty: loopback clients only
    heartbeat_s: float = 2.0
    tls_cert: str = ""
    tls_key: str = ""
    access_log: bool = True  # one JSON line per request on stdout
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (slowloris)
    body_timeout_s: float = 10.0  # a request's announced body must arrive within this after it
    idle_timeout_s: float = 30.0  # keep-alive connections idle longer are closed
    send_timeout_s: float = 30.0  # a client that takes no bytes for this long is dropped
    stall_timeout_s: float = 15.0  # an origin fetch without progress for this long fails
    drain_notice_s: float = 1.0  # after reporting "draining", wait this long before closing
    drain_timeout_s: float = 30.0  # in-flight responses get this long to finish
    fill_rate_bps: float = 200e6  # proactive fill's rate limit, bits per second
    fill_offpeak_load: float = 0.5  # fill only while serving is below this share of capacity
    eviction: Literal["s3fifo", "lru"] = "s3fifo"  # measured: bench/cache.py
    # Behind proxies (a load balancer, a shield tier): from a peer in these networks the client
    # is read from X-Forwarded-For, walked right to left past the trusted hops, as the control
    # plane does (edge/forwarded.py). Empty: the TCP peer is the client, whatever it sends.
    trusted_proxies: tuple[str, ...] = ()
    # Live channels: a playlist (asked for without _HLS_msn) older than this is fetched again.
    # 0: playlists never change, as a VOD catalog's do not. See edge/live.py.
    live_playlist_ttl_s: float = 0.0

    def proxy_networks(self) -> tuple[Network, ...]:
        """``trusted_proxies`` as networks; SettingsError naming the first that is none."""
        from streamplane.edge import parse_networks

        try:
            return parse_networks(self.trusted_proxies)
        except ValueError as err:
            raise SettingsError(f"edge.trusted_proxies: {err}") from None

    def url(self) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        scheme = "https" if self.tls_cert else "http"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{scheme}://{host}:{self.port}"


class RealtimeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The realtime gateway, and how the control plane signs tokens for it."""

    token_key: str = ""  # hex, shared by the control plane and the gateways; empty: realtime off
    token_ttl_s: int = 3600
    public_url: str = ""  # how browsers reach the gateway (ws://...); empty: ws://host:port
    host: str = "127.0.0.1"
    port: int = 8090
    processes: int = 1  # several share the port (SO_REUSEPORT); needs a broker across them
    broker: str = "memory"  # "memory" (one process) or the URL of a scale-out engine
    max_connections: int = 18_000  # per process
    admission_rate: float = 2_000.0  # new connections per second per process
    admission_burst: int = 4_000
    # Where each process polls the admission plan of scheduled events (GET /v1/live/admission
    # on the control plane, every admission_poll_s); empty: the normal limits always.
    control_url: str = ""
    admission_poll_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # Gateway processes on every machine together, among which an event's audience is split
    # (the control plane reads it); 0: ``processes`` (one machine).
    total_processes: Annotated[int, msgspec.Meta(ge=0)] = 0

    def url(self) -> str:
        return self.public_url.rstrip("/") or f"ws://{self.host}:{self.port}"


class TelemetrySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Player heartbeats: the stream they go into, admission, the write-behind consumer
    (docs/telemetry.md)."""

    engine: Literal["embedded", "nats"] = "embedded"
    # embedded: where the stream lives; empty: <control.data_dir>/telemetry-stream, or beside a
    # SQLite store (<database file>-telemetry)
    stream_dir: str = ""
    nats_url: str = "nats://127.0.0.1:4222"
    stream_name: str = "TELEMETRY"  # the JetStream stream (its subjects: <name>.<partition>)
    partitions: int = 8  # fixed once the stream exists
    max_age_s: float = 7 * 86400.0  # JetStream keeps batches this long, written or not
    device_rate: float = 2.0  # heartbeat requests a second one device may send...
    device_burst: float = 10.0  # ... and in one burst
    global_rate: float = 50_000.0  # requests a second this process takes from all players...
    global_burst: float = 100_000.0
    consumer_batches: int = 1024  # batches written in one store transaction, at most
    # a consumer round that did not fill waits until this long after it began: a storm reaches
    # the store in a few large transactions a second, not one per handful of heartbeats
    consumer_linger_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.5
    ack_wait_s: float = 30.0  # a batch taken and not written by then is handed out again
    screen_touch_s: float = 15.0  # a session's last_seen is written at most this often
    # A lean listener for POST /v1/heartbeat alone (docs/telemetry.md); 0: none, heartbeats
    # go to the control plane's own port. Players are sent to ingest_url (empty: host:port).
    ingest_port: int = 0
    ingest_host: str = "127.0.0.1"
    ingest_url: str = ""
    # true: `streamplane ingest` takes heartbeats in a process of its own (its own core; needs
    # ingest_port and control.jwt_secret); the control plane then runs no stream itself
    ingest_process: bool = False
    # The ingest process's niceness (0-19): above 0, a heartbeat storm yields the CPU to the
    # control plane's playback starts on a machine they share, and to everything else on it
    # too (on a busy machine, 10 cut its heartbeats/s 9x: docs/benchmarks.md); 0: no yielding.
    ingest_nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 0
    # The CPUs the ingest process may run on (empty: any): on a machine it shares with the
    # control plane, cores of its own, so that a storm cannot take a playback start's CPU
    ingest_cpus: tuple[Annotated[int, msgspec.Meta(ge=0)], ...] = ()
    # Quality of experience (docs/telemetry.md#quality-of-experience): rows per qos_bucket_s
    # (a minute; it must divide an hour) and per hour, kept this long; steering's judgement.
    qos_bucket_s: int = 60
    qos_lateness_s: float = 600.0  # events older than their arrival by more are moved up
    qos_minutes_kept_s: float = 2 * 86400.0
    qos_hours_kept_s: float = 90 * 86400.0
    qos_judge_every_s: float = 10.0
    qos_window_s: int = 180  # the rows steering compares: those of the last window
    qos_min_watch_s: float = 60.0  # an edge and its peers need this much watching in a network
    qos_floor: float = 0.02  # a rebuffer ratio below this never demotes
    qos_factor: float = 3.0  # demoted at this many times the peers' rebuffer ratio...
    qos_recover_factor: float = 1.5  # ... recovered at this many times
    qos_hold_s: float = 120.0  # a demotion without fresh evidence lasts this long
    # batches per QoS write: its rows grow with the keys a round touches, not its events, so
    # larger rounds than the write-behind's (bench/qos.py: 1024 -> 8192, 3x the events/s)
    qos_consumer_batches: int = 8192
    # The share of the control plane's time its QoS consumer may take (0 < share <= 1): during a
    # storm it cannot keep up with, the rest stays with playback starts, and its backlog waits
    # in the stream (written after, the aggregates later by as much)
    qos_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.25


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every plane's settings; each plane reads its own section."""

    tokens: TokenSettings = msgspec.field(default_factory=TokenSettings)
    control: ControlSettings = msgspec.field(default_factory=ControlSettings)
    edge: EdgeSettings = msgspec.field(default_factory=EdgeSettings)
    realtime: RealtimeSettings = msgspec.field(default_factory=RealtimeSettings)
    telemetry: TelemetrySettings = msgspec.field(default_factory=TelemetrySettings)


# Settings that were removed, and what replaces them: named, not "unknown field".
_REPLACED: Final[Mapping[tuple[str, str], str]] = {
    ("control", "fleet_token"): (
        "was one token shared by every edge, so any edge could speak for another; register "
        'each edge with its own key instead: [control.edges.<edge id>] key = "<hex>", '
        'base_url = "<its URL>" (see docs/control.md, "Edge credentials")'
    ),
    ("edge", "trust_forwarded_for"): (
        "believed the leftmost X-Forwarded-For entry, which any client can write; list the "
        'proxies in front of the edge instead: edge.trusted_proxies = ["10.0.0.0/8"]'
    ),
    ("edge", "fleet_token"): (
        "was one token shared by every edge; set edge.fleet_key to this edge's own key, the "
        "one registered at the control plane as [control.edges.<edge id>] key"
    ),
}

_SECTIONS: Final[Mapping[str, type[msgspec.Struct]]] = {
    "tokens": TokenSettings,
    "control": ControlSettings,
    "edge": EdgeSettings,
    "realtime": RealtimeSettings,
    "telemetry": TelemetrySettings,
}


def load_settings(
    path: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read ``path`` (TOML; None: defaults only), then apply ``STREAMPLANE_*`` overrides.

    Raises :class:`SettingsError` naming the file, section and key of anything unusable.
    """
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise SettingsError(f"{path}: no such settings file") from None
        except tomllib.TOMLDecodeError as err:
            raise SettingsError(f"{path}: not valid TOML: {err}") from None
    for section in raw:
        if section not in _SECTIONS:
            raise SettingsError(
                f"{where}: unknown section [{section}]; sections are {', '.join(_SECTIONS)}"
            )
        table = raw[section]
        for key in table if isinstance(table, dict) else ():
            if (section, key) in _REPLACED:
                raise SettingsError(f"{where}: {section}.{key} {_REPLACED[section, key]}")
    env = os.environ if environ is None else environ
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        if section not in _SECTIONS:
            continue  # STREAMPLANE_* variables of other tools (none today) are not ours
        if not key:
            raise SettingsError(f"{name}: give a key, e.g. {ENV_PREFIX}{section.upper()}_KEY")
        if (section, key) in _REPLACED:
            raise SettingsError(f"{name}: {section}.{key} {_REPLACED[section, key]}")
        fields = _SECTIONS[section].__struct_fields__
        if key not in fields and section != "edge":
            raise SettingsError(f"{name}: [{section}] has no key {key!r}")
        raw.setdefault(section, {})[key] = _env_value(name, value)
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as err:
        raise SettingsError(f"{where} (with {ENV_PREFIX}* overrides): {err}") from None


def _env_value(name: str, value: str) -> Any:
    """JSON tables and lists as themselves; anything else as text, converted by the schema."""
    text = value.strip()
    if text[:1] in ("{", "["):
        try:
            return msgspec.json.decode(text)
        except msgspec.DecodeError as err:
            raise SettingsError(f"{name}: not valid JSON: {err}") from None
    return value
