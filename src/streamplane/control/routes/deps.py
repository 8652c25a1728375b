"""What the routes depend on: the control plane itself, and who is asking.

Every dependency is ``async``: FastAPI runs a plain ``def`` on a worker thread, a hand-off
(and a wait for the GIL) per request for microseconds of work.

The :class:`~streamplane.control.plane.ControlPlane` is ``app.state.plane``; a route takes the
``Request`` and calls :func:`plane_of`. (As a dependency of its own it would cost every
request about 8 us of FastAPI's dependency solving, for one attribute lookup.)

- ``Me``: the account of a valid access token (401 otherwise); :func:`principal_of` is the
  same check called by the route itself, for the hot route (a playback start) where FastAPI's
  solving of the two dependencies cost more than the check.
- ``Creds``: the raw ``Authorization: Bearer`` credentials, for routes that read the claims.
- ``admin``: the admin token (``control.admin_token``); admin routes are off without one.
- ``EdgeAuthorization``: an edge heartbeat's ``Authorization`` header, signed with the edge's
  own key (checked by ``Fleet.authenticate``, which needs the body too).
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Final, cast

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from streamplane.control.accounts import Principal
from streamplane.control.errors import forbidden, unauthorised
from streamplane.control.plane import ControlPlane

__all__ = [
    "BEARER_SECURITY",
    "Creds",
    "EdgeAuthorization",
    "Me",
    "admin",
    "bearer_token",
    "plane_of",
    "principal_of",
]

_bearer = HTTPBearer(auto_error=False, description="an access token from /v1/auth/login")
_admin_bearer = HTTPBearer(auto_error=False, scheme_name="admin", description="control.admin_token")
_edge_key = APIKeyHeader(
    name="Authorization",
    auto_error=False,
    scheme_name="edge",
    description="StreamplaneEdge id=<edge id>, ts=<epoch ms>, sig=<HMAC-SHA256 hex> with "
    "the edge's own key (streamplane.edge.report)",
)


def plane_of(request: Request) -> ControlPlane:
    """The control plane serving ``request``."""
    return cast(ControlPlane, request.app.state.plane)


Creds = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
EdgeAuthorization = Annotated[str | None, Depends(_edge_key)]


def bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str:
    """The token of an ``Authorization: Bearer`` header; 401 without one."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise unauthorised("send Authorization: Bearer <access token>")
    return credentials.credentials


async def principal(request: Request, credentials: Creds) -> Principal:
    plane = plane_of(request)
    return plane.accounts.principal(bearer_token(credentials), plane.clock())


Me = Annotated[Principal, Depends(principal)]

# What ``Me`` adds to a route's OpenAPI operation, for a route that calls principal_of itself.
BEARER_SECURITY: Final[dict[str, Any]] = {"security": [{_bearer.scheme_name: []}]}


def principal_of(request: Request) -> Principal:
    """What ``Me`` gives, read from ``request`` by the route itself (as ``HTTPBearer`` reads
    the header): the same 401s, without a dependency's per-request cost."""
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    credentials = (
        HTTPAuthorizationCredentials(scheme=scheme, credentials=token)
        if scheme.lower() == "bearer" and token
        else None
    )
    plane = plane_of(request)
    return plane.accounts.principal(bearer_token(credentials), plane.clock())


async def admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)],
) -> None:
    expected = plane_of(request).settings.control.admin_token
    if not expected:
        raise forbidden("admin routes are off: set control.admin_token", "admin_disabled")
    token = bearer_token(credentials)
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise forbidden("not the admin token")
