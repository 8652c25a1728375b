"""The placement plane's plain data: servers, a ranked catalog, a placement, yesterday's plan.

A catalog is held as columns (numpy arrays), not as one object per title: a site's catalog runs
to 10^5 or 10^6 titles, and every algorithm here is a vector operation over them.

Popularity is normalised to `traffic`: each title's expected share of the bytes the cluster
serves (the column sums to one). Titles are ranked by *density*, traffic per stored byte
(bytes served / title size): what a byte of a server's storage earns when it holds the title.
Density, not traffic, decides what belongs on a fast, small server: a large title with much
traffic can be worth less per byte than a small one with a little.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from streamplane.placement.errors import InputError

TB = 10**12
GBPS = 10**9

_SERVER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Server:
    id: str
    storage_bytes: int
    throughput_bps: float
    site: str = "default"

    @property
    def storage_tb(self) -> float:
        return self.storage_bytes / TB

    @property
    def throughput_gbps(self) -> float:
        return self.throughput_bps / GBPS


def check_servers(servers: Sequence[Server]) -> None:
    """Raise InputError unless every server has an id usable as a file name and capacity."""
    if not servers:
        raise InputError("no servers: a cluster needs at least one server to place titles on")
    seen: set[str] = set()
    for s in servers:
        if not _SERVER_ID.match(s.id):
            raise InputError(
                f"server id {s.id!r} must start with a letter or digit and hold only letters, "
                "digits, '.', '_' and '-' (it names the server's fill plan file)"
            )
        if not _SERVER_ID.match(s.site):
            raise InputError(
                f"server {s.id!r} has site {s.site!r}; a site id holds only letters, digits, "
                "'.', '_' and '-' and starts with a letter or digit"
            )
        if s.id in seen:
            raise InputError(f"server id {s.id!r} appears twice; every server needs its own id")
        seen.add(s.id)
        if not (math.isfinite(s.storage_bytes) and s.storage_bytes > 0):
            raise InputError(
                f"server {s.id!r} has no storage ({s.storage_bytes} bytes); give it a positive "
                "storage_tb or remove it"
            )
        if not (math.isfinite(s.throughput_bps) and s.throughput_bps > 0):
            raise InputError(
                f"server {s.id!r} has no throughput ({s.throughput_bps} bps); give it a positive "
                "throughput_gbps or remove it"
            )


def _frozen(a: NDArray[np.generic]) -> None:
    a.flags.writeable = False


@dataclass(frozen=True, eq=False)
class Catalog:
    """Titles as columns. Build with `Catalog.from_columns`, which checks and normalises."""

    ids: tuple[str, ...]
    size_bytes: NDArray[np.int64]
    traffic: NDArray[np.float64]  # expected share of bytes served; sums to one

    @classmethod
    def from_columns(
        cls,
        ids: Sequence[str],
        size_bytes: Sequence[int] | NDArray[np.integer],
        popularity: Sequence[float] | NDArray[np.floating],
    ) -> Catalog:
        """Check the columns and normalise popularity (any unit proportional to bytes served)."""
        ids = tuple(ids)
        sizes = np.asarray(size_bytes)
        pop = np.asarray(popularity, dtype=np.float64)
        if not (len(ids) == len(sizes) == len(pop)):
            raise InputError(f"{len(ids)} ids, {len(sizes)} sizes and {len(pop)} popularities")
        if not ids:
            raise InputError("the catalog is empty: there is nothing to place")
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            for t in ids:
                if t in seen:
                    raise InputError(f"title {t!r} appears twice; every title needs its own id")
                seen.add(t)
        for t in ids:
            if not t or t != t.strip() or any(c in t for c in "/\\") or not t.isprintable():
                raise InputError(
                    f"title id {t!r} must be non-empty, without slashes, surrounding spaces or "
                    "control characters (it names the title's directory on the edges)"
                )
        if sizes.dtype.kind not in "iu":
            if sizes.dtype.kind == "f" and np.all(np.isfinite(sizes)) and np.all(sizes % 1 == 0):
                sizes = sizes.astype(np.int64)
            else:
                raise InputError("title sizes must be whole numbers of bytes")
        sizes = sizes.astype(np.int64)
        bad = np.flatnonzero(sizes <= 0)
        if bad.size:
            i = int(bad[0])
            raise InputError(
                f"title {ids[i]!r} has size {int(sizes[i])} bytes; sizes must be positive"
            )
        bad = np.flatnonzero(~np.isfinite(pop) | (pop < 0))
        if bad.size:
            i = int(bad[0])
            raise InputError(
                f"title {ids[i]!r} has popularity {pop[i]}; popularity must be a finite number "
                "of zero or more"
            )
        # fsum is exactly rounded, so the shares do not depend on the order of the rows (a
        # pairwise sum's last bits do, and a last bit can tip a comparison downstream).
        total = math.fsum(pop.tolist())
        if total <= 0:
            raise InputError("every title has zero popularity; there is no traffic to balance")
        traffic = pop / total
        _frozen(sizes)
        _frozen(traffic)
        return cls(ids, sizes, traffic)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def total_bytes(self) -> int:
        return int(self.size_bytes.sum())

    def log_density(self) -> NDArray[np.float64]:
        """log(traffic per byte); -inf for a title nobody watches."""
        with np.errstate(divide="ignore"):
            return np.log(self.traffic) - np.log(self.size_bytes.astype(np.float64))

    def ranking(self) -> NDArray[np.intp]:
        """Title indices, densest first; ties broken by id so row order never matters."""
        return np.lexsort((np.array(self.ids), -self.log_density()))

    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.ids)}


@dataclass(frozen=True, eq=False)
class CutoffCandidates:
    """Every cutoff HCA weighed, for the report's picture: arrays of one length."""

    log_density: NDArray[np.float64]
    head_titles: NDArray[np.int64]
    max_fill: NDArray[np.float64]
    expected_churn: NDArray[np.float64]  # fraction of stored bytes refilled per day
    feasible: NDArray[np.bool_]


@dataclass(frozen=True)
class Cutoff:
    """Where HCA split head from tail, the weights it solved, and why."""

    log_density: float  # titles denser than this are head (+inf: no head)
    hysteresis: float  # a title keeps yesterday's side within this log-density band
    head_titles: int
    head_bytes_share: float  # of the bytes placed (replicas counted)
    head_traffic_share: float
    head_shares: tuple[float, ...]  # per server, share of the head ring (sums to one)
    tail_shares: tuple[float, ...]
    head_weights: tuple[float, ...]  # the head ring's hash weights (yesterday's while close)
    tail_weights: tuple[float, ...]
    hot_titles: int  # head titles too coarse in traffic to balance by hashing alone
    planned_fill: tuple[float, ...]  # per server, bytes / storage the solve aimed for
    wobble: float  # day-to-day log-density noise assumed for the churn estimate
    expected_churn: float
    agreement: float  # chance a title crossing the cutoff stays on its server
    reason: str
    candidates: CutoffCandidates = field(repr=False)


@dataclass(frozen=True, eq=False)
class Placement:
    """Which servers hold which title. `holders[j]` lists title j's servers, primary first."""

    algorithm: str
    servers: tuple[Server, ...]
    catalog: Catalog
    holders: NDArray[np.int32]  # (titles, max replicas) server indices, -1 where none
    head: NDArray[np.bool_]  # per title: placed on the head ring
    hot: NDArray[np.bool_]  # per title: head titles placed with bounded loads
    server_bytes: NDArray[np.int64]
    server_traffic: NDArray[np.float64]  # expected share of the catalog's traffic
    cutoff: Cutoff | None = None
    notes: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        algorithm: str,
        servers: Sequence[Server],
        catalog: Catalog,
        holders: NDArray[np.int32],
        head: NDArray[np.bool_] | None = None,
        cutoff: Cutoff | None = None,
        hot: NDArray[np.bool_] | None = None,
        notes: Sequence[str] = (),
    ) -> Placement:
        n = len(servers)
        held = holders >= 0
        replicas = held.sum(axis=1)
        rows = np.broadcast_to(np.arange(len(catalog))[:, None], holders.shape)[held]
        where = holders[held]
        sizes = catalog.size_bytes[rows]
        share = (catalog.traffic / np.maximum(replicas, 1))[rows]
        server_bytes = np.bincount(where, weights=sizes, minlength=n).round().astype(np.int64)
        server_traffic = np.bincount(where, weights=share, minlength=n).astype(np.float64)
        if head is None:
            head = np.zeros(len(catalog), dtype=bool)
        if hot is None:
            hot = np.zeros(len(catalog), dtype=bool)
        for a in (holders, head, hot, server_bytes, server_traffic):
            _frozen(a)
        return cls(
            algorithm,
            tuple(servers),
            catalog,
            holders,
            head,
            hot,
            server_bytes,
            server_traffic,
            cutoff,
            tuple(notes),
        )

    @property
    def replicas(self) -> NDArray[np.int64]:
        return np.asarray((self.holders >= 0).sum(axis=1), dtype=np.int64)

    @property
    def holes(self) -> NDArray[np.bool_]:
        return self.holders[:, 0] < 0

    def holders_of(self, title: int) -> tuple[str, ...]:
        return tuple(self.servers[s].id for s in self.holders[title] if s >= 0)

    def holder_map(self) -> dict[str, tuple[str, ...]]:
        ids = [s.id for s in self.servers]
        out: dict[str, tuple[str, ...]] = {}
        for t, row in zip(self.catalog.ids, self.holders.tolist(), strict=True):
            if row[0] >= 0:
                out[t] = tuple(ids[s] for s in row if s >= 0)
        return out


@dataclass(frozen=True)
class Balance:
    """How well a placement respects storage and throughput, per server and overall."""

    storage_utilisation: tuple[float, ...]  # bytes held / storage
    traffic_ratio: tuple[float, ...]  # share of served traffic / share of throughput
    hole_titles: int
    hole_bytes: int
    hole_traffic: float  # share of requests for titles no server holds
    served_traffic: float

    @property
    def max_ratio(self) -> float:
        return max(self.traffic_ratio)

    @property
    def spread(self) -> float:
        return max(self.traffic_ratio) - min(self.traffic_ratio)

    @property
    def worst_deviation(self) -> float:
        return max(abs(r - 1) for r in self.traffic_ratio)


def balance(placement: Placement, traffic: NDArray[np.float64] | None = None) -> Balance:
    """Utilisation of `placement`; `traffic` (per title) re-scores it on other demand."""
    cat = placement.catalog
    demand = cat.traffic if traffic is None else traffic
    holes = placement.holes
    if traffic is None:
        per_server = placement.server_traffic
    else:
        held = placement.holders >= 0
        rows = np.broadcast_to(np.arange(len(cat))[:, None], held.shape)[held]
        share = (demand / np.maximum(held.sum(axis=1), 1))[rows]
        per_server = np.bincount(
            placement.holders[held], weights=share, minlength=len(placement.servers)
        ).astype(np.float64)
    served = float(demand[~holes].sum())
    tput = np.array([s.throughput_bps for s in placement.servers], dtype=np.float64)
    storage = np.array([s.storage_bytes for s in placement.servers], dtype=np.float64)
    expected = tput / tput.sum() * served
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(expected > 0, per_server / expected, 0.0)
    return Balance(
        storage_utilisation=tuple((placement.server_bytes / storage).tolist()),
        traffic_ratio=tuple(ratio.tolist()),
        hole_titles=int(holes.sum()),
        hole_bytes=int(cat.size_bytes[holes].sum()),
        hole_traffic=float(demand[holes].sum()),
        served_traffic=served,
    )


@dataclass(frozen=True)
class Prior:
    """Yesterday's plan for one site, as much of it as today's placement needs."""

    holders: Mapping[str, tuple[str, ...]]
    head: frozenset[str]
    hot: frozenset[str]
    log_density: Mapping[str, float]  # yesterday's, to measure how much popularity wobbles
    threshold: float | None  # yesterday's cutoff in log density
    head_weights: Mapping[str, float]  # ring weights by server id
    tail_weights: Mapping[str, float]

    @classmethod
    def from_placement(cls, p: Placement) -> Prior:
        ids = [s.id for s in p.servers]
        logd = p.catalog.log_density()
        c = p.cutoff
        return cls(
            holders=p.holder_map(),
            head=frozenset(t for t, h in zip(p.catalog.ids, p.head.tolist(), strict=True) if h),
            hot=frozenset(t for t, h in zip(p.catalog.ids, p.hot.tolist(), strict=True) if h),
            log_density=dict(zip(p.catalog.ids, logd.tolist(), strict=True)),
            threshold=None if c is None else c.log_density,
            head_weights={} if c is None else dict(zip(ids, c.head_weights, strict=True)),
            tail_weights={} if c is None else dict(zip(ids, c.tail_weights, strict=True)),
        )


def reference_cluster(site: str = "reference") -> list[Server]:
    """One 200 TB / 40 Gbps storage server and two 18 TB / 100 Gbps flash servers."""
    return [
        Server("storage-1", 200 * TB, 40 * GBPS, site),
        Server("flash-1", 18 * TB, 100 * GBPS, site),
        Server("flash-2", 18 * TB, 100 * GBPS, site),
    ]
