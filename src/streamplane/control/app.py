"""The control plane's HTTP service: ``create_app(settings)`` returns the FastAPI app.

The routes live in ``streamplane.control.routes``, one router per domain (accounts, catalog,
playback, fleet, pages); they work on the :class:`ControlPlane` kept as ``app.state.plane``.
This module assembles them: the lifespan that starts and stops the plane, the body limit,
the error handlers and the OpenAPI document (OpenAPI at ``/docs`` and ``/openapi.json``).

Every refusal is JSON ``{"error": code, "detail": sentence, ...facts}``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from streamplane.config import Settings, SettingsError
from streamplane.control.errors import ApiError
from streamplane.control.middleware import BodyLimit
from streamplane.control.plane import Clock, ControlPlane
from streamplane.control.playback import PlaybackOut
from streamplane.control.routes import include, pages
from streamplane.control.routes.body import SCHEMA_REF
from streamplane.control.store import StoreUnavailable
from streamplane.edge import EdgeHeartbeat, HeartbeatReply
from streamplane.media import Title
from streamplane.steering import Steering, SteeringError
from streamplane.telemetry import HeartbeatRequest
from streamplane.telemetry.ingest import HeartbeatAnswer

if TYPE_CHECKING:
    import uvicorn

__all__ = ["ControlPlane", "create_app", "server_config"]

# Bodies that may be larger than the others: title documents and edge heartbeats (many titles).
_BULK_PATHS: Final = ("/v1/titles", "/v1/fleet/heartbeat")
# What a 503 for an unavailable store tells the client to wait before trying again, seconds.
RETRY_AFTER_S: Final = 2


def create_app(
    settings: Settings,
    *,
    clock: Clock = time.time,
    monotonic: Clock = time.monotonic,
    steering: Steering | None = None,
) -> FastAPI:
    """The control plane as an ASGI app. ``clock``/``monotonic`` are injectable for tests."""
    try:
        plane = ControlPlane(settings, clock=clock, monotonic=monotonic, steering=steering)
    except SettingsError:
        raise
    except (ValueError, SteeringError) as err:  # a bad database URL, czmap file, ...
        raise SettingsError(str(err)) from None
    c = settings.control

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await plane.start()
        try:
            yield
        finally:
            await plane.stop()

    app = FastAPI(
        title="streamplane control plane",
        version="1",
        description="Accounts, catalog, playback with ranked signed edges, and the fleet.",
        lifespan=lifespan,
    )
    app.state.plane = plane
    app.add_middleware(
        BodyLimit,
        limit=c.max_body_bytes,
        bulk_limit=c.max_bulk_body_bytes,
        bulk_paths=_BULK_PATHS,
    )
    _errors(app)
    include(app)
    app.mount("/static", pages.static_files(), name="static")
    _openapi_components(app)
    return app


def server_config(app: FastAPI, host: str, port: int, **options: Any) -> uvicorn.Config:
    """How ``streamplane control`` serves ``app`` with uvicorn.

    ``proxy_headers=False``: uvicorn would otherwise believe ``X-Forwarded-For`` from
    127.0.0.1 (its ``forwarded_allow_ips`` default) and hand the app that address as the
    client's. Who the client is is the app's decision, by ``control.trusted_proxies``.
    No per-request access log: it cost 2-5 % of the server's CPU under load.
    """
    import uvicorn

    options = {"log_level": "info", "access_log": False, **options}
    return uvicorn.Config(app, host=host, port=port, proxy_headers=False, **options)


def _openapi_components(app: FastAPI) -> None:
    """Add the msgspec contracts (title.json, the edge heartbeat, the playback answer) to the
    OpenAPI document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _, components = msgspec.json.schema_components(
                [
                    Title,
                    EdgeHeartbeat,
                    HeartbeatReply,
                    PlaybackOut,
                    HeartbeatRequest,
                    HeartbeatAnswer,
                ],
                ref_template=SCHEMA_REF,
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class ErrorResponse(JSONResponse):
    """A refusal's JSON, whatever text it quotes back.

    Bodies are read strictly (``routes/body.py``), so no request text should hold what UTF-8
    cannot encode; should one still be echoed (a lone surrogate in a validation error's
    ``input``), it is escaped (``\\ud800``) rather than failing the response with a 500.
    """

    def render(self, content: Any) -> bytes:
        try:
            return msgspec.json.encode(content)
        except (UnicodeEncodeError, TypeError):
            return json.dumps(content, ensure_ascii=True, default=str).encode()


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        wait = exc.extra.get("retry_after_s")
        if isinstance(wait, int | float):  # 429, 503: how long to wait, in whole seconds
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return ErrorResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_request: Request, _exc: StoreUnavailable) -> Response:
        # Why (hosts, files) is for the operator: the store logs it once an outage and
        # /healthz shows it. The client learns what is down and when to try again.
        return ErrorResponse(
            {
                "error": "store_unavailable",
                "detail": (
                    f"the control plane's database is unavailable; try again in {RETRY_AFTER_S} s"
                ),
                "retry_after_s": RETRY_AFTER_S,
            },
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        for e in errors:
            if e.get("type") == "json_invalid":
                why = (e.get("ctx") or {}).get("error", "")
                return ErrorResponse(
                    {
                        "error": "bad_json",
                        "detail": f"the request body is not valid JSON: {why}".rstrip(": "),
                    },
                    status_code=400,
                )
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors
        )
        return ErrorResponse(
            {"error": "invalid", "detail": detail, "errors": jsonable_encoder(errors)},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return ErrorResponse(
            {"error": code, "detail": str(exc.detail)},
            status_code=exc.status_code,
            headers=exc.headers,
        )
