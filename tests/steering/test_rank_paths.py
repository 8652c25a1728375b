"""The fast ranking agrees with the reference one: every path, every input.

``rank_edges`` decides per place, keys only the edges of the best places, computes many
places' distances with numpy and many edges' keys with numpy; each of those is a path that
must give exactly what ``reference_rank.rank_edges`` (the ranking as first written, every
rule for every edge) gives: the same edges, order, reasons and fields.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.steering import (
    DEFAULT_LIMIT,
    Client,
    EdgeCandidate,
    FleetIndex,
    RankedEdge,
    Route,
    RoutingTable,
    SiteInfo,
    Steering,
    rank_edges,
)
from streamplane.steering import rank as fast
from tests.steering import reference_rank as reference

_SITES = [f"s{i}" for i in range(40)]
_POINTS: dict[str, tuple[float, float] | None] = {
    site: None if i % 9 == 4 else ((i * 37) % 130 - 60.0 + i / 7, (i * 53) % 360 - 180.0)
    for i, site in enumerate(_SITES)
}
# Some sites' edges report no coordinates and take them from here.
_SITE_INFO = {
    site: SiteInfo(site, *point)
    for i, (site, point) in enumerate(_POINTS.items())
    if point is not None and i % 3 == 0
}
_SHARED = FleetIndex(_SITE_INFO)  # learns across examples, as in service

# Thresholds of the paths: all at their lowest (numpy wherever it can be), all at their
# highest (never), and as shipped.
_MODES = {
    "numpy": {"_CHOOSE_FROM": 0, "_NUMPY_FROM": 1, "_NUMPY_KEYS_FROM": 1},
    "python": {"_CHOOSE_FROM": 10**9, "_NUMPY_FROM": 10**9, "_NUMPY_KEYS_FROM": 10**9},
    "choose-python": {"_CHOOSE_FROM": 0, "_NUMPY_FROM": 10**9, "_NUMPY_KEYS_FROM": 10**9},
    "shipped": {},
}


@contextmanager
def _mode(name: str) -> Iterator[None]:
    saved = {attr: getattr(fast, attr) for attr in _MODES[name]}
    for attr, value in _MODES[name].items():
        setattr(fast, attr, value)
    try:
        yield
    finally:
        for attr, value in saved.items():
            setattr(fast, attr, value)


def _edge(i: int, site: str, where: str, load: float, share: float) -> EdgeCandidate:
    point = _POINTS[site]
    if where == "none" or point is None:
        lat, lon = None, None
    elif where == "odd":  # away from its site-mates
        lat, lon = point[0] / 2, point[1] / 3
    elif where == "bad":
        lat, lon = 123.0, point[1]
    else:
        lat, lon = point
    return EdgeCandidate(
        edge_id=f"e{i}",
        site=site,
        base_url=f"https://e{i}.example",
        load=load,
        share=share,
        lat=lat,
        lon=lon,
    )


_candidates = st.lists(
    st.builds(
        _edge,
        st.integers(0, 400),
        st.sampled_from(_SITES),
        st.sampled_from(["site"] * 6 + ["none", "odd", "bad"]),
        st.one_of(
            st.floats(0, 1.2),
            st.sampled_from([0.0, 0.3, 0.31, 0.39, -0.5, math.inf, math.nan, 1e9]),
        ),
        st.one_of(st.just(1.0), st.just(1.0), st.floats(0, 1), st.just(math.nan)),
    ),
    max_size=120,
    unique_by=lambda e: e.edge_id,
)
_routes = st.dictionaries(
    st.sampled_from(_SITES),
    st.builds(
        lambda length, path, med, relation: (length, path, med, relation),
        st.sampled_from([8, 16, 16, 24, 24]),
        st.integers(0, 3),
        st.sampled_from([0, 0, 10, 20]),
        st.sampled_from(["embedded", "private", "public"]),
    ),
    max_size=8,
)
_client_points = st.one_of(
    st.none(),
    st.tuples(st.floats(-70, 70), st.floats(-180, 180)),
    st.sampled_from([p for p in _POINTS.values() if p is not None]),
)


def _as_routes(raw: Mapping[str, tuple[int, int, int, str]]) -> dict[str, Route]:
    return {
        site: Route(
            prefix={8: "203.0.0.0/8", 16: "203.0.0.0/16", 24: "203.0.113.0/24"}[length],
            site=site,
            as_path=tuple(range(path)),
            med=med,
            relation=relation,  # type: ignore[arg-type]
        )
        for site, (length, path, med, relation) in raw.items()
    }


@pytest.mark.parametrize("mode", list(_MODES))
@settings(max_examples=100, deadline=None)
@given(
    candidates=_candidates,
    raw_routes=_routes,
    at=_client_points,
    own=st.booleans(),
    limit=st.one_of(st.none(), st.integers(0, 12), st.just(-1)),
    shared=st.booleans(),
    title=st.text(max_size=6),
    session=st.text(max_size=6),
)
def test_every_path_ranks_as_the_reference(
    mode: str,
    candidates: list[EdgeCandidate],
    raw_routes: dict[str, tuple[int, int, int, str]],
    at: tuple[float, float] | None,
    own: bool,
    limit: int | None,
    shared: bool,
    title: str,
    session: str,
) -> None:
    routes = _as_routes(raw_routes)
    client = Client(address="203.0.113.9")
    location = at
    if own and at is not None:  # the client sent its coordinates; GeoLite2 is not asked
        client, location = Client(address="203.0.113.9", lat=at[0], lon=at[1]), None
    want = reference.rank_edges(
        client=client,
        client_location=location,
        title=title,
        session_key=session,
        candidates=candidates,
        routes=routes,
        sites=_SITE_INFO,
        limit=limit,
    )
    with _mode(mode):
        got = rank_edges(
            client=client,
            client_location=location,
            title=title,
            session_key=session,
            candidates=candidates,
            routes=routes,
            limit=limit,
            index=_SHARED if shared else FleetIndex(_SITE_INFO),
        )
    assert got == want


def test_a_distance_on_a_rounding_boundary_rounds_as_python_does() -> None:
    # A site 100.5 km east of the client, to the last bit the bisection reaches: where
    # numpy's arcsine and math.asin differ in the last bit, this rounds apart unless the
    # distance is redone with math; whether or not they differ here, the tiers agree.
    def km(lon: float) -> float:
        return fast._chord_km(fast._unit(0.0, 0.0), fast._unit(0.0, lon))

    low, high = 0.0, 2.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if km(middle) < 100.5 else (low, middle)
    index = FleetIndex()
    candidates = [
        EdgeCandidate(edge_id=f"e{i}", site=f"s{i}", base_url="u", lat=0.0, lon=lon)
        for i, lon in enumerate([low, high, 1.0, 0.5] + [3.0 + i / 10 for i in range(20)])
    ]
    places = index._current()
    place_of = places.places_of(candidates)
    here = fast._unit(0.0, 0.0)
    vectorised = fast._tiers_numpy(places, here, {})
    one_by_one = fast._tiers_python(places, set(place_of), here, {}, {})
    assert {p: vectorised[p] for p in one_by_one} == one_by_one
    assert abs(km(low) - 100.5) < 1e-9


def test_an_index_follows_a_site_that_moves() -> None:
    index = FleetIndex()
    client = Client(address="203.0.113.9", lat=52.37, lon=4.90)

    def fleet(ams: tuple[float, float]) -> list[EdgeCandidate]:
        return [
            EdgeCandidate(edge_id=f"{site}-{i}", site=site, base_url="u", lat=lat, lon=lon)
            for site, (lat, lon) in {"ams": ams, "fra": (50.11, 8.68)}.items()
            for i in range(20)
        ]

    for ams in [(52.37, 4.90), (40.71, -74.01), (52.37, 4.90)] * 3:
        candidates = fleet(ams)
        got = rank_edges(
            client=client,
            client_location=None,
            title="t",
            session_key="s",
            candidates=candidates,
            routes={},
            limit=3,
            index=index,
        )
        want = reference.rank_edges(
            client=client,
            client_location=None,
            title="t",
            session_key="s",
            candidates=candidates,
            routes={},
            limit=3,
        )
        assert got == want
        assert got[0].site == ("ams" if ams == (52.37, 4.90) else "fra")
    assert len(index._places.site) < 10


def test_an_index_and_sites_are_not_both_given() -> None:
    with pytest.raises(ValueError, match="not both"):
        rank_edges(
            client=Client(address="203.0.113.9"),
            client_location=None,
            title="t",
            session_key="s",
            candidates=[EdgeCandidate(edge_id="e", site="s", base_url="u")],
            routes={},
            sites={"s": SiteInfo("s", 1.0, 2.0)},
            index=FleetIndex(),
        )


def _fleet(n: int) -> list[EdgeCandidate]:
    return [
        EdgeCandidate(
            edge_id=f"e{i:03d}", site=f"s{i % 7}", base_url="u", lat=50.0 + i % 7, lon=8.0
        )
        for i in range(n)
    ]


def test_steering_returns_the_best_few_unless_asked_for_all() -> None:
    steering = Steering(RoutingTable([Route(prefix="203.0.113.0/24", site="s3")]))
    client = Client(address="203.0.113.9", lat=52.0, lon=8.0)
    every: list[RankedEdge] = steering.rank(client, "t", "s", _fleet(30), limit=None)
    assert len(every) == 30 and every[0].site == "s3"
    assert steering.rank(client, "t", "s", _fleet(30)) == every[:DEFAULT_LIMIT]
    assert steering.rank(client, "t", "s", _fleet(30), limit=12) == every[:12]
    assert len(steering.rank(client, "t", "s", _fleet(3))) == 3


def test_assigning_sites_reaches_the_ranking() -> None:
    steering = Steering(RoutingTable())
    fleet = [
        EdgeCandidate(edge_id="a", site="a", base_url="u"),
        EdgeCandidate(edge_id="b", site="b", base_url="u"),
    ]
    client = Client(address="192.0.2.1", lat=52.37, lon=4.90)
    steering.sites = {"a": SiteInfo("a", 40.71, -74.01), "b": SiteInfo("b", 50.11, 8.68)}
    assert [r.edge_id for r in steering.rank(client, "t", "s", fleet)] == ["b", "a"]
    steering.sites = {"a": SiteInfo("a", 52.0, 4.9), "b": SiteInfo("b", 50.11, 8.68)}
    assert [r.edge_id for r in steering.rank(client, "t", "s", fleet)] == ["a", "b"]
    assert steering.sites["a"].lat == 52.0
