"""Quality of experience in the control plane: the aggregates stored, served, and fed to
steering.

:class:`QosStore` is the QoS consumer's sink (``telemetry.qos_consumer``): one transaction
per round reads the marks of the sessions in it, folds the samples (``telemetry.qos.fold_qos``),
reads the minute and hour rows they touch, and writes them back with the new marks. The
transactions of several consumers are serialised (an advisory lock on PostgreSQL, the write
lock on SQLite), so a row's read-merge-write is exact; the marks make a redelivered batch
add nothing. It also answers ``GET /v1/qos`` and purges what is past its retention.

:class:`QosService` runs, every ``judge_every_s``: steering's judgement over the last minutes
of (edge, network) rows (``telemetry.qos.judge_edges``, with hysteresis), assigned whole to
``Steering.demoted`` (prefixes) and ``Steering.demoted_as`` (whole ASes) and kept in the
store, so that a restart starts from the demotions in force; the snapshot behind the
Prometheus metrics; and the purge, once a minute. Without the store it keeps its last state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Literal, TypeVar

import msgspec
from sqlalchemy import Connection, and_, bindparam, delete, insert, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from streamplane.config import SettingsError, TelemetrySettings
from streamplane.control.store import QosDemotion, QosMark, QosRow, Store, StoreUnavailable
from streamplane.steering import Steering
from streamplane.telemetry import (
    AS_NETWORK_PREFIX,
    HOUR,
    MINUTE,
    DemotionPolicy,
    Qos,
    QosConsumer,
    QosKey,
    QosPolicy,
    QosSample,
    RowKey,
    SessionMark,
    Stream,
    Verdict,
    add_qos,
    apply_rows,
    fold_qos,
    judge_edges,
    mean_bitrate_kbps,
    network_asn,
    rebuffer_ratio,
    rollup_qos,
    startup_quantile,
)

__all__ = ["QosRetention", "QosService", "QosStore", "qos_service", "row_out", "total"]

log = logging.getLogger(__name__)

_LOCK: Final = 0x51_05_0F_5E  # pg_advisory_xact_lock key of QoS writes
_CHUNK: Final = 200  # rows per statement (SQLite's bound parameters)
_MARK: Final = msgspec.msgpack.Encoder()
_MARK_DECODER: Final = msgspec.msgpack.Decoder(SessionMark)
_HIST: Final = msgspec.json.Decoder(list[tuple[int, int]])
_COUNTS: Final = (
    "asn",
    "viewers",
    "viewer_minutes",
    "watch_ms",
    "rebuffer_ms",
    "bitrate_ms",
    "kbit",
    "rebuffers",
    "switches",
    "errors",
)
_T = TypeVar("_T")


class QosRetention(msgspec.Struct, frozen=True, kw_only=True):
    minutes_s: float = 2 * 86400.0  # minute rows kept this long...
    hours_s: float = 90 * 86400.0  # ... hour rows this long
    marks_s: float = 6 * 3600.0  # a session's mark, after its last heartbeat


def _chunks(items: Sequence[_T], size: int = _CHUNK) -> Iterator[Sequence[_T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _qos(row: Any) -> Qos:
    return Qos(
        **{name: int(getattr(row, name)) for name in _COUNTS},
        startups=dict(_HIST.decode(row.startups)),
    )


def _values(row: RowKey, q: Qos) -> dict[str, Any]:
    return {
        "start": row.start,
        "span": row.span,
        "edge": row.key.edge,
        "title": row.key.title,
        "network": row.key.network,
        **{name: getattr(q, name) for name in _COUNTS},
        "startups": msgspec.json.encode(sorted(q.startups.items())).decode(),
    }


_KEY_COLUMNS: Final = (QosRow.start, QosRow.span, QosRow.edge, QosRow.title, QosRow.network)


class QosStore:
    """The QoS rows and marks in the control plane's store."""

    def __init__(self, store: Store, policy: QosPolicy = QosPolicy()) -> None:
        self.store = store
        self.policy = policy
        # Built once: a statement per call (its VALUES the size of the batch) was compiled
        # anew every time, most of a write's cost.
        insert = pg_insert if store.is_postgres else sqlite_insert
        rows = insert(QosRow)
        self._upsert_rows = rows.on_conflict_do_update(
            index_elements=[c.key for c in _KEY_COLUMNS],
            set_={c: rows.excluded[c] for c in (*_COUNTS, "startups")},
        )
        marks = insert(QosMark)
        self._upsert_marks = marks.on_conflict_do_update(
            index_elements=["session"],
            set_={"seen_at": marks.excluded.seen_at, "mark": marks.excluded.mark},
        )
        self._read_marks = select(QosMark.session, QosMark.mark).where(
            QosMark.session.in_(bindparam("b_sessions", expanding=True))
        )
        self._read_rows = select(*QosRow.__table__.columns).where(
            tuple_(*_KEY_COLUMNS).in_(bindparam("b_keys", expanding=True))
        )

    async def write(self, samples: Sequence[QosSample]) -> None:
        """Fold ``samples`` into the stored rows and marks, in one transaction."""
        if samples:
            await self.store.transaction(lambda conn: self._write(conn, samples))

    def _write(self, conn: Connection, samples: Sequence[QosSample]) -> None:
        if self.store.is_postgres:
            conn.execute(text(f"SELECT pg_advisory_xact_lock({_LOCK})"))
        seen: dict[str, float] = {}
        for s in samples:
            seen[s.session] = max(seen.get(s.session, 0.0), s.received_at)
        marks: dict[str, SessionMark] = {}
        for chunk in _chunks(sorted(seen)):
            for session, mark in conn.execute(self._read_marks, {"b_sessions": list(chunk)}):
                marks[session] = _MARK_DECODER.decode(mark)
        folded = fold_qos(marks, samples, self.policy)
        keys = set(folded.deltas)
        keys.update(RowKey(r.start // HOUR * HOUR, HOUR, r.key) for r in folded.deltas)
        existing: dict[RowKey, Qos] = {}
        for row_keys in _chunks(sorted(keys)):
            wanted = [(r.start, r.span, r.key.edge, r.key.title, r.key.network) for r in row_keys]
            for stored in conn.execute(self._read_rows, {"b_keys": wanted}):
                key = QosKey(stored.edge, stored.title, stored.network)
                existing[RowKey(stored.start, stored.span, key)] = _qos(stored)
        rows = sorted(apply_rows(existing, folded.deltas).items())  # one lock order for all
        if rows:
            conn.execute(self._upsert_rows, [_values(r, q) for r, q in rows])
        if folded.marks:
            conn.execute(
                self._upsert_marks,
                [
                    {"session": s, "seen_at": seen[s], "mark": _MARK.encode(m)}
                    for s, m in sorted(folded.marks.items())
                ],
            )

    async def rows(
        self,
        *,
        span: int,
        since: float,
        until: float,
        edge: str | None = "",
        title: str | None = "",
        network: str | None = "",
        networks: Literal["prefix", "as"] | None = None,
        limit: int = 10_000,
    ) -> list[tuple[RowKey, Qos]]:
        """Rows of ``span`` whose period overlaps [since, until), of one kind (edge, title,
        network, edge for a network): per field, ``None`` for any value, a value for that one, and
        ``""`` (the default) where the field does not apply to the kind. ``networks`` keeps
        only the rows of prefixes or only those of whole ASes (default: both)."""
        where = [QosRow.span == span, QosRow.start > since - span, QosRow.start < until]
        if networks == "as":
            where.append(QosRow.network.startswith(AS_NETWORK_PREFIX))
        elif networks == "prefix":
            where.append(~QosRow.network.startswith(AS_NETWORK_PREFIX))
        for column, value in (
            (QosRow.edge, edge),
            (QosRow.title, title),
            (QosRow.network, network),
        ):
            if value is None:
                where.append(column != "")
            else:
                where.append(column == value)
        async with self.store.read() as conn:
            found = await conn.execute(
                select(*QosRow.__table__.columns)
                .where(and_(*where))
                .order_by(*_KEY_COLUMNS)
                .limit(limit)
            )
            return [
                (RowKey(r.start, r.span, QosKey(r.edge, r.title, r.network)), _qos(r))
                for r in found
            ]

    async def purge(self, now: float, retention: QosRetention) -> int:
        """Delete minute rows, hour rows and marks past their retention; how many."""

        def work(conn: Connection) -> int:
            gone = conn.execute(
                delete(QosRow).where(QosRow.span != HOUR, QosRow.start < now - retention.minutes_s)
            ).rowcount
            gone += conn.execute(
                delete(QosRow).where(QosRow.span == HOUR, QosRow.start < now - retention.hours_s)
            ).rowcount
            gone += conn.execute(
                delete(QosMark).where(QosMark.seen_at < now - retention.marks_s)
            ).rowcount
            return int(gone)

        return await self.store.transaction(work)

    async def demotions(self) -> dict[tuple[str, str], Verdict]:
        """The demotions in force, as last saved: (network, edge) -> verdict."""
        async with self.store.read() as conn:
            found = await conn.execute(select(*QosDemotion.__table__.columns))
            return {
                (d.network, d.edge): Verdict(since=d.since, bad_at=d.bad_at, reason=d.reason)
                for d in found
            }

    async def save_demotions(self, verdicts: Mapping[tuple[str, str], Verdict]) -> None:
        """Make the stored demotions ``verdicts``, in one transaction."""
        rows = [
            {"network": n, "edge": e, "since": v.since, "bad_at": v.bad_at, "reason": v.reason}
            for (n, e), v in sorted(verdicts.items())
        ]

        def work(conn: Connection) -> None:
            conn.execute(delete(QosDemotion))
            if rows:
                conn.execute(insert(QosDemotion), rows)

        await self.store.transaction(work)


def row_out(row: RowKey, q: Qos) -> dict[str, Any]:
    """A row as the API shows it: the stored sums and what they give."""
    p50, p95 = startup_quantile(q.startups, 0.5), startup_quantile(q.startups, 0.95)
    return {
        "start": row.start,
        "span_s": row.span,
        "edge": row.key.edge or None,
        "title": row.key.title or None,
        "network": row.key.network or None,
        "asn": q.asn if row.key.network else None,
        "viewers": q.viewers,
        "viewer_minutes": q.viewer_minutes,
        "watch_s": q.watch_ms / 1000,
        "rebuffer_s": q.rebuffer_ms / 1000,
        "rebuffer_ratio": rebuffer_ratio(q),
        "mean_bitrate_kbps": mean_bitrate_kbps(q),
        "rebuffers": q.rebuffers,
        "switches": q.switches,
        "errors": q.errors,
        "startups": sum(q.startups.values()),
        "startup_p50_s": None if p50 is None else round(p50, 4),
        "startup_p95_s": None if p95 is None else round(p95, 4),
    }


def total(rows: Iterable[tuple[RowKey, Qos]]) -> Qos:
    """``rows`` as one: the rows of one period added (one key's, or several keys' of a
    kind: a session that moved between edges within a minute counts on both), then the
    periods rolled up (viewers: the peak period's)."""
    periods: dict[int, Qos] = {}
    for row, q in rows:
        known = periods.get(row.start)
        periods[row.start] = q if known is None else add_qos(known, q)
    out = Qos()
    for q in periods.values():
        out = rollup_qos(out, q)
    return out


class QosService:
    """The QoS store, steering's demotions and the metrics snapshot of one control plane."""

    def __init__(
        self,
        store: Store,
        steering: Steering,
        *,
        clock: Callable[[], float] = time.time,
        policy: QosPolicy = QosPolicy(),
        steering_policy: DemotionPolicy = DemotionPolicy(),
        retention: QosRetention = QosRetention(),
        judge_every_s: float = 10.0,
    ) -> None:
        self.store = QosStore(store, policy)
        self.steering = steering
        self.clock = clock
        self.steering_policy = steering_policy
        self.retention = retention
        self.judge_every_s = judge_every_s
        self.verdicts: dict[tuple[str, str], Verdict] = {}
        # The demotions are kept in the store: a restart neither forgets one nor lets the
        # edge back before the evidence (or the hold) says so.
        self._saved: dict[tuple[str, str], Verdict] = {}
        self._restored = False
        self._edges: list[tuple[RowKey, Qos]] = []  # the last whole minute, per edge...
        self._ases: list[tuple[RowKey, Qos]] = []  # ... and per AS
        self._task: asyncio.Task[None] | None = None
        self._purged_at = -float("inf")
        self.judgements = 0
        self.failures = 0
        self.consumers: list[QosConsumer] = []
        # which edge ids a player may report (the control plane: the fleet's, and the origin)
        self.known_edge: Callable[[str], bool] | None = None

    async def start(self) -> None:
        """Steering takes the demotions in force before the restart at once (the store
        down: at the first judgement that can read them), then the judgement loop runs."""
        with contextlib.suppress(StoreUnavailable):
            await self._restore()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="qos-judge")

    async def _restore(self) -> None:
        self.verdicts = await self.store.demotions()
        self._saved = dict(self.verdicts)
        self._restored = True
        self._assign()

    def _assign(self) -> None:
        demoted: dict[str, dict[str, str]] = {}
        demoted_as: dict[int, dict[str, str]] = {}
        for (network, edge), verdict in self.verdicts.items():
            asn = network_asn(network)
            if asn is None:
                demoted.setdefault(network, {})[edge] = verdict.reason
            else:
                demoted_as.setdefault(asn, {})[edge] = verdict.reason
        self.steering.demoted = demoted
        self.steering.demoted_as = demoted_as

    async def consume(self, stream: Stream, **options: Any) -> QosConsumer:
        """Start a QoS consumer of ``stream`` into this store (``options``: its own, such as
        ``group`` or ``ack_wait_s``); stopped with the service."""
        consumer = QosConsumer(
            stream, self.store, self.steering.network, known_edge=self.known_edge, **options
        )
        await consumer.start()
        self.consumers.append(consumer)
        return consumer

    async def stop(self) -> None:
        for consumer in self.consumers:
            await consumer.stop()
        self.consumers = []
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self) -> None:
        """Judge the edges from the stored rows now, and take the metrics snapshot."""
        now = self.clock()
        window = self.steering_policy.window_s
        bucket = self.store.policy.bucket_s
        pairs = await self.store.rows(
            span=bucket, since=now - window, until=now + bucket, edge=None, network=None
        )
        if not self._restored:  # before judging: the hysteresis starts from what was in force
            await self._restore()
        self.verdicts = judge_edges(
            ((r.key, q) for r, q in pairs), self.verdicts, now, self.steering_policy
        )
        self._assign()
        if self.verdicts != self._saved:
            await self.store.save_demotions(self.verdicts)
            self._saved = dict(self.verdicts)
        last = (int(now) // bucket - 1) * bucket
        self._edges = await self.store.rows(
            span=bucket, since=last, until=last + bucket, edge=None, title="", network=""
        )
        self._ases = await self.store.rows(
            span=bucket, since=last, until=last + bucket, network=None, networks="as"
        )
        self.judgements += 1
        if now - self._purged_at >= MINUTE:
            self._purged_at = now
            await self.store.purge(now, self.retention)

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except StoreUnavailable as err:
                self.failures += 1
                log.warning("qos: the store is unavailable (%s); steering keeps its last view", err)
            except Exception:  # must not end the loop: steering would freeze silently
                self.failures += 1
                log.exception("qos: judging the edges failed")
            await asyncio.sleep(self.judge_every_s)

    def metrics(self) -> str:
        """Prometheus text: each edge's last whole minute, and the demotions in force."""
        lines: list[str] = []

        def family(name: str, kind: str, text: str, rows: Iterable[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{{{labels}}} {value:g}" for labels, value in rows)

        edges = [(f'edge="{_label(r.key.edge)}"', q) for r, q in self._edges]
        minute = "in the last whole minute"
        family(
            "streamplane_qos_viewers",
            "gauge",
            f"Sessions heard from on the edge {minute}.",
            ((e, q.viewers) for e, q in edges),
        )
        family(
            "streamplane_qos_rebuffer_ratio",
            "gauge",
            f"Time stalled over time watched on the edge {minute}.",
            ((e, r) for e, q in edges if (r := rebuffer_ratio(q)) is not None),
        )
        family(
            "streamplane_qos_bitrate_kbps",
            "gauge",
            f"Mean bitrate played from the edge {minute}.",
            ((e, b) for e, q in edges if (b := mean_bitrate_kbps(q)) is not None),
        )
        family(
            "streamplane_qos_startup_seconds",
            "gauge",
            f"Startup time of the sessions that started on the edge {minute}.",
            (
                (f'{e},quantile="{p:g}"', v)
                for e, q in edges
                for p in (0.5, 0.95)
                if (v := startup_quantile(q.startups, p)) is not None
            ),
        )
        family(
            "streamplane_qos_switches",
            "gauge",
            f"Rung switches on the edge {minute}.",
            ((e, q.switches) for e, q in edges),
        )
        family(
            "streamplane_qos_errors",
            "gauge",
            f"Player errors on the edge {minute}.",
            ((e, q.errors) for e, q in edges),
        )
        ases = [(f'asn="{asn}"', q) for r, q in self._ases if (asn := network_asn(r.key.network))]
        family(
            "streamplane_qos_as_viewers",
            "gauge",
            f"Sessions heard from in the client AS (its origin AS) {minute}.",
            ((a, q.viewers) for a, q in ases),
        )
        family(
            "streamplane_qos_as_rebuffer_ratio",
            "gauge",
            f"Time stalled over time watched by the client AS's viewers {minute}.",
            ((a, r) for a, q in ases if (r := rebuffer_ratio(q)) is not None),
        )
        family(
            "streamplane_qos_as_bitrate_kbps",
            "gauge",
            f"Mean bitrate played to the client AS's viewers {minute}.",
            ((a, b) for a, q in ases if (b := mean_bitrate_kbps(q)) is not None),
        )
        family(
            "streamplane_qos_demoted",
            "gauge",
            "1 for an edge steering ranks after the others for a client network (a prefix, or"
            " a whole AS: ASn).",
            ((f'network="{_label(n)}",edge="{_label(e)}"', 1.0) for n, e in sorted(self.verdicts)),
        )
        lines.append(
            "# HELP streamplane_qos_events_total Heartbeat events folded into the QoS rows."
        )
        lines.append("# TYPE streamplane_qos_events_total counter")
        lines.append(
            f"streamplane_qos_events_total {sum(c.written_events for c in self.consumers)}"
        )
        lines.append(
            "# HELP streamplane_qos_write_failures_total QoS writes that failed and were retried."
        )
        lines.append("# TYPE streamplane_qos_write_failures_total counter")
        lines.append(
            f"streamplane_qos_write_failures_total {sum(c.failures for c in self.consumers)}"
        )
        lines.append("# HELP streamplane_qos_judge_failures_total Judgements that failed.")
        lines.append("# TYPE streamplane_qos_judge_failures_total counter")
        lines.append(f"streamplane_qos_judge_failures_total {self.failures}")
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def qos_service(
    t: TelemetrySettings, store: Store, steering: Steering, clock: Callable[[], float]
) -> QosService:
    """The QoS service as ``[telemetry]`` sets it up; SettingsError naming a bad setting."""
    try:
        policy = QosPolicy(lateness_s=t.qos_lateness_s, bucket_s=t.qos_bucket_s)
    except ValueError as err:
        raise SettingsError(f"telemetry.qos_bucket_s: {err}") from None
    return QosService(
        store,
        steering,
        clock=clock,
        policy=policy,
        steering_policy=DemotionPolicy(
            window_s=t.qos_window_s,
            min_watch_s=t.qos_min_watch_s,
            floor=t.qos_floor,
            factor=t.qos_factor,
            recover_factor=t.qos_recover_factor,
            hold_s=t.qos_hold_s,
        ),
        retention=QosRetention(minutes_s=t.qos_minutes_kept_s, hours_s=t.qos_hours_kept_s),
        judge_every_s=t.qos_judge_every_s,
    )
