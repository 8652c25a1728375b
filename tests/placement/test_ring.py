"""Weighted rendezvous hashing: stable, proportional and monotone."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.placement.hca import agreement
from streamplane.placement.ring import (
    WeightedRing,
    exponentials,
    server_keys,
    stable_hash64,
    title_keys,
    top,
)

TITLES = [f"title-{i:07d}" for i in range(20_000)]
names = st.lists(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8),
    min_size=1,
    max_size=7,
    unique=True,
)
weight = st.floats(0.05, 10.0)


def owners(servers: list[str], weights: list[float], titles: list[str]) -> list[str]:
    return [o[0] for o in WeightedRing(tuple(servers), tuple(weights)).owners(titles)]


def test_hash_is_the_same_everywhere() -> None:
    # Golden values: a change here would move every title on every edge.
    assert stable_hash64("title-0000001") == 7793896816855512679
    assert stable_hash64("demo-mix") == 17797377962503384499
    assert int(server_keys(["flash-1"])[0]) == 17980869259426853947


def test_shares_follow_weights() -> None:
    weights = (1.0, 2.0, 3.0, 4.0)
    got = owners(["a", "b", "c", "d"], list(weights), TITLES)
    shares = np.array([got.count(s) for s in "abcd"]) / len(TITLES)
    assert np.allclose(shares, np.array(weights) / sum(weights), atol=0.012)


@settings(max_examples=60, deadline=None)
@given(names, st.data())
def test_adding_a_server_moves_titles_only_onto_it(servers: list[str], data: st.DataObject) -> None:
    weights = [data.draw(weight) for _ in servers]
    new = data.draw(st.text("ABC", min_size=1, max_size=3))
    before = owners(servers, weights, TITLES[:3000])
    after = owners([*servers, new], [*weights, data.draw(weight)], TITLES[:3000])
    assert all(b == a or a == new for b, a in zip(before, after, strict=True))


@settings(max_examples=60, deadline=None)
@given(names.filter(lambda s: len(s) >= 2), st.data())
def test_removing_a_server_moves_only_its_titles(servers: list[str], data: st.DataObject) -> None:
    weights = [data.draw(weight) for _ in servers]
    gone = data.draw(st.integers(0, len(servers) - 1))
    before = owners(servers, weights, TITLES[:3000])
    rest = [s for i, s in enumerate(servers) if i != gone]
    after = owners(rest, [w for i, w in enumerate(weights) if i != gone], TITLES[:3000])
    assert all(b == a or b == servers[gone] for b, a in zip(before, after, strict=True))


@settings(max_examples=60, deadline=None)
@given(names, st.data())
def test_raising_a_weight_moves_titles_only_onto_that_server(
    servers: list[str], data: st.DataObject
) -> None:
    weights = [data.draw(weight) for _ in servers]
    k = data.draw(st.integers(0, len(servers) - 1))
    raised = list(weights)
    raised[k] *= data.draw(st.floats(1.01, 5.0))
    before = owners(servers, weights, TITLES[:3000])
    after = owners(servers, raised, TITLES[:3000])
    assert all(b == a or a == servers[k] for b, a in zip(before, after, strict=True))


def test_copies_are_distinct_and_start_with_the_owner() -> None:
    ring = WeightedRing(("a", "b", "c", "d"), (1.0, 0.0, 2.0, 3.0))
    for one, three in zip(ring.owners(TITLES[:2000]), ring.owners(TITLES[:2000], 3), strict=True):
        assert one[0] == three[0]
        assert len(set(three)) == 3
        assert "b" not in three  # weight zero: never chosen


def test_agreement_is_the_chance_a_title_keeps_its_server() -> None:
    p = np.array([0.5, 0.3, 0.2, 0.0])
    q = np.array([0.1, 0.2, 0.3, 0.4])
    exp = exponentials(title_keys(TITLES), server_keys(["a", "b", "c", "d"]))
    same = (top(exp, p, 1) == top(exp, q, 1)).mean()
    assert abs(float(agreement(p, q)[0]) - same) < 0.012
    assert agreement(p, p)[0] == 1.0
    assert agreement(np.array([1.0, 0.0]), np.array([0.0, 1.0]))[0] == 0.0


def test_ring_rejects_bad_weights() -> None:
    for servers, weights in ((("a",), (0.0,)), (("a", "b"), (1.0,)), (("a",), (-1.0,))):
        try:
            WeightedRing(servers, weights)
        except ValueError:
            continue
        raise AssertionError(f"accepted {weights}")
