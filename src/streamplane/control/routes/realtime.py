"""Realtime: ``POST /v1/realtime/token``, a viewer's token for one event's channels."""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from streamplane.control.catalog import check_title_id
from streamplane.control.errors import forbidden, not_found
from streamplane.control.routes.body import JsonRoute
from streamplane.control.routes.deps import Creds, Me, bearer_token, plane_of

__all__ = ["router"]

router = APIRouter(tags=["realtime"], route_class=JsonRoute)


class RealtimeTokenIn(BaseModel):
    event: str = Field(min_length=1, max_length=128, description="the event (a title id)")


@router.post("/v1/realtime/token", response_model=None)
async def realtime_token(body: RealtimeTokenIn, request: Request, me: Me) -> Response:
    """A token for the gateway: chat on the event, its counts and presence, its live state
    (read only). 404 when no gateway is configured (``[realtime] token_key``)."""
    plane = plane_of(request)
    info = plane.realtime.issue(me.account_id, check_title_id(body.event), plane.clock())
    if info is None:
        raise not_found("no realtime gateway is configured here", code="realtime_off")
    return Response(msgspec.json.encode(info), media_type="application/json")


@router.get("/v1/live/admission", response_model=None)
async def live_admission(request: Request, credentials: Creds) -> Response:
    """The realtime gateways' admission plan: for each scheduled event, from its warm-up until
    it is over, every gateway process's raised limits (new connections a second, burst,
    connections), its audience split among ``realtime.total_processes``. For the gateways:
    a token signed with ``realtime.token_key`` granting ``control:admission`` (403 otherwise)."""
    plane = plane_of(request)
    if not plane.realtime.is_gateway(bearer_token(credentials), plane.clock()):
        raise forbidden("the admission plan is for the realtime gateways (realtime.token_key)")
    return Response(msgspec.json.encode(plane.admission_plan()), media_type="application/json")
