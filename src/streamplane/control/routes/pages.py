"""Operations and the pages a person opens: ``/healthz``, ``/watch`` and ``/static``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from streamplane.control.routes.deps import plane_of
from streamplane.web import PLAYER_PAGE, STATIC_DIR

__all__ = ["Health", "router", "static_files"]

router = APIRouter()


class Health(BaseModel):
    status: str  # ok, or degraded when a part the service needs is not working
    store: str  # ok, or "unavailable: " and why


@router.get(
    "/healthz",
    tags=["operations"],
    response_model=Health,
    responses={503: {"model": Health, "description": "a part is down: it says which"}},
)
async def healthz(request: Request) -> Health | JSONResponse:
    """Whether the service can serve: 200 if so, 503 naming what is down.

    The store is asked (``SELECT 1``, and for SQLite whether its file is still there and
    writable) at most once a second, waiting at most a second for the answer.
    """
    problem = await plane_of(request).store_problem()
    if problem is None:
        return Health(status="ok", store="ok")
    return JSONResponse({"status": "degraded", "store": problem}, status_code=503)


@router.get("/watch", include_in_schema=False)
async def watch() -> FileResponse:
    """The browser player (hls.js driven by streamplane's ABR, failover down the edges)."""
    return FileResponse(PLAYER_PAGE, media_type="text/html")


def static_files() -> StaticFiles:
    """The player's assets, mounted at ``/static`` (a router cannot carry a mount)."""
    return StaticFiles(directory=STATIC_DIR)
