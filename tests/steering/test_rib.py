"""The routing table: per-site longest-prefix match, paths, writers and readers."""

from __future__ import annotations

import ipaddress
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.steering import (
    AddressError,
    PrefixError,
    Route,
    RouteError,
    RoutingTable,
    normalise_prefix,
)


def r(prefix: str, site: str, **kw: object) -> Route:
    return Route(prefix=prefix, site=site, **kw)  # type: ignore[arg-type]


def test_each_site_gets_its_own_longest_match() -> None:
    table = RoutingTable(
        [
            r("203.0.0.0/16", "fra"),
            r("203.0.112.0/20", "ams"),
            r("203.0.113.0/24", "ams", med=5),
            r("198.51.100.0/24", "lon"),
        ]
    )
    found = table.lookup("203.0.113.7")
    assert {site: route.prefix for site, route in found.items()} == {
        "fra": "203.0.0.0/16",
        "ams": "203.0.113.0/24",
    }
    assert table.lookup("203.0.112.1")["ams"].prefix == "203.0.112.0/20"
    assert table.lookup("203.0.200.1").keys() == {"fra"}
    assert table.lookup("192.0.2.1") == {}
    assert len(table) == 4


def test_ipv6_and_ipv4_mapped_clients() -> None:
    table = RoutingTable(
        [
            r("2001:db8::/32", "ams"),
            r("2001:db8:1::/48", "fra"),
            r("2001:DB8:1:2::/64", "fra"),
            r("192.0.2.0/24", "lon"),
        ]
    )
    assert table.lookup("2001:db8:1:2::9")["fra"].prefix == "2001:db8:1:2::/64"
    assert table.lookup("2001:db8:1:2::9")["ams"].prefix == "2001:db8::/32"
    assert table.lookup("2001:db8:ffff::1").keys() == {"ams"}
    assert table.lookup("2001:db9::1") == {}
    # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d
    assert table.lookup("::ffff:192.0.2.5").keys() == {"lon"}
    assert table.lookup("::FFFF:192.0.2.5").keys() == {"lon"}


def test_prefixes_are_normalised_and_bad_ones_named() -> None:
    assert normalise_prefix("2001:DB8:0::/32") == "2001:db8::/32"
    assert normalise_prefix("192.0.2.1") == "192.0.2.1/32"
    with pytest.raises(PrefixError, match=r"10\.1\.2\.3/8.*did you mean 10\.0\.0\.0/8"):
        normalise_prefix("10.1.2.3/8")
    with pytest.raises(PrefixError, match=r"'300\.0\.0\.0/8'"):
        normalise_prefix("300.0.0.0/8")
    with pytest.raises(PrefixError, match="'banana'"):
        normalise_prefix("banana")
    table = RoutingTable()
    with pytest.raises(RouteError, match=r"site 'ams'.*'10\.0\.0\.0/33'"):
        table.announce(r("10.0.0.0/33", "ams"))
    with pytest.raises(RouteError, match=r"relation 'peering'.*transit"):
        table.announce(r("10.0.0.0/8", "ams", relation="peering"))
    with pytest.raises(RouteError, match="MED -1"):
        table.announce(r("10.0.0.0/8", "ams", med=-1))
    with pytest.raises(RouteError, match="no site"):
        table.announce(r("10.0.0.0/8", ""))
    with pytest.raises(PrefixError):
        table.withdraw("ams", "10.0.0.0/99")
    assert len(table) == 0


@pytest.mark.parametrize("address", ["banana", "10.0.0.0/8", "", "1.2.3", "fe80::1%eth0"])
def test_bad_client_addresses_are_named(address: str) -> None:
    table = RoutingTable([r("10.0.0.0/8", "ams")])
    with pytest.raises(AddressError, match=repr(address).replace("[", r"\[")):
        table.lookup(address)


def test_announce_withdraw_and_inheritance_below() -> None:
    table = RoutingTable([r("10.1.2.0/24", "ams"), r("10.1.0.0/16", "fra")])
    # A shorter prefix of ams arrives: the /24 keeps ams's longest, the /16's space gains ams.
    table.announce(r("10.0.0.0/8", "ams", med=7))
    assert table.lookup("10.1.2.3")["ams"].prefix == "10.1.2.0/24"
    assert table.lookup("10.1.9.9")["ams"].prefix == "10.0.0.0/8"
    assert table.lookup("10.1.9.9")["fra"].prefix == "10.1.0.0/16"
    # The /16 goes: addresses below it keep what they inherit from the /8 and the /24.
    table.withdraw("fra", "10.1.0.0/16")
    assert table.lookup("10.1.9.9").keys() == {"ams"}
    assert table.lookup("10.1.2.3")["ams"].prefix == "10.1.2.0/24"
    table.withdraw("ams", "10.1.2.0/24")
    assert table.lookup("10.1.2.3")["ams"].prefix == "10.0.0.0/8"
    table.withdraw("ams", "10.0.0.0/8")
    assert table.lookup("10.1.2.3") == {}
    assert len(table) == 0
    table.withdraw("ams", "10.0.0.0/8")  # idempotent, as in BGP


@pytest.mark.parametrize("below", ["::1:0/112", "::ffff:0:0/96", "::ffff:c000:200/120"])
def test_a_prefix_that_inet_ntop_writes_with_a_dotted_quad_is_found_below(below: str) -> None:
    # Found by the brute-force property: pytricia names these nodes "::0.1.0.0/112",
    # "::ffff:0.0.0.0/96"..., which announcing a covering prefix after them has to read.
    table = RoutingTable([r(below, "ams")])
    table.announce(r("::/33", "fra"))
    inside = str(ipaddress.ip_network(below)[1])
    assert table.lookup(inside)["ams"].prefix == below
    assert table.lookup(inside)["fra"].prefix == "::/33"
    table.withdraw("fra", "::/33")
    assert table.lookup(inside).keys() == {"ams"}
    table.announce(r("::/1", "fra"))  # and again from further up, with the table built
    assert table.lookup(inside)["fra"].prefix == "::/1"


def test_the_best_path_of_a_site_wins_and_others_survive_withdrawal() -> None:
    table = RoutingTable()
    table.announce(r("10.0.0.0/8", "ams", as_path=(1, 2, 3), source="bgp", peer="192.0.2.1"))
    table.announce(r("10.0.0.0/8", "ams", as_path=(1,), source="bgp", peer="192.0.2.2"))
    table.announce(r("10.0.0.0/8", "ams", source="czmap"))
    assert len(table) == 1
    # relation ties (public), shortest AS path: peer .2; the file route has no AS path to
    # compare and comes after every path BGP learned
    assert table.lookup("10.0.0.1")["ams"].peer == "192.0.2.2"
    table.announce(
        r(
            "10.0.0.0/8",
            "ams",
            as_path=(1, 2, 3),
            relation="private",
            source="bgp",
            peer="192.0.2.1",
        )
    )
    assert table.lookup("10.0.0.1")["ams"].peer == "192.0.2.1"  # relation before path length
    table.withdraw("ams", "10.0.0.0/8", source="bgp", peer="192.0.2.1")
    assert table.lookup("10.0.0.1")["ams"].peer == "192.0.2.2"
    assert table.clear(site="ams", source="bgp") == 1
    assert table.lookup("10.0.0.1")["ams"].source == "czmap"  # the file route is kept
    table.withdraw("ams", "10.0.0.0/8", source="czmap")
    assert table.lookup("10.0.0.1") == {}
    # A file route marked with a better relation still wins: relation comes first.
    table.announce(r("10.0.0.0/8", "ams", as_path=(1,), source="bgp", peer="192.0.2.2"))
    table.announce(r("10.0.0.0/8", "ams", source="czmap", relation="embedded"))
    assert table.lookup("10.0.0.1")["ams"].source == "czmap"


_ORIGINS = [("ams", "bgp", "p1"), ("ams", "bgp", "p2"), ("ams", "czmap", ""), ("fra", "bgp", "p1")]


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["announce", "announce", "withdraw", "clear", "replace"]),
            st.sampled_from(["10.0.0.0/8", "10.1.0.0/16", "2001:db8::/32"]),
            st.sampled_from(_ORIGINS),
        ),
        max_size=30,
    )
)
def test_paths_are_counted_per_site_source_and_peer(
    ops: list[tuple[str, str, tuple[str, str, str]]],
) -> None:
    """What a BGP session taught (GET /v1/fleet/bgp's prefixes) is counted as paths come
    and go, and agrees with the paths there are."""
    table = RoutingTable()
    paths: set[tuple[str, str, str, str]] = set()  # (prefix, site, source, peer)
    for action, prefix, (site, source, peer) in ops:
        if action == "announce":
            table.announce(r(prefix, site, source=source, peer=peer))
            paths.add((prefix, site, source, peer))
        elif action == "withdraw":
            table.withdraw(site, prefix, source=source, peer=peer)
            paths.discard((prefix, site, source, peer))
        elif action == "clear":
            table.clear(site=site, source=source, peer=peer)
            paths -= {p for p in paths if p[1:] == (site, source, peer)}
        else:  # reload one source with one route
            table.replace([r(prefix, site, source=source, peer=peer)], source=source)
            paths = {p for p in paths if p[2] != source} | {(prefix, site, source, peer)}
        for origin in _ORIGINS:
            want = sum(1 for p in paths if p[1:] == origin)
            site, source, peer = origin
            assert table.count_paths(site=site, source=source, peer=peer) == want
        assert table.count_paths() == len(paths)
        assert table.count_paths(source="bgp", peer="p1") == sum(
            1 for p in paths if p[2:] == ("bgp", "p1")
        )


def test_replace_swaps_everything_or_one_source() -> None:
    table = RoutingTable([r("10.0.0.0/8", "ams", source="czmap")])
    table.announce(r("10.1.0.0/16", "fra", source="bgp", peer="p"))
    table.replace([r("10.2.0.0/16", "lon", source="czmap")], source="czmap")
    assert table.lookup("10.1.0.1").keys() == {"fra"}
    assert table.lookup("10.2.0.1").keys() == {"lon"}
    assert table.lookup("10.3.0.1") == {}
    table.replace([r("192.0.2.0/24", "ams")])
    assert table.lookup("10.1.0.1") == {}
    assert len(table) == 1


def test_lookup_returns_a_copy() -> None:
    table = RoutingTable([r("10.0.0.0/8", "ams")])
    table.lookup("10.0.0.1").clear()
    assert table.lookup("10.0.0.1").keys() == {"ams"}


def test_readers_run_while_a_writer_churns() -> None:
    """Readers never fail or see a half-built answer while prefixes come and go."""
    base = [r(f"10.{i}.0.0/16", f"s{i % 4}") for i in range(64)]
    table = RoutingTable([*base, r("10.0.0.0/8", "root")])
    stop = threading.Event()
    problems: list[str] = []

    def read() -> None:
        while not stop.is_set():
            for i in range(64):
                found = table.lookup(f"10.{i}.1.1")
                if "root" not in found:
                    problems.append(f"10.{i}.1.1 lost the /8: {found}")
                extra = found.get(f"x{i % 8}")
                if extra is not None and extra.prefix != f"10.{i}.1.0/24":
                    problems.append(f"10.{i}.1.1 saw {extra.prefix}")

    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    for round_ in range(30):
        for i in range(64):
            table.announce(r(f"10.{i}.1.0/24", f"x{i % 8}"))
        for i in range(64):
            table.withdraw(f"x{i % 8}", f"10.{i}.1.0/24")
        if round_ % 10 == 0:
            table.replace([*base, r("10.0.0.0/8", "root")])
    stop.set()
    for thread in readers:
        thread.join()
    assert problems == []


# -- longest-prefix match agrees with a brute-force scan ----------------------------------

_SITES = ["a", "b", "c"]


@st.composite
def _v4_prefixes(draw: st.DrawFn) -> str:
    length = draw(st.integers(0, 32))
    # Few distinct top bits, so prefixes nest and overlap often.
    value = draw(st.integers(0, 7)) << 29 | draw(st.integers(0, 2**29 - 1))
    return str(ipaddress.ip_network((value, length), strict=False))


@st.composite
def _v6_prefixes(draw: st.DrawFn) -> str:
    length = draw(st.integers(0, 128))
    value = draw(st.integers(0, 7)) << 125 | draw(st.integers(0, 2**125 - 1))
    return str(ipaddress.ip_network((value, length), strict=False))


_ops = st.lists(
    st.tuples(
        st.sampled_from(["announce", "announce", "withdraw"]),
        st.one_of(_v4_prefixes(), _v6_prefixes()),
        st.sampled_from(_SITES),
        st.integers(0, 3),
    ),
    max_size=40,
)


def _brute_force(routes: dict[tuple[str, str], Route], address: str) -> dict[str, str]:
    ip = ipaddress.ip_address(address)
    best: dict[str, ipaddress.IPv4Network | ipaddress.IPv6Network] = {}
    for prefix, site in routes:
        network = ipaddress.ip_network(prefix)
        if (
            network.version == ip.version
            and ip in network
            and (site not in best or network.prefixlen > best[site].prefixlen)
        ):
            best[site] = network
    return {site: str(network) for site, network in best.items()}


@settings(max_examples=150, deadline=None)
@given(
    ops=_ops,
    probes=st.lists(
        st.one_of(
            st.integers(0, 2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v))),
            st.integers(0, 2**128 - 1).map(lambda v: str(ipaddress.IPv6Address(v))),
        ),
        max_size=10,
    ),
    rebuild=st.booleans(),
)
def test_lookup_agrees_with_a_brute_force_scan(
    ops: list[tuple[str, str, str, int]], probes: list[str], rebuild: bool
) -> None:
    table = RoutingTable()
    model: dict[tuple[str, str], Route] = {}
    for action, prefix, site, med in ops:
        if action == "announce":
            route = r(prefix, site, med=med)
            table.announce(route)
            model[(prefix, site)] = route
        else:
            table.withdraw(site, prefix)
            model.pop((prefix, site), None)
    if rebuild:
        table.replace(model.values())
    # Probe inside every prefix too, not only at random.
    probes = probes + [str(ipaddress.ip_network(p).network_address) for p, _ in model]
    for address in probes:
        got = {site: route.prefix for site, route in table.lookup(address).items()}
        assert got == _brute_force(model, address), address
        for site, route in table.lookup(address).items():
            assert route == model[(route.prefix, site)]
    assert len(table) == len(model)
