"""The control plane's HTTP service: ``create_app(settings)`` returns the FastAPI app.

Routes (OpenAPI at ``/docs`` and ``/openapi.json``):

- accounts: ``POST /v1/accounts``, ``POST /v1/auth/login``, ``POST /v1/auth/refresh``,
  ``POST /v1/auth/logout``, ``GET /v1/account``, ``PUT /v1/account/plan``, ``GET /v1/plans``
- catalog: ``GET /v1/titles``, ``GET /v1/titles/{id}``, ``GET /v1/titles/{id}/availability``,
  ``POST /v1/titles`` (admin)
- playback: ``POST /v1/playback``, ``DELETE /v1/playback/{session_id}``, ``POST /v1/heartbeat``
- fleet: ``POST /v1/fleet/heartbeat`` (edges, each signing with its own key),
  ``GET /v1/fleet`` (admin); edge registrations: ``GET /v1/fleet/edges``,
  ``PUT`` / ``DELETE /v1/fleet/edges/{id}``, ``POST /v1/fleet/edges/{id}/rotate`` (admin)
- web: ``GET /watch`` (the browser player) and its assets under ``/static``

Every refusal is JSON ``{"error": code, "detail": sentence, ...facts}``.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures, whose
# annotations name dependencies local to create_app.
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import msgspec
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from streamplane.config import Settings, SettingsError
from streamplane.control.accounts import (
    AccountOut,
    Accounts,
    Credentials,
    PlanIn,
    Principal,
    RefreshIn,
    SignupIn,
    TokensOut,
)
from streamplane.control.catalog import Catalog, TitleInfo, check_title_id, summarise
from streamplane.control.errors import ApiError, forbidden, not_found, unauthorised
from streamplane.control.fleet import (
    EdgeRegistrationIn,
    EdgeRegistrationOut,
    EdgeRotateIn,
    Fleet,
    FleetPolicy,
    check_heartbeat,
    exclusion,
    settings_credentials,
    share,
    state,
)
from streamplane.control.playback import (
    HeartbeatOut,
    Playback,
    PlaybackIn,
    PlaybackOut,
    PlayerHeartbeatIn,
)
from streamplane.control.store import Store, migrate
from streamplane.edge import EdgeHeartbeat, HeartbeatReply
from streamplane.media import Title
from streamplane.steering import (
    BgpFeed,
    GeoLocator,
    RoutingTable,
    SiteInfo,
    Steering,
    SteeringError,
    load_czmap,
)
from streamplane.web import PLAYER_PAGE, STATIC_DIR

__all__ = ["ControlPlane", "create_app"]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
_T = TypeVar("_T")
_BULK_PATHS: Final = frozenset({"/v1/titles", "/v1/fleet/heartbeat"})
_SCHEMA_REF: Final = "#/components/schemas/{name}"


# -- response models ---------------------------------------------------------------------------


class RungOut(BaseModel):
    id: str
    codec: str
    codec_string: str
    width: int
    height: int
    average_bitrate_bps: int
    peak_bitrate_bps: int
    vmaf: float


class TitleOut(BaseModel):
    id: str
    name: str
    duration_s: float
    width: int
    height: int
    hls: str
    dash: str
    artwork: list[str]
    rungs: list[RungOut]
    plans: list[str]


class TitleList(BaseModel):
    total: int
    limit: int
    offset: int
    titles: list[TitleOut]


class Holder(BaseModel):
    edge_id: str
    site: str | None
    state: str  # up, slow-start, stale, unhealthy, draining, overloaded, unknown
    offered: bool
    sources: list[str]  # heartbeat (it reports holding it), placement (placement.json says so)


class Availability(BaseModel):
    title: str
    offered: int  # edges a playback would be offered now
    edges: list[Holder]
    origin: bool  # the origin backs every playback as the last resort


class EdgeStatus(BaseModel):
    edge_id: str
    site: str
    base_url: str
    state: str
    offered: bool
    why_not: str | None
    load: float
    share: float
    throughput_bps: float
    capacity_bps: float
    connections: int
    disk_used_bytes: int
    disk_total_bytes: int
    titles: int
    heartbeat_age_s: float
    up_since: float | None


class FleetOut(BaseModel):
    edges: list[EdgeStatus]
    offered: int


class AccountScreens(BaseModel):
    limit: int
    in_use: int
    sessions: list[dict[str, Any]]


class AccountDetail(BaseModel):
    account_id: str
    email: str
    plan: str
    screens: AccountScreens


# -- the service -------------------------------------------------------------------------------


class ControlPlane:
    """Everything a request needs, built from the settings; started by the app's lifespan."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        steering: Steering | None = None,
    ) -> None:
        c = settings.control
        self.settings = settings
        self.clock = clock
        self.monotonic = monotonic
        self.store = Store(c.database_url, schema=c.database_schema)
        jwt_key = bytes.fromhex(c.jwt_secret) if c.jwt_secret else secrets.token_bytes(32)
        self.accounts = Accounts(self.store, c, jwt_key)
        self.catalog = Catalog(self.store)
        self.fleet = Fleet(
            self.store,
            FleetPolicy.from_settings(c),
            Path(c.placement) if c.placement else None,
            credentials=settings_credentials(c),
        )
        sites: dict[str, SiteInfo] = {}
        table = RoutingTable()
        if c.czmap:
            routes, sites = load_czmap(Path(c.czmap))
            table.replace(routes)
        self.table = table
        self.steering = (
            steering if steering is not None else Steering(table, GeoLocator(), sites=sites)
        )
        self.playback = Playback(
            self.store,
            c,
            self.fleet,
            self.steering,
            sites,
            settings.tokens.signing_key(),
            settings.tokens.ttl_s,
            self.accounts.session_token,
        )
        self._bgp: list[BgpFeed] = []

    async def start(self) -> None:
        c = self.settings.control
        await migrate(self.store)
        titles = await self.catalog.scan(Path(c.catalog_dir), self.clock())
        if titles:
            log.info("catalog: %d titles from %s", len(titles), c.catalog_dir)
        await self.fleet.start(self.monotonic())
        for peer in c.bgp:
            feed = BgpFeed(self.table, peer)
            await feed.start()
            self._bgp.append(feed)

    async def stop(self) -> None:
        for feed in self._bgp:
            await feed.stop()
        await self.store.dispose()


def _bearer(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise unauthorised("send Authorization: Bearer <access token>")
    return credentials.credentials


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
    )
    _errors(app)

    bearer = HTTPBearer(auto_error=False, description="an access token from /v1/auth/login")
    admin_bearer = HTTPBearer(
        auto_error=False, scheme_name="admin", description="control.admin_token"
    )
    edge_auth = APIKeyHeader(
        name="Authorization",
        auto_error=False,
        scheme_name="edge",
        description="StreamplaneEdge id=<edge id>, ts=<epoch ms>, sig=<HMAC-SHA256 hex> with "
        "the edge's own key (streamplane.edge.report)",
    )
    Creds = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]

    # The dependencies are async: a plain ``def`` would be run on a worker thread, a
    # hand-off (and a wait for the GIL) per request for microseconds of work.
    async def principal(credentials: Creds) -> Principal:
        return plane.accounts.principal(_bearer(credentials), clock())

    async def admin(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_bearer)],
    ) -> None:
        if not c.admin_token:
            raise forbidden("admin routes are off: set control.admin_token", "admin_disabled")
        token = _bearer(credentials)
        if not hmac.compare_digest(token.encode(), c.admin_token.encode()):
            raise forbidden("not the admin token")

    Me = Annotated[Principal, Depends(principal)]

    # -- accounts --------------------------------------------------------------------------

    @app.post("/v1/accounts", status_code=201, response_model=AccountOut, tags=["accounts"])
    async def sign_up(body: SignupIn) -> AccountOut:
        """Create an account on a plan (default: ``control.default_plan``)."""
        return await plane.accounts.sign_up(body, clock())

    @app.post("/v1/auth/login", response_model=TokensOut, tags=["accounts"])
    async def log_in(body: Credentials) -> TokensOut:
        """Exchange email and password for an access token and a refresh token."""
        return await plane.accounts.log_in(body, clock())

    @app.post("/v1/auth/refresh", response_model=TokensOut, tags=["accounts"])
    async def refresh(body: RefreshIn) -> TokensOut:
        """Spend a refresh token for a new pair; a token presented twice revokes its login."""
        return await plane.accounts.refresh(body, clock())

    @app.post("/v1/auth/logout", status_code=204, tags=["accounts"])
    async def log_out(body: RefreshIn) -> Response:
        """Revoke the refresh token and every token rotated from the same login."""
        await plane.accounts.log_out(body)
        return Response(status_code=204)

    @app.get("/v1/account", response_model=AccountDetail, tags=["accounts"])
    async def account(me: Me) -> dict[str, Any]:
        """The account, its plan, and the screens in use now."""
        return await plane.accounts.describe(me.account_id, clock())

    @app.put("/v1/account/plan", response_model=AccountOut, tags=["accounts"])
    async def change_plan(body: PlanIn, me: Me) -> AccountOut:
        return await plane.accounts.change_plan(me.account_id, body)

    @app.get("/v1/plans", tags=["accounts"])
    async def plans() -> dict[str, dict[str, int]]:
        """Plan name -> its concurrent-screens limit."""
        return {name: {"screens": p.screens} for name, p in c.plans.items()}

    # -- catalog ---------------------------------------------------------------------------

    @app.get("/v1/titles", response_model=TitleList, tags=["catalog"])
    async def list_titles(
        q: Annotated[str | None, Query(max_length=128, description="part of a name")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> dict[str, Any]:
        """Titles by name; ``q`` keeps those whose name or id contains it (any case)."""
        total, titles = await plane.catalog.search(q, limit, offset, monotonic())
        return {
            "total": total,
            "limit": limit,
            "offset": offset,
            "titles": [t.public() for t in titles],
        }

    async def _title(title_id: str) -> TitleInfo:
        info = await plane.catalog.get(title_id, monotonic())
        if info is None:
            raise not_found(f"no title {title_id!r} in the catalog", "unknown_title")
        return info

    @app.get("/v1/titles/{title_id}", response_model=TitleOut, tags=["catalog"])
    async def get_title(title_id: str) -> dict[str, Any]:
        return (await _title(title_id)).public()

    @app.get("/v1/titles/{title_id}/availability", response_model=Availability, tags=["catalog"])
    async def availability(title_id: str) -> Availability:
        """Which edges hold the title (by their heartbeats and by placement.json), and state."""
        await _title(title_id)
        await plane.fleet.refresh(monotonic())
        now = clock()
        holders = []
        for edge_id, (edge, sources) in sorted(plane.fleet.holders(title_id).items()):
            if edge is None:
                holders.append(
                    Holder(
                        edge_id=edge_id,
                        site=None,
                        state="unknown",
                        offered=False,
                        sources=sources,
                    )
                )
            else:
                why = exclusion(edge, now, plane.fleet.policy)
                holders.append(
                    Holder(
                        edge_id=edge_id,
                        site=edge.site,
                        state=state(edge, now, plane.fleet.policy),
                        offered=why is None,
                        sources=sources,
                    )
                )
        return Availability(
            title=title_id,
            offered=sum(h.offered for h in holders),
            edges=holders,
            origin=bool(c.origin_url),
        )

    @app.post(
        "/v1/titles",
        status_code=201,
        response_model=TitleOut,
        tags=["catalog"],
        dependencies=[Depends(admin)],
        openapi_extra=_body_schema("Title"),
    )
    async def register_title(
        request: Request,
        plans: Annotated[
            list[str] | None, Query(description="plans entitled to it; none: every plan")
        ] = None,
        title_id: Annotated[
            str | None, Query(alias="id", description="default: the document's title")
        ] = None,
    ) -> dict[str, Any]:
        """Register (or replace) a title from its title.json document (admin)."""
        doc = _decode(await request.body(), Title)
        for p in plans or ():
            if p not in c.plans:
                raise ApiError(422, "unknown_plan", f"no plan {p!r}")
        info = summarise(check_title_id(title_id or doc.title), doc, sorted(set(plans or ())))
        await plane.catalog.register(info, clock())
        return info.public()

    # -- playback --------------------------------------------------------------------------

    @app.post("/v1/playback", response_model=PlaybackOut, tags=["playback"])
    async def start_playback(body: PlaybackIn, request: Request, me: Me) -> PlaybackOut:
        """Start a session: ranked edges with signed HLS and DASH URLs, heartbeat, resume.

        Refusals: 404 unknown title, 403 the plan does not include it, 503 no healthy edge
        holds it (and no origin is configured), 409 the plan's screens are all in use.
        """
        title = await _title(body.title)
        await plane.fleet.refresh(monotonic())
        return await plane.playback.start(
            me.account_id, title, body, _client_address(request), clock()
        )

    @app.delete("/v1/playback/{session_id}", status_code=204, tags=["playback"])
    async def stop_playback(session_id: str, me: Me) -> Response:
        """End a session and free its screen now rather than at its heartbeat timeout."""
        await plane.playback.stop(me.account_id, session_id)
        return Response(status_code=204)

    @app.post("/v1/heartbeat", response_model=HeartbeatOut, tags=["playback"])
    async def player_heartbeat(body: PlayerHeartbeatIn, credentials: Creds) -> HeartbeatOut:
        """A player's batched events: keep the screen, record the position (latest wins).

        Authorise with the session's heartbeat token (from the playback answer) or an access
        token of the same account. 410 if the session already ended or timed out.
        """
        now = clock()
        claims = plane.accounts.claims(_bearer(credentials), now)
        if claims["typ"] == "session" and claims.get("sid") != body.session_id:
            raise forbidden("this heartbeat token belongs to another session")
        return await plane.playback.heartbeat(claims["sub"], body, now)

    # -- fleet -----------------------------------------------------------------------------

    @app.post(
        "/v1/fleet/heartbeat",
        response_model=None,
        tags=["fleet"],
        openapi_extra=_body_schema("EdgeHeartbeat", reply="HeartbeatReply"),
    )
    async def edge_heartbeat(
        request: Request,
        authorization: Annotated[str | None, Depends(edge_auth)],
    ) -> Response:
        """An edge's heartbeat (``streamplane.edge.EdgeHeartbeat``, unknown fields refused),
        signed with the edge's own key: 401 if it is not, 403 if it claims another edge's id,
        base URL or site."""
        body = await request.body()
        now = clock()
        await plane.fleet.refresh(monotonic())
        signed = plane.fleet.authenticate(authorization, body, now)
        hb = check_heartbeat(_decode(body, EdgeHeartbeat))
        await plane.fleet.heartbeat(hb, now, signed)
        return Response(
            msgspec.json.encode(HeartbeatReply(interval_s=c.edge_heartbeat_s)),
            media_type="application/json",
        )

    @app.get("/v1/fleet", response_model=FleetOut, tags=["fleet"], dependencies=[Depends(admin)])
    async def fleet() -> FleetOut:
        """Every edge that ever heartbeated: state, load, slow-start share (admin)."""
        await plane.fleet.refresh(monotonic())
        now = clock()
        policy = plane.fleet.policy
        edges = []
        for e in plane.fleet.edges():
            why = exclusion(e, now, policy)
            edges.append(
                EdgeStatus(
                    edge_id=e.edge_id,
                    site=e.site,
                    base_url=e.base_url,
                    state=state(e, now, policy),
                    offered=why is None,
                    why_not=why,
                    load=e.load,
                    share=share(e.up_since, now, policy) if why is None else 0.0,
                    throughput_bps=e.throughput_bps,
                    capacity_bps=e.capacity_bps,
                    connections=e.connections,
                    disk_used_bytes=e.disk_used_bytes,
                    disk_total_bytes=e.disk_total_bytes,
                    titles=len(e.titles),
                    heartbeat_age_s=now - e.received_at,
                    up_since=e.up_since,
                )
            )
        return FleetOut(edges=edges, offered=sum(e.offered for e in edges))

    @app.get(
        "/v1/fleet/edges",
        response_model=list[EdgeRegistrationOut],
        tags=["fleet"],
        dependencies=[Depends(admin)],
    )
    async def edge_registrations() -> list[EdgeRegistrationOut]:
        """The edges allowed to heartbeat, and the base URL and site each may claim (admin)."""
        await plane.fleet.refresh(monotonic())
        return plane.fleet.registrations()

    @app.put(
        "/v1/fleet/edges/{edge_id}",
        response_model=EdgeRegistrationOut,
        tags=["fleet"],
        dependencies=[Depends(admin)],
        responses={201: {"model": EdgeRegistrationOut, "description": "registered"}},
    )
    async def register_edge(
        edge_id: str, body: EdgeRegistrationIn, response: Response
    ) -> EdgeRegistrationOut:
        """Register an edge, or change its base URL or site (admin). Without ``key``, a new
        edge gets a generated one, shown in this answer only; a registered edge keeps its own."""
        created, out = await plane.fleet.register(edge_id, body, clock())
        response.status_code = 201 if created else 200
        return out

    @app.post(
        "/v1/fleet/edges/{edge_id}/rotate",
        response_model=EdgeRegistrationOut,
        tags=["fleet"],
        dependencies=[Depends(admin)],
    )
    async def rotate_edge_key(edge_id: str, body: EdgeRotateIn) -> EdgeRegistrationOut:
        """A new key for the edge, shown in this answer only (admin)."""
        return await plane.fleet.rotate(edge_id, body, clock())

    @app.delete(
        "/v1/fleet/edges/{edge_id}",
        status_code=204,
        tags=["fleet"],
        dependencies=[Depends(admin)],
    )
    async def unregister_edge(edge_id: str) -> Response:
        """Revoke an edge: its heartbeats are refused, and it is offered no more (admin)."""
        await plane.fleet.unregister(edge_id)
        return Response(status_code=204)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    # -- web pages -------------------------------------------------------------------------

    @app.get("/watch", include_in_schema=False)
    async def watch() -> FileResponse:
        """The browser player (hls.js driven by streamplane's ABR, failover down the edges)."""
        return FileResponse(PLAYER_PAGE, media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    _openapi_components(app)
    return app


# -- helpers -----------------------------------------------------------------------------------


def _client_address(request: Request) -> str:
    host = request.client.host if request.client else ""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return "0.0.0.0"  # unknown: steering falls back to geography the client sent, or none


def _decode(body: bytes, kind: type[_T]) -> _T:
    if not body:
        raise ApiError(400, "bad_json", "the request body is empty; send a JSON document")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as err:
        try:  # msgspec validates while it parses: tell truncated JSON from a wrong shape
            msgspec.json.decode(body)
        except msgspec.DecodeError as syntax:
            raise ApiError(
                400, "bad_json", f"the request body is not valid JSON: {syntax}"
            ) from None
        raise ApiError(422, "invalid", f"{kind.__name__}: {err}") from None
    except msgspec.DecodeError as err:
        raise ApiError(400, "bad_json", f"the request body is not valid JSON: {err}") from None


def _body_schema(name: str, reply: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _SCHEMA_REF.format(name=name)}}},
        }
    }
    if reply is not None:
        extra["responses"] = {
            "200": {
                "description": "accepted",
                "content": {
                    "application/json": {"schema": {"$ref": _SCHEMA_REF.format(name=reply)}}
                },
            }
        }
    return extra


def _openapi_components(app: FastAPI) -> None:
    """Add the msgspec contracts (title.json, the edge heartbeat) to the OpenAPI document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _, components = msgspec.json.schema_components(
                [Title, EdgeHeartbeat, HeartbeatReply], ref_template=_SCHEMA_REF
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        for e in errors:
            if e.get("type") == "json_invalid":
                why = (e.get("ctx") or {}).get("error", "")
                return JSONResponse(
                    {
                        "error": "bad_json",
                        "detail": f"the request body is not valid JSON: {why}".rstrip(": "),
                    },
                    status_code=400,
                )
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors
        )
        return JSONResponse(
            {"error": "invalid", "detail": detail, "errors": jsonable_encoder(errors)},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": code, "detail": str(exc.detail)},
            status_code=exc.status_code,
            headers=exc.headers,
        )


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (``bulk_limit`` for title and edge uploads)
    with 413, whether or not they declare a Content-Length, before any handler reads them."""

    def __init__(self, app: ASGIApp, limit: int, bulk_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.bulk_limit = bulk_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.bulk_limit if scope.get("path") in _BULK_PATHS else self.limit
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _too_large(send, 400, "the Content-Length header is not a number")
                    return
                if declared > limit:
                    await _too_large(send, 413, _over(limit))
                    return
        # Read the body up front (it is bounded) so that a lying or absent Content-Length
        # cannot stream past the limit into a handler.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, 413, _over(limit))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _over(limit: int) -> str:
    return f"the request body is over the limit of {limit} bytes"


async def _too_large(send: Send, status: int, detail: str) -> None:
    error = "body_too_large" if status == 413 else "bad_request"
    body = msgspec.json.encode({"error": error, "detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
