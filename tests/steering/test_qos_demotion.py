"""The client network QoS is kept by, and demotions reaching the ranking through Steering."""

from __future__ import annotations

import pytest

from streamplane.steering import (
    AddressError,
    Client,
    EdgeCandidate,
    PrefixError,
    Route,
    RoutingTable,
    Steering,
    client_network,
)

ROUTES = [
    Route(prefix="203.0.0.0/16", site="a", as_path=(64500,)),
    Route(prefix="203.0.113.0/24", site="b", as_path=(64500, 64501), relation="private"),
    Route(prefix="2001:db8::/32", site="a", source="czmap"),
]


def test_a_client_network_is_its_longest_route_and_that_routes_origin_as() -> None:
    table = RoutingTable(ROUTES)
    steering = Steering(table)
    assert steering.network("203.0.113.9") == ("203.0.113.0/24", 64501)
    assert steering.network("::ffff:203.0.113.9") == ("203.0.113.0/24", 64501)
    assert steering.network("203.0.7.1") == ("203.0.0.0/16", 64500)
    assert steering.network("2001:db8::1") == ("2001:db8::/32", 0)  # a file route: no AS
    assert steering.network("192.0.2.77") == ("192.0.2.0/24", 0)  # no route: its /24
    assert steering.network("2001:db9:1:2::3") == ("2001:db9:1::/48", 0)
    with pytest.raises(AddressError):
        steering.network("testclient")
    with pytest.raises(PrefixError):
        client_network("not an address", {})


def test_demoted_edges_rank_after_the_others_for_their_network_only() -> None:
    steering = Steering(RoutingTable([Route(prefix="203.0.113.0/24", site="s")]))
    edges = [EdgeCandidate(edge_id=e, site="s", base_url=f"http://{e}.example") for e in ("x", "y")]
    natural = [r.edge_id for r in steering.rank(Client(address="203.0.113.9"), "t", "k", edges)]
    worst = natural[0]
    steering.demoted = {"203.0.113.0/24": {worst: "viewers in 203.0.113.0/24 rebuffer 9 %"}}
    ranked = steering.rank(Client(address="203.0.113.9"), "t", "k", edges)
    assert [r.edge_id for r in ranked] == natural[::-1]
    last = ranked[-1]
    assert last.qos_demoted and not last.slow_start_deferred
    assert last.reason.endswith(
        "; ranked after the edges not demoted: viewers in 203.0.113.0/24 rebuffer 9 %"
    )
    assert not ranked[0].qos_demoted
    # Another network's clients are not moved; a prepared set ranks alike.
    other = steering.rank(Client(address="198.51.100.1"), "t", "k", edges)
    assert [r.edge_id for r in other] == [
        r.edge_id for r in steering.rank(Client(address="198.51.100.1"), "t", "k", edges[::-1])
    ]
    assert not any(r.qos_demoted for r in other)
    prepared = steering.rank(Client(address="203.0.113.9"), "t", "k", steering.prepare(edges))
    assert prepared == ranked


def test_an_edge_demoted_for_an_as_ranks_last_for_every_prefix_of_it() -> None:
    steering = Steering(
        RoutingTable(
            [
                Route(prefix="203.0.113.0/24", site="s", as_path=(64510, 64500)),
                Route(prefix="198.51.100.0/24", site="s", as_path=(64500,)),
                Route(prefix="192.0.2.0/24", site="s", as_path=(64999,)),
            ]
        )
    )
    edges = [EdgeCandidate(edge_id=e, site="s", base_url=f"http://{e}.example") for e in ("x", "y")]
    natural = [r.edge_id for r in steering.rank(Client(address="203.0.113.9"), "t", "k", edges)]
    worst = natural[0]
    steering.demoted_as = {64500: {worst: "viewers in AS64500 rebuffer 9 %"}}
    for address in ("203.0.113.9", "198.51.100.1"):  # both prefixes originate in AS64500
        ranked = steering.rank(Client(address=address), "t", "k", edges)
        assert ranked[-1].edge_id == worst and ranked[-1].qos_demoted
        assert ranked[-1].reason.endswith("viewers in AS64500 rebuffer 9 %")
    other = steering.rank(Client(address="192.0.2.1"), "t", "k", edges)  # another AS
    assert not any(r.qos_demoted for r in other)
    # a demotion for the prefix and one for its AS: both apply, the prefix's reason first
    steering.demoted_as = {64500: {worst: "as reason"}}
    steering.demoted = {"203.0.113.0/24": {worst: "prefix reason"}}
    ranked = steering.rank(Client(address="203.0.113.9"), "t", "k", edges)
    assert ranked[-1].reason.endswith("prefix reason")
