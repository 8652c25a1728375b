"""Pre-warming for scheduled events: which edges a channel needs, from when, and why. Pure.

Autoscaling reacts minutes after a surge that arrives in seconds, so a scheduled event is
planned from an upstream signal instead: the audience expected (tickets sold,
pre-registrations) times the bitrate a viewer draws is the throughput the channel needs at
its peak. Each site gets its share of that audience (by the shares given, else in proportion
to the site's throughput) and the fewest of its servers whose throughput, kept to
``headroom`` of their rating, covers the share: the largest first, which is the fewest. The
warm-up starts ``lead_s`` before the event, long enough for edges to take the channel's
playlists and the first parts and for the realtime gateway to raise its admission limits (a
join rate for the surge in the minutes around the start). A site that cannot cover its share
is reported short, with by how much.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from streamplane.placement import Server

__all__ = [
    "LEAD_S",
    "LIVE_S",
    "Event",
    "EventPlan",
    "EventReadiness",
    "GatewayNeeds",
    "SitePlan",
    "event_phase",
    "gateway_needs",
    "plan_event",
    "read_events",
    "readiness",
    "warm_edges",
]


LEAD_S: Final = 900.0  # warm-up before an event's start
LIVE_S: Final = 4 * 3600.0  # how long after its start an event counts as live


@dataclass(frozen=True)
class Event:
    channel: str
    start: float  # UNIX seconds
    expected_viewers: int
    bitrate_bps: float  # what one viewer draws on average (the ladder's likely rung)
    site_shares: Mapping[str, float] | None = None  # audience by site; None: by throughput


@dataclass(frozen=True)
class SitePlan:
    site: str
    viewers: int
    demand_bps: float
    edges: tuple[str, ...]
    capacity_bps: float  # of the chosen edges, within headroom
    short_bps: float  # demand the site cannot cover (0: covered)
    reason: str


@dataclass(frozen=True)
class GatewayNeeds:
    """What the realtime gateways must admit, all processes together, while the event is
    warming or live: its audience joining within the join window, the opening rush (the
    first ``_RUSH_S`` seconds' joins) at once, and every viewer connected with a margin for
    reconnections in flight."""

    admission_per_s: int
    admission_burst: int
    max_connections: int


_RUSH_S = 10.0
_CONNECTION_MARGIN = 1.2


def gateway_needs(event: Event, join_window_s: float = 120.0) -> GatewayNeeds:
    """The gateways' limits for ``event`` (see :class:`GatewayNeeds`)."""
    rate = math.ceil(event.expected_viewers / join_window_s)
    return GatewayNeeds(
        admission_per_s=rate,
        admission_burst=math.ceil(rate * _RUSH_S),
        max_connections=math.ceil(event.expected_viewers * _CONNECTION_MARGIN),
    )


@dataclass(frozen=True)
class EventPlan:
    event: Event
    warm_at: float
    sites: tuple[SitePlan, ...]
    gateway: GatewayNeeds

    @property
    def ready(self) -> bool:
        return all(s.short_bps == 0 for s in self.sites)


def plan_event(
    event: Event,
    servers: Sequence[Server],
    *,
    headroom: float = 0.7,
    lead_s: float = LEAD_S,
    join_window_s: float = 120.0,
) -> EventPlan:
    """The pre-warming plan of ``event`` on ``servers`` (see the module docstring)."""
    if event.expected_viewers < 0 or event.bitrate_bps <= 0:
        raise ValueError("an event needs a non-negative audience and a positive bitrate")
    if not 0 < headroom <= 1:
        raise ValueError("headroom is a share of a server's throughput, in (0, 1]")
    by_site: dict[str, list[Server]] = {}
    for server in servers:
        by_site.setdefault(server.site, []).append(server)
    if not by_site:
        raise ValueError("no servers to plan on")
    shares = _shares(event, by_site)
    plans = []
    for site, share in sorted(shares.items()):
        viewers = round(event.expected_viewers * share)
        demand = viewers * event.bitrate_bps
        chosen: list[Server] = []
        capacity = 0.0
        for server in sorted(by_site.get(site, []), key=lambda s: (-s.throughput_bps, s.id)):
            if capacity >= demand:
                break
            chosen.append(server)
            capacity += server.throughput_bps * headroom
        short = max(0.0, demand - capacity)
        if not viewers:
            reason = "no audience expected here"
        elif short:
            reason = (
                f"{viewers} viewers x {event.bitrate_bps / 1e6:.1f} Mb/s need "
                f"{demand / 1e9:.1f} Gb/s; every server here gives {capacity / 1e9:.1f} Gb/s "
                f"at {headroom:.0%}: {short / 1e9:.1f} Gb/s short"
            )
        else:
            reason = (
                f"{viewers} viewers x {event.bitrate_bps / 1e6:.1f} Mb/s need "
                f"{demand / 1e9:.1f} Gb/s: the {len(chosen)} largest servers give "
                f"{capacity / 1e9:.1f} Gb/s at {headroom:.0%}"
            )
        plans.append(
            SitePlan(site, viewers, demand, tuple(s.id for s in chosen), capacity, short, reason)
        )
    return EventPlan(
        event=event,
        warm_at=event.start - lead_s,
        sites=tuple(plans),
        gateway=gateway_needs(event, join_window_s),
    )


def read_events(text: str) -> list[Event]:
    """``[[event]]`` tables of TOML: channel, start (RFC 3339), expected_viewers,
    bitrate_kbps, and optionally sites = { name = share }. ValueError names what is wrong."""
    import tomllib
    from datetime import datetime

    events = []
    for i, doc in enumerate(tomllib.loads(text).get("event", []), start=1):
        try:
            start = datetime.fromisoformat(str(doc["start"]).replace("Z", "+00:00"))
            if start.tzinfo is None:
                raise ValueError("start needs a time zone (such as Z)")
            sites = doc.get("sites")
            events.append(
                Event(
                    channel=str(doc["channel"]),
                    start=start.timestamp(),
                    expected_viewers=int(doc["expected_viewers"]),
                    bitrate_bps=float(doc.get("bitrate_kbps", 3000)) * 1000,
                    site_shares={str(k): float(v) for k, v in sites.items()} if sites else None,
                )
            )
        except KeyError as exc:
            raise ValueError(f"event {i}: {exc.args[0]} is missing") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"event {i}: {exc}") from None
    if not events:
        raise ValueError("no [[event]] tables")
    return events


def _shares(event: Event, by_site: Mapping[str, list[Server]]) -> dict[str, float]:
    if event.site_shares:
        total = sum(event.site_shares.values())
        if total <= 0 or any(v < 0 for v in event.site_shares.values()):
            raise ValueError("site shares must be non-negative and not all zero")
        return {site: v / total for site, v in event.site_shares.items()}
    throughput = {site: sum(s.throughput_bps for s in group) for site, group in by_site.items()}
    total = sum(throughput.values())
    return {site: t / total for site, t in throughput.items()}


Phase = Literal["scheduled", "warming", "live", "over"]


def event_phase(plan: EventPlan, now: float, live_s: float = LIVE_S) -> Phase:
    """Where ``plan``'s event is at ``now``: before its warm-up, warming, under way (for
    ``live_s`` after its start), over."""
    if now < plan.warm_at:
        return "scheduled"
    if now < plan.event.start:
        return "warming"
    return "live" if now < plan.event.start + live_s else "over"


@dataclass(frozen=True)
class EventReadiness:
    """What the control plane reports for one event: its plan, its phase, which planned edges
    are up (heartbeating and offered), and whether the event is ready."""

    plan: EventPlan
    phase: Phase
    edges_up: tuple[str, ...]
    edges_down: tuple[str, ...]  # planned, but not heartbeating or not offered now
    ready: bool  # every site covered, every planned edge up (and warm, once warming)
    why: str
    edges_cold: tuple[str, ...] = ()  # up, warming, but their last warming failed or is none


def readiness(
    plan: EventPlan,
    up: Collection[str],
    now: float,
    live_s: float = LIVE_S,
    warm: Collection[str] = (),
) -> EventReadiness:
    """The readiness of ``plan`` given the edges ``up`` now (heartbeating and offered) and
    those ``warm`` (their last warming fetched everything). Before the warm-up no edge is
    expected warm; once the event is live, its viewers keep the edges warm."""
    planned = [edge for site in plan.sites for edge in site.edges]
    edges_up = tuple(e for e in planned if e in up)
    edges_down = tuple(e for e in planned if e not in up)
    phase = event_phase(plan, now, live_s)
    edges_cold = tuple(e for e in edges_up if e not in warm) if phase == "warming" else ()
    short = [s.site for s in plan.sites if s.short_bps > 0]
    if short:
        why = f"short of throughput at {', '.join(short)}: more edges are needed there"
    elif edges_down:
        why = f"planned edges not up: {', '.join(edges_down)}"
    elif edges_cold:
        why = f"planned edges not warm yet: {', '.join(edges_cold)}"
    elif phase == "warming":
        why = f"all {len(planned)} planned edges are up and warm"
    else:
        why = f"all {len(planned)} planned edges are up"
    return EventReadiness(
        plan=plan,
        phase=phase,
        edges_up=edges_up,
        edges_down=edges_down,
        ready=not short and not edges_down and not edges_cold,
        why=why,
        edges_cold=edges_cold,
    )


def warm_edges(
    plans: Sequence[EventPlan], channel: str, now: float, live_s: float = LIVE_S
) -> frozenset[str] | None:
    """The edges a channel is placed on at ``now``: those its events' plans chose, while an
    event is warming or live; None when no event of the channel is (every edge serves it)."""
    chosen: set[str] = set()
    placed = False
    for plan in plans:
        if plan.event.channel == channel and event_phase(plan, now, live_s) in ("warming", "live"):
            placed = True
            chosen.update(edge for site in plan.sites for edge in site.edges)
    return frozenset(chosen) if placed else None
