"""Synthetic catalogs and how their popularity moves from day to day. Pure and seeded.

Every function takes its randomness as a `numpy.random.Generator`; the same generator state
gives the same catalog on every machine.

Catalog: popularity by rank follows Zipf-Mandelbrot, (rank + plateau)^-exponent: video-on-demand
demand is Zipf-like with an exponent near 1 and a flattened top. Ranks are dealt to titles at
random, so popularity and size are independent. Sizes are a title's whole package (every rung,
codec and audio track) from a mixture: episodes (lognormal around 6 GB) and films (around
20 GB), so the largest titles are some 20 times the smallest.

Day to day (`next_day`): a title's log popularity is a persistent base, plus a release boost
that fades, plus fresh noise each day (`wobble`, which does not persist: yesterday's lucky
title is not lucky today). The base takes a small random walk. New releases enter near the top,
at ranks drawn log-uniformly from 1 to `release_top`, scaled together so that a day's releases
take `release_share` of that day's traffic whatever the catalog's size. Their base is drawn from
the catalog's own distribution and a boost lifts them to their entry level, decaying with time
constant `release_days`: a release ends as an ordinary catalog title and the popularity curve
stays stationary. The coldest titles retire as releases arrive, so the catalog's size holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from streamplane.placement.model import Catalog


@dataclass(frozen=True)
class CatalogShape:
    exponent: float = 1.0
    plateau: float = 5.0
    film_share: float = 0.35
    episode_median_bytes: float = 6e9
    episode_sigma: float = 0.5
    film_median_bytes: float = 20e9
    film_sigma: float = 0.4

    def mean_size(self) -> float:
        ep = self.episode_median_bytes * math.exp(self.episode_sigma**2 / 2)
        film = self.film_median_bytes * math.exp(self.film_sigma**2 / 2)
        return (1 - self.film_share) * ep + self.film_share * film


@dataclass(frozen=True)
class Drift:
    wobble: float = 0.15  # sd of each day's log-popularity noise (does not persist)
    walk: float = 0.02  # sd of the daily random walk of a title's base (persists)
    releases: float = 0.0005  # new titles a day, as a fraction of the catalog (at least one)
    release_share: float = 0.03  # of a day's traffic, taken by that day's releases on arrival
    release_top: int = 200  # releases enter at ranks drawn log-uniformly in 1..release_top
    release_days: float = 14.0  # time constant of a release's fading boost
    retire: bool = True  # the coldest titles leave as releases arrive


def size_scale(shape: CatalogShape, n_titles: int, storage_bytes: float, fill: float) -> float:
    """The factor on sizes that makes `n_titles` titles fill `fill` of `storage_bytes`."""
    return fill * storage_bytes / (n_titles * shape.mean_size())


def _sizes(
    n: int, rng: np.random.Generator, shape: CatalogShape, scale: float
) -> NDArray[np.int64]:
    film = rng.random(n) < shape.film_share
    median = np.where(film, shape.film_median_bytes, shape.episode_median_bytes)
    sigma = np.where(film, shape.film_sigma, shape.episode_sigma)
    sizes = median * np.exp(sigma * rng.standard_normal(n)) * scale
    return np.maximum(1, np.round(sizes)).astype(np.int64)


def zipf_weights(n: int, shape: CatalogShape) -> NDArray[np.float64]:
    """Popularity by rank 1..n, normalised to sum to one."""
    w = (np.arange(1, n + 1, dtype=np.float64) + shape.plateau) ** -shape.exponent
    return np.asarray(w / w.sum(), dtype=np.float64)


def title_id(prefix: str, number: int) -> str:
    return f"{prefix}{number:07d}"


def zipf_catalog(
    n_titles: int,
    rng: np.random.Generator,
    shape: CatalogShape = CatalogShape(),
    scale: float = 1.0,
    prefix: str = "title-",
) -> Catalog:
    """`n_titles` titles with Zipf-Mandelbrot popularity and a mixture of sizes."""
    if n_titles < 1:
        raise ValueError("a catalog needs at least one title")
    popularity = zipf_weights(n_titles, shape)[rng.permutation(n_titles)]
    ids = [title_id(prefix, i) for i in range(1, n_titles + 1)]
    return Catalog.from_columns(ids, _sizes(n_titles, rng, shape, scale), popularity)


@dataclass(frozen=True, eq=False)
class CatalogDay:
    """One simulated day: the catalog as observed, and the state tomorrow grows from."""

    day: int
    catalog: Catalog
    base: NDArray[np.float64]  # persistent log popularity, per title
    boost: NDArray[np.float64]  # log boost at release (0 for the back catalog)
    age: NDArray[np.int64]  # days since release
    next_number: int
    scale: float
    shape: CatalogShape
    prefix: str

    @classmethod
    def start(
        cls,
        catalog: Catalog,
        scale: float = 1.0,
        shape: CatalogShape = CatalogShape(),
        prefix: str = "title-",
    ) -> CatalogDay:
        with np.errstate(divide="ignore"):
            base = np.log(catalog.traffic)
        base = np.where(np.isfinite(base), base, base[np.isfinite(base)].min() - 5)
        n = len(catalog)
        return cls(
            day=0,
            catalog=catalog,
            base=base,
            boost=np.zeros(n),
            age=np.full(n, 10_000, dtype=np.int64),
            next_number=n + 1,
            scale=scale,
            shape=shape,
            prefix=prefix,
        )

    def trend(self, drift: Drift) -> NDArray[np.float64]:
        return self.base + self.boost * np.exp(-self.age / drift.release_days)


def next_day(today: CatalogDay, rng: np.random.Generator, drift: Drift = Drift()) -> CatalogDay:
    """Tomorrow: bases walk, releases fade, new titles arrive, the coldest retire."""
    n = len(today.base)
    base = today.base + drift.walk * rng.standard_normal(n)
    boost, age = today.boost, today.age + 1
    ids = list(today.catalog.ids)
    sizes = today.catalog.size_bytes
    count = max(1, round(drift.releases * n)) if drift.releases > 0 else 0
    if count and drift.retire and n - count >= 1:
        trend = base + boost * np.exp(-age / drift.release_days)
        keep = np.sort(np.argsort(trend, kind="stable")[count:])  # the coldest leave
        ids = [ids[i] for i in keep.tolist()]
        base, boost, age, sizes = base[keep], boost[keep], age[keep], sizes[keep]
    if count:
        trend = base + boost * np.exp(-age / drift.release_days)
        descending = np.sort(trend)[::-1]
        entry_rank = np.exp(rng.uniform(0.0, math.log(drift.release_top), count)).astype(np.int64)
        entry = descending[np.minimum(entry_rank, len(descending) - 1)]
        # Lift or lower the day's releases together to take `release_share` of the traffic.
        rest = float(np.exp(trend - trend.max()).sum())
        arriving = float(np.exp(entry - trend.max()).sum())
        share = min(max(drift.release_share, 1e-9), 0.9)
        entry = entry + math.log(share / (1 - share) * rest / arriving)
        new_base = base[rng.integers(0, len(base), count)]
        ids += [title_id(today.prefix, today.next_number + k) for k in range(count)]
        base = np.concatenate((base, new_base))
        boost = np.concatenate((boost, np.maximum(entry - new_base, 0.0)))
        age = np.concatenate((age, np.zeros(count, dtype=np.int64)))
        sizes = np.concatenate((sizes, _sizes(count, rng, today.shape, today.scale)))
    trend = base + boost * np.exp(-age / drift.release_days)
    observed = np.exp(trend - trend.max() + drift.wobble * rng.standard_normal(len(trend)))
    return replace(
        today,
        day=today.day + 1,
        catalog=Catalog.from_columns(ids, sizes, observed),
        base=base,
        boost=boost,
        age=age,
        next_number=today.next_number + count,
    )


def sample_catalog(
    rng: np.random.Generator,
    storage_bytes: float,
    n_titles: int = 2000,
    fill: float = 0.5,
    releases: Sequence[tuple[str, int]] = (),
    shape: CatalogShape = CatalogShape(),
) -> Catalog:
    """A Zipf catalog sized to fill `fill` of `storage_bytes`, plus `releases` (id, size):
    new titles at the top of the chart, each drawing a little more traffic per byte than the
    catalog's densest title."""
    base = zipf_catalog(n_titles, rng, shape, size_scale(shape, n_titles, storage_bytes, fill))
    densest = float((base.traffic / base.size_bytes).max()) * 1.05
    ids = [t for t, _ in releases] + list(base.ids)
    sizes = [s for _, s in releases] + base.size_bytes.tolist()
    pops = [densest * s for _, s in releases] + base.traffic.tolist()
    return Catalog.from_columns(ids, sizes, pops)
