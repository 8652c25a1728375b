"""Steering's shell: the routing table and GeoLite2 around the pure ranking."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from streamplane.steering.errors import AddressError, PrefixError
from streamplane.steering.geo import GeoLocator
from streamplane.steering.model import (
    Client,
    EdgeCandidate,
    RankedEdge,
    Route,
    SiteInfo,
    client_network,
)
from streamplane.steering.rank import CandidateSet, rank_edges
from streamplane.steering.rib import RoutingTable

__all__ = ["DEFAULT_LIMIT", "Steering"]

# How many edges a playback answer carries unless the caller asks otherwise: the player
# fails over down the list, and a handful is more than it ever gets through. Reasons are
# most of a decision's cost, and only the edges returned get one.
DEFAULT_LIMIT: Final = 5


class Steering:
    """Ranks edges for a client: its routes from ``table``, its place from ``geo``.

    ``sites`` (e.g. the cache groups of a czmap) gives coordinates to edges that report
    none; assign ``steering.sites`` to update them. Candidates that serve many decisions
    (a title's holders, until the fleet changes) are best grouped once with ``prepare``.
    ``demoted`` maps a client network's prefix (``network``), and ``demoted_as`` a whole
    origin AS, to the edges its viewers rebuffer on far more than on their peers, each with
    why; the control plane assigns both whole from the QoS aggregates, and the ranking moves
    those edges after the others for a client in that prefix or AS (both apply).
    Thread-safe as the table is.
    """

    def __init__(
        self,
        table: RoutingTable,
        geo: GeoLocator | None = None,
        *,
        sites: Mapping[str, SiteInfo] | None = None,
    ) -> None:
        self.table = table
        self.geo = geo
        self.sites: Mapping[str, SiteInfo] = dict(sites) if sites else {}
        self.demoted: Mapping[str, Mapping[str, str]] = {}
        self.demoted_as: Mapping[int, Mapping[str, str]] = {}

    def network(self, address: str) -> tuple[str, int]:
        """The client network of ``address``: (prefix, origin AS), as QoS aggregates and
        demotions key it (``client_network``). Raises AddressError for a non-address."""
        try:
            routes = self.table.lookup(address)
            return client_network(address, routes)
        except PrefixError as err:
            raise AddressError(str(err)) from None

    def _demoted_for(self, prefix: str, asn: int) -> Mapping[str, str] | None:
        """The edges demoted for a client in ``prefix`` of AS ``asn``: those demoted for its
        prefix and those demoted for its whole AS (the prefix's reason first)."""
        by_prefix = self.demoted.get(prefix)
        by_as = self.demoted_as.get(asn) if asn else None
        if not by_as:
            return by_prefix
        if not by_prefix:
            return by_as
        return {**by_as, **by_prefix}

    def prepare(self, candidates: Iterable[EdgeCandidate]) -> CandidateSet:
        """``candidates`` grouped by place for many decisions, with this steering's sites
        (a set keeps the sites it was built with: prepare again after assigning ``sites``).
        """
        return CandidateSet(candidates, self.sites)._complete()

    def rank(
        self,
        client: Client,
        title: str,
        session_key: str,
        candidates: Sequence[EdgeCandidate] | CandidateSet,
        *,
        limit: int | None = DEFAULT_LIMIT,
    ) -> list[RankedEdge]:
        """The best ``limit`` candidates (``DEFAULT_LIMIT``; None for every one), best
        first, each with its reason (see ``rank_edges``).

        ``candidates`` is a ``CandidateSet`` from ``prepare`` (the fast way when the same
        candidates serve many decisions) or any sequence, grouped afresh for this call. A
        client address that is not an IP address (a test client's "testclient", say)
        matches no prefix and has no location: the edges then rank by load and hash.
        """
        routes: Mapping[str, Route]
        try:
            routes = self.table.lookup(client.address)
            valid = True
        except AddressError:
            routes, valid = {}, False
        demoted = None
        if valid and (self.demoted or self.demoted_as):
            # (PrefixError: an address pytricia reads and ipaddress does not, "1.2.3")
            with contextlib.suppress(PrefixError):
                demoted = self._demoted_for(*client_network(client.address, routes))
        location = None
        if valid and self.geo is not None and (client.lat is None or client.lon is None):
            location = self.geo.locate(client.address)
        return rank_edges(
            client=client,
            client_location=location,
            title=title,
            session_key=session_key,
            candidates=candidates,
            routes=routes,
            sites=None if isinstance(candidates, CandidateSet) else self.sites,
            limit=limit,
            demoted=demoted,
        )
