"""Operations and the pages a person opens: ``/healthz``, ``/watch`` and ``/static``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from streamplane.web import PLAYER_PAGE, STATIC_DIR

__all__ = ["router", "static_files"]

router = APIRouter()


@router.get("/healthz", tags=["operations"])
async def healthz() -> dict[str, bool]:
    return {"ok": True}


@router.get("/watch", include_in_schema=False)
async def watch() -> FileResponse:
    """The browser player (hls.js driven by streamplane's ABR, failover down the edges)."""
    return FileResponse(PLAYER_PAGE, media_type="text/html")


def static_files() -> StaticFiles:
    """The player's assets, mounted at ``/static`` (a router cannot carry a mount)."""
    return StaticFiles(directory=STATIC_DIR)
