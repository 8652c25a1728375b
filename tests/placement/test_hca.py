"""HCA's promises: storage never exceeded, no holes while the catalog fits, weights that are
shares, the same answer for the same inputs, balanced traffic and little churn."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from streamplane.placement import hca
from streamplane.placement.errors import CatalogTooLargeError, InputError
from streamplane.placement.fill import churn
from streamplane.placement.model import GBPS, TB, Catalog, Placement, Prior, Server, balance
from streamplane.placement.popularity import CatalogDay, Drift, next_day
from tests.placement.clusters import catalog_for, cluster, flash, sites, storage

Site = tuple[list[Server], Catalog]
PROPERTY = settings(max_examples=40, deadline=None)


def by_id(p: Placement) -> dict[str, tuple[str, ...]]:
    return p.holder_map()


@PROPERTY
@given(sites())
def test_no_server_holds_more_than_its_storage(site: Site) -> None:
    servers, cat = site
    p = hca.place(servers, cat)
    assert (p.server_bytes <= np.array([s.storage_bytes for s in servers])).all()


@PROPERTY
@given(sites())
def test_a_title_is_left_out_only_when_no_server_has_room_for_it(site: Site) -> None:
    """Copies go down their title's ranking to any server with room, and bytes only grow,
    so a hole is a title larger than every server's room at the end; and there is none
    while the storage left over could take the largest title on every server. (A few huge
    titles at 90 % fill can fragment the room: found by this property with 30-140 titles of
    20-90 TB each.)"""
    servers, cat = site
    p = hca.place(servers, cat)
    storage = np.array([s.storage_bytes for s in servers])
    room = storage - p.server_bytes
    assert (cat.size_bytes[p.holes] > room.max()).all()
    largest = int(cat.size_bytes.max())
    if int(storage.sum()) - cat.total_bytes >= len(servers) * largest:
        assert not p.holes.any()
        assert int(p.server_bytes.sum()) >= cat.total_bytes


@PROPERTY
@given(sites())
def test_weights_are_non_negative_and_sum_to_one(site: Site) -> None:
    servers, cat = site
    c = hca.place(servers, cat).cutoff
    assert c is not None
    for w in (c.head_shares, c.tail_shares, c.head_weights, c.tail_weights):
        assert min(w) >= 0
        assert abs(sum(w) - 1) < 1e-9


@PROPERTY
@given(sites())
def test_copies_are_on_distinct_servers(site: Site) -> None:
    servers, cat = site
    for row in hca.place(servers, cat).holders.tolist():
        held = [s for s in row if s >= 0]
        assert len(held) == len(set(held))


@settings(max_examples=25, deadline=None)
@given(sites(max_titles=300), st.randoms(use_true_random=False))
def test_the_same_inputs_give_the_same_placement(site: Site, rnd: object) -> None:
    servers, cat = site
    first = hca.place(servers, cat)
    assert by_id(hca.place(servers, cat)) == by_id(first)
    # Neither the order of the popularity rows nor of the servers matters.
    order = list(range(len(cat)))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    shuffled = Catalog.from_columns(
        [cat.ids[i] for i in order], cat.size_bytes[order], cat.traffic[order]
    )
    assert by_id(hca.place(servers[::-1], shuffled)) == by_id(first)


def test_the_reference_cluster_is_balanced_within_the_goal() -> None:
    servers = cluster(1, 2)
    p = hca.place(servers, catalog_for(servers, 4000, 0.55, seed=3))
    b = balance(p)
    assert b.hole_titles == 0
    assert b.worst_deviation <= 0.05
    # Flash holds the dense head, storage the tail.
    c = p.cutoff
    assert c is not None and c.head_shares[0] < 0.05 < c.tail_shares[0]


def test_hot_titles_get_copies_that_grow_with_popularity() -> None:
    servers = cluster(2, 8)
    p = hca.place(servers, catalog_for(servers, 20_000, 0.6, seed=4))
    order = np.argsort(-p.catalog.traffic)
    head = p.head[order]
    copies = p.replicas[order][head]
    assert copies[0] > 1
    assert (np.diff(copies) <= 0).all()  # hotter never has fewer copies


def test_days_of_popularity_noise_refill_little() -> None:
    servers = cluster(1, 2)
    day = CatalogDay.start(catalog_for(servers, 4000, 0.55, seed=5))
    rng = np.random.default_rng(5)
    for _ in range(3):
        day = next_day(day, rng, Drift())
    before = hca.place(servers, day.catalog)
    for _ in range(3):
        day = next_day(day, rng, Drift())
        after = hca.place(servers, day.catalog, Prior.from_placement(before))
        assert churn(after, before.holder_map()).ratio < 0.02
        assert balance(after).worst_deviation <= 0.05
        before = after


def crossed(before: Placement, after: Placement) -> int:
    """Bytes (copies counted) of titles that changed sides: the cost of a cutoff that moved."""
    cat = after.catalog
    return int((cat.size_bytes * after.replicas)[before.head != after.head].sum())


@settings(max_examples=25, deadline=None)
@given(sites(min_titles=300, max_titles=800), st.sampled_from(["storage", "flash"]))
def test_adding_a_server_refills_little_more_than_it_must_take(site: Site, kind: str) -> None:
    """The rings are monotone and carry yesterday's weights over, so what lands on old servers
    is the titles crossing a cutoff that moved (the cluster's mix changed) and a few hot copies
    rebalanced: beyond the crossings, at most three times what the new server must hold
    (observed: 1.1 times at worst). (Where no
    cutoff meets every share HCA says so in a note and falls back to the lowest fill; the
    bound is not promised there. Titles are small next to a server: 300 or more.)"""
    servers, cat = site
    before = hca.place(servers, cat)
    new = storage(99) if kind == "storage" else flash(99)
    after = hca.place([*servers, new], cat, Prior.from_placement(before))
    assume(not any(n.startswith("no cutoff") for n in before.notes + after.notes))
    refilled = churn(after, before.holder_map()).added_bytes
    least = int(after.server_bytes[-1])
    stored = int(after.server_bytes.sum())
    assert least <= refilled <= 3 * least + crossed(before, after) + 0.02 * stored


def twin(servers: list[Server]) -> int | None:
    """A server with an alike server (same storage and throughput) left when it goes."""
    kinds = [(s.storage_bytes, s.throughput_bps) for s in servers]
    return next((i for i, k in enumerate(kinds) if kinds.count(k) > 1), None)


@settings(max_examples=25, deadline=None)
@given(sites(min_titles=300, max_titles=800).filter(lambda s: twin(s[0]) is not None))
def test_removing_one_of_alike_servers_refills_little_more_than_it_held(site: Site) -> None:
    """A failed server among alike ones: its titles go elsewhere, and little else moves.
    (Removing the only server of its kind changes the site's regime, like adding the first:
    the bench measures that case rather than bounding it.)"""
    servers, cat = site
    gone = twin(servers)
    assert gone is not None
    rest = servers[:gone] + servers[gone + 1 :]
    room = 0.9 * sum(s.storage_bytes for s in rest)
    if cat.total_bytes > room:  # shrink the titles so the catalog fits what is left
        sizes = np.maximum(1, np.floor(cat.size_bytes * (room / cat.total_bytes)))
        cat = Catalog.from_columns(cat.ids, sizes.astype(np.int64), cat.traffic)
    before = hca.place(servers, cat)
    after = hca.place(rest, cat, Prior.from_placement(before))
    assume(not any(n.startswith("no cutoff") for n in before.notes + after.notes))
    refilled = churn(after, before.holder_map()).added_bytes
    held = int(before.server_bytes[gone])
    stored = int(after.server_bytes.sum())
    assert refilled <= 3 * held + crossed(before, after) + 0.02 * stored


@pytest.mark.parametrize("seed", [0, 300])
def test_removing_a_weak_twin_beside_a_strong_server_refills_little(seed: int) -> None:
    """Sites the property above found (2 of 3,000 generated): 5 TB servers at 177, 5 and 5
    Gbit/s, 300 titles filling 10 %. Every title is hot there. When the hot-title line was
    the median share, losing a twin moved it from the weak share to the mean of the two
    left, half the traffic: 300 hot titles became 94, most left bounded loads for the ring,
    and the refill was 4-10 times what the lost server held. (The lower median mended these
    and broke the mirror case, three weak and three strong servers losing a weak one, ten
    times as often; the geometric mean mends both.)"""
    servers = [
        Server("other-0", 5 * TB, 177 * GBPS),
        Server("other-1", 5 * TB, 5 * GBPS),
        Server("other-2", 5 * TB, 5 * GBPS),
    ]
    cat = catalog_for(servers, 300, 0.1, seed)
    before = hca.place(servers, cat)
    after = hca.place([servers[0], servers[2]], cat, Prior.from_placement(before))
    refilled = churn(after, before.holder_map()).added_bytes
    held = int(before.server_bytes[1])
    stored = int(after.server_bytes.sum())
    assert refilled <= 3 * held + crossed(before, after) + 0.02 * stored


def test_a_catalog_larger_than_the_cluster_is_refused_or_partly_placed() -> None:
    servers = cluster(1, 2)
    cat = catalog_for(servers, 500, 1.3, seed=6)
    with pytest.raises(CatalogTooLargeError, match=r"catalog is [\d.,]+ TB but the cluster"):
        hca.place(servers, cat)
    p = hca.place(servers, cat, partial=True)
    b = balance(p)
    assert 0 < b.hole_titles < len(cat)
    assert int(p.server_bytes.sum()) <= sum(s.storage_bytes for s in servers)
    # What is placed is the densest: no hole is denser than a placed title.
    logd = cat.log_density()
    assert logd[p.holes].max() <= logd[~p.holes].min()


def test_alike_servers_are_balanced_too() -> None:
    servers = [Server(f"s{i}", 50 * TB, 40e9) for i in range(5)]
    p = hca.place(servers, catalog_for(servers, 3000, 0.7, seed=8))
    assert balance(p).worst_deviation <= 0.05


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        ([Server("a", 0, 1e9)], "has no storage"),
        ([Server("a", TB, 0.0)], "has no throughput"),
        ([Server("a", TB, 1e9), Server("a", TB, 1e9)], "appears twice"),
        ([Server("a/b", TB, 1e9)], "must start with a letter"),
        ([], "no servers"),
    ],
)
def test_bad_servers_are_named(servers: list[Server], message: str) -> None:
    cat = Catalog.from_columns(["t"], [1000], [1.0])
    with pytest.raises(InputError, match=message):
        hca.place(servers, cat)


@pytest.mark.parametrize(
    ("ids", "sizes", "pops", "message"),
    [
        (["a", "a"], [1, 2], [1, 1], "'a' appears twice"),
        (["a", "b"], [1, -2], [1, 1], "'b' has size -2"),
        (["a", "b"], [1, 0], [1, 1], "'b' has size 0"),
        (["a", "b"], [1, 2], [1, -1], "'b' has popularity -1"),
        (["a", "b"], [1, 2], [0, 0], "every title has zero popularity"),
        (["a", "b/c"], [1, 2], [1, 1], "without slashes"),
        ([], [], [], "empty"),
    ],
)
def test_bad_catalogs_are_named(
    ids: list[str], sizes: list[int], pops: list[float], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        Catalog.from_columns(ids, sizes, pops)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(InputError, match="max_fill"):
        hca.place(
            cluster(1, 1), Catalog.from_columns(["t"], [1], [1]), None, hca.HcaSettings(max_fill=0)
        )
