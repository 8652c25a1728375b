"""Player heartbeats through the telemetry plane: the stream chosen by the settings, ingest in
front of it, and the write-behind consumer that keeps the control plane's store (resume
positions, viewing history, screens) up to date in batches.

``POST /v1/heartbeat`` never writes the store: ingest answers once the batch is durable in the
stream, and :class:`StoreSink` writes what the consumer folded, one transaction per fetch. With
the store down, heartbeats are still taken (for sessions this process knows) and wait in the
stream; they are written when it returns.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from sqlalchemy import Connection, Table, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from streamplane.config import Settings, SettingsError, TelemetrySettings
from streamplane.control.store import Resume, Screen, Store, StoreUnavailable
from streamplane.telemetry import Stream, StreamError
from streamplane.telemetry.admission import Admission, Limit
from streamplane.telemetry.consumers import Position, StoreWrites, WriteBehind
from streamplane.telemetry.ingest import Ingest, SessionView

__all__ = ["Heartbeats", "StoreSink", "open_stream"]

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


async def open_stream(t: TelemetrySettings, sqlite_path: str | None = None) -> Stream:
    """The stream the settings name (the embedded one needs no server)."""
    if t.engine == "nats":
        from streamplane.telemetry.stream_nats import NatsStream

        return await NatsStream.open(
            t.nats_url, name=t.stream_name, partitions=t.partitions, max_age_s=t.max_age_s
        )
    from streamplane.telemetry.stream_embedded import EmbeddedStream

    if t.stream_dir:
        where = Path(t.stream_dir)
    elif sqlite_path:  # beside the SQLite store: one place holds the control plane's state
        where = Path(sqlite_path + "-telemetry")
    else:
        where = Path("telemetry-stream")
    return EmbeddedStream(where, partitions=t.partitions)


class Heartbeats:
    """The telemetry plane as the control plane runs it; :meth:`start` opens the stream."""

    def __init__(self, settings: Settings, store: Store) -> None:
        t = settings.telemetry
        try:
            self.admission = Admission(
                Limit(t.device_rate, t.device_burst), Limit(t.global_rate, t.global_burst)
            )
        except ValueError as err:
            raise SettingsError(f"telemetry: {err}") from None
        self._settings = settings
        self._store = store
        self.ingest: Ingest | None = None
        self.consumer: WriteBehind | None = None
        self._stream: Stream | None = None

    async def start(self) -> None:
        t = self._settings.telemetry
        c = self._settings.control
        try:
            self._stream = await open_stream(t, self._store.path)
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
        )
        await self.consumer.start()

    async def stop(self) -> None:
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
