"""Fleet: edges' heartbeats (each signed with the edge's own key), the state of every edge, the
edges' registrations and the BGP sessions (admin)."""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from streamplane.control.fleet import (
    EdgeRegistrationIn,
    EdgeRegistrationOut,
    EdgeRotateIn,
    check_heartbeat,
    exclusion,
    share,
    state,
)
from streamplane.control.routes.body import JsonRoute, body_schema, decode
from streamplane.control.routes.deps import EdgeAuthorization, admin, plane_of
from streamplane.control.steering_sources import BgpOut
from streamplane.edge import EdgeHeartbeat, HeartbeatReply

__all__ = ["EdgeStatus", "FleetOut", "router"]

router = APIRouter(tags=["fleet"], route_class=JsonRoute)


class EdgeStatus(BaseModel):
    edge_id: str
    site: str
    base_url: str
    state: str
    offered: bool
    why_not: str | None
    load: float
    share: float
    throughput_bps: float
    capacity_bps: float
    connections: int
    disk_used_bytes: int
    disk_total_bytes: int
    titles: int
    heartbeat_age_s: float
    up_since: float | None


class FleetOut(BaseModel):
    edges: list[EdgeStatus]
    offered: int


@router.post(
    "/v1/fleet/heartbeat",
    response_model=None,
    openapi_extra=body_schema("EdgeHeartbeat", reply="HeartbeatReply"),
)
async def edge_heartbeat(request: Request, authorization: EdgeAuthorization) -> Response:
    """An edge's heartbeat (``streamplane.edge.EdgeHeartbeat``, unknown fields refused),
    signed with the edge's own key: 401 if it is not, 403 if it claims another edge's id,
    base URL or site."""
    plane = plane_of(request)
    body = await request.body()
    now = plane.clock()
    await plane.fleet.refresh(plane.monotonic())
    signed = plane.fleet.authenticate(authorization, body, now)
    hb = check_heartbeat(decode(body, EdgeHeartbeat))
    await plane.fleet.heartbeat(hb, now, signed)
    return Response(
        msgspec.json.encode(HeartbeatReply(interval_s=plane.settings.control.edge_heartbeat_s)),
        media_type="application/json",
    )


@router.get("/v1/fleet", response_model=FleetOut, dependencies=[Depends(admin)])
async def fleet(request: Request) -> FleetOut:
    """Every edge that ever heartbeated: state, load, slow-start share (admin)."""
    plane = plane_of(request)
    await plane.fleet.refresh(plane.monotonic())
    now = plane.clock()
    policy = plane.fleet.policy
    edges = []
    for e in plane.fleet.edges():
        why = exclusion(e, now, policy)
        edges.append(
            EdgeStatus(
                edge_id=e.edge_id,
                site=e.site,
                base_url=e.base_url,
                state=state(e, now, policy),
                offered=why is None,
                why_not=why,
                load=e.load,
                share=share(e.up_since, now, policy) if why is None else 0.0,
                throughput_bps=e.throughput_bps,
                capacity_bps=e.capacity_bps,
                connections=e.connections,
                disk_used_bytes=e.disk_used_bytes,
                disk_total_bytes=e.disk_total_bytes,
                titles=len(e.titles),
                heartbeat_age_s=now - e.received_at,
                up_since=e.up_since,
            )
        )
    return FleetOut(edges=edges, offered=sum(e.offered for e in edges))


@router.get(
    "/v1/fleet/edges",
    response_model=list[EdgeRegistrationOut],
    dependencies=[Depends(admin)],
)
async def edge_registrations(request: Request) -> list[EdgeRegistrationOut]:
    """The edges allowed to heartbeat, and the base URL and site each may claim (admin)."""
    plane = plane_of(request)
    await plane.fleet.refresh(plane.monotonic())
    return plane.fleet.registrations()


@router.put(
    "/v1/fleet/edges/{edge_id}",
    response_model=EdgeRegistrationOut,
    dependencies=[Depends(admin)],
    responses={201: {"model": EdgeRegistrationOut, "description": "registered"}},
)
async def register_edge(
    edge_id: str, body: EdgeRegistrationIn, response: Response, request: Request
) -> EdgeRegistrationOut:
    """Register an edge, or change its base URL or site (admin). Without ``key``, a new
    edge gets a generated one, shown in this answer only; a registered edge keeps its own."""
    plane = plane_of(request)
    created, out = await plane.fleet.register(edge_id, body, plane.clock())
    response.status_code = 201 if created else 200
    return out


@router.post(
    "/v1/fleet/edges/{edge_id}/rotate",
    response_model=EdgeRegistrationOut,
    dependencies=[Depends(admin)],
)
async def rotate_edge_key(
    edge_id: str, body: EdgeRotateIn, request: Request
) -> EdgeRegistrationOut:
    """A new key for the edge, shown in this answer only (admin)."""
    plane = plane_of(request)
    return await plane.fleet.rotate(edge_id, body, plane.clock())


@router.delete("/v1/fleet/edges/{edge_id}", status_code=204, dependencies=[Depends(admin)])
async def unregister_edge(edge_id: str, request: Request) -> Response:
    """Revoke an edge: its heartbeats are refused, and it is offered no more (admin)."""
    await plane_of(request).fleet.unregister(edge_id)
    return Response(status_code=204)


@router.get("/v1/fleet/bgp", response_model=BgpOut, dependencies=[Depends(admin)])
async def fleet_bgp(request: Request) -> BgpOut:
    """Every BGP session: state and since when, restarts, prefixes learned (admin)."""
    return plane_of(request).sources.bgp()
