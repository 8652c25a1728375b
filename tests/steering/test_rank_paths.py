"""The fast ranking agrees with the reference one: every path, every input.

``rank_edges`` groups the candidates by place (``CandidateSet``), ranks places rather than
edges, finds the nearest places with numpy when there are many, and cuts a large last tie
group to the load bands it needs; each of those is a path that must give exactly what
``reference_rank.rank_edges`` (the ranking as first written, every rule for every edge)
gives: the same edges, order, reasons and fields. A ``CandidateSet`` is built once and
ranked for many clients, as the control plane uses it, so the properties rank one set for
several decisions.

``make`` compiles ``rank.py`` with mypyc, and the package then imports the extension; the
central property runs on both builds, the one imported and the source interpreted (what a
machine without a C compiler runs), so a difference the compiler makes shows up here.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import ModuleType

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.steering import (
    DEFAULT_LIMIT,
    CandidateSet,
    Client,
    EdgeCandidate,
    RankedEdge,
    Route,
    RoutingTable,
    SiteInfo,
    Steering,
    rank_edges,
)
from streamplane.steering import rank as fast
from streamplane.steering._build import load_rank_source
from tests.steering import reference_rank as reference

_BUILDS = {"imported": fast, "source": load_rank_source("streamplane.steering._rank_source")}

_SITES = [f"s{i}" for i in range(40)]
_POINTS: dict[str, tuple[float, float] | None] = {
    site: None if i % 9 == 4 else ((i * 37) % 130 - 60.0 + i / 7, (i * 53) % 360 - 180.0)
    for i, site in enumerate(_SITES)
}
# Sites that share a point with another (two cache groups in one building): their places
# tie on distance, so their edges meet in one tie group across places.
for _i in range(30, 40, 2):
    _POINTS[_SITES[_i]] = _POINTS[_SITES[_i - 20]]
# Some sites' edges report no coordinates and take them from here.
_SITE_INFO = {
    site: SiteInfo(site, *point)
    for i, (site, point) in enumerate(_POINTS.items())
    if point is not None and i % 3 == 0
}

# Thresholds of the paths: numpy and the band cut wherever they can be, neither, every
# plain list ranked edge by edge without grouping (a set is always walked by place), and
# as shipped.
_MODES = {
    "numpy": {"_NEAREST_FROM": 0, "_BAND_CUT_FROM": 1, "_DIRECT_BELOW": 0},
    "python": {"_NEAREST_FROM": 10**9, "_BAND_CUT_FROM": 10**9, "_DIRECT_BELOW": 0},
    "direct": {"_DIRECT_BELOW": 10**9},
    "shipped": {},
}


@contextmanager
def _mode(name: str, build: ModuleType = fast) -> Iterator[None]:
    saved = {attr: getattr(build, attr) for attr in _MODES[name]}
    for attr, value in _MODES[name].items():
        setattr(build, attr, value)
    try:
        yield
    finally:
        for attr, value in saved.items():
            setattr(build, attr, value)


def _edge(i: int, site: str, where: str, load: float, share: float) -> EdgeCandidate:
    point = _POINTS[site]
    if where == "none" or point is None:
        lat, lon = None, None
    elif where == "odd":  # away from its site-mates
        lat, lon = point[0] / 2, point[1] / 3
    elif where == "bad":
        lat, lon = 123.0, point[1]
    elif where == "nan":
        lat, lon = math.nan, point[1]
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


_loads = st.one_of(
    st.floats(0, 1.2),
    st.sampled_from([0.0, 0.3, 0.31, 0.39, -0.5, math.inf, math.nan, 1e9]),
)
# Slow start: full share most often; ramping, none (0), or a broken NaN report.
_shares = st.one_of(st.just(1.0), st.just(1.0), st.floats(0, 1), st.just(math.nan))
_candidates = st.lists(
    st.builds(
        _edge,
        st.integers(0, 400),
        st.sampled_from(_SITES),
        st.sampled_from(["site"] * 8 + ["none", "odd", "bad", "nan"]),
        _loads,
        _shares,
    ),
    max_size=160,
    unique_by=lambda e: e.edge_id,
)
_PREFIXES = {
    8: "203.0.0.0/8",
    16: "203.0.0.0/16",
    24: "203.0.113.0/24",
    32: "2001:db8::/32",
    48: "2001:db8:42::/48",
}
_routes = st.dictionaries(
    st.sampled_from(_SITES),
    st.tuples(
        st.sampled_from([8, 16, 16, 24, 24, 32, 48]),
        st.integers(0, 3),
        st.sampled_from([0, 0, 10, 20]),
        st.sampled_from(["embedded", "private", "public", "transit"]),
        st.sampled_from(["bgp", "bgp", "czmap", "static"]),
    ),
    max_size=8,
)
_client_points = st.one_of(
    st.none(),
    st.tuples(st.floats(-70, 70), st.floats(-180, 180)),
    st.sampled_from([p for p in _POINTS.values() if p is not None]),
)
_limits = st.one_of(st.none(), st.integers(0, 12), st.just(-1), st.just(DEFAULT_LIMIT))


def _as_routes(raw: Mapping[str, tuple[int, int, int, str, str]]) -> dict[str, Route]:
    return {
        site: Route(
            prefix=_PREFIXES[length],
            site=site,
            as_path=() if source == "czmap" else tuple(range(path)),
            med=0 if source == "czmap" else med,
            relation=relation,  # type: ignore[arg-type]
            source=source,
        )
        for site, (length, path, med, relation, source) in raw.items()
    }


_decisions = st.lists(
    st.tuples(
        _routes,
        _client_points,
        st.booleans(),
        _limits,
        st.text(max_size=6),
        st.text(max_size=6),
        # Edges demoted for this client's network by its viewers' QoS (most often none;
        # ids past the candidates' are not candidates at all).
        st.one_of(
            st.just({}),
            st.just({}),
            st.dictionaries(st.integers(0, 420).map(lambda i: f"e{i}"), st.just("r"), max_size=30),
        ),
    ),
    min_size=1,
    max_size=4,
)


@pytest.mark.parametrize("build", list(_BUILDS))
@pytest.mark.parametrize("mode", list(_MODES))
@settings(max_examples=120, deadline=None)
@given(candidates=_candidates, decisions=_decisions, prepared=st.booleans())
def test_every_path_ranks_as_the_reference(
    build: str,
    mode: str,
    candidates: list[EdgeCandidate],
    decisions: list[
        tuple[
            dict[str, tuple[int, int, int, str]],
            tuple[float, float] | None,
            bool,
            int | None,
            str,
            str,
            dict[str, str],
        ]
    ],
    prepared: bool,
) -> None:
    ranking = _BUILDS[build]
    # One set for every decision, as the control plane keeps one per title's holders.
    grouped = ranking.CandidateSet(candidates, _SITE_INFO) if prepared else None
    for raw_routes, at, own, limit, title, session, demoted in decisions:
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
            demoted=demoted,
        )
        with _mode(mode, ranking):
            got = ranking.rank_edges(
                client=client,
                client_location=location,
                title=title,
                session_key=session,
                candidates=grouped if grouped is not None else candidates,
                routes=routes,
                sites=None if grouped is not None else _SITE_INFO,
                limit=limit,
                demoted=demoted,
            )
        assert got == want


# -- end to end through the routing table ----------------------------------------------


class _Geo:
    """GeoLite2's part, as a fixed answer per address (None: it cannot place it)."""

    def __init__(self, where: Mapping[str, tuple[float, float] | None]) -> None:
        self.where = where

    def locate(self, address: str) -> tuple[float, float] | None:
        return self.where.get(address)


_TABLE_ROUTES = [
    Route(prefix="203.0.113.0/24", site="s1", as_path=(1, 2), med=10, relation="private"),
    Route(prefix="203.0.0.0/16", site="s2", as_path=(1,), relation="embedded"),
    Route(prefix="203.0.113.0/24", site="s5", as_path=(1, 2), med=10, relation="private"),
    Route(prefix="198.51.100.0/24", site="s3"),
    Route(prefix="2001:db8::/32", site="s4", as_path=(7,)),
    Route(prefix="2001:db8:42::/48", site="s5", as_path=(7, 8), relation="embedded"),
    Route(prefix="2001:db8:42::/48", site="s30", as_path=(7, 8), relation="embedded"),
]
_ADDRESSES = [
    "203.0.113.9",  # three sites, two of them tied on the route
    "203.0.7.1",  # one site's /16
    "::ffff:203.0.113.9",  # the same client through a dual-stack socket
    "198.51.100.77",
    "2001:db8:42::1",  # IPv6: a /48 at two sites that share a point, and a /32
    "2001:db8:9::1",
    "192.0.2.1",  # no prefix covers it
    "2001:db9::1",  # no IPv6 prefix covers it
    "testclient",  # no address at all
]


@settings(max_examples=120, deadline=None)
@given(
    candidates=_candidates,
    clients=st.lists(
        st.tuples(st.sampled_from(_ADDRESSES), _client_points, st.booleans()),
        min_size=1,
        max_size=5,
    ),
    limit=_limits,
    title=st.text(max_size=6),
)
def test_steering_ranks_a_prepared_set_as_the_reference_ranks_the_list(
    candidates: list[EdgeCandidate],
    clients: list[tuple[str, tuple[float, float] | None, bool]],
    limit: int | None,
    title: str,
) -> None:
    table = RoutingTable(_TABLE_ROUTES)
    # GeoLite2 places some addresses and not others; some clients send their coordinates.
    geo = _Geo({a: at for a, at, own in clients if not own})
    steering = Steering(table, geo, sites=_SITE_INFO)  # type: ignore[arg-type]
    grouped = steering.prepare(candidates)
    for n, (address, at, own) in enumerate(clients):
        client = Client(address=address)
        if own and at is not None:
            client = Client(address=address, lat=at[0], lon=at[1])
        try:
            ipaddress.ip_address(address.removeprefix("::ffff:"))
            routes = table.lookup(address)
            location = geo.locate(address) if client.lat is None else None
        except ValueError:
            routes, location = {}, None
        want = reference.rank_edges(
            client=client,
            client_location=location,
            title=title,
            session_key=f"session-{n}",
            candidates=candidates,
            routes=routes,
            sites=_SITE_INFO,
            limit=limit,
        )
        assert steering.rank(client, title, f"session-{n}", grouped, limit=limit) == want
        assert steering.rank(client, title, f"session-{n}", candidates, limit=limit) == want


# -- the nearest places, and where a decision stops -------------------------------------


def test_places_on_a_rounding_boundary_round_as_python_does() -> None:
    # Sites 100.5 km east of the client, to the last bit a bisection reaches, and others a
    # hair either side: numpy's order of the dot products may disagree with math's
    # distances here, and the ranking must still be the reference's.
    def km(lon: float) -> float:
        return fast._chord_km(fast._unit(0.0, 0.0), fast._unit(0.0, lon))

    low, high = 0.0, 2.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if km(middle) < 100.5 else (low, middle)
    assert abs(km(low) - 100.5) < 1e-9
    lons = [low, high, math.nextafter(low, 0.0), math.nextafter(high, 2.0), 1.0, 0.9]
    lons += [3.0 + i / 10 for i in range(40)]
    candidates = [
        EdgeCandidate(edge_id=f"e{i}", site=f"s{i}", base_url="u", lat=0.0, lon=lon, load=0.05)
        for i, lon in enumerate(lons)
    ]
    client = Client(address="192.0.2.1", lat=0.0, lon=0.0)
    for limit in range(1, 8):
        want = reference.rank_edges(
            client=client,
            client_location=None,
            title="t",
            session_key="s",
            candidates=candidates,
            routes={},
            limit=limit,
        )
        for mode in _MODES:
            with _mode(mode):
                got = rank_edges(
                    client=client,
                    client_location=None,
                    title="t",
                    session_key="s",
                    candidates=CandidateSet(candidates),
                    routes={},
                    limit=limit,
                )
            assert got == want, (mode, limit)


def test_the_nearest_places_are_read_and_no_more() -> None:
    # 200 sites on the equator a degree apart, five edges each; the best five edges are at
    # the one nearest site. The search reads the places up to the first that cannot tie.
    candidates = [
        EdgeCandidate(edge_id=f"e{s}-{i}", site=f"s{s}", base_url="u", lat=0.0, lon=s - 100.0)
        for s in range(200)
        for i in range(5)
    ]
    grouped = CandidateSet(candidates)
    here = fast._unit(0.0, 20.2)
    kms: dict[int, float] = {}
    read = fast._nearest(grouped, here, set(), kms, 5, lambda place: 5, grouped._slow)
    assert [
        fast._shared(grouped._site[p], grouped._unit[p], p, here, None, kms)[0] for _, p in read
    ] == ["no prefix of site s120 covers the client; 22 km"]
    assert len(kms) == 1  # s121, 89 km, ended the search unread
    # Needing more reads more, nearest first.
    read = fast._nearest(grouped, here, set(), {}, 12, lambda place: 5, grouped._slow)
    assert [grouped._site[p] for _, p in read] == ["s120", "s121", "s119"]


def test_a_client_that_cannot_be_placed_ranks_only_the_lowest_bands() -> None:
    # 1,000 edges in one tie group (no prefix, no location): only the edges of the lowest
    # load band that fills the list are hashed, and the runs are still counted whole.
    candidates = [
        EdgeCandidate(edge_id=f"e{i}", site=f"s{i % 100}", base_url="u", load=(i % 10) / 10 + 0.01)
        for i in range(1000)
    ]
    grouped = CandidateSet(candidates)
    cut = fast._lowest_bands(grouped._by_band(), set(), 5)
    assert len(cut) == 100 and {grouped[i].load for _, i, _ in cut} == {0.01}
    client = Client(address="192.0.2.1")
    got = rank_edges(
        client=client,
        client_location=None,
        title="t",
        session_key="s",
        candidates=grouped,
        routes={},
        limit=5,
    )
    want = reference.rank_edges(
        client=client,
        client_location=None,
        title="t",
        session_key="s",
        candidates=candidates,
        routes={},
        limit=5,
    )
    assert got == want
    assert got[0].reason.endswith("load 1 %; title hash puts it 1 of 100 equals")


# -- the set itself --------------------------------------------------------------------


def test_a_candidate_set_is_the_sequence_it_was_given() -> None:
    fleet = _fleet(12)
    grouped = CandidateSet(iter(fleet))
    assert len(grouped) == 12 and list(grouped) == fleet
    assert grouped[3] == fleet[3] and list(grouped[2:5]) == fleet[2:5]
    assert isinstance(grouped, Sequence) and not isinstance(fleet, CandidateSet)
    assert isinstance(fleet, Sequence)  # asking about the set taught the ABC nothing wrong
    assert fleet[5] in grouped and grouped.index(fleet[5]) == 5 and grouped.count(fleet[5]) == 1
    assert list(reversed(grouped)) == fleet[::-1]
    assert repr(grouped) == "CandidateSet(12 edges at 7 places)"
    with pytest.raises(ValueError, match="'e003' is a candidate twice"):
        CandidateSet([*fleet, fleet[3]])


def test_a_candidate_set_carries_its_sites() -> None:
    fleet = [EdgeCandidate(edge_id="a", site="a", base_url="u")]
    with pytest.raises(ValueError, match="carries its sites"):
        rank_edges(
            client=Client(address="203.0.113.9"),
            client_location=None,
            title="t",
            session_key="s",
            candidates=CandidateSet(fleet),
            routes={},
            sites={"a": SiteInfo("a", 1.0, 2.0)},
        )


@settings(max_examples=60, deadline=None)
@given(
    candidates=_candidates,
    loads=st.lists(_loads, min_size=160, max_size=160),
    shares=st.lists(_shares, min_size=160, max_size=160),
    at=_client_points,
    raw_routes=_routes,
)
def test_sets_that_sit_alike_share_a_layout_and_rank_each_as_the_reference(
    candidates: list[EdgeCandidate],
    loads: list[float],
    shares: list[float],
    at: tuple[float, float] | None,
    raw_routes: dict[str, tuple[int, int, int, str]],
) -> None:
    # The same holders a moment later: every load and share changed, every place the same.
    later = [
        msgspec.structs.replace(edge, load=load, share=share)
        for edge, load, share in zip(candidates, loads, shares, strict=False)
    ]
    first, second = CandidateSet(candidates, _SITE_INFO), CandidateSet(later, _SITE_INFO)
    assert first._layout is second._layout
    routes = _as_routes(raw_routes)
    client = Client(address="203.0.113.9")
    for edges, grouped in ((candidates, first), (later, second)):
        for limit in (None, DEFAULT_LIMIT):
            want = reference.rank_edges(
                client=client,
                client_location=at,
                title="t",
                session_key="s",
                candidates=edges,
                routes=routes,
                sites=_SITE_INFO,
                limit=limit,
            )
            got = rank_edges(
                client=client,
                client_location=at,
                title="t",
                session_key="s",
                candidates=grouped,
                routes=routes,
                limit=limit,
            )
            assert got == want


def test_a_shared_layout_still_takes_each_sets_sites() -> None:
    # Edges that report no coordinates sit alike in both sets; where their sites are
    # comes from each set's own ``sites``, even a mapping changed in place.
    fleet = [EdgeCandidate(edge_id=f"e{i}", site=f"s{i % 3}", base_url="u") for i in range(9)]
    sites = {"s0": SiteInfo("s0", 52.37, 4.90), "s1": SiteInfo("s1", 40.71, -74.01)}
    client = Client(address="192.0.2.1", lat=50.11, lon=8.68)
    for _ in range(2):
        got = rank_edges(
            client=client,
            client_location=None,
            title="t",
            session_key="s",
            candidates=CandidateSet(fleet, sites),
            routes={},
            limit=None,
        )
        want = reference.rank_edges(
            client=client,
            client_location=None,
            title="t",
            session_key="s",
            candidates=fleet,
            routes={},
            sites=sites,
            limit=None,
        )
        assert got == want
        assert [r.site for r in got][::3] == (
            ["s0", "s1", "s2"] if len(sites) == 2 else ["s1", "s0", "s2"]
        )
        sites["s1"] = SiteInfo("s1", 50.0, 8.0)
        sites["s0"] = SiteInfo("s0", 40.71, -74.01)
        sites["s9"] = SiteInfo("s9", 0.0, 0.0)
    assert CandidateSet(fleet)._layout is CandidateSet(fleet, sites)._layout


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
    assert steering.rank(client, "t", "s", steering.prepare(_fleet(30)), limit=12) == every[:12]
    assert len(steering.rank(client, "t", "s", _fleet(3))) == 3


def test_assigning_sites_reaches_the_ranking() -> None:
    steering = Steering(RoutingTable())
    fleet = [
        EdgeCandidate(edge_id="a", site="a", base_url="u"),
        EdgeCandidate(edge_id="b", site="b", base_url="u"),
    ]
    client = Client(address="192.0.2.1", lat=52.37, lon=4.90)
    steering.sites = {"a": SiteInfo("a", 40.71, -74.01), "b": SiteInfo("b", 50.11, 8.68)}
    before = steering.prepare(fleet)
    assert [r.edge_id for r in steering.rank(client, "t", "s", fleet)] == ["b", "a"]
    steering.sites = {"a": SiteInfo("a", 52.0, 4.9), "b": SiteInfo("b", 50.11, 8.68)}
    assert [r.edge_id for r in steering.rank(client, "t", "s", fleet)] == ["a", "b"]
    assert [r.edge_id for r in steering.rank(client, "t", "s", steering.prepare(fleet))] == [
        "a",
        "b",
    ]
    # A set keeps the sites it was prepared with.
    assert [r.edge_id for r in steering.rank(client, "t", "s", before)] == ["b", "a"]
    assert steering.sites["a"].lat == 52.0
