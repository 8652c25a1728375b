"""The popularity model: seeded, Zipf-like, realistic sizes, a stationary day-to-day drift."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.placement.popularity import (
    CatalogDay,
    CatalogShape,
    Drift,
    next_day,
    sample_catalog,
    zipf_catalog,
    zipf_weights,
)


def test_the_same_seed_gives_the_same_catalog() -> None:
    a = zipf_catalog(2000, np.random.default_rng(1))
    b = zipf_catalog(2000, np.random.default_rng(1))
    c = zipf_catalog(2000, np.random.default_rng(2))
    assert a.ids == b.ids
    assert (a.size_bytes == b.size_bytes).all() and (a.traffic == b.traffic).all()
    assert not (a.traffic == c.traffic).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5000), st.floats(0.5, 1.5), st.floats(0.0, 20.0))
def test_zipf_weights_fall_with_rank_and_sum_to_one(
    n: int, exponent: float, plateau: float
) -> None:
    w = zipf_weights(n, CatalogShape(exponent=exponent, plateau=plateau))
    assert abs(w.sum() - 1) < 1e-9
    assert (np.diff(w) <= 0).all()


def test_sizes_spread_like_episodes_and_films() -> None:
    cat = zipf_catalog(20_000, np.random.default_rng(3))
    lo, median, hi = np.quantile(cat.size_bytes, [0.05, 0.5, 0.95])
    assert 3e9 < median < 15e9
    assert hi / lo > 5


def test_a_million_titles_build_in_seconds() -> None:
    cat = zipf_catalog(1_000_000, np.random.default_rng(4))
    assert len(cat) == 1_000_000
    assert abs(cat.traffic.sum() - 1) < 1e-9


def test_days_keep_the_catalog_size_and_bring_releases_at_the_top() -> None:
    rng = np.random.default_rng(5)
    day = CatalogDay.start(zipf_catalog(5000, rng))
    drift = Drift()
    shares = []
    for _ in range(20):
        before = set(day.catalog.ids)
        day = next_day(day, rng, drift)
        assert len(day.catalog) == 5000
        new = [j for j, t in enumerate(day.catalog.ids) if t not in before]
        assert len(new) == round(drift.releases * 5000)
        shares.append(day.catalog.traffic[new].sum())
    assert abs(np.mean(shares) - drift.release_share) < 0.01
    # The curve stays put: the top 10 % holds a steady share, not one that creeps up.
    top = np.sort(day.catalog.traffic)[::-1][:500].sum()
    first = np.sort(zipf_catalog(5000, np.random.default_rng(5)).traffic)[::-1][:500].sum()
    assert abs(top - first) < 0.1


def test_noise_is_what_the_drift_says() -> None:
    rng = np.random.default_rng(6)
    day = CatalogDay.start(zipf_catalog(20_000, rng))
    a = next_day(day, rng, Drift(releases=0, walk=0))
    b = next_day(a, rng, Drift(releases=0, walk=0))
    diff = np.log(b.catalog.traffic) - np.log(a.catalog.traffic)
    assert abs(np.std(diff - np.median(diff)) - 0.15 * np.sqrt(2)) < 0.01


def test_a_sample_catalog_puts_releases_at_the_top() -> None:
    cat = sample_catalog(np.random.default_rng(7), 236e12, 2000, 0.4, [("demo-mix", 15_000_000)])
    assert cat.ids[0] == "demo-mix"
    assert cat.ranking()[0] == 0  # the densest title: small and as watched as the top one
    assert abs(cat.total_bytes / 236e12 - 0.4) < 0.05
