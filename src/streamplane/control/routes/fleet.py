"""Fleet: edges' heartbeats, and the state of every edge (admin)."""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from streamplane.control.fleet import check_heartbeat, exclusion, share, state
from streamplane.control.routes.body import JsonRoute, body_schema, decode
from streamplane.control.routes.deps import admin, edge_auth, plane_of
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
    dependencies=[Depends(edge_auth)],
    openapi_extra=body_schema("EdgeHeartbeat", reply="HeartbeatReply"),
)
async def edge_heartbeat(request: Request) -> Response:
    """An edge's heartbeat (``streamplane.edge.EdgeHeartbeat``, unknown fields refused)."""
    plane = plane_of(request)
    hb = check_heartbeat(decode(await request.body(), EdgeHeartbeat))
    await plane.fleet.heartbeat(hb, plane.clock())
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
