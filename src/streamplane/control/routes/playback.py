"""Playback: start a session (ranked, signed edges), end it, and the player's heartbeats."""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Request, Response

from streamplane.control.playback import PlaybackIn
from streamplane.control.routes.body import JsonRoute, body_schema, reply_schema
from streamplane.control.routes.catalog import known_title
from streamplane.control.routes.deps import (
    BEARER_SECURITY,
    Creds,
    Me,
    plane_of,
    principal_of,
)
from streamplane.edge import forwarded_client

__all__ = ["router"]

router = APIRouter(tags=["playback"], route_class=JsonRoute)


@router.post(
    "/v1/playback",
    response_model=None,
    openapi_extra={**reply_schema("PlaybackOut"), **BEARER_SECURITY},
)
async def start_playback(body: PlaybackIn, request: Request) -> Response:
    """Start a session: ranked edges with signed HLS and DASH URLs, heartbeat, resume.

    Refusals: 404 unknown title, 403 the plan does not include it, 503 no healthy edge
    holds it (and no origin is configured), 409 the plan's screens are all in use.
    """
    # The access token is checked here, as ``Me`` would: as a dependency, FastAPI's solving
    # of it (and of HTTPBearer under it) cost a start more than the check itself.
    me = principal_of(request)
    plane = plane_of(request)
    title = await known_title(plane, body.title)
    await plane.fleet.refresh(plane.monotonic())
    now = plane.clock()
    out = await plane.playback.start(me.account_id, title, body, _client_address(request), now)
    out.realtime = plane.realtime.issue(me.account_id, title.id, now)
    # Encoded once by msgspec: validating and serialising it as a pydantic model was a
    # tenth of a start.
    return Response(msgspec.json.encode(out), media_type="application/json")


@router.delete("/v1/playback/{session_id}", status_code=204)
async def stop_playback(session_id: str, me: Me, request: Request) -> Response:
    """End a session and free its screen now rather than at its heartbeat timeout."""
    plane = plane_of(request)
    await plane.playback.stop(me.account_id, session_id)
    return Response(status_code=204)


@router.post(
    "/v1/heartbeat",
    response_model=None,
    openapi_extra=body_schema("HeartbeatRequest", reply="HeartbeatAnswer"),
)
async def player_heartbeat(_credentials: Creds, request: Request) -> Response:
    """A player's batched events, appended to the telemetry stream and written behind.

    Authorise with the session's heartbeat token (from the playback answer) or an access
    token of the same account. The answer comes once the batch is durable in the stream; a
    bad event is refused with its reason (``refused``) and the rest kept. 410 if the session
    already ended or timed out (its events are still recorded); 429 with Retry-After past the
    device's or the service's rate (wait that long; ``interval_s`` is the cadence to keep).
    """
    # the same answer as the lean listener's (telemetry.ingest_port), errors included
    status, body, headers = await plane_of(request).heartbeats.answer(
        request.headers.get("authorization", ""), await request.body(), _client_address(request)
    )
    return Response(
        body,
        status_code=status,
        media_type="application/json",
        headers={k.decode(): v.decode() for k, v in headers},
    )


def _client_address(request: Request) -> str:
    """The client's address: the TCP peer, or whom trusted proxies say they forward for."""
    peer = request.client.host if request.client else ""
    plane = plane_of(request)
    header = plane.settings.control.trusted_proxy_header
    # the headers are read only from a trusted peer
    values = request.headers.getlist(header) if plane.trusted_proxies else []
    address = forwarded_client(peer, values, plane.trusted_proxies, header)
    # unknown: steering falls back to geography the client sent, or none
    return address if address is not None else "0.0.0.0"
