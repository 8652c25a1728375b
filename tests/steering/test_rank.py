"""Ranking: every rule and tie-break, slow start, the reasons, and properties."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.steering import (
    Client,
    EdgeCandidate,
    RankedEdge,
    Route,
    RoutingTable,
    SiteInfo,
    Steering,
    distance_km,
    load_band,
    rank_edges,
    session_fraction,
    title_score,
)

AMS = (52.37, 4.90)
FRA = (50.11, 8.68)
LON = (51.51, -0.13)
NYC = (40.71, -74.01)
CLIENT = Client(address="203.0.113.7")


def edge(
    edge_id: str, site: str, point: tuple[float, float] | None = None, **kw: object
) -> EdgeCandidate:
    lat, lon = point if point is not None else (None, None)
    return EdgeCandidate(
        edge_id=edge_id,
        site=site,
        base_url=f"https://{edge_id}.example",
        lat=lat,
        lon=lon,
        **kw,  # type: ignore[arg-type]
    )


def route(prefix: str, site: str, **kw: object) -> Route:
    return Route(prefix=prefix, site=site, **kw)  # type: ignore[arg-type]


def rank(
    candidates: Sequence[EdgeCandidate],
    routes: Mapping[str, Route] | None = None,
    *,
    at: tuple[float, float] | None = AMS,
    title: str = "tt0111161",
    session: str = "s-1",
    client: Client = CLIENT,
    sites: Mapping[str, SiteInfo] | None = None,
    limit: int | None = None,
) -> list[RankedEdge]:
    return rank_edges(
        client=client,
        client_location=at,
        title=title,
        session_key=session,
        candidates=candidates,
        routes=routes or {},
        sites=sites,
        limit=limit,
    )


def order(ranked: Sequence[RankedEdge]) -> list[str]:
    return [r.edge_id for r in ranked]


# -- one rule at a time: the winner is worse on every later rule ------------------------


def test_a_site_with_a_covering_prefix_beats_a_nearer_idle_one() -> None:
    ranked = rank(
        [edge("near", "ams", AMS, load=0.0), edge("far", "nyc", NYC, load=0.9)],
        {"nyc": route("203.0.113.0/24", "nyc", as_path=(1, 2, 3, 4), med=500)},
    )
    assert order(ranked) == ["far", "near"]
    assert ranked[0].prefix == "203.0.113.0/24" and ranked[1].prefix is None


def test_longest_prefix_first() -> None:
    ranked = rank(
        [edge("short", "ams", AMS), edge("long", "nyc", NYC, load=0.95)],
        {
            "ams": route("203.0.0.0/16", "ams", relation="embedded", med=0),
            "nyc": route("203.0.113.0/24", "nyc", as_path=(1, 2, 3), med=900),
        },
    )
    assert order(ranked) == ["long", "short"]
    assert [r.prefix_len for r in ranked] == [24, 16]


def test_relation_before_as_path_length() -> None:
    ranked = rank(
        [
            edge("public", "lon", AMS),
            edge("private", "fra", FRA),
            edge("embedded", "nyc", NYC, load=0.9),
        ],
        {
            "lon": route("203.0.113.0/24", "lon", as_path=(1,), relation="public"),
            "fra": route("203.0.113.0/24", "fra", as_path=(1, 2), relation="private"),
            "nyc": route("203.0.113.0/24", "nyc", as_path=(1, 2, 3), med=50, relation="embedded"),
        },
    )
    assert order(ranked) == ["embedded", "private", "public"]


def test_shortest_as_path_then_lowest_med() -> None:
    ranked = rank(
        [edge("long-path", "ams", AMS), edge("high-med", "fra", FRA), edge("best", "nyc", NYC)],
        {
            "ams": route("203.0.113.0/24", "ams", as_path=(1, 2, 3), med=0),
            "fra": route("203.0.113.0/24", "fra", as_path=(1, 2), med=20),
            "nyc": route("203.0.113.0/24", "nyc", as_path=(1, 9), med=10),
        },
    )
    assert order(ranked) == ["best", "high-med", "long-path"]
    assert [(r.as_path_len, r.med) for r in ranked] == [(2, 10), (2, 20), (3, 0)]


def test_distance_after_the_bgp_rules() -> None:
    routes = {s: route("203.0.113.0/24", s, as_path=(1,)) for s in ("ams", "fra", "nyc")}
    ranked = rank(
        [edge("nyc", "nyc", NYC), edge("fra", "fra", FRA), edge("ams", "ams", AMS, load=0.8)],
        routes,
        at=LON,
    )
    assert order(ranked) == ["ams", "fra", "nyc"]
    assert ranked[0].distance_km == pytest.approx(distance_km(*LON, *AMS), abs=0.1)


def test_load_bands_then_the_title_hash() -> None:
    routes = {"ams": route("203.0.113.0/24", "ams")}
    busy = edge("busy", "ams", AMS, load=0.55)
    ranked = rank([busy, edge("idle", "ams", AMS, load=0.42)], routes)
    assert order(ranked) == ["idle", "busy"]
    # 31 % and 39 % share a band: the title decides, not the 8 points of load.
    a, b = edge("a", "ams", AMS, load=0.31), edge("b", "ams", AMS, load=0.39)
    firsts = Counter(rank([a, b], routes, title=f"t{i}")[0].edge_id for i in range(400))
    assert 150 < firsts["a"] < 250 and firsts["a"] + firsts["b"] == 400
    for i in range(20):
        title = f"t{i}"
        expected = sorted(["a", "b"], key=lambda e: title_score(title, e))
        assert order(rank([a, b], routes, title=title)) == expected


def test_load_band_edges() -> None:
    assert [load_band(x) for x in (0.0, 0.0999, 0.1, 0.3, 0.7, 0.999, 1.0, 1.5)] == [
        0,
        0,
        1,
        3,
        7,
        9,
        10,
        15,
    ]
    assert load_band(-0.5) == 0
    assert load_band(math.inf) == load_band(math.nan) == load_band(1e9) == 1023


def test_a_title_concentrates_and_titles_spread() -> None:
    routes = {"ams": route("203.0.113.0/24", "ams")}
    fleet = [edge(f"ams-{i}", "ams", AMS, load=0.2) for i in range(4)]
    # The same title goes to the same edge whoever asks, from wherever.
    for title in ("a", "b", "c"):
        firsts = {
            rank(
                fleet,
                routes,
                title=title,
                session=f"s{i}",
                client=Client(address=f"203.0.113.{i}"),
                at=at,
            )[0].edge_id
            for i, at in enumerate([AMS, FRA, LON, None])
        }
        assert len(firsts) == 1
    # Different titles spread over the equal edges.
    spread = Counter(rank(fleet, routes, title=f"title-{i}")[0].edge_id for i in range(2000))
    assert set(spread) == {e.edge_id for e in fleet}
    assert all(400 < count < 600 for count in spread.values()), spread


def test_rendezvous_removing_an_edge_moves_only_its_titles() -> None:
    routes = {"ams": route("203.0.113.0/24", "ams")}
    fleet = [edge(f"ams-{i}", "ams", AMS) for i in range(5)]
    before = {t: rank(fleet, routes, title=t)[0].edge_id for t in map(str, range(500))}
    after = {t: rank(fleet[1:], routes, title=t)[0].edge_id for t in map(str, range(500))}
    moved = {t for t in before if before[t] != after[t]}
    assert moved == {t for t in before if before[t] == "ams-0"}


# -- clients in no known prefix ---------------------------------------------------------


def test_no_prefix_falls_back_to_geography_then_any_edge() -> None:
    ranked = rank(
        [edge("nowhere", "x", None, load=0.0), edge("nyc", "nyc", NYC), edge("fra", "fra", FRA)],
        {},
        at=AMS,
    )
    assert order(ranked) == ["fra", "nyc", "nowhere"]
    assert "no prefix of site fra covers the client" in ranked[0].reason
    assert "site x has no coordinates: any healthy edge" in ranked[2].reason
    assert ranked[2].distance_km is None


def test_unlocated_client_in_no_prefix_ranks_by_load_then_hash() -> None:
    fleet = [edge("busy", "fra", FRA, load=0.9), edge("idle", "nyc", NYC, load=0.05)]
    ranked = rank(fleet, {}, at=None)
    assert order(ranked) == ["idle", "busy"]
    assert all("the client could not be located: any healthy edge" in r.reason for r in ranked)


def test_matched_sites_rank_before_located_and_anywhere_ones() -> None:
    ranked = rank(
        [edge("anywhere", "x"), edge("located", "fra", FRA), edge("matched", "nyc")],
        {"nyc": route("203.0.113.0/24", "nyc")},
    )
    assert order(ranked) == ["matched", "located", "anywhere"]
    assert "distance unknown: site nyc has no coordinates" in ranked[0].reason


def test_client_coordinates_beat_the_geolocation_and_sites_fill_edge_coordinates() -> None:
    fleet = [edge("ams", "ams"), edge("nyc", "nyc")]
    sites = {"ams": SiteInfo("ams", *AMS), "nyc": SiteInfo("nyc", *NYC)}
    assert order(rank(fleet, at=AMS, sites=sites))[0] == "ams"
    in_nyc = Client(address="203.0.113.7", lat=NYC[0], lon=NYC[1])
    assert order(rank(fleet, at=AMS, sites=sites, client=in_nyc))[0] == "nyc"
    # Coordinates that cannot be are ignored, not trusted.
    nonsense = Client(address="203.0.113.7", lat=123.0, lon=NYC[1])
    assert order(rank(fleet, at=AMS, sites=sites, client=nonsense))[0] == "ams"


def test_ipv6_client_through_the_table() -> None:
    table = RoutingTable(
        [
            route("2001:db8::/32", "ams", relation="embedded"),
            route("2001:db8:42::/48", "fra"),
            route("203.0.113.0/24", "nyc"),
        ]
    )
    steering = Steering(table)
    fleet = [edge("ams", "ams", AMS), edge("fra", "fra", FRA), edge("nyc", "nyc", NYC)]
    ranked = steering.rank(Client(address="2001:db8:42::1"), "t", "s", fleet)
    assert order(ranked) == ["fra", "ams", "nyc"]
    assert ranked[0].reason.startswith("longest prefix 2001:db8:42::/48 (/48)")
    ranked = steering.rank(Client(address="2001:db8:43::1"), "t", "s", fleet)
    assert order(ranked)[0] == "ams" and ranked[0].relation == "embedded"


def test_a_client_address_that_is_no_address_still_gets_edges() -> None:
    steering = Steering(RoutingTable([route("203.0.113.0/24", "ams")]))
    ranked = steering.rank(Client(address="testclient"), "t", "s", [edge("a", "ams", AMS)])
    assert order(ranked) == ["a"] and ranked[0].prefix is None


# -- slow start -------------------------------------------------------------------------


def test_slow_start_keeps_the_rank_for_its_share_of_sessions() -> None:
    routes = {"ams": route("203.0.113.0/24", "ams", as_path=(1,))}
    recovering = edge("recovering", "ams", AMS, share=0.3)
    rest = [edge("fra", "fra", FRA), edge("nowhere", "x")]  # no prefix: rank below it
    kept = 0
    for i in range(2000):
        ranked = rank([recovering, *rest], routes, session=f"s{i}")
        inside = session_fraction(f"s{i}", "recovering") < 0.3
        (mine,) = (r for r in ranked if r.edge_id == "recovering")
        assert mine.slow_start_deferred is not inside
        if inside:
            kept += 1
            assert order(ranked)[0] == "recovering"
            assert "slow start at 30 % share: this session is in it" in ranked[0].reason
        else:
            # After every full-share edge, even those no prefix covers.
            assert order(ranked) == ["fra", "nowhere", "recovering"]
            assert "outside it, so after the full-share edges" in ranked[2].reason
    assert 540 < kept < 660


def test_slow_start_is_stable_per_session_and_only_grows() -> None:
    routes = {"ams": route("203.0.113.0/24", "ams")}
    for i in range(300):
        session = f"s{i}"
        admitted = [
            rank(
                [edge("r", "ams", AMS, share=share), edge("o", "fra", FRA)], routes, session=session
            )[0].edge_id
            == "r"
            for share in (0.0, 0.1, 0.25, 0.5, 0.75, 0.99, 1.0)
        ]
        assert admitted[0] is False and admitted[-1] is True
        assert admitted == sorted(admitted), session  # once in, in for every larger share


def test_deferred_edges_keep_their_order_among_themselves() -> None:
    routes = {
        "ams": route("203.0.113.0/24", "ams"),
        "fra": route("203.0.0.0/16", "fra"),
    }
    fleet = [edge("ams", "ams", AMS, share=0.0), edge("fra", "fra", FRA, share=0.0), edge("x", "x")]
    assert order(rank(fleet, routes)) == ["x", "ams", "fra"]


# -- reasons, limit, input checks -------------------------------------------------------


def test_the_reason_says_why() -> None:
    routes = {
        "ams": route("203.0.113.0/24", "ams", as_path=(64500, 64501), med=10, relation="private")
    }
    ranked = rank(
        [edge("a", "ams", AMS, load=0.314), edge("b", "ams", AMS, load=0.35)],
        routes,
        at=(52.0, 4.9),
    )
    first = ranked[0].reason
    assert first.startswith(
        "longest prefix 203.0.113.0/24 (/24) via AS path 64500 64501, MED 10, private peering;"
        " 41 km; load"
    )
    assert "title hash puts it 1 of 2 equals" in first
    assert "title hash puts it 2 of 2 equals" in ranked[1].reason
    assert ranked[0].as_path_len == 2 and ranked[0].relation == "private"
    alone = rank([edge("a", "ams", AMS, load=0.314)], routes, at=(52.0, 4.9))[0]
    assert alone.reason.endswith("41 km; load 31 %")
    assert [r.rank for r in ranked] == [1, 2]


def test_a_file_route_says_so_and_ranks_after_a_learned_one() -> None:
    """A czmap route is described as what it is, not as an empty AS path, and a BGP route of
    the same prefix length and relation ranks before it (it knows the path); among file
    routes distance decides."""
    czmap = route("203.0.113.0/24", "ams", source="czmap")
    learned = route("203.0.113.0/24", "fra", as_path=(64500, 64501, 64502), med=90, source="bgp")
    ranked = rank([edge("a", "ams", AMS), edge("f", "fra", FRA)], {"ams": czmap, "fra": learned})
    assert order(ranked) == ["f", "a"]  # the client is next to ams: only the path decided
    assert ranked[1].reason.startswith(
        "longest prefix 203.0.113.0/24 (/24) via czmap file route, public peering; 0 km"
    )
    assert "AS path" not in ranked[1].reason and "MED" not in ranked[1].reason
    assert (ranked[1].as_path_len, ranked[1].med) == (None, None)
    # What still comes first: a longer prefix, a better relation.
    longer = route("203.0.113.0/25", "ams", source="czmap")
    assert order(
        rank([edge("a", "ams", AMS), edge("f", "fra", FRA)], {"ams": longer, "fra": learned})
    ) == ["a", "f"]
    private = route("203.0.113.0/24", "ams", source="czmap", relation="private")
    assert order(
        rank([edge("a", "ams", AMS), edge("f", "fra", FRA)], {"ams": private, "fra": learned})
    ) == ["a", "f"]
    # Two file routes: the nearer site.
    other = route("203.0.113.0/24", "fra", source="czmap")
    assert order(
        rank([edge("a", "ams", AMS), edge("f", "fra", FRA)], {"ams": czmap, "fra": other}, at=FRA)
    ) == ["f", "a"]


def test_transit_ranks_after_public_peering_and_says_so() -> None:
    routes = {
        "ams": route("203.0.113.0/24", "ams", as_path=(1,), relation="transit"),
        "fra": route("203.0.113.0/24", "fra", as_path=(1, 2, 3), relation="public"),
    }
    ranked = rank([edge("a", "ams", AMS), edge("f", "fra", FRA)], routes)
    assert order(ranked) == ["f", "a"]
    assert ranked[1].relation == "transit"
    assert "via AS path 1, MED 0, transit;" in ranked[1].reason


def test_limit_keeps_the_best() -> None:
    fleet = [edge(f"e{i}", "fra", FRA, load=i / 10) for i in range(8)]
    full = rank(fleet)
    assert rank(fleet, limit=3) == full[:3]
    assert rank(fleet, limit=0) == []


def test_a_candidate_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="'e1' is a candidate twice"):
        rank([edge("e1", "ams"), edge("e2", "ams"), edge("e1", "fra")])


def test_no_candidates() -> None:
    assert rank([]) == []


# -- properties -------------------------------------------------------------------------

_SITE_NAMES = ["ams", "fra", "lon", "nyc", "x"]
_POINTS = {"ams": AMS, "fra": FRA, "lon": LON, "nyc": NYC, "x": None}

_candidates = st.lists(
    st.builds(
        lambda i, site, load, share: edge(f"e{i}", site, _POINTS[site], load=load, share=share),
        st.integers(0, 40),
        st.sampled_from(_SITE_NAMES),
        st.one_of(st.floats(0, 1.5), st.just(math.inf), st.just(math.nan)),
        st.one_of(st.just(1.0), st.floats(0, 1)),
    ),
    max_size=25,
    unique_by=lambda e: e.edge_id,
)
_routes = st.dictionaries(
    st.sampled_from(_SITE_NAMES),
    st.builds(
        lambda length, path, med, relation, source: Route(
            prefix=f"203.0.{113 & (0xFF << (24 - length)) & 0xFF}.0/{length}"
            if length > 16
            else f"203.0.0.0/{length}",
            site="",
            as_path=() if source == "czmap" else tuple(range(path)),
            med=0 if source == "czmap" else med,
            relation=relation,
            source=source,
        ),
        st.integers(8, 24),
        st.integers(0, 4),
        st.integers(0, 3),
        st.sampled_from(["embedded", "private", "public", "transit"]),
        st.sampled_from(["bgp", "czmap", "static"]),
    ),
)


def _fix_sites(routes: dict[str, Route]) -> dict[str, Route]:
    return {
        site: Route(**{**{f: getattr(r, f) for f in r.__struct_fields__}, "site": site})
        for site, r in routes.items()
    }


@settings(max_examples=200, deadline=None)
@given(
    candidates=_candidates,
    routes=_routes,
    at=st.one_of(st.none(), st.sampled_from([AMS, FRA, NYC])),
    title=st.text(max_size=8),
    session=st.text(max_size=8),
)
def test_ranking_properties(
    candidates: list[EdgeCandidate],
    routes: dict[str, Route],
    at: tuple[float, float] | None,
    title: str,
    session: str,
) -> None:
    routes = _fix_sites(routes)
    ranked = rank(candidates, routes, at=at, title=title, session=session)
    # A permutation of the candidates, ranked 1..n, every one with a reason.
    assert sorted(order(ranked)) == sorted(e.edge_id for e in candidates)
    assert [r.rank for r in ranked] == list(range(1, len(candidates) + 1))
    assert all(r.reason for r in ranked)
    # Deterministic, and blind to the order the candidates come in.
    assert rank(candidates, routes, at=at, title=title, session=session) == ranked
    assert rank(candidates[::-1], routes, at=at, title=title, session=session) == ranked
    # Full-share or admitted edges first; then, by the rules in order.
    deferred = [r.slow_start_deferred for r in ranked]
    assert deferred == sorted(deferred)
    for block in (
        [r for r in ranked if not r.slow_start_deferred],
        [r for r in ranked if r.slow_start_deferred],
    ):
        # A file route (no AS path, no MED: None) ranks as the longest path, highest MED.
        keys = [
            (
                r.prefix is None,
                -(r.prefix_len or 0),
                ["embedded", "private", "public", "transit"].index(r.relation) if r.relation else 0,
                255 if r.as_path_len is None else r.as_path_len,
                2**32 if r.med is None else r.med,
            )
            for r in block
        ]
        assert keys == sorted(keys)
        matched_or_located = [r for r in block if r.prefix is not None or r.distance_km is not None]
        assert block[: len(matched_or_located)] == matched_or_located


@settings(max_examples=100, deadline=None)
@given(
    candidates=_candidates,
    unrelated=st.lists(
        st.tuples(
            st.sampled_from(_SITE_NAMES),
            st.sampled_from(["198.51.100.0/24", "10.0.0.0/8", "2001:db8::/32", "203.0.114.0/24"]),
        ),
        max_size=6,
    ),
)
def test_a_prefix_that_does_not_cover_the_client_changes_nothing(
    candidates: list[EdgeCandidate], unrelated: list[tuple[str, str]]
) -> None:
    table = RoutingTable([route("203.0.113.0/24", "ams"), route("203.0.0.0/16", "fra", med=3)])
    steering = Steering(table)
    client = Client(address="203.0.113.9", lat=AMS[0], lon=AMS[1])
    before = steering.rank(client, "t", "s", candidates)
    for site, prefix in unrelated:
        table.announce(route(prefix, site, relation="embedded"))
    assert steering.rank(client, "t", "s", candidates) == before
