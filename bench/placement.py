"""HCA against uniform, capacity-weighted and bounded-load consistent hashing, over 30 days.

Method
  Clusters (one site each):
  * reference: 1 storage server (200 TB, 40 Gbps) + 2 flash servers (18 TB, 100 Gbps);
    10,000 titles filling 60 % of the storage.
  * large: 10 storage + 20 flash servers of the same kinds; 100,000 titles filling 80 %.
  * mixed: three generations, 4 storage (200 TB, 40 Gbps) + 4 older storage (100 TB,
    20 Gbps) + 8 flash (18 TB, 100 Gbps) + 4 newer flash (36 TB, 190 Gbps); 30,000 titles
    filling 70 %.
  Catalog (`placement/popularity.py`, seeded): Zipf-Mandelbrot popularity, exponent 1.0,
  plateau 5; title sizes from a mixture of episodes (~6 GB) and films (~20 GB). Each day the
  log popularity of every title gets fresh noise (sd 0.15) on a base that random-walks
  (sd 0.02 a day); 0.05 % of the catalog is released each day near the top (a rank drawn
  log-uniformly in 1..200), fading with a 14-day time constant, and as many of the coldest
  titles retire. 30 days of warm-up, then 30 measured days; every algorithm places the same
  catalog each day, and HCA gets its own previous day's plan.
  Algorithms (`placement/hca.py`, `placement/baselines.py`): HCA; uniform consistent hashing
  (a full server drops what hashes to it); consistent hashing weighted by storage; consistent
  hashing with bounded loads (epsilon 0.25 on traffic, storage as a hard limit). All use the
  same rendezvous hash; baselines keep one copy per title.
  Measures, per day: holes (bytes and requests of titles no server holds); per server traffic
  / its share of throughput, where traffic = sum over titles held of popularity / copies
  (requests split evenly among copies) - "worst" is the server furthest from 1; storage used;
  churn = bytes refilled (copies new on a server) / bytes stored, days 1..30, with the floor
  that new releases alone force; the wall time of one placement. "next day": the day's
  placement scored on the next day's popularity (forecast error included).
  Stability, on the last day's catalog: add one flash server, remove one storage server, add
  one storage server; bytes moved / bytes stored, against the least possible (the new server's
  bytes, or the removed server's).

Reproduce: .venv/bin/python bench/placement.py [--clusters reference large mixed] [--days 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from streamplane.placement import baselines, hca
from streamplane.placement.errors import CatalogTooLargeError
from streamplane.placement.fill import churn
from streamplane.placement.model import GBPS, TB, Catalog, Placement, Prior, Server, balance
from streamplane.placement.popularity import (
    CatalogDay,
    CatalogShape,
    Drift,
    next_day,
    size_scale,
    zipf_catalog,
)

console = Console(width=160)
ALGORITHMS = ("hca", "uniform", "capacity", "bounded")
Placer = Callable[[Sequence[Server], Catalog, Placement | None], Placement]


def _storage(i: int, tb: float = 200, gbps: float = 40) -> Server:
    return Server(f"storage-{i}", round(tb * TB), gbps * GBPS, "bench")


def _flash(i: int, tb: float = 18, gbps: float = 100) -> Server:
    return Server(f"flash-{i}", round(tb * TB), gbps * GBPS, "bench")


CLUSTERS: dict[str, tuple[list[Server], int, float]] = {
    "reference": ([_storage(1), _flash(1), _flash(2)], 10_000, 0.6),
    "large": (
        [_storage(i) for i in range(1, 11)] + [_flash(i) for i in range(1, 21)],
        100_000,
        0.8,
    ),
    "mixed": (
        [_storage(i) for i in range(1, 5)]
        + [_storage(i, 100, 20) for i in range(5, 9)]
        + [_flash(i) for i in range(1, 9)]
        + [_flash(i, 36, 190) for i in range(9, 13)],
        30_000,
        0.7,
    ),
}


def _placer(name: str) -> Placer:
    if name == "hca":
        return lambda s, c, prev: hca.place(s, c, Prior.from_placement(prev) if prev else None)
    f = baselines.ALGORITHMS[name]
    return lambda s, c, prev: f(s, c)


@dataclass
class Tally:
    hole_bytes: list[float] = field(default_factory=list)
    hole_requests: list[float] = field(default_factory=list)
    worst: list[float] = field(default_factory=list)  # max |ratio - 1| per day
    max_ratio: list[float] = field(default_factory=list)
    spread: list[float] = field(default_factory=list)
    next_worst: list[float] = field(default_factory=list)
    fill_max: list[float] = field(default_factory=list)
    fill_mean: list[float] = field(default_factory=list)
    churn: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def _next_day_worst(p: Placement, tomorrow: Catalog) -> float:
    """`p` scored on tomorrow's popularity, over the titles both days share."""
    index = tomorrow.index()
    demand = np.zeros(len(p.catalog))
    for j, t in enumerate(p.catalog.ids):
        k = index.get(t)
        if k is not None:
            demand[j] = tomorrow.traffic[k]
    return balance(p, demand).worst_deviation


def run_cluster(name: str, days: int, warmup: int, seed: int) -> dict[str, object]:
    servers, n_titles, fill = CLUSTERS[name]
    rng = np.random.default_rng(seed)
    shape, drift = CatalogShape(), Drift()
    scale = size_scale(shape, n_titles, sum(s.storage_bytes for s in servers), fill)
    day = CatalogDay.start(zipf_catalog(n_titles, rng, shape, scale), scale, shape)
    for _ in range(warmup):
        day = next_day(day, rng, drift)
    tallies = {a: Tally() for a in ALGORITHMS}
    placers = {a: _placer(a) for a in ALGORITHMS}
    previous: dict[str, Placement | None] = dict.fromkeys(ALGORITHMS)
    floor: list[float] = []
    catalogs = [day.catalog]
    for _ in range(days):
        day = next_day(day, rng, drift)
        catalogs.append(day.catalog)
    for d, cat in enumerate(catalogs):
        console.print(f"[dim]{name}: day {d}/{days}[/dim]", end="\r")
        for a in ALGORITHMS:
            t0 = time.perf_counter()
            p = placers[a](servers, cat, previous[a])
            elapsed = time.perf_counter() - t0
            b = balance(p)
            t = tallies[a]
            t.seconds.append(elapsed)
            t.hole_bytes.append(b.hole_bytes / cat.total_bytes)
            t.hole_requests.append(b.hole_traffic)
            t.worst.append(b.worst_deviation)
            t.max_ratio.append(b.max_ratio)
            t.spread.append(b.spread)
            t.fill_max.append(max(b.storage_utilisation))
            t.fill_mean.append(float(p.server_bytes.sum()) / sum(s.storage_bytes for s in servers))
            if d + 1 < len(catalogs):
                t.next_worst.append(_next_day_worst(p, catalogs[d + 1]))
            prev = previous[a]
            if prev is not None:
                t.churn.append(churn(p, prev.holder_map()).ratio)
            previous[a] = p
        if d:
            before = set(catalogs[d - 1].ids)
            new = [j for j, t in enumerate(cat.ids) if t not in before]
            stored = float(previous["hca"].server_bytes.sum())  # type: ignore[union-attr]
            floor.append(float(cat.size_bytes[new].sum()) / stored)
    stability = _stability(servers, catalogs[-1], previous)
    return {"tallies": tallies, "floor": floor, "stability": stability, "servers": servers}


def _stability(
    servers: list[Server], cat: Catalog, last: dict[str, Placement | None]
) -> dict[str, dict[str, tuple[float, float] | None]]:
    """(bytes moved / stored, least possible / stored) per event and algorithm; None where
    the catalog does not fit the changed cluster."""
    flash = next(s for s in servers if s.id.startswith("flash"))
    storage = next(s for s in servers if s.id.startswith("storage"))
    events = {
        "add a flash server": (servers + [replace(flash, id="flash-new")], None),
        "remove a flash server": ([s for s in servers if s.id != flash.id], flash.id),
        "add a storage server": (servers + [replace(storage, id="storage-new")], None),
        "remove a storage server": ([s for s in servers if s.id != storage.id], storage.id),
    }
    out: dict[str, dict[str, tuple[float, float] | None]] = {}
    for event, (cluster, removed) in events.items():
        out[event] = {}
        for a in ALGORITHMS:
            before = last[a]
            assert before is not None
            try:
                after = _placer(a)(cluster, cat, before)
            except CatalogTooLargeError:
                out[event][a] = None
                continue
            moved = churn(after, before.holder_map()).ratio
            if removed is None:  # the least: what the new server must hold
                least = float(after.server_bytes[-1])
            else:  # the least: what the removed server held
                ids = [s.id for s in before.servers]
                least = float(before.server_bytes[ids.index(removed)])
            out[event][a] = (moved, least / float(after.server_bytes.sum()))
    return out


def _pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f} %"


def _ratio(x: float, ref: float) -> str:
    if ref <= 0:
        return "-" if x <= 0 else "inf"
    return f"{x / ref:,.1f}x"


def report(name: str, result: dict[str, object], days: int, md: list[str]) -> None:
    tallies: dict[str, Tally] = result["tallies"]  # type: ignore[assignment]
    floor: list[float] = result["floor"]  # type: ignore[assignment]
    servers: list[Server] = result["servers"]  # type: ignore[assignment]
    n_titles = CLUSTERS[name][1]
    title = (
        f"{name}: {len(servers)} servers, {n_titles:,} titles, {days} days "
        f"(churn floor from releases: mean {_pct(statistics.mean(floor))})"
    )
    cols = [
        "algorithm",
        "holes: bytes (max)",
        "holes: requests (max)",
        "worst server |traffic/share - 1| (mean, max)",
        "x HCA",
        "spread (mean)",
        "next day worst (mean)",
        "storage used: max server (max)",
        "churn/day (mean, max)",
        "place s (mean, max)",
    ]
    table = Table(title=title, title_justify="left")
    for c in cols:
        table.add_column(c, justify="right")
    h = tallies["hca"]
    rows = []
    for a in ALGORITHMS:
        t = tallies[a]
        rows.append(
            [
                a,
                _pct(max(t.hole_bytes)),
                _pct(max(t.hole_requests)),
                f"{_pct(statistics.mean(t.worst), 1)}, {_pct(max(t.worst), 1)}",
                _ratio(statistics.mean(t.worst), statistics.mean(h.worst)),
                f"{statistics.mean(t.spread):.3f}",
                _pct(statistics.mean(t.next_worst), 1),
                _pct(max(t.fill_max), 1),
                f"{_pct(statistics.mean(t.churn))}, {_pct(max(t.churn))}",
                f"{statistics.mean(t.seconds):.2f}, {max(t.seconds):.2f}",
            ]
        )
    for r in rows:
        table.add_row(*r)
    console.print(table)
    md += [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(r) + " |" for r in rows] + [""]

    stab: dict[str, dict[str, tuple[float, float] | None]] = result["stability"]  # type: ignore[assignment]
    st = Table(
        title=f"{name}: bytes moved / bytes stored when the cluster changes "
        "(least possible in brackets)",
        title_justify="left",
    )
    scols = ["event", *ALGORITHMS]
    for c in scols:
        st.add_column(c, justify="right")
    srows = []
    for event, by_alg in stab.items():
        cells = [by_alg[a] for a in ALGORITHMS]
        srows.append(
            [event]
            + ["does not fit" if c is None else f"{_pct(c[0])} ({_pct(c[1])})" for c in cells]
        )
    for r in srows:
        st.add_row(*r)
    console.print(st)
    md += [
        f"**{name}: bytes moved / bytes stored when the cluster changes (least possible "
        "in brackets)**",
        "",
        "| " + " | ".join(scols) + " |",
        "|" + "---|" * len(scols),
    ]
    md += ["| " + " | ".join(r) + " |" for r in srows] + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clusters", nargs="+", default=list(CLUSTERS), choices=list(CLUSTERS))
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--markdown", type=Path, help="Also write the tables as markdown here.")
    args = ap.parse_args()
    print(__doc__)
    md: list[str] = []
    for name in args.clusters:
        result = run_cluster(name, args.days, args.warmup, args.seed)
        report(name, result, args.days, md)
    if args.markdown:
        args.markdown.write_text("\n".join(md), encoding="utf-8")
    console.print(
        "Reproduce: .venv/bin/python bench/placement.py --clusters "
        + " ".join(args.clusters)
        + f" --days {args.days} --warmup {args.warmup} --seed {args.seed}"
    )


if __name__ == "__main__":
    main()
