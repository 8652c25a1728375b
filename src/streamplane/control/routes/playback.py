"""Playback: start a session (ranked, signed edges), end it, and the player's heartbeats."""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Request, Response

from streamplane.control.errors import ApiError
from streamplane.control.playback import PlaybackIn
from streamplane.control.routes.body import JsonRoute, body_schema, reply_schema
from streamplane.control.routes.catalog import known_title
from streamplane.control.routes.deps import Creds, Me, bearer_token, plane_of
from streamplane.edge import client_address, forwarded_chain, x_forwarded_for_chain
from streamplane.telemetry import BatchError
from streamplane.telemetry.ingest import IngestRefused

__all__ = ["router"]

router = APIRouter(tags=["playback"], route_class=JsonRoute)


@router.post("/v1/playback", response_model=None, openapi_extra=reply_schema("PlaybackOut"))
async def start_playback(body: PlaybackIn, request: Request, me: Me) -> Response:
    """Start a session: ranked edges with signed HLS and DASH URLs, heartbeat, resume.

    Refusals: 404 unknown title, 403 the plan does not include it, 503 no healthy edge
    holds it (and no origin is configured), 409 the plan's screens are all in use.
    """
    plane = plane_of(request)
    title = await known_title(plane, body.title)
    await plane.fleet.refresh(plane.monotonic())
    out = await plane.playback.start(
        me.account_id, title, body, _client_address(request), plane.clock()
    )
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
async def player_heartbeat(credentials: Creds, request: Request) -> Response:
    """A player's batched events, appended to the telemetry stream and written behind.

    Authorise with the session's heartbeat token (from the playback answer) or an access
    token of the same account. The answer comes once the batch is durable in the stream; a
    bad event is refused with its reason (``refused``) and the rest kept. 410 if the session
    already ended or timed out (its events are still recorded); 429 with Retry-After past the
    device's or the service's rate (wait that long; ``interval_s`` is the cadence to keep).
    """
    plane = plane_of(request)
    now = plane.clock()
    claims = plane.accounts.claims(bearer_token(credentials), now)
    ingest = plane.heartbeats.ingest
    if ingest is None:
        raise ApiError(
            503, "telemetry_unavailable", "heartbeats are not taken yet", retry_after_s=1
        )
    session = claims.get("sid") if claims["typ"] == "session" else None
    try:
        answer = await ingest.heartbeat(
            claims["sub"], await request.body(), now, plane.monotonic(), session
        )
    except BatchError as err:
        raise ApiError(err.status, err.code, str(err)) from None
    except IngestRefused as err:
        raise ApiError(err.status, err.code, err.detail, **err.extra) from None
    return Response(msgspec.json.encode(answer), media_type="application/json")


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
