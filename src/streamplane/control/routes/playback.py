"""Playback: start a session (ranked, signed edges), end it, and the player's heartbeats."""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Request, Response

from streamplane.control.errors import forbidden
from streamplane.control.playback import HeartbeatOut, PlaybackIn, PlayerHeartbeatIn
from streamplane.control.routes.body import JsonRoute, reply_schema
from streamplane.control.routes.catalog import known_title
from streamplane.control.routes.deps import (
    BEARER_SECURITY,
    Creds,
    Me,
    bearer_token,
    plane_of,
    principal_of,
)
from streamplane.edge import client_address, forwarded_chain, x_forwarded_for_chain

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


@router.post("/v1/heartbeat", response_model=HeartbeatOut)
async def player_heartbeat(
    body: PlayerHeartbeatIn, credentials: Creds, request: Request
) -> HeartbeatOut:
    """A player's batched events: keep the screen, record the position (latest wins).

    Authorise with the session's heartbeat token (from the playback answer) or an access
    token of the same account. 410 if the session already ended or timed out.
    """
    plane = plane_of(request)
    now = plane.clock()
    claims = plane.accounts.claims(bearer_token(credentials), now)
    if claims["typ"] == "session" and claims.get("sid") != body.session_id:
        raise forbidden("this heartbeat token belongs to another session")
    return await plane.playback.heartbeat(claims["sub"], body, now)


def _client_address(request: Request) -> str:
    """The client's address: the TCP peer, or whom trusted proxies say they forward for."""
    peer = request.client.host if request.client else ""
    plane = plane_of(request)
    chain: list[str] = []
    if plane.trusted_proxies:  # the headers are read only from a trusted peer
        header = plane.settings.control.trusted_proxy_header
        values = request.headers.getlist(header)
        chain = forwarded_chain(values) if header == "forwarded" else x_forwarded_for_chain(values)
    address = client_address(peer, chain, plane.trusted_proxies)
    # unknown: steering falls back to geography the client sent, or none
    return address if address is not None else "0.0.0.0"
