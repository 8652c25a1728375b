"""Heterogeneous cluster allocation (HCA): titles onto servers that differ. Pure.

A site mixes storage servers (much disk, little throughput) and flash servers (little disk, much
throughput). One hash ring gives every server the same kind of content, so either the flash
overflows or the storage saturates. HCA ranks titles by density (traffic per stored byte),
cuts the ranking at D: the head (dense, traffic-bound) and the tail (storage-bound) each go on
a weighted rendezvous ring (`ring.py`), and each server's weights on the two rings are solved
so that its bytes fit its storage and its expected traffic is its share of throughput.

The weight solve. Let Bh, Bt be the head and tail bytes (replicas counted), Ph, Pt their
traffic. Server i, with throughput share tau_i, takes a fraction lambda_i of its traffic from
the head: h_i = lambda_i tau_i / Ph, t_i = (1 - lambda_i) tau_i / Pt. Its traffic is then
exactly tau_i, and its bytes are

    bytes_i = tau_i (lambda_i Bh/Ph + (1 - lambda_i) Bt/Pt),

between tau_i Bh/Ph (head only: dense bytes) and tau_i Bt/Pt (tail only). HCA picks every
lambda_i in [0, 1] so that each server's bytes are the same fraction f of its storage, and
where a server cannot reach f inside [0, 1] it stops at the end of its range (water-filling f
so that the bytes add up to Bh + Bt). Then sum h = sum t = 1 follows from the traffic adding
up, and every weight is non-negative by construction.

Where every server reaches f this is the two-equations-per-server solve (storage share, and
throughput share), with the same answer. It is better in two ways. First, storage is a limit,
not a target: a flash server that would need negative tail weight to hit its storage share
instead holds only head and runs below the common fill, which is a perfectly good allocation,
so more cutoffs are feasible, and the cutoff can be chosen for stability rather than forced.
Second, among all weights that meet every throughput share it is the one with the lowest
maximum fill, so the hash's sampling noise has the most room.

D*. A cutoff is feasible when the solve keeps every server within `max_fill` of its storage and
every server's traffic can be held within the balance goal (a server off the head ring relies on
the tail's own averaging, so the tail's lumps must be small next to its share; one on the head
ring is corrected by the hot titles, below). Among feasible cutoffs HCA takes the one with the
least expected daily churn: the bytes of titles near the cutoff that popularity noise will push
across it (the noise measured against yesterday's plan), plus the bytes that change sides if the
cutoff moves from yesterday's, times the chance that a crossing title changes server (1 - J_P of
the two rings' weights, see `ring.py`). A hysteresis band keeps a title on yesterday's side
until its density leaves the band. Every candidate is scored at once from prefix sums.

Replicas. A title gets ceil(traffic / (replica_load x median throughput share)) copies, at most
`max_replicas` and at most 1 / (largest ring share), so that no server carries a hot title alone
and a ring can honour its shares with that many distinct servers; yesterday's count stands while
the ideal is within 25 % of it. Requests split evenly among a title's copies.

Hot titles. Shares are expectations, and a site's head has a few hundred titles each carrying
a sizeable part of a server's traffic: hashed, they land unevenly (some 20 % off on a 30-server
site). So the head titles whose traffic is coarse next to the tolerance (hot) are placed last,
on the head ring's ranking with bounded loads: each server's bound is its share of throughput
less what the tail and the rest of the head already give it; yesterday's holders are kept while
within half the balance goal, and a local search moves the fewest copies that bring every server
into that band. Hot titles are a small part of the bytes, so evening out traffic this way
barely disturbs storage.

Stability. The tail and the rest of the head keep yesterday's ring weights while they hold
traffic within `ring_deadband` of the solve, and past it move only as far as needed; when a
server joins or leaves, yesterday's weights carry over (the newcomer at its solved share, the
others scaled), so titles move onto a new server or off a removed one and little else.

Finally titles are assigned densest first, each to its ring's choice, spilling to the next
server in its own ranking when a server is full (`assign.py`): no server ever exceeds its storage,
and a title is dropped only when no server has room for it (never while the storage left over
would take the largest title on every server).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from streamplane.placement import ring
from streamplane.placement.assign import assign
from streamplane.placement.errors import CatalogTooLargeError, InputError
from streamplane.placement.model import (
    TB,
    Catalog,
    Cutoff,
    CutoffCandidates,
    Placement,
    Prior,
    Server,
    check_servers,
)

_EPS = 1e-12


@dataclass(frozen=True)
class HcaSettings:
    max_fill: float = 0.95  # of each server's storage; the rest absorbs hashing noise
    balance: float = 0.05  # the goal: each server's traffic within this of its share
    tolerance: float = 0.01  # hot titles are placed to bring every server this close
    ring_deadband: float = 0.05  # yesterday's ring weights stay while traffic is this close
    hysteresis: float = 0.3  # log-density band in which a title keeps yesterday's side
    wobble: float = 0.15  # day-to-day log-popularity noise assumed without a previous plan
    replica_load: float = 0.05  # most traffic one copy carries, x the median throughput share
    max_replicas: int = 16
    candidates: int = 400

    def check(self) -> None:
        if not 0 < self.max_fill <= 1:
            raise InputError(f"max_fill {self.max_fill} must be in (0, 1]")
        if not 0 < self.balance < 1 or not 0 < self.tolerance < 1:
            raise InputError("balance and tolerance must be in (0, 1)")
        if self.hysteresis < 0 or self.wobble <= 0 or self.ring_deadband < 0:
            raise InputError("hysteresis and ring_deadband must be >= 0 and wobble > 0")
        if self.replica_load <= 0 or self.max_replicas < 1:
            raise InputError("replica_load must be positive and max_replicas at least 1")
        if self.candidates < 2:
            raise InputError("candidates must be at least 2")


@dataclass(frozen=True, eq=False)
class Shares:
    """The solve for one or many cutoffs: (candidates, servers) arrays, or (servers,)."""

    head: NDArray[np.float64]
    tail: NDArray[np.float64]
    bytes: NDArray[np.float64]


def solve_shares(
    storage: NDArray[np.float64],
    throughput: NDArray[np.float64],
    head_bytes: NDArray[np.float64] | float,
    tail_bytes: NDArray[np.float64] | float,
    head_traffic: NDArray[np.float64] | float,
    tail_traffic: NDArray[np.float64] | float,
) -> Shares:
    """Each server's share of the head and tail rings, for each cutoff (see the module doc).

    Every server's expected traffic is its share of throughput; bytes fill every server to
    the same fraction of its storage where the server's mix of head and tail allows.
    """
    bh = np.atleast_1d(np.asarray(head_bytes, dtype=np.float64))[:, None]
    bt = np.atleast_1d(np.asarray(tail_bytes, dtype=np.float64))[:, None]
    ph = np.atleast_1d(np.asarray(head_traffic, dtype=np.float64))[:, None]
    pt = np.atleast_1d(np.asarray(tail_traffic, dtype=np.float64))[:, None]
    scalar = np.ndim(head_bytes) == 0
    tau = (throughput / throughput.sum())[None, :]
    s = storage[None, :]
    total_traffic = ph + pt
    ph, pt = ph / total_traffic, pt / total_traffic
    total = bh + bt
    split = (ph > _EPS) & (pt > _EPS) & (bh > 0) & (bt > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        pure_head = np.where(split, tau * bh / ph, tau * total)
        pure_tail = np.where(split, tau * bt / pt, tau * total)
    low = np.minimum(pure_head, pure_tail)
    high = np.maximum(pure_head, pure_tail)
    # Water-fill one fill ratio f: sum_i clip(f * S_i, low_i, high_i) = B, by bisection.
    f_lo = np.zeros_like(total)
    f_hi = (high / s).max(axis=1, keepdims=True)
    for _ in range(64):
        mid = (f_lo + f_hi) / 2
        short = np.clip(mid * s, low, high).sum(axis=1, keepdims=True) < total
        f_lo = np.where(short, mid, f_lo)
        f_hi = np.where(short, f_hi, mid)
    placed = np.clip(f_hi * s, low, high)
    placed *= total / placed.sum(axis=1, keepdims=True)  # exact sum after bisection
    gap = pure_tail - pure_head
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.where(np.abs(gap) > _EPS * total, (pure_tail - placed) / gap, ph)
    lam = np.clip(lam, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        head = np.where(split, lam * tau / ph, tau)
        tail = np.where(split, (1 - lam) * tau / pt, tau)
    head /= head.sum(axis=1, keepdims=True)
    tail /= tail.sum(axis=1, keepdims=True)
    if scalar:
        return Shares(head[0], tail[0], placed[0])
    return Shares(head, tail, placed)


def agreement(p: NDArray[np.float64], q: NDArray[np.float64]) -> NDArray[np.float64]:
    """J_P(p, q) per row: the chance one rendezvous hash puts a title on the same server
    under weights p and under weights q (Moulton and Jiang, 2018)."""
    p = np.atleast_2d(p)
    q = np.atleast_2d(q)
    with np.errstate(divide="ignore", invalid="ignore"):
        rp = p[:, None, :] / p[:, :, None]  # [c, i, j] = p_j / p_i
        rq = q[:, None, :] / q[:, :, None]
        denom = np.maximum(rp, rq).sum(axis=2)
        terms = np.where((p > 0) & (q > 0), 1.0 / denom, 0.0)
    return np.asarray(np.nan_to_num(terms).sum(axis=1), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# cutoff candidates


class _Sorted:
    """Titles of one group sorted by log density, with prefix sums of their columns."""

    def __init__(self, logd: NDArray[np.float64], columns: NDArray[np.float64]) -> None:
        order = np.argsort(logd, kind="stable")
        self.x = logd[order]
        self.cum = np.vstack((np.zeros((1, columns.shape[1])), np.cumsum(columns[order], axis=0)))

    def above(self, t: NDArray[np.float64], inclusive: bool = False) -> NDArray[np.float64]:
        """Column sums over titles with log density > t (>= t when inclusive), per t."""
        idx = np.searchsorted(self.x, t, side="left" if inclusive else "right")
        return np.asarray(self.cum[-1][None, :] - self.cum[idx], dtype=np.float64)


# column indices in _Sorted
_RB, _Q, _N, _Q2, _B = range(5)


@dataclass(frozen=True, eq=False)
class _Evaluated:
    theta: NDArray[np.float64]
    head_titles: NDArray[np.int64]
    shares: Shares
    max_fill: NDArray[np.float64]
    churn: NDArray[np.float64]  # expected bytes refilled a day, fraction of bytes stored
    agreement: NDArray[np.float64]
    balanced: NDArray[np.bool_]
    feasible: NDArray[np.bool_]
    switch: NDArray[np.float64]  # bytes that change sides against yesterday's plan


def _side(
    logd: NDArray[np.float64],
    theta: float,
    delta: float,
    prev_head: NDArray[np.bool_],
    prev_tail: NDArray[np.bool_],
) -> NDArray[np.bool_]:
    """Head membership at cutoff theta with hysteresis: yesterday's side holds inside the band."""
    with np.errstate(invalid="ignore"):
        new = ~(prev_head | prev_tail)
        return (
            (new & (logd > theta))
            | (prev_head & (logd >= theta - delta))
            | (prev_tail & (logd > theta + delta))
        )


def _evaluate(
    theta: NDArray[np.float64],
    groups: tuple[_Sorted, _Sorted, _Sorted],
    totals: NDArray[np.float64],
    storage: NDArray[np.float64],
    tput: NDArray[np.float64],
    hist: tuple[NDArray[np.float64], NDArray[np.float64]],
    wobble: float,
    settings: HcaSettings,
) -> _Evaluated:
    new, prev_head, prev_tail = groups
    delta = settings.hysteresis
    head = new.above(theta) + prev_head.above(theta - delta, True) + prev_tail.above(theta + delta)
    tail = totals[None, :] - head
    shares = solve_shares(storage, tput, head[:, _RB], tail[:, _RB], head[:, _Q], tail[:, _Q])
    fill = (shares.bytes / storage[None, :]).max(axis=1)
    agree = agreement(shares.head, shares.tail)

    # Balance: a server's tail traffic is a sum of random lumps; its spread must fit in the
    # goal, or the server must take enough head traffic for the hot titles to correct it.
    tau = tput / tput.sum()
    t = shares.tail
    tail_sd = np.sqrt(np.maximum(tail[:, _Q2 : _Q2 + 1], 0) * t * (1 - t)) / totals[_Q]
    correctable = shares.head * (head[:, _Q : _Q + 1] / totals[_Q])
    balanced = (2 * tail_sd <= settings.balance * tau[None, :] + correctable).all(axis=1)

    # Expected crossings: a title at log distance x from the cutoff crosses tomorrow with
    # probability Phi(-(|x| + delta) / (wobble sqrt 2)) (two days' independent noise).
    centres, bytes_in_bin = hist
    z = -(np.abs(centres[None, :] - theta[:, None]) + delta) / (wobble * math.sqrt(2))
    wobble_bytes = (bytes_in_bin[None, :] * _normal_cdf(z)).sum(axis=1)
    switch = (prev_head.cum[-1][_RB] - prev_head.above(theta - delta, True)[:, _RB]) + (
        prev_tail.above(theta + delta)[:, _RB]
    )
    churn = (wobble_bytes + switch) * (1 - np.clip(agree, 0, 1)) / totals[_RB]
    feasible = (fill <= settings.max_fill + 1e-9) & balanced
    return _Evaluated(
        theta=theta,
        head_titles=np.round(head[:, _N]).astype(np.int64),
        shares=shares,
        max_fill=fill,
        churn=churn,
        agreement=agree,
        balanced=balanced,
        feasible=feasible,
        switch=switch,
    )


def _normal_cdf(z: NDArray[np.float64]) -> NDArray[np.float64]:
    from scipy.special import ndtr

    return np.asarray(ndtr(z), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# the placement


def place(
    servers: Sequence[Server],
    catalog: Catalog,
    prior: Prior | None = None,
    settings: HcaSettings = HcaSettings(),
    *,
    partial: bool = False,
) -> Placement:
    """Place `catalog` on one site's `servers`; `prior` is yesterday's plan for the site.

    Raises CatalogTooLargeError when one copy of every title does not fit, unless `partial`,
    which places the densest titles that fit within `max_fill` and reports the rest as holes.
    """
    check_servers(servers)
    settings.check()
    # Work on the servers in id order, so that no sum or tie depends on how they were listed,
    # and hand the placement back in the caller's order.
    by_id = sorted(range(len(servers)), key=lambda i: servers[i].id)
    p = _place([servers[i] for i in by_id], catalog, prior, settings, partial)
    return _reordered(p, servers, by_id)


def _reordered(p: Placement, servers: Sequence[Server], by_id: list[int]) -> Placement:
    if by_id == sorted(by_id):
        return p
    back = np.empty(len(by_id), dtype=np.int32)
    back[np.arange(len(by_id))] = np.array(by_id, dtype=np.int32)  # sorted slot -> caller slot
    holders = np.where(p.holders >= 0, back[np.maximum(p.holders, 0)], -1).astype(np.int32)
    c = p.cutoff
    if c is not None:
        where = np.argsort(np.array(by_id))  # caller slot -> sorted slot

        def caller(values: tuple[float, ...]) -> tuple[float, ...]:
            return tuple(values[k] for k in where.tolist())

        c = replace(
            c,
            head_shares=caller(c.head_shares),
            tail_shares=caller(c.tail_shares),
            head_weights=caller(c.head_weights),
            tail_weights=caller(c.tail_weights),
            planned_fill=caller(c.planned_fill),
        )
    return Placement.build(
        p.algorithm, servers, p.catalog, holders, head=p.head, hot=p.hot, cutoff=c, notes=p.notes
    )


def _place(
    servers: Sequence[Server],
    catalog: Catalog,
    prior: Prior | None,
    settings: HcaSettings,
    partial: bool,
) -> Placement:
    n = len(servers)
    storage = np.array([s.storage_bytes for s in servers], dtype=np.float64)
    tput = np.array([s.throughput_bps for s in servers], dtype=np.float64)
    tau = tput / tput.sum()
    server_ids = [s.id for s in servers]
    notes: list[str] = []

    rows = _fitting(catalog, storage, settings, partial, notes)
    # From here on: the placed titles, densest first; `rows` maps back to catalog indices.
    sizes = catalog.size_bytes[rows].astype(np.float64)
    traffic = catalog.traffic[rows] / math.fsum(catalog.traffic[rows].tolist())
    logd = catalog.log_density()[rows]
    ids = [catalog.ids[i] for i in rows.tolist()]
    m = len(rows)

    prev_head, prev_tail, prev_logd, prev_copies = _prior_sides(ids, prior)
    replicas = _replicas(traffic, sizes, storage, tau, prev_copies, settings)
    wobble, wobble_source = _wobble(logd, prev_logd, settings)

    # Choose the cutoff among candidates, all evaluated at once from prefix sums.
    columns = np.column_stack((replicas * sizes, traffic, np.ones(m), traffic**2 / replicas, sizes))
    fresh = ~(prev_head | prev_tail)
    groups = (
        _Sorted(logd[fresh], columns[fresh]),
        _Sorted(logd[prev_head], columns[prev_head]),
        _Sorted(logd[prev_tail], columns[prev_tail]),
    )
    thetas = _candidates(logd, traffic, prior, settings)
    hist = _histogram(logd, replicas * sizes, wobble)
    ev = _evaluate(thetas, groups, columns.sum(axis=0), storage, tput, hist, wobble, settings)
    pick = _pick(ev)
    theta = float(thetas[pick])

    # Solve again on the exact sides (hysteresis applied) and cap copies to what rings honour.
    head = _side(logd, theta, settings.hysteresis, prev_head, prev_tail)
    shares = _solve_for(head, replicas, sizes, traffic, storage, tput)
    capped = _cap_replicas(replicas, head, shares)
    if not np.array_equal(capped, replicas):
        replicas = capped
        shares = _solve_for(head, replicas, sizes, traffic, storage, tput)
    if not ev.feasible.any():
        notes.append(
            f"no cutoff meets every throughput share within {settings.max_fill:.0%} of storage; "
            f"the cutoff with the lowest fill ({(shares.bytes / storage).max():.0%}) is used and "
            "overflow spills to servers with room"
        )

    # The tail and the bulk of the head keep their solved weights (or yesterday's, while
    # close), so their bytes land where the solve planned them.
    rb = replicas * sizes
    tail_w = _sticky(
        shares.tail,
        prior.tail_weights if prior else None,
        server_ids,
        traffic[~head].sum(),
        tau,
        settings,
    )
    head_w = _sticky(
        shares.head,
        prior.head_weights if prior else None,
        server_ids,
        traffic[head].sum(),
        tau,
        settings,
    )
    head_w, tail_w = _fit(
        head_w, tail_w, shares, rb[head].sum(), rb[~head].sum(), settings.max_fill * storage
    )
    # Hot titles: head titles whose traffic is coarse next to the balance tolerance. They are
    # few and small in bytes, and go last, with bounded loads, to even out what hashing left.
    active = shares.head > _EPS
    # Coarse next to a typical head server's share: the weakest server on the ring would make
    # the line jump whenever a slow server joins or leaves. So would the median, across two
    # classes of servers (one strong and two weak: losing a weak one moves it from the weak
    # share to half the traffic, and most hot titles would leave bounded loads). The geometric
    # mean moves by the removed server's own factor to the power 1/n, so a server joining or
    # leaving moves the line by less than the hysteresis below absorbs.
    lump = (
        settings.tolerance * float(np.exp(np.log(tau[active]).mean())) if active.any() else math.inf
    )
    was_hot = np.zeros(m, dtype=bool)
    if prior is not None and prior.hot:
        was_hot = np.fromiter((t in prior.hot for t in ids), dtype=bool, count=m)
    # Hysteresis: a title hot yesterday stays hot down to half the line, so titles near it
    # do not flip between bounded loads and the ring (each flip may move the title).
    hot = head & ((traffic > lump) | (was_hot & (traffic > lump / 2)))
    exp = ring.exponentials(ring.title_keys(ids), ring.server_keys(server_ids))
    prefs = np.empty((m, n), dtype=np.intp)
    base = np.zeros(n)
    for members, w in ((~head, tail_w), (head & ~hot, head_w)):
        group = np.flatnonzero(members)
        if group.size:
            prefs[group] = ring.preference(exp[group], w)
            base += _realised(prefs[group], traffic[group], replicas[group], n)
    hot_rows = np.flatnonzero(hot)
    if hot_rows.size:
        index = {sid: i for i, sid in enumerate(server_ids)}
        prefs[hot_rows] = _place_hot(
            ring.preference(exp[hot_rows], head_w),
            traffic[hot_rows],
            replicas[hot_rows],
            base,
            tau,
            [_held(prior, ids[j], index) for j in hot_rows.tolist()],
            settings.balance / 2,
        )

    done = assign(
        sizes.astype(np.int64), traffic, np.arange(m), prefs, replicas.astype(np.int64), storage
    )
    holders = np.full((len(catalog), done.holders.shape[1]), -1, dtype=np.int32)
    holders[rows] = done.holders
    head_all = np.zeros(len(catalog), dtype=bool)
    head_all[rows] = head
    if done.spilled:
        notes.append(f"{done.spilled:,} copies spilled past a full server to the next in rank")
    if done.dropped:
        notes.append(f"{done.dropped:,} extra copies found no room and were left out")

    cutoff = Cutoff(
        log_density=theta,
        hysteresis=settings.hysteresis,
        head_titles=int(head.sum()),
        hot_titles=int(hot.sum()),
        head_bytes_share=float(rb[head].sum() / rb.sum()),
        head_traffic_share=float(traffic[head].sum()),
        head_shares=tuple(shares.head.tolist()),
        tail_shares=tuple(shares.tail.tolist()),
        head_weights=tuple((head_w / head_w.sum()).tolist()),
        tail_weights=tuple((tail_w / tail_w.sum()).tolist()),
        planned_fill=tuple((shares.bytes / storage).tolist()),
        wobble=wobble,
        expected_churn=float(ev.churn[pick]),
        agreement=float(ev.agreement[pick]),
        reason=_reason(ev, pick, head, hot, rb, traffic, wobble, wobble_source, settings),
        candidates=CutoffCandidates(
            log_density=ev.theta,
            head_titles=ev.head_titles,
            max_fill=ev.max_fill,
            expected_churn=ev.churn,
            feasible=ev.feasible,
        ),
    )
    hot_all = np.zeros(len(catalog), dtype=bool)
    hot_all[rows] = hot
    return Placement.build(
        "hca", servers, catalog, holders, head=head_all, hot=hot_all, cutoff=cutoff, notes=notes
    )


def _fitting(
    catalog: Catalog,
    storage: NDArray[np.float64],
    settings: HcaSettings,
    partial: bool,
    notes: list[str],
) -> NDArray[np.intp]:
    """The titles to place, densest first: all of them, or with `partial` those that fit."""
    order = catalog.ranking()
    cum = np.cumsum(catalog.size_bytes[order].astype(np.float64))
    if cum[-1] <= storage.sum():
        return order
    if not partial:
        raise CatalogTooLargeError(
            f"the catalog is {cum[-1] / TB:,.2f} TB but the cluster stores "
            f"{storage.sum() / TB:,.2f} TB; add servers, or place only the most popular titles "
            "that fit (--partial)"
        )
    fits = int(np.searchsorted(cum, settings.max_fill * storage.sum(), side="right"))
    if fits == 0:
        raise CatalogTooLargeError("not even the densest title fits in the cluster's storage")
    notes.append(
        f"the catalog does not fit: the {fits:,} densest of {len(catalog):,} titles are placed, "
        "the rest are holes"
    )
    return order[:fits]


def _replicas(
    traffic: NDArray[np.float64],
    sizes: NDArray[np.float64],
    storage: NDArray[np.float64],
    tau: NDArray[np.float64],
    previous: NDArray[np.int64],
    settings: HcaSettings,
) -> NDArray[np.float64]:
    """Copies per title: one per `replica_load` of a median server's traffic share.

    Yesterday's count stands while the ideal count is within 25 % of it, so a day's noise in
    popularity adds and removes no copies. Extra copies are the first thing to give up when
    space is short.
    """
    unit = settings.replica_load * float(np.median(tau))
    ideal = traffic / unit
    want = np.ceil(ideal)
    steady = (previous >= np.ceil(ideal / 1.25)) & (previous <= np.ceil(ideal * 1.25))
    want = np.where((previous > 0) & steady, previous, want)
    cap = min(settings.max_replicas, len(storage))
    budget = settings.max_fill * storage.sum()
    while cap > 1 and float((np.clip(want, 1, cap) * sizes).sum()) > budget:
        cap -= 1
    return np.clip(want, 1, cap).astype(np.float64)


def _cap_replicas(
    replicas: NDArray[np.float64], head: NDArray[np.bool_], shares: Shares
) -> NDArray[np.float64]:
    # A ring can honour a server's share s with r distinct copies only if s <= 1/r.
    cap_head = max(1, math.floor(1 / max(float(shares.head.max()), _EPS) + 1e-9))
    cap_tail = max(1, math.floor(1 / max(float(shares.tail.max()), _EPS) + 1e-9))
    return np.where(head, np.minimum(replicas, cap_head), np.minimum(replicas, cap_tail))


def _solve_for(
    head: NDArray[np.bool_],
    replicas: NDArray[np.float64],
    sizes: NDArray[np.float64],
    traffic: NDArray[np.float64],
    storage: NDArray[np.float64],
    tput: NDArray[np.float64],
) -> Shares:
    rb = replicas * sizes
    return solve_shares(
        storage,
        tput,
        float(rb[head].sum()),
        float(rb[~head].sum()),
        float(traffic[head].sum()),
        float(traffic[~head].sum()),
    )


def _prior_sides(
    ids: Sequence[str], prior: Prior | None
) -> tuple[NDArray[np.bool_], NDArray[np.bool_], NDArray[np.float64], NDArray[np.int64]]:
    """Yesterday's side (head, tail or neither), log density and copy count of each title."""
    m = len(ids)
    if prior is None:
        return np.zeros(m, bool), np.zeros(m, bool), np.full(m, np.nan), np.zeros(m, np.int64)
    copies = np.fromiter((len(prior.holders.get(t, ())) for t in ids), dtype=np.int64, count=m)
    in_head = np.fromiter((t in prior.head for t in ids), dtype=bool, count=m)
    prev_logd = np.fromiter((prior.log_density.get(t, np.nan) for t in ids), np.float64, m)
    known = copies > 0
    return known & in_head, known & ~in_head, prev_logd, copies


def _wobble(
    logd: NDArray[np.float64], prev: NDArray[np.float64], settings: HcaSettings
) -> tuple[float, str]:
    both = np.isfinite(logd) & np.isfinite(prev)
    if both.sum() < 30:
        return settings.wobble, "assumed (no previous plan to measure it against)"
    diff = logd[both] - prev[both]
    diff -= np.median(diff)  # renormalising popularity shifts every title alike
    mad = float(np.median(np.abs(diff)))
    # MAD to standard deviation, and two days' noise in a difference to one day's.
    sigma = min(2.0, max(0.01, 1.4826 * mad / math.sqrt(2)))
    return sigma, "measured against the previous plan"


def _candidates(
    logd: NDArray[np.float64],
    traffic: NDArray[np.float64],
    prior: Prior | None,
    settings: HcaSettings,
) -> NDArray[np.float64]:
    """Cutoffs to weigh: between titles at evenly spaced ranks, and denser near the top, where
    a few titles hold much of the traffic; plus no head at all, and yesterday's cutoff."""
    finite = np.sort(logd[np.isfinite(logd) & (traffic > 0)])
    k = settings.candidates
    even = np.linspace(0, len(finite) - 1, k // 2)
    top = len(finite) - np.geomspace(1, len(finite), k // 2)
    at = np.unique(np.clip(np.concatenate((even, top)), 0, len(finite) - 1).astype(np.int64))
    thetas = (finite[at] + finite[np.maximum(at - 1, 0)]) / 2
    extra = [np.inf, finite[0] - 1.0]
    if prior is not None and prior.threshold is not None:
        extra.append(prior.threshold)
    return np.unique(np.concatenate((thetas, extra)))


def _histogram(
    logd: NDArray[np.float64], weights: NDArray[np.float64], wobble: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Bytes by log density in bins fine next to the wobble: the crossing estimate sums these."""
    ok = np.isfinite(logd)
    lo, hi = float(logd[ok].min()), float(logd[ok].max())
    width = max(wobble / 6, (hi - lo) / 20_000, 1e-6)
    bins = max(1, math.ceil((hi - lo) / width) + 1)
    counts, edges = np.histogram(
        logd[ok], bins=bins, range=(lo, lo + bins * width), weights=weights[ok]
    )
    keep = counts > 0
    return ((edges[:-1] + edges[1:]) / 2)[keep], counts[keep].astype(np.float64)


def _pick(ev: _Evaluated) -> int:
    if ev.feasible.any():
        # Least expected churn; among near-ties (within 1e-4 of stored bytes) the lower fill.
        churn = np.where(ev.feasible, ev.churn, np.inf)
        near = ev.feasible & (churn <= churn.min() + 1e-4)
        return int(np.flatnonzero(near)[np.argmin(ev.max_fill[near])])
    # Nothing meets every share: the lowest fill, or near it (within 5 %) the least churn.
    fill = ev.max_fill + np.where(ev.balanced, 0.0, 1.0)
    near = fill <= fill.min() * 1.05
    return int(np.flatnonzero(near)[np.argmin(ev.churn[near])])


def _sticky(
    solved: NDArray[np.float64],
    previous: Mapping[str, float] | None,
    server_ids: Sequence[str],
    ring_traffic: float,
    tau: NDArray[np.float64],
    settings: HcaSettings,
) -> NDArray[np.float64]:
    """Yesterday's ring weights, moved toward today's solve only as far as needed.

    While no server's expected traffic from this ring is off the solve by more than
    `ring_deadband` of its throughput share, yesterday's weights stand (the hot titles absorb
    the difference): a share that wobbles moves no title. Past it, the weights move just far
    enough to be within half the deadband, so a steady drift moves titles in proportion to the
    drift, a little at a time, rather than all at once.

    When servers join or leave, yesterday's weights carry over: a new server gets its solved
    share and the others keep their ratios, scaled to make room; a server that left simply
    drops out. On a rendezvous ring that moves titles only onto a new server, or only off a
    removed one.
    """
    if not previous:
        return solved
    known = np.array([s in previous for s in server_ids])
    prev = np.array([previous.get(s, 0.0) for s in server_ids], dtype=np.float64)
    if prev[known].sum() <= 0:
        return solved
    prev[known] = prev[known] / prev[known].sum() * (1 - solved[~known].sum())
    prev[~known] = solved[~known]
    if ((prev > _EPS) != (solved > _EPS)).any():
        return solved
    prev = prev / prev.sum()
    gap = np.abs(prev - solved) * ring_traffic
    limit = settings.ring_deadband * tau
    if (gap <= limit).all():
        return np.asarray(prev, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(gap > 0, 1 - limit / 2 / gap, 0.0)
    alpha = float(np.clip(need.max(), 0.0, 1.0))
    moved = prev + alpha * (solved - prev)
    return np.asarray(moved / moved.sum(), dtype=np.float64)


def _fit(
    head_w: NDArray[np.float64],
    tail_w: NDArray[np.float64],
    shares: Shares,
    head_bytes: float,
    tail_bytes: float,
    cap: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Kept weights that would plan a server past `cap` move toward the solve just far enough
    to fit (the solve itself fits whenever the cutoff is feasible): a jump all the way would
    move every title the solve and yesterday disagree on, at once."""
    kept = head_w * head_bytes + tail_w * tail_bytes
    solved = shares.head * head_bytes + shares.tail * tail_bytes
    over = kept > cap
    if not over.any():
        return head_w, tail_w
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(over & (kept > solved), (kept - cap) / (kept - solved), 1.0)
    alpha = float(np.clip(need.max(), 0.0, 1.0))
    return (
        head_w + alpha * (shares.head - head_w),
        tail_w + alpha * (shares.tail - tail_w),
    )


def _realised(
    prefs: NDArray[np.intp],
    traffic: NDArray[np.float64],
    replicas: NDArray[np.float64],
    n: int,
) -> NDArray[np.float64]:
    """Expected traffic per server when each title sits on its first `replicas` servers."""
    width = int(replicas.max())
    slots = np.arange(width)[None, :] < replicas[:, None]
    share = np.broadcast_to((traffic / replicas)[:, None], slots.shape)
    return np.bincount(prefs[:, :width][slots], weights=share[slots], minlength=n).astype(
        np.float64
    )


def _held(prior: Prior | None, title: str, index: Mapping[str, int]) -> list[int]:
    if prior is None:
        return []
    return [index[s] for s in prior.holders.get(title, ()) if s in index]


def _place_hot(
    ranking: NDArray[np.intp],
    traffic: NDArray[np.float64],
    replicas: NDArray[np.float64],
    base: NDArray[np.float64],
    tau: NDArray[np.float64],
    previous: Sequence[Sequence[int]],
    band: float,
) -> NDArray[np.intp]:
    """Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018) for the
    hot copies, then the fewest moves that bring every server within `band` of its share.

    `base` is the traffic the other rings already give each server. A copy stays on
    yesterday's server while that server is within its share plus `band`, so a day's noise does
    not move it. The other copies go largest first (the small ones fill the gaps, as in LPT
    scheduling), each to the first servers in its ring order whose load stays within its share.
    Staying copies can leave a server over its share and another short; the repair then moves,
    one copy at a time, the copy that best closes the largest gap. Returns each title's servers
    in preference order: the chosen, then the rest of its ranking (for storage spill).
    """
    tau_l = tau.tolist()
    load = base.tolist()
    share_of = (traffic / replicas).tolist()
    want_of = replicas.astype(np.int64).tolist()
    rows = ranking.tolist()
    held: list[list[int]] = [[] for _ in rows]
    order = np.argsort(-(traffic / replicas), kind="stable").tolist()
    for j in order:  # yesterday's servers first, while within the band
        for s in rows[j]:
            stays = load[s] + share_of[j] <= tau_l[s] * (1 + band)
            if s in previous[j] and len(held[j]) < want_of[j] and stays:
                held[j].append(s)
                load[s] += share_of[j]
    for j in order:  # the rest: bounded loads, nobody past its share
        share = share_of[j]
        for s in rows[j]:
            if len(held[j]) == want_of[j]:
                break
            if s not in held[j] and load[s] + share <= tau_l[s]:
                held[j].append(s)
                load[s] += share
        if len(held[j]) < want_of[j]:  # nobody has load to spare: the least overshoot first
            spare = sorted(
                (s for s in rows[j] if s not in held[j]),
                key=lambda s: (load[s] + share) / tau_l[s],
            )
            for s in spare[: want_of[j] - len(held[j])]:
                held[j].append(s)
                load[s] += share
    _repair(held, rows, share_of, load, tau_l, band)
    out = np.empty_like(ranking)
    for j, servers in enumerate(held):
        out[j] = servers + [s for s in rows[j] if s not in servers]
    return out


def _repair(
    held: list[list[int]],
    rows: Sequence[Sequence[int]],
    share_of: Sequence[float],
    load: list[float],
    tau: Sequence[float],
    band: float,
) -> None:
    """Move hot copies, one at a time, until every server is within `band` of its share or
    no move helps: a local search on the largest deviation.

    Each move takes the server furthest from its share and the one copy, onto it or off it,
    that leaves the larger of the two servers' deviations smallest; a move must make that
    smaller than the deviation it fixes, so the worst deviation never grows and the search
    ends. Ties go the way of the title's own ring order: the listing order of servers never
    matters."""
    n = len(tau)

    def dev(s: int, extra: float = 0.0) -> float:
        return abs((load[s] + extra) / tau[s] - 1)

    for _ in range(4 * len(held) + n):
        worst = max(range(n), key=dev)
        now = dev(worst)
        if now <= band:
            return
        over = load[worst] > tau[worst]
        best: tuple[float, int, int, int] | None = None  # (resulting worst, title, from, to)
        for j, servers in enumerate(held):
            share = share_of[j]
            if over and worst in servers:  # push a copy off `worst`
                for u in rows[j]:
                    if u not in servers:
                        after = max(dev(worst, -share), dev(u, share))
                        if after < now - 1e-12 and (best is None or after < best[0]):
                            best = (after, j, worst, u)
            elif not over and worst not in servers:  # pull a copy onto `worst`
                for v in rows[j]:
                    if v in servers:
                        after = max(dev(worst, share), dev(v, -share))
                        if after < now - 1e-12 and (best is None or after < best[0]):
                            best = (after, j, v, worst)
        if best is None:
            return
        _, j, v, u = best
        held[j][held[j].index(v)] = u
        load[v] -= share_of[j]
        load[u] += share_of[j]


def _reason(
    ev: _Evaluated,
    pick: int,
    head: NDArray[np.bool_],
    hot: NDArray[np.bool_],
    rb: NDArray[np.float64],
    traffic: NDArray[np.float64],
    wobble: float,
    wobble_source: str,
    settings: HcaSettings,
) -> str:
    parts = [
        f"D* = {int(head.sum()):,} head titles ({rb[head].sum() / rb.sum():.1%} of the bytes "
        f"placed, {traffic[head].sum():.1%} of the traffic), {int(hot.sum()):,} of them hot."
    ]
    if ev.feasible.any():
        sizes_ok = ev.head_titles[ev.feasible]
        parts.append(
            f"{int(ev.feasible.sum())} of {len(ev.theta)} cutoffs weighed keep every server "
            f"within {settings.max_fill:.0%} of its storage with its traffic at its throughput "
            f"share (head sizes {int(sizes_ok.min()):,} to {int(sizes_ok.max()):,} titles)."
        )
        parts.append(
            f"This one has the least expected churn: {ev.churn[pick]:.2%} of stored bytes a day "
            f"from titles crossing it (popularity wobble sd {wobble:.2f} in log density, "
            f"{wobble_source}; hysteresis +-{settings.hysteresis:.2f}; a crossing title keeps "
            f"its server {ev.agreement[pick]:.0%} of the time)."
        )
        if ev.switch[pick] > 0:
            parts.append(
                f"Against yesterday's sides it moves {ev.switch[pick] / TB:,.2f} TB across the "
                "cutoff."
            )
    else:
        parts.append(
            "No cutoff keeps every server within its storage limit while matching its throughput "
            f"share; this one has the lowest fill ({ev.max_fill[pick]:.0%})."
        )
    return " ".join(parts)
