"""The steering plane: which edges a client should fetch from, best first, and why.

The pure core is :func:`rank_edges`; :class:`RoutingTable` (longest-prefix match per edge
site, IPv4 and IPv6), :func:`load_czmap` (Apache Traffic Control coverage zones),
:class:`BgpFeed` (routes learned by ExaBGP) and :class:`GeoLocator` (GeoLite2) feed it, and
:class:`Steering` puts them together for the control plane.
"""

from __future__ import annotations

# First: it sets aside a compiled ranking that was built from another rank.py.
import streamplane.steering._build  # noqa: F401
from streamplane.steering.bgp import (
    DEFAULT_HOLD_TIME_S,
    BgpFeed,
    BgpNeighbor,
    SessionState,
    SessionStatus,
    apply_changes,
    bgp_health,
    bgp_metrics,
    clean_stale_workdirs,
    exabgp_config,
    find_exabgp,
    parse_exabgp_message,
    restart_delay,
)
from streamplane.steering.czmap import CoverageZones, load_czmap, parse_czmap
from streamplane.steering.errors import (
    AddressError,
    BgpError,
    BgpMessageError,
    CzmapError,
    ExabgpNotFound,
    GeoError,
    PrefixError,
    RouteError,
    SteeringError,
)
from streamplane.steering.geo import GeoLocator, bundled_database
from streamplane.steering.model import (
    Client,
    EdgeCandidate,
    RankedEdge,
    Relation,
    Route,
    RouteChange,
    SiteInfo,
    client_network,
    normalise_prefix,
)
from streamplane.steering.rank import (
    LOAD_STEP,
    CandidateSet,
    distance_km,
    load_band,
    rank_edges,
    session_fraction,
    title_score,
)
from streamplane.steering.rib import RoutingTable
from streamplane.steering.shell import DEFAULT_LIMIT, Steering

__all__ = [
    "DEFAULT_HOLD_TIME_S",
    "DEFAULT_LIMIT",
    "LOAD_STEP",
    "AddressError",
    "BgpError",
    "BgpFeed",
    "BgpMessageError",
    "BgpNeighbor",
    "CandidateSet",
    "Client",
    "CoverageZones",
    "CzmapError",
    "EdgeCandidate",
    "ExabgpNotFound",
    "GeoError",
    "GeoLocator",
    "PrefixError",
    "RankedEdge",
    "Relation",
    "Route",
    "RouteChange",
    "RouteError",
    "RoutingTable",
    "SessionState",
    "SessionStatus",
    "SiteInfo",
    "Steering",
    "SteeringError",
    "apply_changes",
    "bgp_health",
    "bgp_metrics",
    "bundled_database",
    "clean_stale_workdirs",
    "client_network",
    "distance_km",
    "exabgp_config",
    "find_exabgp",
    "load_band",
    "load_czmap",
    "normalise_prefix",
    "parse_czmap",
    "parse_exabgp_message",
    "rank_edges",
    "restart_delay",
    "session_fraction",
    "title_score",
]
