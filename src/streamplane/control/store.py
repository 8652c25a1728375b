"""The control plane's store: SQLAlchemy 2 models, one engine, transactions that serialise.

SQLite (through aiosqlite) is the embedded default; PostgreSQL (through asyncpg) is the same
models with a URL setting. The one transaction that must not race, starting a playback
against the screens limit, takes a lock on the account row: ``SELECT ... FOR UPDATE`` on
PostgreSQL, and on SQLite ``BEGIN IMMEDIATE``, which takes the database's single write lock
before the first read, so two starts can never both count the same free screen.

Hot paths use Core statements on a connection rather than the ORM unit of work, written as
one plain function of a connection and run by :meth:`Store.transaction`. On PostgreSQL that
is an ordinary transaction (each statement a round trip, awaited). On SQLite it runs
synchronously, on the event loop's own thread, through the ``sqlite3`` module: a small
transaction there takes tens of microseconds, while through aiosqlite every statement is
several hand-offs to the connection's thread, each waiting for the GIL (up to the
interpreter's 5 ms switch interval when the loop is busy) while the database's only write
lock is held. Writers of one process also queue for SQLite's lock on an asyncio lock, in
order, rather than in SQLite's busy handler (which sleeps and retries); other processes are
still kept out by the lock in the database file.

The hottest transaction (a playback start) goes one step further: :meth:`Store.run` drives a
*script*, a generator that yields :class:`Prepared` statements with their parameters and is
sent back each one's rows, straight on the driver (``sqlite3``, or asyncpg on a connection of
the same pool). SQLAlchemy compiles each statement once; what it would otherwise do on every
execution (cache lookup, execution context, result objects, on PostgreSQL a greenlet switch
per statement) cost several times what the database takes to run them. The script holds the
transaction's logic once for both engines, and can be read and tested without a database.
On SQLite the scripts that arrive together (concurrent playback starts) run in one
transaction, each in a savepoint of its own: one ``BEGIN IMMEDIATE`` and one ``COMMIT``
(whose WAL writes were most of a start's time in the lock) for the batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

from alembic import command
from alembic.config import Config
from pydantic import AfterValidator
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    create_engine,
    event,
    make_url,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql import ClauseElement, ColumnElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util import greenlet_spawn

__all__ = [
    "Account",
    "Base",
    "Edge",
    "EdgeKey",
    "Prepared",
    "QosDemotion",
    "QosMark",
    "QosRow",
    "RefreshToken",
    "Resume",
    "Rows",
    "Screen",
    "Script",
    "Store",
    "StoreUnavailable",
    "StoredText",
    "TitleRow",
    "alembic_config",
    "migrate",
    "unavailable",
    "upsert",
]

log = logging.getLogger(__name__)


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character (\\u0000): no stored text may hold one")
    return value


# Request text that reaches the store. PostgreSQL refuses a NUL character in text (SQLite
# keeps it), so it is refused at the door with a 422 naming the field, not a 500 from the
# driver.
StoredText = Annotated[str, AfterValidator(_no_nul)]

_T = TypeVar("_T")
_BUSY_TIMEOUT_S: Final = 30.0  # how long a SQLite writer waits for another process's lock
_BATCH_MAX: Final = 64  # SQLite scripts run in one transaction at most (see Store._flush)
_CHECKPOINT_EVERY: Final = 1000  # SQLite transactions between two WAL checkpoints
_CHECKPOINT: Final = "WAL checkpoint"
# SQLite: a filesystem with less room than this fails the health check (writes may fail).
_MIN_FREE_BYTES: Final = 1 << 20

# Names for constraints and indexes, so that migrations name them the same on every engine.
_NAMING: Final = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class StoreUnavailable(Exception):
    """The database cannot be reached or written now: try again later (an HTTP 503).

    The message says why, for the operator (it may name hosts and files): the routes tell a
    client only that the store is unavailable.
    """


# SQLSTATE classes that mean "not now" rather than "not this request": connection exceptions,
# insufficient resources (too many connections, disk full) and operator intervention
# (shutting down, starting up, a statement cancelled).
_UNAVAILABLE_SQLSTATES: Final = ("08", "53", "57")


def unavailable(err: BaseException) -> str | None:
    """Why ``err`` means the store is unavailable (worth a retry later); None if it does not.

    Connecting fails with the driver's own exceptions (``OSError`` for a refused or timed out
    connection, asyncpg's for a server that is starting or shutting down), which SQLAlchemy
    passes through; a statement fails with SQLAlchemy's: ``OperationalError`` (SQLite:
    read-only, disk full, locked past the busy timeout...), a lost connection, or the pool
    timing out while every connection is in use.
    """
    if isinstance(err, PoolTimeout):
        return "every database connection is busy (pool timeout)"
    if isinstance(err, OperationalError | InterfaceError):
        return str(err.orig)
    if isinstance(err, DBAPIError):
        state = str(getattr(err.orig, "sqlstate", None) or "")
        if err.connection_invalidated or state.startswith(_UNAVAILABLE_SQLSTATES):
            return str(err.orig)
        return None
    if isinstance(err, OSError):  # TimeoutError included
        return f"cannot connect: {err or type(err).__name__}"
    if type(err).__module__.startswith("asyncpg"):  # raised while connecting, unwrapped
        return f"cannot connect: {err}"
    return None


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=_NAMING)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    plan: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class RefreshToken(Base):
    """One refresh token (by the SHA-256 of its secret); ``used_at`` set once it is rotated.

    Tokens rotated from one login share a ``family``: presenting a used token again revokes
    the family, since one of the two holders is a thief.
    """

    __tablename__ = "refresh_tokens"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the secret
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    family: Mapped[str] = mapped_column(String(36), index=True)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class TitleRow(Base):
    """A title registered from its title.json, summarised for the catalog."""

    __tablename__ = "titles"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    duration_s: Mapped[float] = mapped_column(Float)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    hls: Mapped[str] = mapped_column(String(256))
    dash: Mapped[str] = mapped_column(String(256))
    artwork: Mapped[list[str]] = mapped_column(JSON)
    rungs: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    plans: Mapped[list[str]] = mapped_column(JSON)  # plans entitled to it; empty: every plan
    registered_at: Mapped[float] = mapped_column(Float)


class Screen(Base):
    """A playback session occupying one of the account's screens while heartbeats arrive.

    Rows stay after a session ends or times out (a late heartbeat learns it ended), until
    ``screen_retention_s`` after their last heartbeat. What a start reads goes through the
    partial indexes below, which hold only the sessions not ended: an account's history,
    however long, is never read by a start, and the purge finds old rows by ``last_seen``.
    Filter with ``~Screen.ended``, as the indexes are declared: SQLite uses a partial index
    only for a query that repeats its condition in the same form (``ended = 0`` there, where
    ``Screen.ended.is_(False)``, ``ended IS 0``, scans).
    """

    __tablename__ = "screens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(128))
    device: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    ended: Mapped[bool] = mapped_column(Boolean, default=False)


# A start gives up the device's earlier screen (by account and device) and counts the screens
# heard from since the timeout (by account and last heartbeat): both among live sessions only.
Index(
    "ix_screens_live_device",
    Screen.account_id,
    Screen.device,
    sqlite_where=~Screen.ended,
    postgresql_where=~Screen.ended,
)
Index(
    "ix_screens_live_seen",
    Screen.account_id,
    Screen.last_seen,
    sqlite_where=~Screen.ended,
    postgresql_where=~Screen.ended,
)
Index("ix_screens_last_seen", Screen.last_seen)  # the purge of old sessions


class Resume(Base):
    """Where an account stopped in a title: the position of the latest event by event time."""

    __tablename__ = "resume"

    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    title: Mapped[str] = mapped_column(String(128), primary_key=True)
    position_s: Mapped[float] = mapped_column(Float)
    event_at: Mapped[float] = mapped_column(Float)


class Edge(Base):
    """An edge's last heartbeat, and since when it has been continuously offerable."""

    __tablename__ = "edges"

    edge_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(String(64))
    base_url: Mapped[str] = mapped_column(String(256))
    lat: Mapped[float | None] = mapped_column(Float, nullable=True)
    lon: Mapped[float | None] = mapped_column(Float, nullable=True)
    throughput_bps: Mapped[float] = mapped_column(Float)
    capacity_bps: Mapped[float] = mapped_column(Float)
    connections: Mapped[int] = mapped_column(Integer)
    disk_used_bytes: Mapped[int] = mapped_column(BigInteger)
    disk_total_bytes: Mapped[int] = mapped_column(BigInteger)
    titles: Mapped[list[str]] = mapped_column(JSON)
    healthy: Mapped[bool] = mapped_column(Boolean)
    draining: Mapped[bool] = mapped_column(Boolean)
    sent_at: Mapped[float] = mapped_column(Float)  # the edge's clock
    received_at: Mapped[float] = mapped_column(Float)  # ours
    up_since: Mapped[float | None] = mapped_column(Float, nullable=True)  # None: not offerable
    # the ts (epoch ms, the edge's clock) of its last signed heartbeat: later ones only
    auth_ts: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class EdgeKey(Base):
    """An edge registered through the admin API: its key and the base URL (and site) it may
    claim. Edges registered in the settings file are not stored here."""

    __tablename__ = "edge_keys"

    edge_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(128))  # hex
    base_url: Mapped[str] = mapped_column(String(256))
    site: Mapped[str] = mapped_column(String(64))  # empty: any
    previous_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    previous_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    registered_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class QosRow(Base):
    """One period's quality of experience for one edge, title, network or edge for a
    network (the others empty): see ``streamplane.telemetry.qos``. Minute rows (``span``
    60) and hour rows (3600), each hour kept equal to the roll-up of its minutes."""

    __tablename__ = "qos"

    start: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # epoch s
    span: Mapped[int] = mapped_column(Integer, primary_key=True)  # s
    edge: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str] = mapped_column(String(128), primary_key=True)
    network: Mapped[str] = mapped_column(String(64), primary_key=True)
    asn: Mapped[int] = mapped_column(BigInteger)
    viewers: Mapped[int] = mapped_column(BigInteger)
    viewer_minutes: Mapped[int] = mapped_column(BigInteger)
    watch_ms: Mapped[int] = mapped_column(BigInteger)
    rebuffer_ms: Mapped[int] = mapped_column(BigInteger)
    bitrate_ms: Mapped[int] = mapped_column(BigInteger)
    kbit: Mapped[int] = mapped_column(BigInteger)
    rebuffers: Mapped[int] = mapped_column(BigInteger)
    switches: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    startups: Mapped[str] = mapped_column(String)  # JSON [[bucket, sessions], ...]


class QosMark(Base):
    """What a session has contributed to the QoS rows so far (``telemetry.qos.SessionMark``,
    msgpack), so that a redelivered event adds nothing."""

    __tablename__ = "qos_marks"

    session: Mapped[str] = mapped_column(String(64), primary_key=True)
    seen_at: Mapped[float] = mapped_column(Float, index=True)  # server clock: the purge
    mark: Mapped[bytes] = mapped_column(LargeBinary)


class QosDemotion(Base):
    """An edge steering ranks after the others for a client network (``telemetry.qos.Verdict``),
    kept so that a restarted control plane neither forgets it nor lets the edge back early."""

    __tablename__ = "qos_demotions"

    network: Mapped[str] = mapped_column(String(64), primary_key=True)
    edge: Mapped[str] = mapped_column(String(64), primary_key=True)
    since: Mapped[float] = mapped_column(Float)
    bad_at: Mapped[float] = mapped_column(Float)  # the last judgement that found it bad
    reason: Mapped[str] = mapped_column(String)


Rows = Sequence[Sequence[Any]]
"""A statement's rows as the driver gives them: tuples (sqlite3) or records (asyncpg)."""

Script = Generator[tuple["Prepared", Mapping[str, Any]], Rows, _T]
"""A transaction's logic for :meth:`Store.run`: yields each statement with its parameters,
is sent back its rows, returns the result."""


class Prepared:
    """A Core statement compiled once for one dialect, and how to lay out its parameters.

    Parameters are ``bindparam`` names given to :meth:`args` as a mapping; values written
    into the statement (``.values(ended=True)``) are kept, converted once. Each value goes
    through its column type's bind processor, as SQLAlchemy would; rows come back unprocessed,
    so select plain columns (numbers, strings).
    """

    __slots__ = ("_layout", "sql", "whole")

    def __init__(self, statement: ClauseElement, dialect: Dialect, *, whole: bool = False) -> None:
        # A whole transaction by itself (a database function that takes its locks and does
        # all its writes): sent alone, without BEGIN and COMMIT round trips, and nothing may
        # follow it in its script.
        self.whole = whole
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        if compiled.positiontup is None:
            raise ValueError(f"{dialect.name}: parameters are not positional")
        self.sql: str = compiled.string
        # per position: (parameter name, its bind processor) or ("", the written value)
        layout: list[tuple[str, Any]] = []
        for name in compiled.positiontup:
            bind = compiled.binds[name]
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.required:
                layout.append((name, process))
            else:
                value = bind.effective_value
                layout.append(("", value if process is None else process(value)))
        self._layout = tuple(layout)

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        """The driver's positional arguments; a ``KeyError`` names a missing parameter."""
        out = []
        for name, process in self._layout:
            if not name:
                out.append(process)  # the value written into the statement
            elif process is None:
                out.append(params[name])
            else:
                out.append(process(params[name]))
        return out


def _finish(script: Script[_T], rows: Rows) -> _T:
    """Send the rows of a script's whole-transaction statement; what the script returns."""
    try:
        script.send(rows)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise RuntimeError("a whole-transaction statement must be the last of its script")


def _drive(dbapi_connection: Any, script: Script[_T], dialect: Dialect) -> _T:
    """Run ``script`` on a DB-API connection already inside its transaction."""
    cursor = dbapi_connection.cursor()
    try:
        rows: Rows | None = None
        while True:
            try:
                statement, params = script.send(rows)  # type: ignore[arg-type]
            except StopIteration as done:
                result: _T = done.value
                return result
            args = statement.args(params)
            try:
                cursor.execute(statement.sql, args)
                rows = cursor.fetchall()
            except dialect.loaded_dbapi.Error as err:
                raise DBAPIError.instance(
                    statement.sql, args, err, dialect.loaded_dbapi.Error, dialect=dialect
                ) from err
            if statement.whole:  # as on PostgreSQL, where it runs without BEGIN and COMMIT
                return _finish(script, rows)
    finally:
        script.close()
        cursor.close()


def _asyncpg_error(
    err: Exception, adapted: Any, sql: str, args: Sequence[Any], invalidated: bool
) -> Exception:
    """``err`` from asyncpg as SQLAlchemy would have raised it (an ``IntegrityError`` for a
    unique violation, ``DBAPIError.connection_invalidated`` for a lost connection, ...), so
    that callers catch the same exceptions on every path; ``err`` itself where SQLAlchemy
    would not have wrapped it either. ``adapted`` is SQLAlchemy's adapter of the connection.
    """
    dbapi = adapted.dbapi
    try:
        # The adapter's own translation to DB-API exceptions (a private hook: SQLAlchemy has
        # no public one for a driver exception raised outside its cursor).
        adapted._handle_exception(err)
    except dbapi.Error as dbapi_error:
        wrapped: Exception = DBAPIError.instance(
            sql, list(args), dbapi_error, dbapi.Error, connection_invalidated=invalidated
        )
        return wrapped
    except Exception:  # not translated: raised as it is
        return err
    return err


class Store:
    """The engine, and transactions with the locking each engine needs.

    ``pool_size`` connections are kept open and never more: a request beyond them waits for
    one to come back (up to ``pool_timeout_s``), rather than opening (and soon closing) a
    connection of its own. A PostgreSQL server that does not answer fails a connection after
    ``connect_timeout_s``.

    Every transaction that fails because the database is unavailable raises
    :class:`StoreUnavailable` (see :func:`unavailable`), whatever the engine's own exception;
    the pool forgets its connections when one is found lost, so the store recovers by itself
    once the database is back. A SQLite database file removed or replaced under a running
    store is unavailable too (its open connections would go on writing into the removed
    file, lost at the next start).
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str = "",
        pool_size: int = 20,
        connect_timeout_s: float = 5.0,
        pool_timeout_s: float = 10.0,
        statement_timeout_s: float = 30.0,
    ) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.is_postgres = url.startswith("postgresql")
        if not (self.is_sqlite or self.is_postgres):
            raise ValueError(
                f"database URL {url!r}: use sqlite+aiosqlite:///FILE or postgresql+asyncpg://..."
            )
        kwargs: dict[str, Any] = {
            "pool_size": pool_size,
            "max_overflow": 0,
            "pool_timeout": pool_timeout_s,
        }
        if schema and (not self.is_postgres or not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema)):
            raise ValueError(f"database schema {schema!r}: a PostgreSQL name in [a-z0-9_]")
        if self.is_postgres:
            # A cancelled statement is SQLSTATE 57014, which ``unavailable`` counts as "not now".
            server = {"statement_timeout": str(max(1, round(statement_timeout_s * 1000)))}
            if schema:
                server["search_path"] = schema
            kwargs["connect_args"] = {"timeout": connect_timeout_s, "server_settings": server}
        if self.is_sqlite:
            # A writer waits for the write lock rather than failing at once with "locked".
            kwargs["connect_args"] = {"timeout": _BUSY_TIMEOUT_S}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        # SQLite: the database file, and its identity (device, inode) once it exists.
        self.path = _sqlite_file(url) if self.is_sqlite else None
        self._file_id: tuple[int, int] | None = None
        self._down: str | None = None  # why the last transaction found the store unavailable
        # SQLite: this process's writers, one at a time, in order; and the synchronous engine
        # that runs transaction() on the loop's thread (none for an in-memory database, which
        # a second engine would not share).
        self._write_lock = asyncio.Lock()
        self._inline: Engine | None = None
        self._driver: sqlite3.Connection | None = None
        self._commits = 0
        self._housekeeping: dict[str, asyncio.Task[None]] = {}
        # SQLite: scripts waiting for the next batch, and the tasks that run batches
        self._batch: list[tuple[Script[Any], asyncio.Future[Any]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        if self.is_sqlite:
            _sqlite_transactions(self.engine.sync_engine)
            self._inline = _inline_engine(url)

    @contextmanager
    def _outage(self) -> Iterator[None]:
        """Around one use of the store: an error that means the store is down becomes
        ``StoreUnavailable`` (see ``_unavailable``), and a success ends an outage."""
        self._check_file()
        try:
            yield
        except Exception as err:
            down = self._unavailable(err)
            if down is None or down is err:
                raise
            raise down from err
        self._succeeded()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A transaction for reads and for writes that need no lock (committed on exit)."""
        with self._outage():
            async with self.engine.connect() as conn, conn.begin():
                yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that holds SQLite's write lock from its first statement.

        On PostgreSQL it is an ordinary transaction: lock rows with ``FOR UPDATE``
        (``.with_for_update()``) where a read decides a write. Prefer :meth:`transaction` on
        hot paths: here every statement is awaited while the lock is held.
        """
        with self._outage():
            if not self.is_sqlite:
                async with self.engine.connect() as conn, conn.begin():
                    yield conn
            else:
                async with self._write_lock, self.engine.connect() as conn:
                    await conn.execution_options(sqlite_begin="BEGIN IMMEDIATE")
                    async with conn.begin():
                        yield conn

    async def transaction(self, work: Callable[[Connection], _T]) -> _T:
        """``work(connection)`` in one write transaction (as :meth:`write`), committed if it
        returns, rolled back if it raises; its result.

        ``work`` is plain (synchronous) code issuing Core statements and nothing else: it is
        the whole transaction, so no other work can sit between its statements while it
        holds locks. On SQLite it runs on this thread, waiting (without blocking the loop)
        for another process's write lock; on PostgreSQL each statement is awaited.
        """
        if self._inline is None:
            async with self.write() as conn:
                return await conn.run_sync(work)
        with self._outage():
            result = await self._inline_transaction(self._inline, work)
        return result

    async def _inline_transaction(self, inline: Engine, work: Callable[[Connection], _T]) -> _T:
        def begin() -> tuple[Connection, Any]:
            sync = inline.connect()
            try:
                return sync, sync.begin()  # BEGIN IMMEDIATE: the write lock, or "locked"
            except BaseException:
                sync.close()
                raise

        async with self._write_lock:
            sync, tx = await self._sqlite_locked(begin)
            with sync, tx:
                result = work(sync)
            self._after_commit()
            return result

    def prepare(self, statement: ClauseElement, *, whole: bool = False) -> Prepared:
        """``statement`` compiled for this store's engine, to be yielded by a :data:`Script`;
        ``whole``: it is a transaction by itself (see :class:`Prepared`)."""
        return Prepared(statement, self.engine.dialect, whole=whole)

    async def run(self, script: Script[_T]) -> _T:
        """``script`` as one write transaction (locked as :meth:`write`), on the driver itself.

        Each statement the script yields runs with its parameters and its rows are sent back;
        what the script returns is the result, committed. If the script or a statement raises,
        nothing is kept and the error propagates: :class:`StoreUnavailable` as from
        :meth:`transaction`, else SQLAlchemy's exception for the database's own. The script is
        the whole transaction: it does nothing else between two statements, so on SQLite it
        runs on this thread with no await while the lock is held. There, scripts queued
        together share one transaction, each in a savepoint (see ``_flush``): a script that
        raises leaves the others of its batch committed.
        """
        if self._inline is None and not self.is_postgres:  # SQLite in memory
            return await self.transaction(
                lambda conn: _drive(conn.connection.dbapi_connection, script, self.engine.dialect)
            )
        with self._outage():
            if self.is_postgres:
                result = await self._run_asyncpg(script)
            else:
                result = await self._run_inline(script)
        return result

    async def _run_inline(self, script: Script[_T]) -> _T:
        """``script`` in the next batch of this process's SQLite scripts (see ``_flush``)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._batch.append((script, waiter))
        if len(self._batch) == 1:  # the first of a batch sees it flushed
            flush = loop.create_task(self._flush())
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)
        return await waiter  # type: ignore[no-any-return]

    async def _flush(self) -> None:
        """Run the queued scripts in one transaction, each inside a savepoint of its own.

        A task started by the first script queued, so it runs once the loop has taken the
        requests that were ready with it through to their own scripts: concurrent starts share
        one ``BEGIN IMMEDIATE`` and one ``COMMIT``, whose WAL writes (the pages every start
        touches, the same few) were most of a start's time inside the lock. Each script still
        sees the ones before it (the screens limit stays exact), and one that raises is rolled
        back to its savepoint and fails alone. If the transaction itself is lost (COMMIT
        failed, or an error after which SQLite rolled everything back: a full disk, an I/O
        error), every script of the batch fails with that error: none of them was kept.
        """
        raw = self._inline_driver()
        dialect = self.engine.dialect

        def execute(sql: str) -> None:
            try:
                raw.execute(sql)
            except sqlite3.Error as err:  # as SQLAlchemy raises it for any other statement
                raise DBAPIError.instance(sql, (), err, sqlite3.Error, dialect=dialect) from err

        batch: list[tuple[Script[Any], asyncio.Future[Any]]] = []
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            async with self._write_lock:
                await self._sqlite_locked(lambda: execute("BEGIN IMMEDIATE"))
                # Taken once the lock is held: starts that queued meanwhile come along too.
                batch = self._batch[:_BATCH_MAX]
                del self._batch[:_BATCH_MAX]
                if self._batch:  # more than one batch's worth: the rest go next
                    again = asyncio.get_running_loop().create_task(self._flush())
                    self._flushes.add(again)
                    again.add_done_callback(self._flushes.discard)
                alone = len(batch) == 1
                try:
                    for script, waiter in batch:
                        if waiter.done():  # its request was cancelled while it queued
                            script.close()
                            continue
                        if not alone:
                            execute("SAVEPOINT script")
                        try:
                            result = _drive(raw, script, dialect)
                        except Exception as err:
                            if alone or not raw.in_transaction:
                                raise  # the transaction is lost: the whole batch with it
                            execute("ROLLBACK TO script")
                            execute("RELEASE script")
                            outcomes.append((waiter, None, err))
                            continue
                        if not alone:
                            execute("RELEASE script")
                        outcomes.append((waiter, result, None))
                    execute("COMMIT")
                except BaseException:
                    if raw.in_transaction:
                        execute("ROLLBACK")
                    raise
                self._after_commit()
        except BaseException as err:
            for script, waiter in batch or self._batch:
                script.close()
                if waiter.done():
                    continue
                if isinstance(err, Exception):
                    waiter.set_exception(err)
                else:
                    waiter.cancel()
            if not batch:
                self._batch.clear()
            if not isinstance(err, Exception):
                raise
            return
        for waiter, result, error in outcomes:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(result)
            else:
                waiter.set_exception(error)

    async def _sqlite_locked(self, begin: Callable[[], _T]) -> _T:
        """``begin()``, which takes SQLite's write lock or raises "database is locked", tried
        again (the loop running meanwhile) while another process holds it, up to the busy
        timeout. Called with this process's ``_write_lock`` held."""
        delay = 0.001
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while True:
            try:
                return begin()
            except (OperationalError, sqlite3.OperationalError) as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(delay)  # another process writes: let the loop run
            delay = min(2 * delay, 0.05)

    def _inline_driver(self) -> sqlite3.Connection:
        """The ``sqlite3`` connection under the inline engine (its pool holds exactly one)."""
        if self._driver is None:
            assert self._inline is not None
            proxied = self._inline.raw_connection()
            driver = proxied.driver_connection
            assert isinstance(driver, sqlite3.Connection)
            self._driver = driver
        return self._driver

    async def _run_asyncpg(self, script: Script[_T]) -> _T:
        """The script on an asyncpg connection of the engine's pool, each statement prepared
        once per connection (asyncpg's statement cache): in a transaction of its own (BEGIN,
        the statements, COMMIT), or, for a :attr:`Prepared.whole` statement, alone."""
        try:
            statement, params = next(script)
        except StopIteration as nothing:
            return nothing.value  # type: ignore[no-any-return]
        proxied = await self.engine.raw_connection()
        adapted = proxied.dbapi_connection
        driver: Any = proxied.driver_connection  # an asyncpg connection
        args: Sequence[Any] = ()
        try:
            if statement.whole:
                args = statement.args(params)
                result = _finish(script, await driver.fetch(statement.sql, *args))
            else:
                async with driver.transaction():
                    while True:
                        args = statement.args(params)
                        rows = await driver.fetch(statement.sql, *args)
                        try:
                            statement, params = script.send(rows)
                        except StopIteration as done:
                            result = done.value
                            break
        except BaseException as err:
            script.close()
            # Only a statement the server refused (a SQLSTATE that is not about the connection)
            # leaves the connection as it was: any other failure (a lost or cut connection,
            # the client's protocol out of step, a cancellation) may have left it dead or
            # half-finished, and it is never handed to the next request.
            sqlstate = str(getattr(err, "sqlstate", "") or "")
            if (
                sqlstate
                and not sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
                and not driver.is_closed()
                and not driver.is_in_transaction()
            ):
                await greenlet_spawn(proxied.close)
            else:
                await greenlet_spawn(proxied.invalidate, err)
            if isinstance(err, Exception):
                translated = _asyncpg_error(err, adapted, statement.sql, args, driver.is_closed())
                if translated is not err:
                    raise translated from err
            raise
        await greenlet_spawn(proxied.close)
        return result

    def _check_file(self) -> None:
        """SQLite: refuse to go on when the database file was removed or replaced.

        The open connections would not notice: they keep the removed file open and write on
        into it, and new ones would create an empty database in its place. One ``stat`` a
        transaction (about a microsecond).
        """
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._file_id is None:
                return  # not created yet: migrate() creates it
            raise self._down_because(f"the database file {self.path} was removed") from None
        except OSError as err:
            raise self._down_because(f"the database file {self.path}: {err}") from None
        file_id = (st.st_dev, st.st_ino)
        if self._file_id is None:
            self._file_id = file_id
        elif file_id != self._file_id:
            raise self._down_because(
                f"the database file {self.path} was replaced by another file; restart to use it"
            )

    def _unavailable(self, err: Exception) -> StoreUnavailable | None:
        """:class:`StoreUnavailable` if ``err`` means the store is unavailable, else None."""
        if isinstance(err, StoreUnavailable):
            return err
        reason = unavailable(err)
        return None if reason is None else self._down_because(reason)

    def _down_because(self, reason: str) -> StoreUnavailable:
        if self._down is None:  # once per outage, not once per request
            log.warning("the database is unavailable: %s", reason)
        self._down = reason
        return StoreUnavailable(reason)

    def _succeeded(self) -> None:
        if self._down is not None:
            log.warning("the database is available again (it was: %s)", self._down)
            self._down = None

    async def ping(self) -> None:
        """Prove the store answers: ``SELECT 1`` runs, and a SQLite file is still there,
        writable, with room left on its filesystem.

        Raises :class:`StoreUnavailable` saying why not.
        """
        if self.path is not None and self._file_id is not None:
            self._check_file()
            if not os.access(self.path, os.W_OK):
                raise self._down_because(f"the database file {self.path} is not writable")
            fs = os.statvfs(os.path.dirname(self.path))
            if fs.f_bavail * fs.f_frsize < _MIN_FREE_BYTES:
                raise self._down_because(
                    f"the filesystem of {self.path} is full "
                    f"({fs.f_bavail * fs.f_frsize} bytes free)"
                )
        async with self.read() as conn:
            await conn.exec_driver_sql("SELECT 1")

    def _after_commit(self) -> None:
        """Every so many commits, checkpoint the WAL on another thread (see ``_checkpoint``)."""
        self._commits += 1
        if self._commits >= _CHECKPOINT_EVERY and _CHECKPOINT not in self._housekeeping:
            self._commits = 0
            self.housekeep(_CHECKPOINT, self._checkpoint)

    async def _checkpoint(self) -> None:
        """Copy the WAL back into the database, on aiosqlite's thread.

        SQLite would otherwise do it inside a commit once the WAL passes 1000 pages, on the
        thread committing (here the loop's), and its fsync can take a good fraction of a
        second on a busy disk. Writers of this process wait meanwhile (they await: the loop
        runs on), so that the checkpoint completes and the WAL starts over from its beginning.
        If it fails, the next one will do: the WAL stays valid, only longer.
        """
        async with self._write_lock, self.engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None  # an aiosqlite connection
            cursor = await driver.execute("PRAGMA wal_checkpoint(PASSIVE)")
            await cursor.close()

    def housekeep(self, name: str, work: Callable[[], Awaitable[object]]) -> bool:
        """Run ``work()`` in a task of its own, unless the one called ``name`` still runs;
        whether it was started.

        For upkeep a request should not wait for (a WAL checkpoint, purging old rows): a
        failure is logged, not raised; :meth:`settled` and :meth:`dispose` wait for it.
        """
        if name in self._housekeeping:
            return False
        loop = asyncio.get_running_loop()
        self._housekeeping[name] = loop.create_task(self._housekept(name, work))
        return True

    async def _housekept(self, name: str, work: Callable[[], Awaitable[object]]) -> None:
        try:
            await work()
        except Exception:
            log.warning("%s failed (the next one will do)", name, exc_info=True)
        finally:
            del self._housekeeping[name]

    async def settled(self) -> None:
        """Return once no housekeeping runs."""
        while self._housekeeping:
            await asyncio.wait(list(self._housekeeping.values()))

    async def dispose(self) -> None:
        await self.settled()
        await self.engine.dispose()
        if self._inline is not None:
            self._inline.dispose()


def _sqlite_file(url: str) -> str | None:
    """The file of a SQLite URL; None for an in-memory database."""
    parsed = make_url(url)
    if parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory":
        return None
    return os.path.abspath(parsed.database)


def _inline_engine(url: str) -> Engine | None:
    """A pysqlite engine on the same SQLite file, for :meth:`Store.transaction`."""
    parsed = make_url(url)
    if parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory":
        return None
    engine = create_engine(
        parsed.set(drivername="sqlite+pysqlite"),
        poolclass=StaticPool,  # one connection, only ever used by one transaction at a time
        # Never wait inside SQLite's busy handler: that would block the loop.
        connect_args={"timeout": 0.0, "check_same_thread": False},
    )
    _sqlite_transactions(engine)

    @event.listens_for(engine, "connect")
    def _no_autocheckpoint(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")  # Store._checkpoint does it

    return engine.execution_options(sqlite_begin="BEGIN IMMEDIATE")


def _sqlite_transactions(engine: Engine) -> None:
    """Let SQLAlchemy, not the sqlite3 module, emit BEGIN, so that it can be IMMEDIATE.

    The sqlite3 module would otherwise open transactions lazily and DEFERRED, so two
    transactions could both read before either writes. (SQLAlchemy's documented recipe.)
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the writer
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))


MIGRATIONS: Final = Path(__file__).parent / "migrations"
_MIGRATION_LOCK: Final = 0x5354504C  # pg advisory lock key: one migrating instance at a time


def alembic_config() -> Config:
    """Alembic's configuration, pointing at the migrations shipped inside the package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


async def migrate(store: Store, revision: str = "head") -> None:
    """Bring the database schema to ``revision``; safe to run from many instances at once."""

    def upgrade(sync_conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, revision)

    async with store.engine.connect() as conn:
        if store.is_sqlite:
            await conn.execution_options(sqlite_begin="BEGIN IMMEDIATE")
        async with conn.begin():
            if store.is_postgres:
                await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            await conn.run_sync(upgrade)


def upsert(
    store: Store,
    model: type[Base],
    values: dict[str, Any],
    *,
    key: tuple[str, ...],
    update_columns: list[str],
    where: ColumnElement[bool] | None = None,
) -> Executable:
    """``INSERT ... ON CONFLICT (key) DO UPDATE SET update_columns [WHERE where]``.

    Both engines have it, with the same meaning; ``where`` sees the existing row through the
    model's columns.
    """
    stmt: Any = (pg_insert if store.is_postgres else sqlite_insert)(model).values(values)
    return stmt.on_conflict_do_update(  # type: ignore[no-any-return]
        index_elements=list(key),
        set_={c: stmt.excluded[c] for c in update_columns},
        where=where,
    )
