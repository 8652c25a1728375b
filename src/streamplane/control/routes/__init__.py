"""The control plane's HTTP routes, one router per domain over the same services.

- ``accounts``: ``POST /v1/accounts``, ``POST /v1/auth/login``, ``POST /v1/auth/refresh``,
  ``POST /v1/auth/logout``, ``GET /v1/account``, ``PUT /v1/account/plan``, ``GET /v1/plans``
- ``catalog``: ``GET /v1/titles``, ``GET /v1/titles/{id}``, ``GET /v1/titles/{id}/availability``,
  ``POST /v1/titles`` (admin)
- ``playback``: ``POST /v1/playback``, ``DELETE /v1/playback/{session_id}``, ``POST /v1/heartbeat``
- ``realtime``: ``POST /v1/realtime/token`` (a viewer's token for the realtime gateway)
- ``fleet``: ``POST /v1/fleet/heartbeat`` (edges, each signing with its own key),
  ``GET /v1/fleet`` (admin); edge registrations: ``GET /v1/fleet/edges``,
  ``PUT`` / ``DELETE /v1/fleet/edges/{id}``, ``POST /v1/fleet/edges/{id}/rotate`` (admin);
  ``GET /v1/fleet/bgp`` (admin: the BGP sessions)
- ``qos``: ``GET /v1/qos`` (admin: quality of experience per edge, title, network)
- ``pages``: ``GET /metrics`` (admin, Prometheus), ``GET /healthz`` (each component's status),
  ``GET /watch`` (the browser player) and its assets under ``/static``

``deps`` holds what routes depend on (the control plane, the principal, the admin token and
an edge's signed heartbeat header); ``body`` reads JSON bodies. :func:`include` puts the
routes on the app in this order, which is also the order of the OpenAPI document.
"""

from __future__ import annotations

from typing import Final

from fastapi import APIRouter, FastAPI

from streamplane.control.routes import accounts, catalog, fleet, pages, playback, qos, realtime

__all__ = ["ROUTERS", "include"]

ROUTERS: Final[tuple[APIRouter, ...]] = (
    accounts.router,
    catalog.router,
    playback.router,
    realtime.router,
    fleet.router,
    qos.router,
    pages.router,
)


def include(app: FastAPI) -> None:
    """Put every router's routes on ``app``'s own router, as ``@app.post`` would have.

    Not ``app.include_router``: FastAPI (0.16x) keeps an included router as one nested route
    that re-derives its candidates on every request, about 40 us per request here against a
    route of the app's own; our routers have no prefix, dependencies or settings of their own
    that an include would add, so their routes are complete as they are.
    """
    for router in ROUTERS:
        app.router.routes.extend(router.routes)
