"""Catalog: search and read titles, where each is available, and register one (admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel

from streamplane.control.catalog import TitleInfo, channel_info, check_title_id, summarise
from streamplane.control.errors import ApiError, not_found
from streamplane.control.fleet import exclusion, state
from streamplane.control.plane import ControlPlane
from streamplane.control.realtime import process_limits
from streamplane.control.routes.body import JsonRoute, body_schema, decode
from streamplane.control.routes.deps import admin, plane_of
from streamplane.live import EventReadiness
from streamplane.media import Title

__all__ = ["Availability", "Holder", "RungOut", "TitleList", "TitleOut", "known_title", "router"]

router = APIRouter(tags=["catalog"], route_class=JsonRoute)


class RungOut(BaseModel):
    id: str
    codec: str
    codec_string: str
    width: int
    height: int
    average_bitrate_bps: int
    peak_bitrate_bps: int
    vmaf: float


class TitleOut(BaseModel):
    id: str
    name: str
    duration_s: float
    width: int
    height: int
    hls: str
    dash: str
    artwork: list[str]
    rungs: list[RungOut]
    plans: list[str]


class TitleList(BaseModel):
    total: int
    limit: int
    offset: int
    titles: list[TitleOut]


class Holder(BaseModel):
    edge_id: str
    site: str | None
    state: str  # up, slow-start, stale, unhealthy, draining, overloaded, unknown
    offered: bool
    sources: list[str]  # heartbeat (it reports holding it), placement (placement.json says so)


class Availability(BaseModel):
    title: str
    offered: int  # edges a playback would be offered now
    edges: list[Holder]
    origin: bool  # the origin backs every playback as the last resort


async def known_title(plane: ControlPlane, title_id: str) -> TitleInfo:
    """The catalog's title ``title_id`` (or the live channel of that name); 404
    ``unknown_title`` if there is none."""
    if title_id in plane.settings.control.live_channels:
        return channel_info(title_id)
    info = await plane.catalog.get(title_id, plane.monotonic())
    if info is None:
        raise not_found(f"no title {title_id!r} in the catalog", "unknown_title")
    return info


@router.get("/v1/titles", response_model=TitleList)
async def list_titles(
    request: Request,
    q: Annotated[str | None, Query(max_length=128, description="part of a name")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    """Titles by name; ``q`` keeps those whose name or id contains it (any case)."""
    plane = plane_of(request)
    total, titles = await plane.catalog.search(q, limit, offset, plane.monotonic())
    return {
        "total": total,
        "limit": limit,
        "offset": offset,
        "titles": [t.public() for t in titles],
    }


@router.get("/v1/titles/{title_id}", response_model=TitleOut)
async def get_title(title_id: str, request: Request) -> dict[str, Any]:
    plane = plane_of(request)
    return (await known_title(plane, title_id)).public()


@router.get("/v1/titles/{title_id}/availability", response_model=Availability)
async def availability(title_id: str, request: Request) -> Availability:
    """Which edges hold the title (by their heartbeats and by placement.json), and state."""
    plane = plane_of(request)
    await known_title(plane, title_id)
    await plane.fleet.refresh(plane.monotonic())
    now = plane.clock()
    policy = plane.fleet.policy
    holders = []
    for edge_id, (edge, sources) in sorted(plane.fleet.holders(title_id).items()):
        if edge is None:
            holders.append(
                Holder(edge_id=edge_id, site=None, state="unknown", offered=False, sources=sources)
            )
        else:
            holders.append(
                Holder(
                    edge_id=edge_id,
                    site=edge.site,
                    state=state(edge, now, policy),
                    offered=exclusion(edge, now, policy) is None,
                    sources=sources,
                )
            )
    return Availability(
        title=title_id,
        offered=sum(h.offered for h in holders),
        edges=holders,
        origin=bool(plane.settings.control.origin_url),
    )


@router.post(
    "/v1/titles",
    status_code=201,
    response_model=TitleOut,
    dependencies=[Depends(admin)],
    openapi_extra=body_schema("Title"),
)
async def register_title(
    request: Request,
    plans: Annotated[
        list[str] | None, Query(description="plans entitled to it; none: every plan")
    ] = None,
    title_id: Annotated[
        str | None, Query(alias="id", description="default: the document's title")
    ] = None,
) -> dict[str, Any]:
    """Register (or replace) a title from its title.json document (admin)."""
    plane = plane_of(request)
    doc = decode(await request.body(), Title)
    for p in plans or ():
        if p not in plane.settings.control.plans:
            raise ApiError(422, "unknown_plan", f"no plan {p!r}")
    info = summarise(check_title_id(title_id or doc.title), doc, sorted(set(plans or ())))
    await plane.catalog.register(info, plane.clock())
    return info.public()


@router.get("/v1/live/plan", dependencies=[Depends(admin)])
async def live_plan(request: Request) -> dict[str, Any]:
    """The scheduled events (control.live_events), each planned on the edges heartbeating now:
    when its warm-up starts, the edges by site and why, the realtime gateway's admission
    for it, its phase, and whether it is ready (admin)."""
    plane = plane_of(request)
    await plane.fleet.refresh(plane.monotonic())
    processes = plane.gateway_processes
    events = []
    for r in plane.live_readiness():
        plan = r.plan
        limits = process_limits(plan.gateway, processes)
        events.append(
            {
                "channel": plan.event.channel,
                "start": plan.event.start,
                "warm_at": plan.warm_at,
                "expected_viewers": plan.event.expected_viewers,
                "phase": r.phase,
                "ready": r.ready,
                "why": r.why,
                "edges_up": list(r.edges_up),
                "edges_down": list(r.edges_down),
                "edges_cold": list(r.edges_cold),
                "edges": [
                    _planned_edge(plane, r, site.site, edge)
                    for site in plan.sites
                    for edge in site.edges
                ],
                "gateway": {
                    "admission_per_s": plan.gateway.admission_per_s,
                    "admission_burst": plan.gateway.admission_burst,
                    "max_connections": plan.gateway.max_connections,
                    "processes": processes,
                    "per_process": {
                        "rate": limits.rate,
                        "burst": limits.burst,
                        "max_connections": limits.max_connections,
                    },
                },
                "sites": [
                    {
                        "site": s.site,
                        "viewers": s.viewers,
                        "demand_bps": s.demand_bps,
                        "edges": list(s.edges),
                        "capacity_bps": s.capacity_bps,
                        "short_bps": s.short_bps,
                        "reason": s.reason,
                    }
                    for s in plan.sites
                ],
            }
        )
    scheduled = len(plane.live_events)
    return {"events": events, "scheduled": scheduled, "planned": len(events)}


def _planned_edge(plane: ControlPlane, r: EventReadiness, site: str, edge: str) -> dict[str, Any]:
    """One planned edge of an event: up or not, and what its last warming fetched."""
    warmth = plane.warmer.warmth.get((r.plan.event.channel, edge))
    return {
        "edge": edge,
        "site": site,
        "up": edge in r.edges_up,
        "warm": warmth is not None and warmth.warm,
        "warmed_at": warmth.at if warmth else None,
        "objects": warmth.objects if warmth else 0,
        "why": warmth.why if warmth else "not warmed yet",
    }
