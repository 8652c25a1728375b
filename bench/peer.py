"""The peer the control plane's request paths are measured against: a bare FastAPI app whose
one route validates its body (a pydantic model) and writes one row, inline, in one write
transaction run the way the control plane runs its own (``Store.transaction``), served by
uvicorn with the control plane's server settings.

bench/playback.py (``POST /v1/playback``) and bench/telemetry.py (``POST /v1/heartbeat``) both
use it: each says its route, its body and the row it writes; everything else is the same, so
their peers differ only in that.
"""

# No ``from __future__ import annotations``: FastAPI reads the route's body model from the
# handler's annotation, and a postponed one would name a local it cannot resolve.

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Column

__all__ = ["peer_app", "serve_peer"]


def peer_app(
    url: str,
    *,
    path: str,
    body: type[BaseModel],
    table: str,
    columns: Callable[[], list[Column[Any]]],
    row: Callable[[Any], dict[str, Any]],
    answer: Callable[[dict[str, Any]], Any],
) -> Any:
    """The app: ``POST path`` takes a ``body``, writes ``row(body)`` into ``table`` (created
    at start with ``columns()``) and answers ``answer(row)``; ``GET /healthz`` answers."""
    from fastapi import FastAPI
    from sqlalchemy import MetaData, Table, insert

    from streamplane.control.store import Store

    store = Store(url)
    metadata = MetaData()
    statement = insert(Table(table, metadata, *columns()))

    async def lifespan(_app: FastAPI) -> Any:
        async with store.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        yield
        await store.dispose()

    app = FastAPI(lifespan=lifespan)

    async def handle(payload: BaseModel) -> Any:
        values = row(payload)
        await store.transaction(lambda conn: conn.execute(statement, values))
        return answer(values)

    handle.__annotations__["payload"] = body
    app.post(path)(handle)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    return app


def serve_peer(app: Any, port: int) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` as ``streamplane control`` serves its own."""
    import uvicorn

    from streamplane.control.app import server_config

    uvicorn.Server(server_config(app, "127.0.0.1", port)).run()
