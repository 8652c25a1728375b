"""Quality of experience per minute: the pure core of the QoS aggregates.

What is aggregated, per minute of event time, per edge, per title, per client network
(its prefix and origin AS, as steering finds them: ``steering.client_network``; and, when the
AS is known, the whole AS as a network of its own, ``as_network``) and per (edge, network),
which is what steering compares:

- ``viewers``: distinct sessions with a heartbeat in that minute;
- ``watch_ms``: the event time the sessions' heartbeats span; ``rebuffer_ms``: time stalled
  (so the rebuffer ratio is ``rebuffer_ms / watch_ms``);
- ``kbit`` over ``bitrate_ms``: the mean bitrate, each stretch of time weighted by the
  bitrate the player reported at its end;
- ``rebuffers``, ``switches``, ``errors``: how many happened;
- ``startups``: each session's startup time once, as a histogram (below).

Players report counters since their session started (rebuffers, rebuffer time, switches,
errors). A session's rebuffer time is counted up to the time its heartbeats span (no one
stalls longer than that; a player that says so is wrong, or lying to have an edge demoted).
The core keeps, per session, a :class:`SessionMark`: the highest of each counter seen
and the event-time range seen. An event contributes only what raises the mark: the counters'
growth, the time by which it stretches the range, a startup not yet counted, a minute (per
edge and network) in which the session was not yet counted as a viewer. Hence idempotence
without a dedupe table: a duplicate or a redelivered event raises nothing and adds nothing,
and a late event adds only what no later event had already reported. Totals (watch time,
rebuffer time, the counters, startups) do not depend on the order events arrive in; only
which minute receives an increment does (the first event that reports it).

Late and skewed events: an event's minute is that of its own clock (``at``), clamped to at
most ``lateness_s`` before and ``ahead_s`` after the moment the control plane received it.
A player whose clock is off, or a batch delayed past the lateness, lands in the nearest
allowed minute: nothing is dropped, it is only moved in time. A
session's viewer marks are kept for the minutes within the lateness of its latest event; an
event older than that counts no viewer (it could be counted twice otherwise).

Startup percentiles come from a log-bucketed histogram with the logarithmic mapping of
DDSketch (Masson, Rim, Lee, VLDB 2019): bucket ``ceil(log_gamma(x))`` with
``gamma = (1 + a) / (1 - a)``, ``a = STARTUP_ACCURACY`` (1 %). Merging is adding bucket
counts, so minutes, hours and processes merge exactly, and a quantile read from any merge is
within 1 % of a true sample value of that quantile's rank.

Two merges: :func:`add_qos` combines deltas for the same period (everything sums), and
:func:`rollup_qos` combines different minutes into a longer period (``viewers`` becomes the
peak minute's, ``viewer_minutes`` their sum; everything else sums). Both are associative
and commutative; times are integer milliseconds and bitrate integrals integer kbit, so sums
are exact in any order.

Pure: no I/O, no clock; the shell (``control/qos.py``) resolves networks, reads and writes
the marks and rows in one transaction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final, NamedTuple

import msgspec

__all__ = [
    "AS_NETWORK_PREFIX",
    "HOUR",
    "MINUTE",
    "STARTUP_ACCURACY",
    "DemotionPolicy",
    "Folded",
    "Qos",
    "QosKey",
    "QosPolicy",
    "QosSample",
    "RowKey",
    "SessionMark",
    "Verdict",
    "add_qos",
    "apply_rows",
    "as_network",
    "fold_qos",
    "judge_edges",
    "mean_bitrate_kbps",
    "network_asn",
    "rebuffer_ratio",
    "rollup_qos",
    "startup_bucket",
    "startup_quantile",
]

MINUTE: Final = 60
HOUR: Final = 3600
STARTUP_ACCURACY: Final = 0.01
_GAMMA: Final = (1 + STARTUP_ACCURACY) / (1 - STARTUP_ACCURACY)
_LOG_GAMMA: Final = math.log(_GAMMA)
_MIN_STARTUP_S: Final = 0.001  # faster startups share the 1 ms bucket
_MAX_KEYS_PER_SESSION: Final = 256  # viewer marks kept per session (edges x networks x minutes)


AS_NETWORK_PREFIX: Final = "AS"


def as_network(asn: int) -> str:
    """The network of a row kept for a whole origin AS (``AS64500``): rows and demotions are
    kept per prefix and per AS alike, and no prefix is spelt so (``S`` is no hex digit)."""
    return f"{AS_NETWORK_PREFIX}{asn}"


def network_asn(network: str) -> int | None:
    """The AS of a row's network that is a whole AS; None for a prefix."""
    if network.startswith(AS_NETWORK_PREFIX) and network[len(AS_NETWORK_PREFIX) :].isdigit():
        return int(network[len(AS_NETWORK_PREFIX) :])
    return None


class QosKey(NamedTuple):
    """What a row aggregates: an edge, a title, a network, or an edge for a network.
    Fields that do not apply are empty."""

    edge: str = ""
    title: str = ""
    network: str = ""


class RowKey(NamedTuple):
    """A stored row: its period (start, epoch s, and span, s) and what it aggregates."""

    start: int
    span: int
    key: QosKey


class Qos(msgspec.Struct, kw_only=True):
    """One period's aggregate for one key (or a delta to add to it)."""

    viewers: int = 0  # a minute: distinct sessions; longer: the peak minute's
    viewer_minutes: int = 0
    watch_ms: int = 0
    rebuffer_ms: int = 0
    bitrate_ms: int = 0  # time with a known bitrate...
    kbit: int = 0  # ... and the bits played in it
    rebuffers: int = 0
    switches: int = 0
    errors: int = 0
    startups: dict[int, int] = {}  # startup histogram: bucket -> sessions
    asn: int = 0  # a network's origin AS (0: unknown)


def _sum_fields(a: Qos, b: Qos, viewers: int) -> Qos:
    startups = dict(a.startups)
    for bucket, n in b.startups.items():
        startups[bucket] = startups.get(bucket, 0) + n
    return Qos(
        viewers=viewers,
        viewer_minutes=a.viewer_minutes + b.viewer_minutes,
        watch_ms=a.watch_ms + b.watch_ms,
        rebuffer_ms=a.rebuffer_ms + b.rebuffer_ms,
        bitrate_ms=a.bitrate_ms + b.bitrate_ms,
        kbit=a.kbit + b.kbit,
        rebuffers=a.rebuffers + b.rebuffers,
        switches=a.switches + b.switches,
        errors=a.errors + b.errors,
        startups=startups,
        asn=max(a.asn, b.asn),
    )


def add_qos(a: Qos, b: Qos) -> Qos:
    """Two deltas of the same period together."""
    return _sum_fields(a, b, a.viewers + b.viewers)


def rollup_qos(a: Qos, b: Qos) -> Qos:
    """Two periods together (minutes into an hour): the peak viewers, everything else summed."""
    return _sum_fields(a, b, max(a.viewers, b.viewers))


def startup_bucket(seconds: float) -> int:
    return math.ceil(math.log(max(seconds, _MIN_STARTUP_S)) / _LOG_GAMMA)


def _bucket_value(bucket: int) -> float:
    # DDSketch's estimate for a bucket: within the relative accuracy of every value in it.
    return 2 * _GAMMA**bucket / (_GAMMA + 1)


def startup_quantile(histogram: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a startup histogram, in seconds; None if it is empty."""
    total = sum(histogram.values())
    if total <= 0:
        return None
    rank = q * (total - 1)
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen > rank:
            return _bucket_value(bucket)
    return _bucket_value(max(histogram))  # pragma: no cover - rank < total always


def rebuffer_ratio(q: Qos) -> float | None:
    """Time stalled over time watched (0..1); None with nothing watched."""
    if q.watch_ms <= 0:
        return None if q.rebuffer_ms <= 0 else 1.0
    return min(1.0, q.rebuffer_ms / q.watch_ms)


def mean_bitrate_kbps(q: Qos) -> float | None:
    return q.kbit * 1000 / q.bitrate_ms if q.bitrate_ms > 0 else None


class QosSample(msgspec.Struct, frozen=True, kw_only=True):
    """What the core reads of one heartbeat event (the shell resolved its network)."""

    session: str
    title: str
    at: float  # the player's clock, epoch s
    received_at: float  # the control plane's
    edge: str | None = None
    network: str | None = None  # the client's prefix
    asn: int = 0
    rebuffer_s: float = 0.0  # since the session started
    rebuffers: int = 0
    switches: int = 0
    errors: int = 0
    bitrate_kbps: float | None = None
    startup_s: float | None = None


class SessionMark(msgspec.Struct, kw_only=True):
    """What one session has contributed so far (see the module's docstring)."""

    lo_ms: int
    hi_ms: int
    rebuffer_ms: int = 0  # reported
    rebuffer_counted_ms: int = 0  # counted: at most hi_ms - lo_ms
    rebuffers: int = 0
    switches: int = 0
    errors: int = 0
    startup: bool = False
    viewed: list[tuple[int, str, str]] = []  # (minute start, edge, network) counted


class QosPolicy(msgspec.Struct, frozen=True, kw_only=True):
    lateness_s: float = 600.0  # an event may be this much older than its arrival...
    ahead_s: float = 60.0  # ... or this much newer, before it is moved
    # The period of the finest rows: a minute; shorter ones (dividing an hour) for tests
    # and demos that cannot wait minutes for steering to see a change.
    bucket_s: int = MINUTE

    def __post_init__(self) -> None:
        if not (1 <= self.bucket_s < HOUR and HOUR % self.bucket_s == 0):
            raise ValueError(f"bucket_s must divide an hour and be shorter, not {self.bucket_s}")


class Folded(msgspec.Struct, kw_only=True):
    """A fold's result: the marks after it, and what it adds to each minute's rows."""

    marks: dict[str, SessionMark]
    deltas: dict[RowKey, Qos]
    events: int = 0


def _networks(network: str, asn: int) -> list[str]:
    """The networks an event counts in: its prefix, and its whole origin AS when known."""
    if not network:
        return []
    return [network, as_network(asn)] if asn else [network]


def _keys(edge: str, title: str, networks: list[str]) -> list[QosKey]:
    keys = [QosKey(title=title)]
    if edge:
        keys.append(QosKey(edge=edge))
    for network in networks:
        keys.append(QosKey(network=network))
        if edge:
            keys.append(QosKey(edge=edge, network=network))
    return keys


def _viewed(
    key: QosKey, minute: int, edge: str, network: str, marks: list[tuple[int, str, str]]
) -> bool:
    for m, e, n in marks:
        if m != minute:
            continue
        if key.edge and key.network:
            if e == edge and n == network:
                return True
        elif key.edge:
            if e == edge:
                return True
        elif key.network:
            if n == network:
                return True
        else:
            return True
    return False


def fold_qos(
    marks: Mapping[str, SessionMark],
    samples: Iterable[QosSample],
    policy: QosPolicy = QosPolicy(),
) -> Folded:
    """What ``samples`` add to the minutes' rows, given the sessions' ``marks`` before them
    (sessions not in it are new); ``marks`` is not changed."""
    out = Folded(marks={}, deltas={})
    lateness_ms = int(policy.lateness_s * 1000)
    bucket = policy.bucket_s
    bucket_ms = bucket * 1000
    for s in samples:
        out.events += 1
        received_ms = int(s.received_at * 1000)
        at_ms = int(s.at * 1000)
        if at_ms < received_ms - lateness_ms:
            at_ms = received_ms - lateness_ms
        elif at_ms > received_ms + int(policy.ahead_s * 1000):
            at_ms = received_ms
        minute = at_ms // bucket_ms * bucket
        mark = out.marks.get(s.session)
        if mark is None:
            known = marks.get(s.session)
            mark = (
                msgspec.structs.replace(known, viewed=list(known.viewed))
                if known is not None
                else None
            )
        delta = Qos(asn=s.asn)
        rebuffer_ms = int(s.rebuffer_s * 1000)
        if mark is None:
            mark = SessionMark(lo_ms=at_ms, hi_ms=at_ms)
            stretch = 0
        else:
            stretch = max(0, at_ms - mark.hi_ms) + max(0, mark.lo_ms - at_ms)
            mark.hi_ms = max(mark.hi_ms, at_ms)
            mark.lo_ms = min(mark.lo_ms, at_ms)
        out.marks[s.session] = mark
        delta.watch_ms = stretch
        if stretch and s.bitrate_kbps is not None:
            delta.bitrate_ms = stretch
            delta.kbit = round(s.bitrate_kbps * stretch / 1000)
        # No session stalls longer than the time its heartbeats span: a player reporting more
        # (a bug, or one trying to have an edge demoted) is counted up to that, as it goes.
        # Both bounds only grow, and end the same in any order.
        mark.rebuffer_ms = max(mark.rebuffer_ms, rebuffer_ms)
        counted = min(mark.rebuffer_ms, mark.hi_ms - mark.lo_ms)
        delta.rebuffer_ms = max(0, counted - mark.rebuffer_counted_ms)
        mark.rebuffer_counted_ms = max(mark.rebuffer_counted_ms, counted)
        delta.rebuffers = max(0, s.rebuffers - mark.rebuffers)
        delta.switches = max(0, s.switches - mark.switches)
        delta.errors = max(0, s.errors - mark.errors)
        mark.rebuffers = max(mark.rebuffers, s.rebuffers)
        mark.switches = max(mark.switches, s.switches)
        mark.errors = max(mark.errors, s.errors)
        if s.startup_s is not None and not mark.startup:
            mark.startup = True
            delta.startups = {startup_bucket(s.startup_s): 1}
        edge = s.edge or ""
        networks = _networks(s.network or "", s.asn)
        # Viewer marks older than the lateness behind the session's latest event are let go;
        # an event in those minutes counts no viewer (it might have been counted already).
        horizon = (mark.hi_ms - lateness_ms) // bucket_ms * bucket - bucket
        if mark.viewed and mark.viewed[0][0] < horizon:
            mark.viewed = [v for v in mark.viewed if v[0] >= horizon]
        counted = minute >= horizon and len(mark.viewed) < _MAX_KEYS_PER_SESSION
        viewed_before = mark.viewed
        if counted:
            new = [
                (minute, edge, n) for n in networks or [""] if (minute, edge, n) not in mark.viewed
            ]
            if new:
                mark.viewed = sorted([*viewed_before, *new])
        for key in _keys(edge, s.title, networks):
            seen = _viewed(key, minute, edge, key.network, viewed_before)
            viewer = 1 if counted and not seen else 0
            row = RowKey(minute, bucket, key)
            d = out.deltas.get(row)
            if d is None:  # owned by this fold: added to in place below
                d = out.deltas[row] = Qos(asn=delta.asn if key.network else 0)
            elif key.network and delta.asn > d.asn:
                d.asn = delta.asn
            d.viewers += viewer
            d.viewer_minutes += viewer
            d.watch_ms += delta.watch_ms
            d.rebuffer_ms += delta.rebuffer_ms
            d.bitrate_ms += delta.bitrate_ms
            d.kbit += delta.kbit
            d.rebuffers += delta.rebuffers
            d.switches += delta.switches
            d.errors += delta.errors
            if delta.startups:
                if not d.startups:
                    d.startups = {}
                for b, n in delta.startups.items():
                    d.startups[b] = d.startups.get(b, 0) + n
    return out


def apply_rows(existing: Mapping[RowKey, Qos], deltas: Mapping[RowKey, Qos]) -> dict[RowKey, Qos]:
    """The rows to store after ``deltas`` (minute rows), given the ``existing`` rows (minute
    and hour rows of the same keys): each minute's row plus its delta, and its hour's row
    kept equal to the rollup of that hour's minutes."""
    out: dict[RowKey, Qos] = {}
    for row, delta in sorted(deltas.items()):
        minute_row = add_qos(out.get(row) or existing.get(row) or Qos(), delta)
        out[row] = minute_row
        hour = RowKey(row.start // HOUR * HOUR, HOUR, row.key)
        hour_row = out.get(hour) or existing.get(hour) or Qos()
        summed = add_qos(hour_row, msgspec.structs.replace(delta, viewers=0))
        summed.viewers = max(hour_row.viewers, minute_row.viewers)
        out[hour] = summed
    return out


# -- steering: which edges rebuffer far more than their peers for the same network ---------


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """An edge demoted for a network: since when, the last time the evidence said so, and
    why (the sentence steering puts in the edge's ranking reason)."""

    since: float
    bad_at: float
    reason: str


class DemotionPolicy(msgspec.Struct, frozen=True, kw_only=True):
    window_s: int = 180  # the minutes compared: those ending within this of now
    min_watch_s: float = 60.0  # an edge (and its peers) needs this much watching to judge
    floor: float = 0.02  # a rebuffer ratio below this is never "far more"
    factor: float = 3.0  # demoted at this many times its peers' ratio...
    recover_factor: float = 1.5  # ... and recovered at this many times, or below the floor
    hold_s: float = 120.0  # demoted this long after the last evidence, then tried again


def _pct(x: float) -> str:
    return f"{x * 100:.1f} %"


def judge_edges(
    rows: Iterable[tuple[QosKey, Qos]],
    demoted: Mapping[tuple[str, str], Verdict],
    now: float,
    policy: DemotionPolicy = DemotionPolicy(),
) -> dict[tuple[str, str], Verdict]:
    """Which (network, edge) pairs steering demotes now, from the (edge, network) minute
    rows of the window (summed here) and the pairs demoted before (hysteresis).

    An edge is demoted for a network when its viewers there rebuffer at least ``factor``
    times as much as the other edges' viewers in the same network (pooled), and more than
    ``floor``; it stays demoted until its ratio falls to ``recover_factor`` times its peers'
    (or below ``floor``), or ``hold_s`` passes with no evidence (a demoted edge gets few new
    viewers: it is then tried again rather than kept out forever).
    """
    per: dict[str, dict[str, list[int]]] = {}  # network -> edge -> [watch_ms, rebuffer_ms]
    for key, q in rows:
        if not (key.edge and key.network):
            continue
        sums = per.setdefault(key.network, {}).setdefault(key.edge, [0, 0])
        sums[0] += q.watch_ms
        sums[1] += q.rebuffer_ms
    out: dict[tuple[str, str], Verdict] = {}
    judged: set[tuple[str, str]] = set()  # pairs with enough watching, theirs and their peers'
    min_ms = policy.min_watch_s * 1000
    for network, edges in per.items():
        total_watch = sum(w for w, _ in edges.values())
        total_rebuffer = sum(r for _, r in edges.values())
        for edge, (watch, rebuffer) in edges.items():
            peers_watch = total_watch - watch
            if watch < min_ms or peers_watch < min_ms:
                continue
            judged.add((network, edge))
            ratio = min(1.0, rebuffer / watch)
            peers = (total_rebuffer - rebuffer) / peers_watch
            before = demoted.get((network, edge))
            if before is None:
                bad = ratio > policy.floor and ratio >= policy.factor * peers
            else:
                bad = ratio > policy.floor and ratio > policy.recover_factor * peers
            if bad:
                reason = (
                    f"viewers in {network} rebuffer {_pct(ratio)} of the time on it against"
                    f" {_pct(peers)} on other edges"
                )
                since = before.since if before is not None else now
                out[network, edge] = Verdict(since=since, bad_at=now, reason=reason)
    for pair, before in demoted.items():
        if pair not in out and pair not in judged and now - before.bad_at < policy.hold_s:
            out[pair] = before  # no evidence either way yet: held
    return out
