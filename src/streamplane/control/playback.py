"""Playback: start a session against the screens limit, answer with ranked, signed edges.

A start is one transaction (``claim_screen``): lock the account row (``FOR UPDATE`` on
PostgreSQL; on SQLite the transaction began IMMEDIATE) reading its plan and the resume
position; then give up the same device's earlier screen, count the screens in use (screens
whose heartbeats stopped ``screen_timeout_s`` ago are not counted) and, if one is free,
insert the new one: four statements on SQLite, and on PostgreSQL one call of a database
function that runs them (one round trip, the row lock held only while they run). Each reads
only live sessions, through partial indexes: an account's history never slows its starts.
The plan must entitle the title and someone must be able to serve it. Refusals, in this
order: 404 unknown title, 403 not entitled, 503 no healthy edge holds it and no origin is
configured, 409 screens limit reached. Everything else happens outside the transaction: the
candidate edges are taken from the in-process fleet before it, steering ranks the best few
after the commit, and one EdgeAuth token (its ACL is the title's path, so every edge takes
it) and the session's JWT are signed then. Sessions not heard from for
``screen_retention_s`` are deleted by a purge that starts set off once a minute.

Player heartbeats keep a screen alive and record where the viewer is; they go through the
telemetry stream and are written behind (``heartbeats.py``). A start tells ingest about its
session, and takes the resume position ingest has seen if it is newer than the store's."""

from __future__ import annotations

import logging
import math
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

import msgspec
from pydantic import BaseModel, Field
from sqlalchemy import (
    Connection,
    Float,
    Integer,
    String,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from streamplane.config import ControlSettings, Plan
from streamplane.control.catalog import TitleInfo
from streamplane.control.errors import ApiError, not_found, unauthorised
from streamplane.control.fleet import Fleet, candidates
from streamplane.control.heartbeats import Heartbeats
from streamplane.control.realtime import RealtimeInfo
from streamplane.control.store import (
    Account,
    Resume,
    Screen,
    Script,
    Store,
    StoredText,
)
from streamplane.edge import sign, signed_url
from streamplane.live import EventPlan, warm_edges
from streamplane.steering import (
    DEFAULT_LIMIT,
    CandidateSet,
    Client,
    RankedEdge,
    SiteInfo,
    Steering,
)

__all__ = [
    "Claimed",
    "EdgeOut",
    "Playback",
    "PlaybackIn",
    "PlaybackOut",
    "claim_screen",
    "new_session_id",
    "signed_urls",
]

log = logging.getLogger(__name__)

_MAX_POSITION_S: Final = 1e7
_OFFER_TTL_S: Final = 1.0  # how much older than their heartbeats steering's loads may be
_OFFERS_KEPT: Final = 10_000  # titles with prepared candidates

# The start's statements, built once and compiled once per store (``Store.prepare``). Every
# filter on screens is ``NOT ended`` so that it goes through the partial indexes of live
# sessions (see ``Screen``): a start never reads an account's ended screens.
_LOCK_ACCOUNT: Final = (
    select(
        Account.plan,
        select(Resume.position_s)
        .where(Resume.account_id == bindparam("b_account"), Resume.title == bindparam("b_title"))
        .scalar_subquery(),
    )
    .where(Account.id == bindparam("b_account"))
    .with_for_update(of=Account)
)
_END_DEVICE: Final = (
    update(Screen)
    .where(
        Screen.account_id == bindparam("b_account"),
        Screen.device == bindparam("b_device"),
        ~Screen.ended,
    )
    .values(ended=True)
)
_COUNT_SCREENS: Final = (
    select(func.count())
    .select_from(Screen)
    .where(
        Screen.account_id == bindparam("b_account"),
        ~Screen.ended,
        Screen.last_seen >= bindparam("b_cutoff", type_=Float),
    )
)
_INSERT_SCREEN: Final = insert(Screen).values(
    id=bindparam("b_id", type_=String),
    account_id=bindparam("b_account", type_=String),
    title=bindparam("b_title", type_=String),
    device=bindparam("b_device", type_=String),
    started_at=bindparam("b_now", type_=Float),
    last_seen=bindparam("b_now", type_=Float),
    ended=False,
)


# On PostgreSQL the start's statements run in the database (migration 0003 defines the
# function): one round trip, and the account's row locked only while they run.
_CLAIM_ON_POSTGRES: Final = text(
    "SELECT o_plan, o_position, o_in_use FROM streamplane_claim_screen("
    ":b_account, :b_title, :b_device, :b_id, :b_now, :b_cutoff, :b_plans, :b_limits)"
).bindparams(
    bindparam("b_account", type_=String),
    bindparam("b_title", type_=String),
    bindparam("b_device", type_=String),
    bindparam("b_id", type_=String),
    bindparam("b_now", type_=Float),
    bindparam("b_cutoff", type_=Float),
    bindparam("b_plans", type_=ARRAY(String)),
    bindparam("b_limits", type_=ARRAY(Integer)),
)

# Sessions not heard from for the retention, deleted a batch per transaction.
_PURGE_BATCH: Final = 2000
_PURGE_EVERY_S: Final = 60.0
_PURGE: Final = delete(Screen).where(
    Screen.id.in_(
        select(Screen.id)
        .where(Screen.last_seen < bindparam("b_before", type_=Float))
        .limit(_PURGE_BATCH)
        .scalar_subquery()
    )
)


class _Statements:
    """The start's statements compiled for one store."""

    def __init__(self, store: Store) -> None:
        self.lock_account = store.prepare(_LOCK_ACCOUNT)
        self.end_device = store.prepare(_END_DEVICE)
        self.count_screens = store.prepare(_COUNT_SCREENS)
        self.insert_screen = store.prepare(_INSERT_SCREEN)
        self.claim_on_postgres = (
            store.prepare(_CLAIM_ON_POSTGRES, whole=True) if store.is_postgres else None
        )


class Claimed(NamedTuple):
    """What a start's transaction decided: a refusal, or the plan, screens in use and the
    resume position."""

    refusal: ApiError | None
    plan: Plan | None = None
    in_use: int = 0
    resume_s: float = 0.0


def claim_screen(
    statements: _Statements,
    params: dict[str, Any],
    plans: Mapping[str, Plan],
    title: TitleInfo,
    servable: bool,
) -> Script[Claimed]:
    """The whole start transaction, as statements: nothing else happens while locks are held.

    ``params`` carries ``b_account``, ``b_title``, ``b_device``, ``b_id`` (the new session),
    ``b_now`` and ``b_cutoff`` (screens last heard from before it are free). Lock the account
    row (and read its plan and the title's resume position); refuse a plan without the
    title, a title no one can serve; give up the device's earlier screen; count the screens in
    use; take one if one is free. On PostgreSQL one statement does it all, in the database
    (``streamplane_claim_screen``), told the limit of each plan it may take a screen for.
    """
    in_use: int | None = None
    if statements.claim_on_postgres is not None:
        limits = {
            name: plan.screens
            for name, plan in plans.items()
            if servable and plan.screens > 0 and title.entitles(name)
        }
        claim = {**params, "b_plans": list(limits), "b_limits": list(limits.values())}
        rows = yield statements.claim_on_postgres, claim
        if rows:
            plan_name, position, counted = rows[0]
            in_use = None if counted is None else int(counted)
    else:
        rows = yield statements.lock_account, params
        if rows:
            plan_name, position = rows[0]
    if not rows:
        return Claimed(unauthorised("the account no longer exists"))
    plan = plans.get(plan_name)
    if plan is None or plan.screens <= 0 or not title.entitles(plan_name):
        return Claimed(
            ApiError(
                403,
                "not_entitled",
                f"plan {plan_name!r} does not include {title.id!r}"
                + (f"; plans that do: {', '.join(title.plans)}" if title.plans else ""),
                plan=plan_name,
            )
        )
    if not servable:
        return Claimed(
            ApiError(
                503,
                "no_edge",
                f"no healthy edge holds {title.id!r} now; try again shortly",
                title=title.id,
            )
        )
    if in_use is None:
        # The same device starting again gives its screen up first; then a screen is taken
        # if one is free.
        yield statements.end_device, params
        rows = yield statements.count_screens, params
        in_use = int(rows[0][0])
        if in_use < plan.screens:
            yield statements.insert_screen, params
    if in_use >= plan.screens:
        return Claimed(
            ApiError(
                409,
                "screens_limit",
                f"screens limit reached: plan {plan_name!r} allows {plan.screens}"
                f" screen{'s' if plan.screens != 1 else ''} at once and {in_use} in use;"
                " stop playback on another device or wait for it to time out",
                limit=plan.screens,
                in_use=in_use,
                plan=plan_name,
            ),
            None,
            in_use,
        )
    return Claimed(None, plan, in_use + 1, 0.0 if position is None else float(position))


def new_session_id(now: float, random74: int) -> str:
    """A session id: a UUIDv7 (RFC 9562) of ``now`` to the millisecond and 74 random bits.

    Time-ordered, so that each new session's key lands at the end of the screens' primary-key
    index, in pages a commit and a checkpoint write anyway; a random UUIDv4 dirtied a page
    anywhere in it per start, most of a WAL checkpoint's writes once an index outgrows the
    cache. The random bits keep ids unguessable; none of them is a credential.
    """
    ms = int(now * 1000) & ((1 << 48) - 1)
    value = (
        (ms << 80)
        | (0x7 << 76)  # version 7
        | (((random74 >> 62) & 0xFFF) << 64)  # 12 random bits
        | (0b10 << 62)  # the RFC 4122 variant
        | (random74 & ((1 << 62) - 1))  # 62 random bits
    )
    return str(uuid.UUID(int=value))


def signed_urls(bases: Sequence[str], path: str, token: str) -> list[str]:
    """``signed_url(base, path, token)`` for every base, the way a start needs them.

    The quoted path and token are the same for every edge, so they are made once (by
    ``signed_url`` itself, for the first base) and each base only checked and prefixed:
    a tenth of the work for the dozen URLs of an answer.
    """
    if not bases:
        return []
    first = signed_url(bases[0], path, token)
    tail = first[len(_scheme_host(bases[0])) :]
    return [first, *(_scheme_host(base) + tail for base in bases[1:])]


def _scheme_host(base: str) -> str:
    """``scheme://host[:port]`` of ``base``, refused as ``signed_url`` refuses it."""
    parts = urlsplit(base)
    if (
        not parts.scheme
        or not parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"base must be scheme://host[:port] only, not {base!r}")
    return f"{parts.scheme}://{parts.netloc}"


class PlaybackIn(BaseModel):
    title: StoredText = Field(min_length=1, max_length=128, examples=["demo-mix"])
    device: StoredText = Field(
        min_length=1,
        max_length=128,
        description="A stable id of the device; a device starting again replaces its screen",
    )
    lat: float | None = Field(default=None, ge=-90, le=90, description="the client's, if known")
    lon: float | None = Field(default=None, ge=-180, le=180)


class EdgeOut(msgspec.Struct, kw_only=True):
    edge_id: str
    base_url: str
    rank: int
    reason: str
    hls: str
    dash: str
    load: float
    share: float
    last_resort: bool = False


class HeartbeatInfo(msgspec.Struct, kw_only=True):
    url: str
    interval_s: float
    token: str  # Bearer token for POST /v1/heartbeat, good for this session only


class ScreensOut(msgspec.Struct, kw_only=True):
    in_use: int
    limit: int


class PlaybackOut(msgspec.Struct, kw_only=True):
    """The answer to a start, encoded with msgspec (a tenth of what validating and
    serialising it through pydantic took on every start)."""

    session_id: str
    title: str
    hls: str  # on the best edge
    dash: str
    edges: list[EdgeOut]
    token_expires_at: int
    heartbeat: HeartbeatInfo
    resume_position_s: float
    screens: ScreensOut
    realtime: RealtimeInfo | None = None  # the event's chat, counts and live state
    live: bool = False  # a live channel: play at the live edge, no resume


class Playback:
    def __init__(
        self,
        store: Store,
        settings: ControlSettings,
        fleet: Fleet,
        steering: Steering,
        sites: dict[str, SiteInfo],
        signing_key: tuple[str, bytes],
        token_ttl_s: int,
        session_token: Callable[[str, str, int], str],
    ) -> None:
        if settings.screen_retention_s < settings.screen_timeout_s:
            raise ValueError(
                f"control.screen_retention_s ({settings.screen_retention_s:g}) must be at least"
                f" control.screen_timeout_s ({settings.screen_timeout_s:g}): a session still"
                " holding its screen would be deleted"
            )
        self._store = store
        self._settings = settings
        self._fleet = fleet
        self._steering = steering
        self.sites = sites
        self._kid, self._key = signing_key
        self._ttl = token_ttl_s
        self._session_token = session_token
        self.heartbeats: Heartbeats | None = None  # set by the control plane
        # the scheduled events' plans (set by the control plane): a channel whose event is
        # warming or live is offered from the edges its plan chose
        self.live_plans: Callable[[], Sequence[EventPlan]] = list
        self.heartbeat_url = settings.base_url() + "/v1/heartbeat"
        self._statements = _Statements(store)
        self._purge_due = -math.inf  # when a start next sets off a purge
        self._latest = -math.inf  # the latest start's clock
        self._purge_again = False
        # title -> (fleet generation, built at, sites, prepared candidates)
        self._offers: dict[str, tuple[int, float, dict[str, SiteInfo], CandidateSet]] = {}

    def _offered(self, title: str, now: float) -> CandidateSet:
        """The offerable holders of ``title``, grouped for steering once per fleet change.

        Rebuilt when the fleet's generation moves (holders, health, draining, overload,
        recovery) and at least every ``_OFFER_TTL_S`` of ``now``, so loads, slow-start shares
        and missed heartbeats are at most that much older than the heartbeats themselves.
        """
        known = self._offers.get(title)
        generation = self._fleet.generation
        if (
            known is not None
            and known[0] == generation
            and known[2] is self.sites
            and 0.0 <= now - known[1] < _OFFER_TTL_S
        ):
            return known[3]
        live = title in self._settings.live_channels
        holders = self._fleet.serving() if live else self._fleet.holding(title)
        if live:
            placed = warm_edges(self.live_plans(), title, now)
            if placed is not None and any(e.edge_id in placed for e in holders):
                holders = [e for e in holders if e.edge_id in placed]
        offered = self._steering.prepare(candidates(holders, now, self._fleet.policy, self.sites))
        if len(self._offers) >= _OFFERS_KEPT:
            self._offers.clear()
        self._offers[title] = (generation, now, self.sites, offered)
        return offered

    async def start(
        self, account_id: str, title: TitleInfo, body: PlaybackIn, address: str, now: float
    ) -> PlaybackOut:
        offered = self._offered(title.id, now)
        origin = self._settings.origin_url.rstrip("/")
        session_id = new_session_id(now, secrets.randbits(74))
        params = {
            "b_account": account_id,
            "b_title": title.id,
            "b_device": body.device,
            "b_id": session_id,
            "b_now": now,
            "b_cutoff": now - self._settings.screen_timeout_s,
        }
        script = claim_screen(
            self._statements, params, self._settings.plans, title, bool(offered or origin)
        )
        # A refusal is returned, not raised, so that the device's earlier screen stays given
        # up (committed) even when the start is refused.
        refusal, plan, in_use, resume = await self._store.run(script)
        self._latest = max(self._latest, now)
        if now >= self._purge_due:
            self._purge_due = now + _PURGE_EVERY_S
            if not self._store.housekeep("screen purge", lambda: self.purge(now)):
                self._purge_again = True  # the one running goes on to this start's clock
        if refusal is not None:
            raise refusal
        assert plan is not None
        if self.heartbeats is not None:
            if self.heartbeats.ingest is not None:
                self.heartbeats.ingest.started(session_id, account_id, title.id, body.device, now)
            seen = self.heartbeats.resume(account_id, title.id)
            if seen is not None:  # ingested, perhaps not yet written
                resume = seen.position_s

        ranked: Sequence[RankedEdge] = ()
        if offered:
            client = Client(address=address, lat=body.lat, lon=body.lon)
            ranked = self._steering.rank(client, title.id, session_id, offered, limit=DEFAULT_LIMIT)
        expiry = int(now) + self._ttl
        token = sign(
            key_id=self._kid,
            key=self._key,
            acl=[f"/{title.id}/*"],
            expiry=expiry,
            session_id=session_id,
        )
        shares = {c.edge_id: c.share for c in offered}
        hls_path = f"/{title.id}/{title.hls}"
        dash_path = f"/{title.id}/{title.dash}"
        bases = [r.base_url for r in ranked]
        edges = [
            EdgeOut(
                edge_id=r.edge_id,
                base_url=r.base_url,
                rank=r.rank,
                reason=r.reason,
                hls=hls,
                dash=dash,
                load=r.load,
                share=shares.get(r.edge_id, 1.0),
            )
            for r, hls, dash in zip(
                ranked,
                signed_urls(bases, hls_path, token),
                signed_urls(bases, dash_path, token) if title.dash else [""] * len(bases),
                strict=True,
            )
        ]
        if origin:
            edges.append(
                EdgeOut(
                    edge_id="origin",
                    base_url=origin,
                    rank=len(edges) + 1,
                    reason=(
                        "last resort: the origin, after every edge"
                        if edges
                        else f"last resort: no healthy edge holds {title.id!r}, so the origin"
                    ),
                    hls=signed_url(origin, hls_path, token),
                    dash=signed_url(origin, dash_path, token) if title.dash else "",
                    load=0.0,
                    share=1.0,
                    last_resort=True,
                )
            )
        return PlaybackOut(
            session_id=session_id,
            title=title.id,
            hls=edges[0].hls,
            dash=edges[0].dash,
            edges=edges,
            token_expires_at=expiry,
            heartbeat=HeartbeatInfo(
                url=self.heartbeat_url,
                interval_s=self._settings.player_heartbeat_s,
                token=self._session_token(account_id, session_id, expiry),
            ),
            resume_position_s=resume,
            screens=ScreensOut(in_use=in_use, limit=plan.screens),
            live=title.id in self._settings.live_channels,
        )

    async def purge(self, now: float) -> int:
        """Delete the sessions not heard from for ``screen_retention_s`` (ended, stopped or
        timed out: none holds a screen) before ``now``, or before a later start's clock if
        one came meanwhile; how many. A batch per transaction, so that starts wait for one
        batch at most. Starts set it off once a minute."""
        total = 0
        self._purge_again = False
        while True:
            before = max(now, self._latest) - self._settings.screen_retention_s

            def batch(conn: Connection, before: float = before) -> int:
                return int(conn.execute(_PURGE, {"b_before": before}).rowcount)

            deleted = await self._store.transaction(batch)
            total += deleted
            if deleted == _PURGE_BATCH:
                continue  # more to delete
            if self._purge_again:  # a start found a purge due meanwhile: its turn
                self._purge_again = False
                continue
            if total:
                log.info("purged %d playback sessions heard from before %.0f", total, before)
            return total

    async def stop(self, account_id: str, session_id: str) -> None:
        def end(conn: Connection) -> int:
            return conn.execute(
                update(Screen)
                .where(Screen.id == session_id, Screen.account_id == account_id)
                .values(ended=True)
            ).rowcount

        if await self._store.transaction(end) == 0:
            raise not_found(f"no playback session {session_id!r}", "no_session")
        if self.heartbeats is not None and self.heartbeats.ingest is not None:
            self.heartbeats.ingest.ended(session_id)
