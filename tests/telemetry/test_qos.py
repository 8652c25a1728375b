"""The QoS core: merges, roll-ups, redelivery, late events, the startup sketch, steering's
judgement with hysteresis."""

from __future__ import annotations

import random
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.telemetry.qos import (
    HOUR,
    MINUTE,
    STARTUP_ACCURACY,
    Qos,
    QosKey,
    QosSample,
    RowKey,
    SessionMark,
    Verdict,
    add_qos,
    apply_rows,
    fold_qos,
    judge_edges,
    mean_bitrate_kbps,
    rebuffer_ratio,
    rollup_qos,
    startup_quantile,
)

T0 = 1_800_000_000.0  # a whole hour (1_800_000_000 / 3600 = 500_000)

qos_values = st.builds(
    Qos,
    viewers=st.integers(0, 50),
    viewer_minutes=st.integers(0, 50),
    watch_ms=st.integers(0, 10**9),
    rebuffer_ms=st.integers(0, 10**8),
    bitrate_ms=st.integers(0, 10**9),
    kbit=st.integers(0, 10**10),
    rebuffers=st.integers(0, 100),
    switches=st.integers(0, 100),
    errors=st.integers(0, 100),
    startups=st.dictionaries(st.integers(-700, 1200), st.integers(1, 9), max_size=4),
    asn=st.sampled_from([0, 64500, 64501]),
)


@st.composite
def sessions(draw: st.DrawFn) -> list[QosSample]:
    """Heartbeats of a few sessions in order, counters growing as players report them."""
    out: list[QosSample] = []
    for s in range(draw(st.integers(1, 4))):
        t = T0 + draw(st.integers(0, 7000))
        reb = 0.0
        rebuffers = switches = errors = 0
        edge = draw(st.sampled_from(["e1", "e2", None]))
        network = draw(st.sampled_from(["203.0.113.0/24", "198.51.100.0/24", None]))
        startup = draw(st.none() | st.floats(0.05, 30))
        for i in range(draw(st.integers(1, 8))):
            t += draw(st.integers(1, 90))
            reb += draw(st.sampled_from([0.0, 0.0, 0.5, 2.25]))
            rebuffers += draw(st.integers(0, 1))
            switches += draw(st.integers(0, 2))
            errors += draw(st.integers(0, 1))
            if draw(st.integers(0, 5)) == 0:
                edge = draw(st.sampled_from(["e1", "e2"]))  # a failover
            out.append(
                QosSample(
                    session=f"s{s}",
                    title="demo",
                    at=t,
                    received_at=t + draw(st.integers(0, 5)),
                    edge=edge,
                    network=network,
                    asn=64500 if network else 0,
                    rebuffer_s=reb,
                    rebuffers=rebuffers,
                    switches=switches,
                    errors=errors,
                    bitrate_kbps=draw(st.none() | st.sampled_from([800.0, 2500.0])),
                    startup_s=startup if i >= draw(st.integers(0, 1)) else None,
                )
            )
    order = draw(st.permutations(range(len(out))))
    # Per session in order (as a partition delivers one device's batches), interleaved.
    by_session: dict[str, list[QosSample]] = {}
    for e in out:
        by_session.setdefault(e.session, []).append(e)
    merged: list[QosSample] = []
    cursors = dict.fromkeys(by_session, 0)
    for k in order:
        name = out[k].session
        merged.append(by_session[name][cursors[name]])
        cursors[name] += 1
    return merged


def _run(batches: Iterable[list[QosSample]]) -> dict[RowKey, Qos]:
    """Fold batch after batch, marks carried over and rows stored, as the consumer does."""
    marks: dict[str, SessionMark] = {}
    rows: dict[RowKey, Qos] = {}
    for batch in batches:
        folded = fold_qos(marks, batch)
        marks.update(folded.marks)
        rows.update(apply_rows(rows, folded.deltas))
    return rows


def _split(events: list[QosSample], cuts: list[int]) -> list[list[QosSample]]:
    points = sorted({c % (len(events) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(events)]:
        out.append(events[last:p])
        last = p
    return out


@given(qos_values, qos_values, qos_values)
def test_both_merges_are_associative_and_commutative(a: Qos, b: Qos, c: Qos) -> None:
    for merge in (add_qos, rollup_qos):
        assert merge(a, b) == merge(b, a)
        assert merge(merge(a, b), c) == merge(a, merge(b, c))


@settings(max_examples=150, deadline=None)
@given(sessions(), st.lists(st.integers(0, 100), max_size=5))
def test_batches_in_any_split_give_the_rows_of_one_fold(
    events: list[QosSample], cuts: list[int]
) -> None:
    assert _run(_split(events, cuts)) == _run([events])


@settings(max_examples=150, deadline=None)
@given(sessions(), st.data())
def test_redelivered_events_change_nothing(events: list[QosSample], data: st.DataObject) -> None:
    once = _run([events])
    # A batch redelivered later (a consumer died before acknowledging it): any run of the
    # events, again, anywhere after its first delivery.
    start = data.draw(st.integers(0, len(events) - 1))
    end = data.draw(st.integers(start + 1, len(events)))
    at = data.draw(st.integers(end, len(events)))
    again = events[:at] + events[start:end] + events[at:]
    assert _run([again]) == once
    assert _run([events, events]) == once


@settings(max_examples=150, deadline=None)
@given(sessions())
def test_hour_rows_are_the_rollup_of_their_minutes(events: list[QosSample]) -> None:
    rows = _run([[e] for e in events])
    hours = {r: q for r, q in rows.items() if r.span == HOUR}
    minutes = {r: q for r, q in rows.items() if r.span == MINUTE}
    assert hours
    for hour, q in hours.items():
        rolled = Qos()
        for r, m in minutes.items():
            if r.key == hour.key and hour.start <= r.start < hour.start + HOUR:
                rolled = rollup_qos(rolled, m)
        assert q == rolled


@settings(max_examples=150, deadline=None)
@given(sessions(), st.randoms(use_true_random=False))
def test_totals_do_not_depend_on_arrival_order(events: list[QosSample], rnd: random.Random) -> None:
    shuffled = list(events)
    rnd.shuffle(shuffled)

    def totals(rows: dict[RowKey, Qos]) -> tuple[int, ...]:
        title = [q for r, q in rows.items() if r.span == HOUR and r.key == QosKey(title="demo")]
        q = Qos()
        for h in title:
            q = rollup_qos(q, h)
        return (
            q.watch_ms,
            q.rebuffer_ms,
            q.rebuffers,
            q.switches,
            q.errors,
            sum(q.startups.values()),
        )

    # Received when sent: no event moved by the lateness rule.
    def on_time(e: QosSample) -> QosSample:
        return QosSample(**{**{f: getattr(e, f) for f in e.__struct_fields__}, "received_at": e.at})

    assert totals(_run([[on_time(e) for e in shuffled]])) == totals(
        _run([[on_time(e) for e in events]])
    )


def test_the_counters_of_a_session_become_its_minutes_and_viewers() -> None:
    def hb(at: float, edge: str, reb: float, switches: int, **kw: object) -> QosSample:
        return QosSample(
            session=str(kw.get("session", "a")),
            title="demo",
            at=T0 + at,
            received_at=T0 + at,
            edge=edge,
            network="203.0.113.0/24",
            asn=64501,
            rebuffer_s=reb,
            switches=switches,
            bitrate_kbps=2000.0,
            startup_s=kw.get("startup"),  # type: ignore[arg-type]
        )

    rows = _run(
        [
            [hb(0, "e1", 0.0, 0, startup=0.8), hb(30, "e1", 1.5, 1, startup=0.8)],
            [hb(70, "e2", 4.0, 2), hb(10, "e1", 0.0, 0, session="b", startup=2.0)],
        ]
    )
    m0 = rows[RowKey(int(T0), MINUTE, QosKey(edge="e1"))]
    assert (m0.viewers, m0.watch_ms, m0.rebuffer_ms, m0.switches) == (2, 30_000, 1500, 1)
    assert mean_bitrate_kbps(m0) == 2000.0
    m1 = rows[RowKey(int(T0) + 60, MINUTE, QosKey(edge="e2"))]
    assert (m1.viewers, m1.watch_ms, m1.rebuffer_ms, m1.switches) == (1, 40_000, 2500, 1)
    assert rebuffer_ratio(m1) == 2500 / 40_000
    net = rows[RowKey(int(T0), MINUTE, QosKey(edge="e1", network="203.0.113.0/24"))]
    assert net.asn == 64501 and net.viewers == 2
    hour = rows[RowKey(int(T0), HOUR, QosKey(title="demo"))]
    assert (hour.viewers, hour.viewer_minutes, hour.rebuffer_ms) == (2, 3, 4000)
    assert startup_quantile(hour.startups, 0.5) is not None
    assert sum(hour.startups.values()) == 2  # each session's startup once


def test_a_client_as_gets_rows_of_its_own_over_all_its_prefixes() -> None:
    def hb(session: str, at: float, network: str, asn: int, reb: float) -> QosSample:
        return QosSample(
            session=session,
            title="demo",
            at=T0 + at,
            received_at=T0 + at,
            edge="e1",
            network=network,
            asn=asn,
            rebuffer_s=reb,
        )

    rows = _run(
        [
            [hb("a", 0, "203.0.113.0/24", 64500, 0.0), hb("a", 30, "203.0.113.0/24", 64500, 3.0)],
            # the same AS from another prefix; the same session moving prefix counts once
            [hb("b", 0, "198.51.100.0/24", 64500, 0.0), hb("b", 40, "198.51.100.0/24", 64500, 1.0)],
            [hb("a", 50, "192.0.2.0/24", 64500, 3.0)],
            [hb("c", 0, "192.0.2.0/24", 0, 0.0), hb("c", 20, "192.0.2.0/24", 0, 5.0)],  # no AS
        ]
    )
    whole = rows[RowKey(int(T0), MINUTE, QosKey(network="AS64500"))]
    assert (whole.asn, whole.viewers, whole.watch_ms, whole.rebuffer_ms) == (64500, 2, 90_000, 4000)
    on_edge = rows[RowKey(int(T0), MINUTE, QosKey(edge="e1", network="AS64500"))]
    assert (on_edge.viewers, on_edge.watch_ms, on_edge.rebuffer_ms) == (2, 90_000, 4000)
    assert rows[RowKey(int(T0), MINUTE, QosKey(network="203.0.113.0/24"))].viewers == 1
    assert not any(r.key.network in ("AS0", "AS") for r in rows)  # an unknown AS: no AS rows
    edge = rows[RowKey(int(T0), MINUTE, QosKey(edge="e1"))]
    assert edge.viewers == 3  # a, b and c, each once whatever networks they were seen in


def test_an_edge_is_judged_against_its_peers_for_a_whole_as() -> None:
    # Per prefix, too little watching to judge; the AS pools its prefixes' viewers.
    rows = [
        (QosKey(edge=e, network=n), Qos(watch_ms=w * 1000, rebuffer_ms=r * 1000))
        for e, n, w, r in (
            ("slow", "203.0.113.0/24", 40, 8),
            ("slow", "198.51.100.0/24", 40, 8),
            ("slow", "AS64500", 80, 16),
            ("fast", "203.0.113.0/24", 40, 0),
            ("fast", "198.51.100.0/24", 40, 0),
            ("fast", "AS64500", 80, 0),
        )
    ]
    demoted = judge_edges(rows, {}, now=0.0)
    assert set(demoted) == {("AS64500", "slow")}
    assert demoted["AS64500", "slow"].reason.startswith("viewers in AS64500 rebuffer 20.0 %")


def test_a_skewed_or_delayed_event_is_moved_into_the_allowed_lateness() -> None:
    ahead = QosSample(session="a", title="t", at=T0 + 3600, received_at=T0, switches=1)
    behind = QosSample(session="b", title="t", at=T0 - 86400, received_at=T0, switches=1)
    rows = _run([[ahead, behind]])
    starts = {r.start for r in rows if r.span == MINUTE}
    assert starts == {int(T0), int(T0) - 600}  # received; received less the 10 min lateness
    hours = [q for r, q in rows.items() if r.span == HOUR and r.key == QosKey(title="t")]
    assert sum(q.switches for q in hours) == 2  # nothing dropped


def test_a_session_is_counted_no_more_stalled_than_it_was_watched() -> None:
    def hb(at: float, rebuffer_s: float) -> QosSample:
        return QosSample(
            session="liar", title="t", at=T0 + at, received_at=T0 + at, rebuffer_s=rebuffer_s
        )

    first = [hb(0, 1e6), hb(30, 1e6)]
    rows = _run([first, [hb(20, 2e6)], [hb(50, 5.0)]])
    hour = rows[RowKey(int(T0), HOUR, QosKey(title="t"))]
    assert (hour.watch_ms, hour.rebuffer_ms) == (50_000, 50_000)
    assert rebuffer_ratio(hour) == 1.0


@given(st.lists(st.floats(0.001, 600.0), min_size=1, max_size=300), st.floats(0.0, 1.0))
def test_startup_quantiles_are_within_the_sketch_accuracy(values: list[float], q: float) -> None:
    from streamplane.telemetry.qos import startup_bucket

    hist: dict[int, int] = {}
    for v in values:
        hist[startup_bucket(v)] = hist.get(startup_bucket(v), 0) + 1
    got = startup_quantile(hist, q)
    assert got is not None
    true = sorted(values)[int(q * (len(values) - 1))]
    assert abs(got - true) <= STARTUP_ACCURACY * true * 1.0000001


def _rows(**pairs: tuple[int, int]) -> list[tuple[QosKey, Qos]]:
    """(edge, network) rows: edge name -> (watch s, rebuffer s), all in one network."""
    return [
        (QosKey(edge=e, network="n"), Qos(watch_ms=w * 1000, rebuffer_ms=r * 1000))
        for e, (w, r) in pairs.items()
    ]


def test_an_edge_rebuffering_far_more_than_its_peers_is_demoted_until_it_recovers() -> None:
    demoted = judge_edges(_rows(slow=(300, 60), a=(300, 3), b=(300, 0)), {}, now=100.0)
    assert set(demoted) == {("n", "slow")}
    assert "20.0 % of the time on it against 0.5 %" in demoted["n", "slow"].reason
    # Better, but above the recovery line (1.5x its peers): still demoted (hysteresis).
    held = judge_edges(_rows(slow=(300, 12), a=(300, 6), b=(300, 6)), demoted, now=160.0)
    assert set(held) == {("n", "slow")} and held["n", "slow"].since == 100.0
    # The same figures would not have demoted it (3x needed).
    assert judge_edges(_rows(slow=(300, 12), a=(300, 6), b=(300, 6)), {}, now=160.0) == {}
    # Recovered.
    assert judge_edges(_rows(slow=(300, 1), a=(300, 6), b=(300, 6)), held, now=220.0) == {}


def test_without_evidence_a_demotion_is_held_then_let_go() -> None:
    before = {("n", "slow"): Verdict(since=0.0, bad_at=100.0, reason="r")}
    quiet = _rows(slow=(10, 5), a=(300, 0))  # too little watching on it to judge
    assert judge_edges(quiet, before, now=200.0) == before
    assert judge_edges(quiet, before, now=221.0) == {}


def test_no_verdict_without_peers_or_below_the_floor() -> None:
    assert judge_edges(_rows(alone=(600, 300)), {}, now=0.0) == {}
    assert judge_edges(_rows(a=(600, 6), b=(600, 0)), {}, now=0.0) == {}  # 1 %: under the floor
