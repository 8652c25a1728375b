"""The steering plane's plain data: routes, sites, clients, candidate and ranked edges."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Final, Literal

import msgspec

from streamplane.steering.errors import PrefixError, RouteError

Relation = Literal["embedded", "private", "public", "transit"]
Source = Literal["bgp", "czmap", "static"]

# Lower is preferred. An embedded cache reaches the client without crossing an
# interconnect, a private peering (PNI) crosses one dedicated link, a public one (an IXP's
# shared fabric) crosses shared capacity the CDN does not control, and transit crosses a
# provider's network as well, paid by the bit (BGP's customer > peer > provider).
RELATION_PREFERENCE: Final[dict[str, int]] = {
    "embedded": 0,
    "private": 1,
    "public": 2,
    "transit": 3,
}
RELATION_LABEL: Final[dict[str, str]] = {
    "embedded": "embedded in the ISP",
    "private": "private peering",
    "public": "public peering",
    "transit": "transit",
}
# Among paths to the same prefix at the same site, a live BGP path beats configuration.
SOURCE_PREFERENCE: Final[dict[str, int]] = {"bgp": 0, "czmap": 1, "static": 2}
# A coverage-zone file says which cache group serves a network, not how the network is
# reached: its routes carry no AS path and no MED. Compared as the longest path with the
# highest MED (not as an empty path, which would beat every path BGP learns), a file route
# ranks after a BGP route of the same prefix length and relation, and file routes tie with
# each other on those rules, so distance decides between cache groups, as in Traffic Router.
FILE_SOURCES: Final = frozenset({"czmap"})
PATH_CAP: Final = 255  # path lengths compare up to this (an AS path is never near it)
_MAX_ASN: Final = 2**32 - 1
_MAX_MED: Final = 2**32 - 1
MAX_MED: Final = _MAX_MED


def path_preference(route: Route) -> tuple[int, int]:
    """What rules 4 and 5 compare of ``route``: (AS path length, MED), lower preferred."""
    if route.source in FILE_SOURCES:
        return PATH_CAP, MAX_MED
    hops = len(route.as_path)
    return (hops if hops < PATH_CAP else PATH_CAP), route.med


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """A prefix that an edge site serves, with the BGP attributes that rank it.

    ``peer`` tells apart paths to the same prefix at the same site learned from different
    BGP neighbours (the table keeps the best); it is empty for routes from files.
    """

    prefix: str  # "203.0.113.0/24" or "2001:db8::/32", normalised (see normalise_prefix)
    site: str  # the edge site (cache group) that serves this prefix
    as_path: tuple[int, ...] = ()
    med: int = 0
    relation: Relation = "public"
    source: str = "static"  # "bgp" | "czmap" | "static"
    peer: str = ""
    next_hop: str | None = None

    @property
    def prefix_len(self) -> int:
        return int(self.prefix.rpartition("/")[2])


class SiteInfo(msgspec.Struct, frozen=True):
    """An edge site (an ATC cache group) and where it is."""

    name: str
    lat: float | None = None
    lon: float | None = None


class Client(msgspec.Struct, frozen=True, kw_only=True):
    """Who asks: its address, and its coordinates if the player sent them."""

    address: str
    lat: float | None = None
    lon: float | None = None


class EdgeCandidate(msgspec.Struct, frozen=True, kw_only=True):
    """An edge that holds the title and is healthy, as the fleet sees it now."""

    edge_id: str
    site: str
    base_url: str
    load: float = 0.0  # throughput now / capacity (0..1, can exceed 1)
    share: float = 1.0  # slow start: fraction of sessions a recovering edge may take (0..1]
    lat: float | None = None  # the edge's site coordinates
    lon: float | None = None


class RankedEdge(msgspec.Struct, frozen=True, kw_only=True):
    """A candidate in its place (``rank`` 1 is best), with why it is there."""

    edge_id: str
    base_url: str
    rank: int
    reason: str
    prefix: str | None
    prefix_len: int | None
    as_path_len: int | None
    med: int | None
    relation: Relation | None
    distance_km: float | None
    load: float
    site: str = ""
    slow_start_deferred: bool = False  # moved after the full-share edges for this session
    qos_demoted: bool = False  # moved after them: its viewers in this network rebuffer far more


@lru_cache(maxsize=4096)
def normalise_prefix(text: str) -> str:
    """The canonical text of a CIDR prefix: ``"2001:DB8::/32"`` -> ``"2001:db8::/32"``.

    A bare address is a host route (/32 or /128). Host bits set are refused rather than
    masked: ``10.1.2.3/8`` is far more likely a typo for a /24 than a wish for all of 10/8.
    """
    if not isinstance(text, str):
        raise PrefixError(f"bad prefix {text!r}: expected a string like '203.0.113.0/24'")
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        hint = ""
        if "host bits set" in str(exc):
            masked = ipaddress.ip_network(text.strip(), strict=False)
            hint = f"; did you mean {masked}?"
        raise PrefixError(f"bad prefix {text!r}: {exc}{hint}") from None
    return str(network)


def check_route(route: Route) -> Route:
    """``route`` with its prefix normalised, or RouteError naming what is wrong with it."""
    if not isinstance(route.site, str) or not route.site:
        raise RouteError(f"route for {route.prefix!r} has no site")
    try:
        prefix = normalise_prefix(route.prefix)
    except PrefixError as exc:
        raise RouteError(f"route of site {route.site!r}: {exc}") from None
    if route.relation not in RELATION_PREFERENCE:
        raise RouteError(
            f"route {prefix} of site {route.site!r}: relation {route.relation!r} is not one of "
            f"{', '.join(RELATION_PREFERENCE)}"
        )
    if not isinstance(route.med, int) or not 0 <= route.med <= _MAX_MED:
        raise RouteError(
            f"route {prefix} of site {route.site!r}: MED {route.med!r} not in 0..2^32-1"
        )
    for asn in route.as_path:
        if not isinstance(asn, int) or not 0 <= asn <= _MAX_ASN:
            raise RouteError(
                f"route {prefix} of site {route.site!r}: AS {asn!r} in the AS path "
                "is not in 0..2^32-1"
            )
    if prefix != route.prefix:
        return msgspec.structs.replace(route, prefix=prefix)
    return route


class RouteChange(msgspec.Struct, frozen=True, kw_only=True):
    """One change that a BGP message makes to a site's routes.

    ``announce`` carries the new ``route``; ``withdraw`` names ``prefix``; ``reset`` (the
    session with ``peer`` went ``session`` "down", or came "up" afresh) drops everything
    learned from it.
    """

    action: Literal["announce", "withdraw", "reset"]
    site: str
    peer: str
    prefix: str | None = None
    route: Route | None = None
    session: Literal["up", "down"] | None = None
    reason: str | None = None  # why a session went down, as the speaker says it


# A client no route covers is put in its /24 (IPv4) or /48 (IPv6): the blocks an ISP
# assigns and announces, so its viewers still share a network with their neighbours.
_UNROUTED_V4: Final = 24
_UNROUTED_V6: Final = 48


def client_network(address: str, routes: dict[str, Route] | None) -> tuple[str, int]:
    """The network a client is in, as steering sees it: ``(prefix, origin AS)``.

    The prefix is the longest of ``routes`` (each site's longest route covering the
    client, ``RoutingTable.lookup``), the announcement meant for that client, and the AS
    the last of its path (the network that originated it; 0 when the route has no path: a
    czmap route, or the peer's own). A client no route covers is in its /24 or /48 with AS 0.
    Raises PrefixError for an address that is not an IP address.
    """
    if routes:
        best = max(routes.values(), key=lambda r: (r.prefix_len, r.prefix))
        return best.prefix, best.as_path[-1] if best.as_path else 0
    text = address[7:] if address[:7].lower() == "::ffff:" and "." in address else address
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise PrefixError(f"bad client address {address!r}: not an IPv4 or IPv6 address") from None
    length = _UNROUTED_V4 if ip.version == 4 else _UNROUTED_V6
    return str(ipaddress.ip_network(f"{ip}/{length}", strict=False)), 0
