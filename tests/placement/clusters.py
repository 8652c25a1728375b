"""Shared builders for the placement tests: clusters and catalogs, small and seeded."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from streamplane.placement.model import GBPS, TB, Catalog, Server
from streamplane.placement.popularity import CatalogShape, size_scale, zipf_catalog


def storage(i: int, tb: float = 200, gbps: float = 40) -> Server:
    return Server(f"storage-{i}", round(tb * TB), gbps * GBPS)


def flash(i: int, tb: float = 18, gbps: float = 100) -> Server:
    return Server(f"flash-{i}", round(tb * TB), gbps * GBPS)


def cluster(n_storage: int, n_flash: int) -> list[Server]:
    return [storage(i) for i in range(1, n_storage + 1)] + [flash(i) for i in range(1, n_flash + 1)]


def catalog_for(servers: list[Server], n: int, fill: float, seed: int) -> Catalog:
    """`n` Zipf titles whose sizes add up to `fill` of the servers' storage, exactly."""
    shape = CatalogShape()
    total = sum(s.storage_bytes for s in servers)
    cat = zipf_catalog(n, np.random.default_rng(seed), shape, size_scale(shape, n, total, fill))
    sizes = np.maximum(1, np.floor(cat.size_bytes * (fill * total / cat.total_bytes)))
    return Catalog.from_columns(cat.ids, sizes.astype(np.int64), cat.traffic)


@st.composite
def sites(
    draw: st.DrawFn, min_titles: int = 30, max_titles: int = 600
) -> tuple[list[Server], Catalog]:
    """A mixed cluster of one to six servers of varied sizes, and a catalog that fits it."""
    kinds = draw(st.lists(st.sampled_from(["storage", "flash", "other"]), min_size=1, max_size=6))
    servers = []
    for i, kind in enumerate(kinds):
        if kind == "storage":
            servers.append(storage(i, draw(st.sampled_from([100, 200])), 40))
        elif kind == "flash":
            servers.append(flash(i, draw(st.sampled_from([18, 36])), 100))
        else:
            tb = draw(st.integers(5, 300))
            servers.append(Server(f"other-{i}", tb * TB, draw(st.integers(5, 200)) * GBPS))
    n = draw(st.integers(min_titles, max_titles))
    fill = draw(st.floats(0.1, 0.9))
    return servers, catalog_for(servers, n, fill, draw(st.integers(0, 2**16)))
