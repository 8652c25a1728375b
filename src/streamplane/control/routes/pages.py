"""Operations and the pages a person opens: ``/metrics``, ``/healthz``, ``/watch``, ``/static``."""

from __future__ import annotations

from typing import Any, Final

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from streamplane.control.routes.deps import admin, plane_of
from streamplane.web import PLAYER_PAGE, STATIC_DIR

__all__ = ["router", "static_files"]

router = APIRouter()


_PROMETHEUS: Final = "text/plain; version=0.0.4; charset=utf-8"
_SEVERITY: Final = {"ok": 0, "degraded": 1, "down": 2}


@router.get("/metrics", tags=["operations"], dependencies=[Depends(admin)])
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text: BGP sessions, the czmap file, each edge's quality of experience and
    steering's demotions (admin: scrape with the token)."""
    plane = plane_of(request)
    return PlainTextResponse(plane.sources.metrics() + plane.qos.metrics(), media_type=_PROMETHEUS)


@router.get("/healthz", tags=["operations"])
async def healthz(request: Request) -> JSONResponse:
    """``{"status": ..., "<component>": {"status": ..., ...}}``: ``ok``; ``degraded`` (still
    serving: a BGP session not established, a czmap file refused), or ``down`` (503: the
    store is unavailable, so requests that need it fail).

    The store is asked (``SELECT 1``, and for SQLite whether its file is still there,
    writable, with room) at most once a second, waiting at most a second for the answer.
    """
    plane = plane_of(request)
    problem = await plane.store_problem()
    store: dict[str, Any] = {"status": "ok"}
    if problem is not None:
        store = {"status": "down", "problems": [problem]}
    return _health({"store": store, **plane.sources.health()})


def _health(components: dict[str, dict[str, Any]]) -> JSONResponse:
    """The worst component's status overall; 503 only when something is down."""
    status = max(
        (c["status"] for c in components.values()), key=_SEVERITY.__getitem__, default="ok"
    )
    return JSONResponse(
        {"status": status, **components}, status_code=503 if status == "down" else 200
    )


@router.get("/watch", include_in_schema=False)
async def watch() -> FileResponse:
    """The browser player (hls.js driven by streamplane's ABR, failover down the edges)."""
    return FileResponse(PLAYER_PAGE, media_type="text/html")


def static_files() -> StaticFiles:
    """The player's assets, mounted at ``/static`` (a router cannot carry a mount)."""
    return StaticFiles(directory=STATIC_DIR)
