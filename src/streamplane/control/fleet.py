"""The fleet: which edges may be offered, with what slow-start share, and which hold a title.

The rules are a pure core (:func:`exclusion`, :func:`share`, :func:`next_up_since`,
:func:`candidates`) over :class:`EdgeView` values and a clock reading; :class:`Fleet` is the
shell that keeps the store's edge rows in memory for the hot path.

An edge is offered when its last heartbeat arrived within ``edge_timeout_s`` (by the control
plane's clock: edge clocks may be skewed), reported it healthy and not draining, and its
throughput is below its capacity. ``up_since`` is when it last became offerable; for
``slow_start_s`` after that its share ramps linearly from ``slow_start_floor`` to 1, so a
recovered edge with a cold cache is not handed every session at once. A new edge starts the
same way.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec
from sqlalchemy import Connection, select

from streamplane.config import ControlSettings
from streamplane.control.errors import ApiError
from streamplane.control.store import Edge, Store, upsert
from streamplane.edge import EdgeHeartbeat
from streamplane.steering import EdgeCandidate, SiteInfo

__all__ = [
    "EdgeView",
    "Fleet",
    "FleetPolicy",
    "candidates",
    "check_heartbeat",
    "exclusion",
    "next_up_since",
    "share",
    "state",
]

_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TITLE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_INT64: Final = 2**63 - 1


class FleetPolicy(msgspec.Struct, frozen=True, kw_only=True):
    timeout_s: float
    slow_start_s: float
    slow_start_floor: float

    @classmethod
    def from_settings(cls, settings: ControlSettings) -> FleetPolicy:
        return cls(
            timeout_s=settings.edge_timeout_s,
            slow_start_s=settings.slow_start_s,
            slow_start_floor=settings.slow_start_floor,
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
    parts = urlsplit(hb.base_url)
    if (
        len(hb.base_url) > 256
        or "\x00" in hb.base_url  # no stored text may hold a NUL (PostgreSQL refuses it)
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        problems.append("base_url must be http(s)://host[:port] and nothing more")
    else:
        try:
            parts.port  # noqa: B018 - raises for a port out of range
        except ValueError:
            problems.append("base_url has a bad port")
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
    ) -> None:
        self.store = store
        self.policy = policy
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

    async def heartbeat(self, hb: EdgeHeartbeat, now: float) -> EdgeView:
        """Record ``hb`` (already checked) as received at ``now``."""

        def record(conn: Connection) -> dict[str, Any]:
            row = conn.execute(
                select(*Edge.__table__.columns).where(Edge.edge_id == hb.edge_id).with_for_update()
            ).first()
            previous = None if row is None else _view(row)
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
        view = EdgeView(**{**values, "titles": frozenset(values["titles"])})
        self._put(view)
        return view

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
            self._edges = {}
            self._by_title = {}
            for row in rows:
                self._put(_view(row))
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

    def holding(self, title: str) -> list[EdgeView]:
        """The edges with a heartbeat that hold ``title`` by heartbeat or by placement."""
        ids = set(self._by_title.get(title, ()))
        ids.update(self._planned.get(title, ()))
        return [self._edges[i] for i in ids if i in self._edges]
