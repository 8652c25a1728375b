"""The fleet: which edges may be offered, with what slow-start share, and which hold a title.

The rules are a pure core (:func:`exclusion`, :func:`share`, :func:`next_up_since`,
:func:`candidates`) over :class:`EdgeView` values and a clock reading; :class:`Fleet` is the
shell that keeps the store's edge rows in memory for the hot path.

Edges prove who they are (:func:`authenticate`, :func:`check_claims`): each is registered
with a key of its own and the base URL (and, optionally, the site) it may claim, in the
settings file (``[control.edges.<id>]``) or through the admin API (the ``edge_keys`` table).
A heartbeat is signed with that key over its exact body and a timestamp (see
:mod:`streamplane.edge.report`); it must name the edge that signed it and its registered base
URL, and its timestamp must be later than that of the edge's last accepted heartbeat and
within ``edge_clock_skew_s`` of this clock. Only ``control.dev_mode`` accepts unsigned
heartbeats, and only for edge ids nobody registered.

An edge is offered when its last heartbeat arrived within ``edge_timeout_s`` (by the control
plane's clock: edge clocks may be skewed), reported it healthy and not draining, and its
throughput is below its capacity. ``up_since`` is when it last became offerable; for
``slow_start_s`` after that its share ramps linearly from ``slow_start_floor`` to 1, so a
recovered edge with a cold cache is not handed every session at once. A new edge starts the
same way.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import msgspec
from pydantic import BaseModel, Field
from sqlalchemy import Connection, delete, select, update

from streamplane.config import ControlSettings, EdgeRegistration, SettingsError
from streamplane.control.errors import ApiError, not_found
from streamplane.control.store import Edge, EdgeKey, Store, StoredText, upsert
from streamplane.edge import (
    EDGE_AUTH_SCHEME,
    EdgeHeartbeat,
    body_digest,
    edge_key,
    heartbeat_signature,
    parse_edge_authorization,
)
from streamplane.steering import EdgeCandidate, SiteInfo

__all__ = [
    "EdgeCredential",
    "EdgeRegistrationIn",
    "EdgeRegistrationOut",
    "EdgeRotateIn",
    "EdgeView",
    "Fleet",
    "FleetPolicy",
    "Signed",
    "authenticate",
    "base_url_problem",
    "candidates",
    "check_claims",
    "check_heartbeat",
    "exclusion",
    "next_up_since",
    "replay_problem",
    "same_base_url",
    "settings_credentials",
    "share",
    "state",
]

log = logging.getLogger(__name__)

_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TITLE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_INT64: Final = 2**63 - 1
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_AUTH_EXAMPLE: Final = f"Authorization: {EDGE_AUTH_SCHEME} id=<edge id>, ts=<epoch ms>, sig=<hex>"
_NO_CREDENTIALS: Final = (
    "no edge can prove who it is: register each edge with a key of its own, "
    '[control.edges.<edge id>] key = "<hex>" and base_url = "<its URL>" (generate a key with: '
    "python -c 'import secrets; print(secrets.token_hex(32))'), or set control.admin_token to "
    "register them with PUT /v1/fleet/edges/<edge id>. control.dev_mode = true (streamplane "
    "control --dev) accepts unsigned heartbeats instead: for development only, since anyone "
    "who reaches the control plane can then add an edge, take over its URL or drain it"
)


class FleetPolicy(msgspec.Struct, frozen=True, kw_only=True):
    timeout_s: float
    slow_start_s: float
    slow_start_floor: float
    clock_skew_s: float = 300.0  # a signed heartbeat's ts may be this far from our clock
    dev_mode: bool = False  # unsigned heartbeats from unregistered edges are accepted

    @classmethod
    def from_settings(cls, settings: ControlSettings) -> FleetPolicy:
        return cls(
            timeout_s=settings.edge_timeout_s,
            slow_start_s=settings.slow_start_s,
            slow_start_floor=settings.slow_start_floor,
            clock_skew_s=settings.edge_clock_skew_s,
            dev_mode=settings.dev_mode,
        )


class EdgeCredential(msgspec.Struct, frozen=True, kw_only=True):
    """What an edge must prove to heartbeat (one of its keys), and what it may claim."""

    edge_id: str
    key: bytes
    base_url: str  # as registered
    site: str  # empty: any
    source: Literal["settings", "api"]
    previous_key: bytes | None = None  # the replaced key, still accepted ...
    previous_until: float | None = None  # ... until then (None: until it is removed)

    def keys(self, now: float) -> tuple[bytes, ...]:
        """The keys a heartbeat at ``now`` may be signed with."""
        if self.previous_key is None or (
            self.previous_until is not None and now >= self.previous_until
        ):
            return (self.key,)
        return (self.key, self.previous_key)


class Signed(msgspec.Struct, frozen=True):
    """A heartbeat whose signature checked out: the edge that signed it, and when."""

    edge_id: str
    ts_ms: int


def base_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an edge's base URL (``http(s)://host[:port]``), or None."""
    parts = urlsplit(url)
    if (
        len(url) > 256
        or "\x00" in url  # no stored text may hold a NUL (PostgreSQL refuses it)
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        return "base_url must be http(s)://host[:port] and nothing more"
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        return "base_url has a bad port"
    return None


def _url_identity(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return (parts.scheme, parts.hostname or "", parts.port or _DEFAULT_PORTS.get(parts.scheme))


def same_base_url(a: str, b: str) -> bool:
    """Whether two valid base URLs name the same place (host case and default port aside)."""
    return _url_identity(a) == _url_identity(b)


def authenticate(
    authorization: str | None,
    body: bytes,
    credentials: Mapping[str, EdgeCredential],
    now: float,
    policy: FleetPolicy,
) -> Signed | None:
    """Which edge signed heartbeat ``body``, at ``now``.

    None for an unsigned heartbeat in development mode (:func:`check_claims` then still
    refuses it for a registered edge). Anything else not signed by a registered edge's key,
    or with a timestamp too far from ``now``, is a 401 saying why.
    """
    if not authorization:
        if policy.dev_mode:
            return None
        raise ApiError(
            401, "unauthenticated_edge", f"sign heartbeats with the edge's own key: {_AUTH_EXAMPLE}"
        )
    try:
        claim = parse_edge_authorization(authorization)
    except ValueError as err:
        raise ApiError(401, "bad_edge_authorization", str(err)) from None
    credential = credentials.get(claim.edge_id)
    if credential is None:
        raise ApiError(
            401,
            "unknown_edge",
            f"no edge is registered as {claim.edge_id!r}: register it with its own key in "
            f"[control.edges.{claim.edge_id}] or with PUT /v1/fleet/edges/{claim.edge_id}",
        )
    digest = body_digest(body)  # only now: a stranger's bulk body costs no hashing
    for key in credential.keys(now):
        expected = heartbeat_signature(key, claim.edge_id, claim.ts_ms, digest)
        if hmac.compare_digest(expected, claim.sig):
            break
    else:
        raise ApiError(
            401,
            "bad_edge_signature",
            f"the signature is not that of edge {claim.edge_id!r}'s key over this body and ts",
        )
    skew = claim.ts_ms / 1000 - now
    if abs(skew) > policy.clock_skew_s:
        raise ApiError(
            401,
            "edge_clock_skew",
            f"the heartbeat's ts is {skew:+.0f} s from the control plane's clock (at most "
            f"{policy.clock_skew_s:g} s either way): set the edge's clock (NTP)",
        )
    return Signed(claim.edge_id, claim.ts_ms)


def check_claims(
    hb: EdgeHeartbeat, signed: Signed | None, credentials: Mapping[str, EdgeCredential]
) -> None:
    """Refuse a heartbeat that claims an id, base URL or site its signer was not given."""
    credential = credentials.get(hb.edge_id)
    if signed is None:
        if credential is not None:
            raise ApiError(
                401,
                "unsigned_heartbeat",
                f"edge {hb.edge_id!r} is registered: its heartbeats must be signed with its key "
                f"({_AUTH_EXAMPLE})",
            )
        return
    if hb.edge_id != signed.edge_id or credential is None:
        raise ApiError(
            403,
            "edge_id_mismatch",
            f"signed by edge {signed.edge_id!r} but reports edge_id {hb.edge_id!r}: an edge "
            "heartbeats only as itself",
        )
    if not same_base_url(hb.base_url, credential.base_url):
        raise ApiError(
            403,
            "base_url_mismatch",
            f"edge {hb.edge_id!r} is registered at {credential.base_url}, not "
            f"{hb.base_url.rstrip('/')}: change its registration to move it",
        )
    if credential.site and hb.site != credential.site:
        raise ApiError(
            403,
            "site_mismatch",
            f"edge {hb.edge_id!r} is registered in site {credential.site!r}, not {hb.site!r}",
        )


def replay_problem(ts_ms: int, last_ms: int | None) -> str | None:
    """Why a signed heartbeat at ``ts_ms`` cannot follow one accepted at ``last_ms``, or None."""
    if last_ms is not None and ts_ms <= last_ms:
        return (
            f"the heartbeat's ts {ts_ms} is not after that of the edge's last accepted heartbeat "
            f"({last_ms}): it is a replay, or the edge's clock went back"
        )
    return None


def _credential(
    edge_id: str,
    key: str,
    base_url: str,
    site: str,
    source: Literal["settings", "api"],
    previous_key: str | None = None,
    previous_until: float | None = None,
) -> EdgeCredential:
    """Check one registration; ValueError naming the field that is wrong."""
    if not _ID_RE.fullmatch(edge_id):
        raise ValueError("edge id: 1-64 of [A-Za-z0-9._-], starting with a letter or digit")
    try:
        secret = edge_key(key)
    except ValueError as err:
        raise ValueError(f"key: {err}") from None
    try:
        previous = edge_key(previous_key) if previous_key else None
    except ValueError as err:
        raise ValueError(f"previous_key: {err}") from None
    problem = base_url_problem(base_url)
    if problem is not None:
        raise ValueError(problem)
    if site and not _ID_RE.fullmatch(site):
        raise ValueError("site: 1-64 of [A-Za-z0-9._-], starting with a letter or digit")
    return EdgeCredential(
        edge_id=edge_id,
        key=secret,
        base_url=base_url.rstrip("/"),
        site=site,
        source=source,
        previous_key=previous,
        previous_until=previous_until,
    )


def settings_credentials(settings: ControlSettings) -> dict[str, EdgeCredential]:
    """The edges registered in ``[control.edges]``; SettingsError naming a bad one, or if no
    edge could ever prove who it is outside development mode."""
    out: dict[str, EdgeCredential] = {}
    for edge_id, reg in settings.edges.items():
        try:
            out[edge_id] = _registered(edge_id, reg)
        except ValueError as err:
            raise SettingsError(f"control.edges.{edge_id}: {err}") from None
    if not out and not settings.admin_token and not settings.dev_mode:
        raise SettingsError(_NO_CREDENTIALS)
    return out


def _registered(edge_id: str, reg: EdgeRegistration) -> EdgeCredential:
    return _credential(
        edge_id, reg.key, reg.base_url, reg.site, "settings", reg.previous_key or None
    )


class EdgeRegistrationIn(BaseModel):
    base_url: StoredText = Field(
        max_length=256,
        examples=["https://edge-7.example.net"],
        description="the only base_url its heartbeats may carry: http(s)://host[:port]",
    )
    site: StoredText = Field(
        default="", max_length=64, description="the only site its heartbeats may name; '': any"
    )
    key: StoredText | None = Field(
        default=None,
        max_length=128,
        description="hex, at least 16 bytes; default: the current key, or a new one",
    )


class EdgeRotateIn(BaseModel):
    keep_previous_s: float = Field(
        default=0.0,
        ge=0.0,
        le=30 * 86400.0,
        description="how long the replaced key is still accepted while the edge moves over",
    )


class EdgeRegistrationOut(BaseModel):
    edge_id: str
    base_url: str
    site: str
    source: str  # settings: [control.edges]; api: PUT /v1/fleet/edges/{id}
    previous_key_until: float | None = None  # the replaced key is accepted until then
    key: str | None = None  # hex, only in the answer that made it: shown once


def _out(credential: EdgeCredential, key: str | None = None) -> EdgeRegistrationOut:
    until = credential.previous_until if credential.previous_key is not None else None
    return EdgeRegistrationOut(
        edge_id=credential.edge_id,
        base_url=credential.base_url,
        site=credential.site,
        source=credential.source,
        previous_key_until=until,
        key=key,
    )


class EdgeView(msgspec.Struct, frozen=True, kw_only=True):
    """An edge's last heartbeat as the control plane keeps it."""

    edge_id: str
    site: str
    base_url: str
    lat: float | None
    lon: float | None
    throughput_bps: float
    capacity_bps: float
    connections: int
    disk_used_bytes: int
    disk_total_bytes: int
    titles: frozenset[str]
    healthy: bool
    draining: bool
    sent_at: float
    received_at: float
    up_since: float | None

    @property
    def load(self) -> float:
        return self.throughput_bps / self.capacity_bps if self.capacity_bps > 0 else math.inf


def check_heartbeat(hb: EdgeHeartbeat) -> EdgeHeartbeat:
    """Refuse (422) what the msgspec schema lets through but no edge can mean."""
    problems: list[str] = []
    if not _ID_RE.fullmatch(hb.edge_id):
        problems.append("edge_id must be 1-64 of [A-Za-z0-9._-], starting with a letter or digit")
    if not _ID_RE.fullmatch(hb.site):
        problems.append("site must be 1-64 of [A-Za-z0-9._-], starting with a letter or digit")
    problem = base_url_problem(hb.base_url)
    if problem is not None:
        problems.append(problem)
    if (hb.lat is None) != (hb.lon is None):
        problems.append("give both lat and lon, or neither")
    if hb.lat is not None and not -90 <= hb.lat <= 90:
        problems.append("lat must be within [-90, 90]")
    if hb.lon is not None and not -180 <= hb.lon <= 180:
        problems.append("lon must be within [-180, 180]")
    if not (math.isfinite(hb.throughput_bps) and hb.throughput_bps >= 0):
        problems.append("throughput_bps must be a finite number >= 0")
    if not (math.isfinite(hb.capacity_bps) and hb.capacity_bps > 0):
        problems.append("capacity_bps must be a finite number > 0")
    for name in ("connections", "disk_used_bytes", "disk_total_bytes"):
        if not 0 <= getattr(hb, name) <= _MAX_INT64:
            problems.append(f"{name} must be within [0, 2**63)")
    if not math.isfinite(hb.sent_at):
        problems.append("sent_at must be a finite number")
    bad = [t for t in hb.titles if not _TITLE_RE.fullmatch(t)]
    if bad:
        problems.append(f"titles holds {len(bad)} invalid title ids, e.g. {bad[0][:140]!r}")
    if problems:
        raise ApiError(422, "invalid_heartbeat", "; ".join(problems))
    return hb


def exclusion(edge: EdgeView, now: float, policy: FleetPolicy) -> str | None:
    """Why ``edge`` is not offered at ``now``, or None if it is."""
    age = now - edge.received_at
    if age > policy.timeout_s:
        return f"stale: no heartbeat for {age:.1f} s (timeout {policy.timeout_s:g} s)"
    return _reported_exclusion(edge.healthy, edge.draining, edge.throughput_bps, edge.capacity_bps)


def _reported_exclusion(
    healthy: bool, draining: bool, throughput_bps: float, capacity_bps: float
) -> str | None:
    if not healthy:
        return "unhealthy: the edge reports itself unhealthy"
    if draining:
        return "draining: the edge takes no new sessions"
    if capacity_bps <= 0 or throughput_bps >= capacity_bps:
        return f"overloaded: {throughput_bps:.3g} b/s at or over capacity {capacity_bps:.3g} b/s"
    return None


def state(edge: EdgeView, now: float, policy: FleetPolicy) -> str:
    """One word for operators: up, slow-start, stale, unhealthy, draining or overloaded."""
    why = exclusion(edge, now, policy)
    if why is not None:
        return why.partition(":")[0]
    return "slow-start" if share(edge.up_since, now, policy) < 1.0 else "up"


def share(up_since: float | None, now: float, policy: FleetPolicy) -> float:
    """The slow-start share of an edge offerable since ``up_since``: floor -> 1, linearly."""
    if up_since is None:
        return 0.0
    if policy.slow_start_s <= 0:
        return 1.0
    ramp = max(0.0, now - up_since) / policy.slow_start_s
    if ramp >= 1.0:
        return 1.0
    floor = min(max(policy.slow_start_floor, 0.0), 1.0)
    return max(floor + (1.0 - floor) * ramp, 1e-6)


def next_up_since(
    previous: EdgeView | None, hb: EdgeHeartbeat, now: float, policy: FleetPolicy
) -> float | None:
    """``up_since`` after heartbeat ``hb`` arrives at ``now``.

    It keeps its value while the edge stays offerable; an edge that was not offerable just
    before (never seen, stale, unhealthy, draining, overloaded) and is now restarts its
    slow start at ``now``; one that is not offerable has none.
    """
    if _reported_exclusion(hb.healthy, hb.draining, hb.throughput_bps, hb.capacity_bps):
        return None
    if (
        previous is not None
        and previous.up_since is not None
        and exclusion(previous, now, policy) is None
    ):
        return previous.up_since
    return now


def candidates(
    holders: Iterable[EdgeView],
    now: float,
    policy: FleetPolicy,
    sites: Mapping[str, SiteInfo],
) -> list[EdgeCandidate]:
    """The offerable edges among ``holders``, as steering takes them (in edge id order)."""
    out: list[EdgeCandidate] = []
    for edge in sorted(holders, key=lambda e: e.edge_id):
        if exclusion(edge, now, policy) is not None:
            continue
        lat, lon = edge.lat, edge.lon
        if lat is None or lon is None:
            site = sites.get(edge.site)
            if site is not None:
                lat, lon = site.lat, site.lon
        out.append(
            EdgeCandidate(
                edge_id=edge.edge_id,
                site=edge.site,
                base_url=edge.base_url.rstrip("/"),
                load=edge.load,
                share=share(edge.up_since, now, policy),
                lat=lat,
                lon=lon,
            )
        )
    return out


def _offer_shape(edge: EdgeView) -> tuple[object, ...]:
    """What of a heartbeat decides whether and where an edge is offered, besides its age and
    its load within capacity (Playback rebuilds its prepared candidates every second for those).
    """
    overloaded = edge.capacity_bps <= 0 or edge.throughput_bps >= edge.capacity_bps
    return (
        edge.site,
        edge.base_url,
        edge.lat,
        edge.lon,
        edge.titles,
        edge.healthy,
        edge.draining,
        overloaded,
        edge.up_since,
    )


def _stored(row: Mapping[str, Any]) -> EdgeCredential:
    """An ``edge_keys`` row as a credential; ValueError if it is unusable."""
    return _credential(
        row["edge_id"],
        row["key"],
        row["base_url"],
        row["site"],
        "api",
        row["previous_key"],
        row["previous_until"],
    )


def _view(row: Any) -> EdgeView:
    return EdgeView(
        edge_id=row.edge_id,
        site=row.site,
        base_url=row.base_url,
        lat=row.lat,
        lon=row.lon,
        throughput_bps=row.throughput_bps,
        capacity_bps=row.capacity_bps,
        connections=row.connections,
        disk_used_bytes=row.disk_used_bytes,
        disk_total_bytes=row.disk_total_bytes,
        titles=frozenset(row.titles),
        healthy=row.healthy,
        draining=row.draining,
        sent_at=row.sent_at,
        received_at=row.received_at,
        up_since=row.up_since,
    )


class Fleet:
    """The edges' last heartbeats in memory, backed by the store; and the placement plan.

    Heartbeats received here update the copy at once; edges heartbeating another instance
    show up at the next reload (every ``refresh_s`` of the monotonic clock).
    """

    def __init__(
        self,
        store: Store,
        policy: FleetPolicy,
        placement: Path | None = None,
        refresh_s: float = 1.0,
        credentials: Mapping[str, EdgeCredential] | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        # who may heartbeat: [control.edges] (fixed) over those registered through the API
        # (reloaded with the edges, so a registration reaches every instance within refresh_s)
        self._configured = dict(credentials or {})
        self._registered: dict[str, EdgeCredential] = {}
        self.credentials: dict[str, EdgeCredential] = dict(self._configured)
        self._unsigned_seen: set[str] = set()
        self._placement_path = placement
        self._placement_mtime: float | None = None
        self._refresh_s = refresh_s
        self._edges: dict[str, EdgeView] = {}
        self._by_title: dict[str, set[str]] = {}
        self._planned: dict[str, tuple[str, ...]] = {}  # title -> edge ids, from placement.json
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()
        # Counts changes to what is offered other than load within capacity: who holds what,
        # health, draining, overload, recovery, placement. Steering's prepared candidates per
        # title stay valid while it holds (see Playback), and a plain load report changes it not.
        self.generation = 0

    # -- writes ------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None, body: bytes, now: float) -> Signed | None:
        """The edge that signed heartbeat ``body`` (see :func:`authenticate`); 401 if none did."""
        return authenticate(authorization, body, self.credentials, now, self.policy)

    async def heartbeat(self, hb: EdgeHeartbeat, now: float, signed: Signed | None) -> EdgeView:
        """Record ``hb`` (already checked, signed as ``signed``) as received at ``now``.

        Refused if it claims what its signer was not given (:func:`check_claims`), or if its
        signature's timestamp is not after that of the edge's last accepted heartbeat: that
        is checked and recorded in the same transaction, so a replay to another instance of
        the control plane is refused too.
        """
        check_claims(hb, signed, self.credentials)
        if signed is None and hb.edge_id not in self._unsigned_seen:
            self._unsigned_seen.add(hb.edge_id)
            log.warning(
                "accepting UNSIGNED heartbeats from edge %r (control.dev_mode): anyone can "
                "send them",
                hb.edge_id,
            )

        def record(conn: Connection) -> dict[str, Any]:
            row = conn.execute(
                select(*Edge.__table__.columns).where(Edge.edge_id == hb.edge_id).with_for_update()
            ).first()
            previous = None if row is None else _view(row)
            last_ms = None if row is None else row.auth_ts
            if signed is not None:
                problem = replay_problem(signed.ts_ms, last_ms)
                if problem is not None:
                    raise ApiError(401, "replayed_heartbeat", problem)
            values = {
                "edge_id": hb.edge_id,
                "site": hb.site,
                "base_url": hb.base_url.rstrip("/"),
                "lat": hb.lat,
                "lon": hb.lon,
                "throughput_bps": hb.throughput_bps,
                "capacity_bps": hb.capacity_bps,
                "connections": hb.connections,
                "disk_used_bytes": hb.disk_used_bytes,
                "disk_total_bytes": hb.disk_total_bytes,
                "titles": sorted(set(hb.titles)),
                "healthy": hb.healthy,
                "draining": hb.draining,
                "sent_at": hb.sent_at,
                "received_at": now,
                "up_since": next_up_since(previous, hb, now, self.policy),
                "auth_ts": last_ms if signed is None else signed.ts_ms,
            }
            conn.execute(
                upsert(
                    self.store,
                    Edge,
                    values,
                    key=("edge_id",),
                    update_columns=[k for k in values if k != "edge_id"],
                )
            )
            return values

        values = await self.store.transaction(record)
        del values["auth_ts"]
        view = EdgeView(**{**values, "titles": frozenset(values["titles"])})
        self._put(view)
        return view

    # -- who may heartbeat (admin) -----------------------------------------------------------

    def registrations(self) -> list[EdgeRegistrationOut]:
        """Every registered edge, from the settings file and the API; never a key."""
        return [_out(self.credentials[i]) for i in sorted(self.credentials)]

    def _api_only(self, edge_id: str) -> None:
        if not _ID_RE.fullmatch(edge_id):
            raise ApiError(
                422,
                "invalid_edge_id",
                "an edge id is 1-64 of [A-Za-z0-9._-], starting with a letter or digit",
            )
        if edge_id in self._configured:
            raise ApiError(
                409,
                "registered_in_settings",
                f"edge {edge_id!r} is registered in the settings file ([control.edges.{edge_id}])"
                ": change it there",
            )

    async def register(
        self, edge_id: str, body: EdgeRegistrationIn, now: float
    ) -> tuple[bool, EdgeRegistrationOut]:
        """Register ``edge_id`` or change its registration; (whether it is new, the answer).

        The key is the one given, else the current one, else a new one (returned once). A
        changed base URL or site takes the edge out of the fleet until it heartbeats with it.
        """
        self._api_only(edge_id)
        given = body.key
        made = secrets.token_hex(32) if given is None else None  # used only for a new edge
        try:
            _credential(edge_id, given or made or "", body.base_url, body.site, "api")
        except ValueError as err:
            raise ApiError(422, "invalid_registration", str(err)) from None

        def write(conn: Connection) -> tuple[Any, dict[str, Any]]:
            row = conn.execute(
                select(*EdgeKey.__table__.columns)
                .where(EdgeKey.edge_id == edge_id)
                .with_for_update()
            ).first()
            key, previous, until = given or made, None, None
            if given is None and row is not None:
                key, previous, until = row.key, row.previous_key, row.previous_until
            values = {
                "edge_id": edge_id,
                "key": key,
                "base_url": body.base_url.rstrip("/"),
                "site": body.site,
                "previous_key": previous,
                "previous_until": until,
                "registered_at": now if row is None else row.registered_at,
                "updated_at": now,
            }
            conn.execute(
                upsert(
                    self.store,
                    EdgeKey,
                    values,
                    key=("edge_id",),
                    update_columns=[k for k in values if k != "edge_id"],
                )
            )
            if row is None or (row.base_url, row.site) != (values["base_url"], body.site):
                # what it reported under its old registration is not offered any more
                conn.execute(delete(Edge).where(Edge.edge_id == edge_id))
            return row, values

        row, values = await self.store.transaction(write)
        credential = _stored(values)
        self._registered[edge_id] = credential
        self._merge()
        if row is None or (row.base_url, row.site) != (credential.base_url, credential.site):
            self._forget(edge_id)
        return row is None, _out(credential, made if values["key"] == made else None)

    async def rotate(self, edge_id: str, body: EdgeRotateIn, now: float) -> EdgeRegistrationOut:
        """Give a registered edge a new key (returned once); the old one is accepted for
        ``keep_previous_s`` more, while the edge is moved to the new one."""
        self._api_only(edge_id)
        key = secrets.token_hex(32)

        def write(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(
                select(*EdgeKey.__table__.columns)
                .where(EdgeKey.edge_id == edge_id)
                .with_for_update()
            ).first()
            if row is None:
                return None
            keep = body.keep_previous_s > 0
            values = {
                **row._asdict(),
                "key": key,
                "previous_key": row.key if keep else None,
                "previous_until": now + body.keep_previous_s if keep else None,
                "updated_at": now,
            }
            conn.execute(
                update(EdgeKey)
                .where(EdgeKey.edge_id == edge_id)
                .values({k: v for k, v in values.items() if k != "edge_id"})
            )
            return values

        values = await self.store.transaction(write)
        if values is None:
            raise not_found(f"no edge is registered as {edge_id!r}", "unknown_edge")
        credential = _stored(values)
        self._registered[edge_id] = credential
        self._merge()
        return _out(credential, key)

    async def unregister(self, edge_id: str) -> None:
        """Revoke an edge's registration: its heartbeats are refused and it is offered no more."""
        self._api_only(edge_id)

        def write(conn: Connection) -> bool:
            gone = conn.execute(delete(EdgeKey).where(EdgeKey.edge_id == edge_id)).rowcount
            conn.execute(delete(Edge).where(Edge.edge_id == edge_id))
            return bool(gone)

        if not await self.store.transaction(write):
            raise not_found(f"no edge is registered as {edge_id!r}", "unknown_edge")
        self._registered.pop(edge_id, None)
        self._merge()
        self._forget(edge_id)

    def _merge(self) -> None:
        self.credentials = {**self._registered, **self._configured}

    def _edge_url(self, edge_id: str) -> str | None:
        edge = self._edges.get(edge_id)
        return None if edge is None else edge.base_url

    def _forget(self, edge_id: str) -> None:
        """Take an edge out of the in-memory fleet (its row is gone from the store)."""
        old = self._edges.pop(edge_id, None)
        if old is None:
            return
        for t in old.titles:
            holders = self._by_title.get(t)
            if holders is not None:
                holders.discard(edge_id)
        self.generation += 1

    async def start(self, monotonic: float) -> None:
        """Load the fleet, and say loudly when edges cannot (or need not) prove who they are."""
        await self.refresh(monotonic)
        if self.policy.dev_mode:
            log.warning(
                "control.dev_mode is on: heartbeats from unregistered edges are accepted "
                "UNSIGNED, so anyone who reaches this service can add an edge, claim an "
                "unregistered edge's id and URL, or drain it. Never run this in production."
            )
        elif not self.credentials:
            log.warning(
                "no edge is registered yet: every heartbeat is refused until one is, in "
                "[control.edges.<id>] or with PUT /v1/fleet/edges/<id>"
            )

    def _put(self, view: EdgeView) -> None:
        old = self._edges.get(view.edge_id)
        if old is None or _offer_shape(old) != _offer_shape(view):
            self.generation += 1
        if old is not None:
            for t in old.titles - view.titles:
                holders = self._by_title.get(t)
                if holders is not None:
                    holders.discard(view.edge_id)
        for t in view.titles:
            self._by_title.setdefault(t, set()).add(view.edge_id)
        self._edges[view.edge_id] = view

    # -- reads -------------------------------------------------------------------------------

    async def refresh(self, monotonic: float) -> None:
        if monotonic - self._loaded_at < self._refresh_s:
            return
        async with self._lock:
            if monotonic - self._loaded_at < self._refresh_s:
                return
            async with self.store.read() as conn:
                rows = (await conn.execute(select(*Edge.__table__.columns))).all()
                keys = (await conn.execute(select(*EdgeKey.__table__.columns))).all()
            self._edges = {}
            self._by_title = {}
            for row in rows:
                self._put(_view(row))
            self._registered = {}
            for key in keys:
                try:
                    self._registered[key.edge_id] = _stored(key._asdict())
                except ValueError as err:  # written by hand: refuse that edge, say why
                    log.warning("edge_keys row %r is unusable: %s", key.edge_id, err)
            self._merge()
            self._load_placement()
            self._loaded_at = monotonic

    def _load_placement(self) -> None:
        path = self._placement_path
        if path is None:
            return
        try:
            mtime = path.stat().st_mtime
        except OSError:
            self._planned = {}
            self._placement_mtime = None
            return
        if mtime == self._placement_mtime:
            return
        from streamplane import placement

        try:
            doc = placement.read_placement(path)
        except placement.InputError:
            return  # keep the last good plan; the operator sees the file is bad elsewhere
        self._planned = {t: tuple(servers) for t, servers in doc.titles.items()}
        self._placement_mtime = mtime
        self.generation += 1

    def knows(self, edge_id: str) -> bool:
        """Whether ``edge_id`` is an edge of the fleet: registered, or heard from."""
        return edge_id in self.credentials or edge_id in self._edges

    def edges(self) -> list[EdgeView]:
        return sorted(self._edges.values(), key=lambda e: e.edge_id)

    def holders(self, title: str) -> dict[str, tuple[EdgeView | None, list[str]]]:
        """Every edge that holds ``title`` (by heartbeat) or should (by placement.json).

        Maps edge id to its last heartbeat (None if never seen) and the sources that say so.
        """
        out: dict[str, tuple[EdgeView | None, list[str]]] = {}
        for edge_id in self._by_title.get(title, ()):
            out[edge_id] = (self._edges[edge_id], ["heartbeat"])
        for edge_id in self._planned.get(title, ()):
            if edge_id in out:
                out[edge_id][1].append("placement")
            else:
                out[edge_id] = (self._edges.get(edge_id), ["placement"])
        return out

    def serving(self) -> list[EdgeView]:
        """Every edge with a heartbeat: a live channel is pulled by any of them."""
        return list(self._edges.values())

    def holding(self, title: str) -> list[EdgeView]:
        """The edges with a heartbeat that hold ``title`` by heartbeat or by placement."""
        ids = set(self._by_title.get(title, ()))
        ids.update(self._planned.get(title, ()))
        return [self._edges[i] for i in ids if i in self._edges]
