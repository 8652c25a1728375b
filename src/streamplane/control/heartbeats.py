"""Player heartbeats through the telemetry plane: the stream chosen by the settings, ingest in
front of it, and the write-behind consumer that keeps the control plane's store (resume
positions, viewing history, screens) up to date in batches.

``POST /v1/heartbeat`` never writes the store: ingest answers once the batch is durable in the
stream, and :class:`StoreSink` writes what the consumer folded, one transaction per fetch. With
the store down, heartbeats are still taken (for sessions this process knows) and wait in the
stream; they are written when it returns.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgspec
from sqlalchemy import Connection, Table, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from streamplane.config import Settings, SettingsError
from streamplane.control.errors import ApiError, unauthorised
from streamplane.control.store import Resume, Screen, Store, StoreUnavailable
from streamplane.edge import forwarded_client, parse_networks
from streamplane.telemetry import BatchError, Stream, StreamError
from streamplane.telemetry.admission import Admission, Limit
from streamplane.telemetry.consumers import Position, StoreWrites, WriteBehind
from streamplane.telemetry.ingest import Ingest, IngestRefused, SessionView
from streamplane.telemetry.server import Answer, IngestServer

__all__ = ["Heartbeats", "StoreSink", "open_stream", "run_ingest", "stream_dir"]

log = logging.getLogger(__name__)

_SCREENS: Final[Table] = Screen.__table__  # type: ignore[assignment]
_TOUCH: Final = (
    update(_SCREENS)
    .where(
        _SCREENS.c.id == bindparam("b_id"),
        ~_SCREENS.c.ended,
        _SCREENS.c.last_seen < bindparam("b_seen"),
        # a session already timed out stays so: a late batch does not take its screen back
        _SCREENS.c.last_seen >= bindparam("b_floor"),
    )
    .values(last_seen=bindparam("b_seen"))
)
_END: Final = update(_SCREENS).where(_SCREENS.c.id == bindparam("b_id")).values(ended=True)


class StoreSink:
    """Writes a consumer's folded batches into the control plane's store, idempotently."""

    def __init__(self, store: Store, screen_timeout_s: float, touch_s: float) -> None:
        self._store = store
        self._slack_s = screen_timeout_s + touch_s
        insert = pg_insert if store.is_postgres else sqlite_insert
        stmt = insert(Resume)
        self._resume = stmt.on_conflict_do_update(
            index_elements=["account_id", "title"],
            set_={"position_s": stmt.excluded.position_s, "event_at": stmt.excluded.event_at},
            where=Resume.event_at < stmt.excluded.event_at,  # the latest by event time wins
        )

    async def write(self, writes: StoreWrites) -> None:
        resume = [
            {"account_id": a, "title": t, "position_s": p.position_s, "event_at": p.at}
            for (a, t), p in sorted(writes.resume.items())  # one lock order for every writer
        ]
        touch = [
            {"b_id": s, "b_seen": at, "b_floor": at - self._slack_s}
            for s, at in sorted(writes.seen.items())
        ]
        ended = [{"b_id": s} for s in sorted(writes.stopped)]

        def work(conn: Connection) -> None:
            if resume:
                conn.execute(self._resume, resume)
            if touch:
                conn.execute(_TOUCH, touch)
            if ended:
                conn.execute(_END, ended)

        if writes:
            await self._store.transaction(work)


def stream_dir(settings: Settings, sqlite_path: str | None = None) -> Path:
    """Where the embedded stream lives: ``telemetry.stream_dir``, else ``telemetry-stream``
    in ``control.data_dir``, else beside a SQLite store (``<database file>-telemetry``: one
    place holds the control plane's state). On PostgreSQL with neither set there is no place
    that is this control plane's own (the working directory is anyone's: two control planes
    started there would share a stream): SettingsError saying what to set."""
    t, c = settings.telemetry, settings.control
    if t.stream_dir:
        return Path(t.stream_dir)
    if c.data_dir:
        return Path(c.data_dir) / "telemetry-stream"
    if sqlite_path:
        return Path(sqlite_path + "-telemetry")
    raise SettingsError(
        "telemetry: the embedded stream needs a directory of this control plane's own: set"
        ' control.data_dir (or telemetry.stream_dir), or use telemetry.engine = "nats"'
    )


async def open_stream(settings: Settings, sqlite_path: str | None = None) -> Stream:
    """The stream the settings name (the embedded one needs no server; see
    :func:`stream_dir` for where it lives)."""
    t = settings.telemetry
    if t.engine == "nats":
        from streamplane.telemetry.stream_nats import NatsStream

        return await NatsStream.open(
            t.nats_url, name=t.stream_name, partitions=t.partitions, max_age_s=t.max_age_s
        )
    from streamplane.telemetry.stream_embedded import EmbeddedStream

    return EmbeddedStream(stream_dir(settings, sqlite_path), partitions=t.partitions)


Claims = Callable[[str, float], dict[str, Any]]  # token, now -> verified claims (or ApiError)
_STORE_RETRY_AFTER_S: Final = 2
_TOKENS_KEPT: Final = 100_000


def _refusal(err: ApiError) -> Answer:
    headers: list[tuple[bytes, bytes]] = []
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    wait = err.extra.get("retry_after_s")
    if isinstance(wait, int | float):
        headers.append((b"retry-after", str(max(1, math.ceil(wait))).encode()))
    return err.status, msgspec.json.encode(err.body()), headers


class Heartbeats:
    """The telemetry plane as the control plane runs it; :meth:`start` opens the stream."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        claims: Claims,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        t = settings.telemetry
        try:
            self.admission = Admission(
                Limit(t.device_rate, t.device_burst), Limit(t.global_rate, t.global_burst)
            )
        except ValueError as err:
            raise SettingsError(f"telemetry: {err}") from None
        self._settings = settings
        self._store = store
        self._claims = claims
        self._clock = clock
        self._monotonic = monotonic
        self.ingest: Ingest | None = None
        self.consumer: WriteBehind | None = None
        self.listener: IngestServer | None = None
        self._stream: Stream | None = None
        self._tokens: dict[str, dict[str, Any]] = {}  # token -> its verified claims

    @property
    def stream(self) -> Stream | None:
        """The stream, once started (other consumer groups read it too: QoS)."""
        return self._stream

    def url(self) -> str | None:
        """Where players send heartbeats when the lean listener runs; None: the control
        plane's own /v1/heartbeat."""
        t = self._settings.telemetry
        if not t.ingest_port:
            return None
        return t.ingest_url.rstrip("/") or f"http://{t.ingest_host}:{t.ingest_port}/v1/heartbeat"

    def _verified(self, token: str, now: float) -> dict[str, Any]:
        """The token's claims, its signature checked once: a player sends the same token with
        every heartbeat, and checking it was a fifth of a heartbeat's work. Expiry is
        checked every time (a token cannot be revoked otherwise)."""
        claims = self._tokens.get(token)
        if claims is None or claims["exp"] <= now:
            claims = self._claims(token, now)  # ApiError if it is bad or expired
            if len(self._tokens) >= _TOKENS_KEPT:
                self._tokens.clear()
            self._tokens[token] = claims
        return claims

    async def answer(self, authorization: str, body: bytes, client: str | None = None) -> Answer:
        """``POST /v1/heartbeat``, whichever listener took it: (status, JSON body, headers).
        ``client`` is the player's address (its events carry it, for the QoS networks)."""
        now = self._clock()
        try:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise unauthorised("send Authorization: Bearer <heartbeat or access token>")
            claims = self._verified(token.strip(), now)
            if self.ingest is None:
                where = self.url() if self._settings.telemetry.ingest_process else None
                raise ApiError(
                    503,
                    "telemetry_unavailable",
                    f"heartbeats are taken at {where}" if where else "heartbeats are not taken yet",
                    retry_after_s=1,
                )
            session = claims.get("sid") if claims["typ"] == "session" else None
            try:
                answer = await self.ingest.heartbeat(
                    claims["sub"], body, now, self._monotonic(), session, client=client
                )
            except BatchError as err:
                raise ApiError(err.status, err.code, str(err)) from None
            except IngestRefused as err:
                raise ApiError(err.status, err.code, err.detail, **err.extra) from None
        except ApiError as err:
            return _refusal(err)
        except StoreUnavailable:  # a session not seen yet, and the store down
            return _refusal(
                ApiError(
                    503,
                    "store_unavailable",
                    "the control plane's database is unavailable; try again in"
                    f" {_STORE_RETRY_AFTER_S} s",
                    retry_after_s=_STORE_RETRY_AFTER_S,
                )
            )
        return 200, msgspec.json.encode(answer), []

    async def start(self) -> None:
        t = self._settings.telemetry
        c = self._settings.control
        try:
            self._stream = await open_stream(self._settings, self._store.path)
        except StreamError as err:
            raise SettingsError(f"telemetry: {err}") from None
        self.ingest = Ingest(
            self._stream,
            self.admission,
            self._lookup,
            heartbeat_s=c.player_heartbeat_s,
            screen_timeout_s=c.screen_timeout_s,
            on_stop=self._stopped,
        )
        self.consumer = WriteBehind(
            self._stream,
            StoreSink(self._store, c.screen_timeout_s, t.screen_touch_s),
            max_batches=t.consumer_batches,
            ack_wait_s=t.ack_wait_s,
            touch_s=t.screen_touch_s,
            linger_s=t.consumer_linger_s,
        )
        await self.consumer.start()
        if t.ingest_port:
            self.listener = IngestServer(
                self.answer, t.ingest_host, t.ingest_port, **self._forwarding()
            )
            try:
                await self.listener.start()
            except OSError as err:
                raise SettingsError(
                    f"telemetry.ingest_port: cannot listen on {t.ingest_host}:{t.ingest_port}:"
                    f" {err}"
                ) from None

    def _forwarding(self) -> dict[str, Any]:
        """How the lean listener learns the client, as the control plane does: the peer, or
        whom ``control.trusted_proxies`` say they forward for (none by default)."""
        c = self._settings.control
        if not c.trusted_proxies:
            return {}
        try:
            trusted = parse_networks(c.trusted_proxies)
        except ValueError as err:
            raise SettingsError(f"control.trusted_proxies: {err}") from None
        header = c.trusted_proxy_header

        def client_of(peer: str | None, values: list[str]) -> str | None:
            return forwarded_client(peer or "", values, trusted, header)

        return {"client_header": header, "client_of": client_of}

    async def stop(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        if self.consumer is not None:
            try:
                await self.consumer.settle(timeout_s=2.0)  # write what is waiting, if we can
            except (TimeoutError, StreamError) as err:  # the store is down: they wait
                log.warning(
                    "telemetry: stopping with batches unwritten (%s); kept in the stream", err
                )
            await self.consumer.stop()
        if self._stream is not None:
            await self._stream.close()

    def resume(self, account: str, title: str) -> Position | None:
        return None if self.ingest is None else self.ingest.resume(account, title)

    async def _lookup(self, session_id: str) -> SessionView | None:
        def read(conn: Connection) -> SessionView | None:
            row = conn.execute(
                select(
                    Screen.account_id,
                    Screen.title,
                    Screen.device,
                    Screen.ended,
                    Screen.last_seen,
                    Resume.position_s,
                    Resume.event_at,
                )
                .outerjoin(
                    Resume,
                    (Resume.account_id == Screen.account_id) & (Resume.title == Screen.title),
                )
                .where(Screen.id == session_id)
            ).first()
            if row is None:
                return None
            return SessionView(
                account=row.account_id,
                title=row.title,
                device=row.device,
                ended=bool(row.ended),
                last_seen=row.last_seen,
                resume=None if row.position_s is None else Position(row.event_at, row.position_s),
            )

        return await self._store.transaction(read)

    async def _stopped(self, account: str, session_id: str) -> None:
        """Free the screen now (the stream carries the stop too, should this fail)."""

        def end(conn: Connection) -> None:
            conn.execute(
                update(Screen)
                .where(Screen.id == session_id, Screen.account_id == account)
                .values(ended=True)
            )

        try:
            await self._store.transaction(end)
        except StoreUnavailable as err:
            log.info("telemetry: a stop waits in the stream for the store (%s)", err)


async def run_ingest(settings: Settings, stopped: asyncio.Event) -> str:
    """``streamplane ingest``: heartbeats taken in a process of their own until ``stopped``
    is set, at niceness ``telemetry.ingest_nice`` on CPUs ``telemetry.ingest_cpus``. Its store
    is the control plane's (a session's first heartbeat reads it once; the write-behind writes
    it); it verifies the control plane's tokens with the shared ``control.jwt_secret``.
    Returns where it listened."""
    import gc
    import os
    import time

    from streamplane.control.accounts import Accounts

    c, t = settings.control, settings.telemetry
    if not t.ingest_port or not c.jwt_secret:
        raise SettingsError(
            "streamplane ingest needs telemetry.ingest_port and control.jwt_secret (the"
            " control plane's, to verify its tokens)"
        )
    # Before any thread starts (the store's, the stream's): they inherit it. Only ever
    # lowered: a start that is already nicer stays so.
    if t.ingest_nice > os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, t.ingest_nice)
    if t.ingest_cpus:
        try:
            os.sched_setaffinity(0, t.ingest_cpus)
        except OSError as err:
            raise SettingsError(
                f"telemetry.ingest_cpus: cannot run on CPUs {list(t.ingest_cpus)}: {err.strerror}"
                f" (this machine's: {sorted(os.sched_getaffinity(0))})"
            ) from None
    store = Store(
        c.database_url,
        schema=c.database_schema,
        connect_timeout_s=c.database_connect_timeout_s,
        pool_timeout_s=c.database_pool_timeout_s,
        statement_timeout_s=c.database_statement_timeout_s,
    )
    accounts = Accounts(store, c, bytes.fromhex(c.jwt_secret))
    heartbeats = Heartbeats(settings, store, accounts.claims, time.time, time.monotonic)
    try:
        await heartbeats.start()
        # What is loaded and started now lives as long as the process: kept out of the
        # collector's full passes (as the control plane's), which walked it all every second
        # or so under a storm: a seventh of ingest's CPU went to them.
        gc.collect()
        gc.freeze()
        await stopped.wait()
    finally:
        await heartbeats.stop()
        await store.dispose()
    return heartbeats.url() or ""
