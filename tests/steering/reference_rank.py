"""The ranking as first written, kept as an oracle: one integer sort key per edge, built in
one pass over the candidates, every rule computed for every edge. The faster ranking in
``streamplane.steering.rank`` must agree with it exactly (order, reasons, every field) on
every input; ``test_rank_paths.py`` checks that. Not used by the package. The rules and why
they are as they are: see ``streamplane.steering.rank``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Final

from streamplane.steering.model import (
    RELATION_LABEL,
    RELATION_PREFERENCE,
    Client,
    EdgeCandidate,
    RankedEdge,
    Route,
    SiteInfo,
)

__all__ = [
    "LOAD_STEP",
    "distance_km",
    "load_band",
    "rank_edges",
    "session_fraction",
    "title_score",
]

LOAD_STEP: Final = 0.1
EARTH_RADIUS_KM: Final = 6371.0088  # IUGG mean radius

_MASK64: Final = (1 << 64) - 1
_GOLDEN: Final = 0x9E3779B97F4A7C15
_M1: Final = 0xBF58476D1CE4E5B9
_M2: Final = 0x94D049BB133111EB
_TITLE: Final = b"sp-st-title"
_SESSION: Final = b"sp-st-session"
_EDGE: Final = b"sp-st-edge"

# The sort key is one integer, so that sorting compares machine words, not tuples. Its bit
# fields, most significant first: deferred by slow start (1), group (2: covered by a prefix,
# located, anywhere), 128 - prefix length (8), relation (2), AS path length (8), MED (32),
# distance in km (15), load band (10), title hash (64). Caps are far past real values (an AS
# path of 255, 32,767 km, 102x capacity); values beyond them tie at the cap.
_HASH_BITS: Final = 64
_LOAD_BITS: Final = 10
_DIST_BITS: Final = 15
_MED_BITS: Final = 32
_PATH_BITS: Final = 8
_REL_BITS: Final = 2
_LEN_BITS: Final = 8
_GROUP_BITS: Final = 2
_LOAD_CAP: Final = (1 << _LOAD_BITS) - 1
_LOAD_CAP_VALUE: Final = _LOAD_CAP * LOAD_STEP
_DIST_CAP: Final = (1 << _DIST_BITS) - 1
_PATH_CAP: Final = (1 << _PATH_BITS) - 1
_ROUTE_BITS: Final = _LEN_BITS + _REL_BITS + _PATH_BITS + _MED_BITS
_SITE_SHIFT: Final = _DIST_BITS + _LOAD_BITS + _HASH_BITS  # where a site's part of the key sits
_DEFER_BIT: Final = 1 << (_GROUP_BITS + _ROUTE_BITS + _SITE_SHIFT)

_MATCHED, _LOCATED, _ANYWHERE = 0, 1, 2

# edge id -> its 64-bit key, pre-multiplied for the mix. Edge ids are few and long-lived;
# the bound only guards against a caller inventing ids per request.
_EDGE_KEYS: dict[str, int] = {}
_EDGE_KEYS_MAX: Final = 1 << 16


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine on a sphere of the Earth's mean radius)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def load_band(load: float) -> int:
    """The load band an edge is compared in: 0 for [0, 10 %), 1 for [10 %, 20 %)...

    A negative load counts as 0; an infinite or NaN one (a broken report) as the busiest.
    """
    if 0.0 <= load < _LOAD_CAP_VALUE:
        # The epsilon keeps 0.3 (29.999...% after float division) in the 30 % band.
        return int(load / LOAD_STEP + 1e-9)
    return 0 if load < 0.0 else _LOAD_CAP


@lru_cache(maxsize=1 << 14)
def _key64(text: str, person: bytes) -> int:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "little")


def _edge_key(edge_id: str) -> int:
    key = _EDGE_KEYS.get(edge_id)
    if key is None:
        if len(_EDGE_KEYS) >= _EDGE_KEYS_MAX:
            _EDGE_KEYS.clear()
        key = _EDGE_KEYS[edge_id] = (_key64(edge_id, _EDGE) * _GOLDEN) & _MASK64
    return key


def _mix(z: int) -> int:
    # splitmix64's finaliser: every input bit flips about half the output bits.
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def title_score(title: str, edge_id: str) -> int:
    """The rendezvous score of (title, edge): among tied edges the lowest goes first."""
    return _mix(_key64(title, _TITLE) ^ _edge_key(edge_id))


def session_fraction(session_key: str, edge_id: str) -> float:
    """A stable number in [0, 1) per (session, edge): slow start admits it below ``share``."""
    return (_mix(_key64(session_key, _SESSION) ^ _edge_key(edge_id)) >> 11) * 2.0**-53


def _valid_point(lat: float | None, lon: float | None) -> tuple[float, float] | None:
    if lat is None or lon is None:
        return None
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):  # also refuses NaN
        return None
    return float(lat), float(lon)


def _route_text(route: Route) -> str:
    if route.source == "czmap":
        via = "czmap file route"
    else:
        path = " ".join(map(str, route.as_path)) if route.as_path else "(empty: the peer's own)"
        via = f"AS path {path}, MED {route.med}"
    return (
        f"longest prefix {route.prefix} (/{_prefix_len(route.prefix)}) via {via}, "
        f"{RELATION_LABEL[route.relation]}"
    )


# (lat, lon) -> the point on the unit sphere: sites are few and fixed, so their vectors are
# computed once, and a distance costs a chord, not a haversine's five trigonometric calls.
_UNIT: dict[tuple[float, float], tuple[float, float, float]] = {}
_UNIT_MAX: Final = 1 << 16


def _unit(lat: float, lon: float) -> tuple[float, float, float]:
    vector = _UNIT.get((lat, lon))
    if vector is None:
        if len(_UNIT) >= _UNIT_MAX:
            _UNIT.clear()
        p, q = math.radians(lat), math.radians(lon)
        vector = _UNIT[lat, lon] = (
            math.cos(p) * math.cos(q),
            math.cos(p) * math.sin(q),
            math.sin(p),
        )
    return vector


@lru_cache(maxsize=1 << 16)
def _prefix_len(prefix: str) -> int:
    return int(prefix.rpartition("/")[2])


def _chord_km(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    # The great-circle distance from the chord: 2 R asin(|a - b| / 2), as exact as haversine.
    dx, dy, dz = a[0] - b[0], a[1] - b[1], a[2] - b[2]
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(dx * dx + dy * dy + dz * dz) / 2))


class _Place:
    """What every edge of one site at one point shares: its key bits and its reason."""

    __slots__ = ("_text", "key", "km", "lat", "located", "lon", "route", "site")

    def __init__(
        self,
        site: str,
        lat: float | None,
        lon: float | None,
        point: tuple[float, float] | None,
        here: tuple[float, float, float] | None,
        route: Route | None,
    ) -> None:
        self.site, self.lat, self.lon, self.route = site, lat, lon, route
        self.located = here is not None
        self.km = km = None if here is None or point is None else _chord_km(here, _unit(*point))
        if route is not None:
            group = _MATCHED
            # A file route has no AS path or MED: it compares as the longest and highest.
            file_route = route.source == "czmap"
            hops = _PATH_CAP if file_route else len(route.as_path)
            med = (1 << _MED_BITS) - 1 if file_route else route.med
            route_key = 128 - _prefix_len(route.prefix)
            route_key = (route_key << _REL_BITS) | RELATION_PREFERENCE[route.relation]
            route_key = (route_key << _PATH_BITS) | (hops if hops < _PATH_CAP else _PATH_CAP)
            route_key = (route_key << _MED_BITS) | med
        else:
            group = _LOCATED if km is not None else _ANYWHERE
            route_key = 0
        dist = _DIST_CAP if km is None or km >= _DIST_CAP else int(km + 0.5)
        self.key = ((((group << _ROUTE_BITS) | route_key) << _DIST_BITS) | dist) << (
            _LOAD_BITS + _HASH_BITS
        )
        self._text: str | None = None

    def text(self) -> str:
        """The reason shared by the site's edges; built only for the edges returned."""
        if self._text is None:
            route, km, site = self.route, self.km, self.site
            text = _route_text(route) if route else f"no prefix of site {site} covers the client"
            if km is not None:
                text += f"; {int(km + 0.5)} km"
            else:
                why = (
                    f"site {site} has no coordinates"
                    if self.located
                    else "the client could not be located"
                )
                text += f"; distance unknown: {why}" if route else f" and {why}: any healthy edge"
            self._text = text
        return self._text


def rank_edges(
    *,
    client: Client,
    client_location: tuple[float, float] | None,
    title: str,
    session_key: str,
    candidates: Sequence[EdgeCandidate],
    routes: Mapping[str, Route],
    sites: Mapping[str, SiteInfo] | None = None,
    limit: int | None = None,
    demoted: Mapping[str, str] | None = None,
) -> list[RankedEdge]:
    """Every candidate, best first, each with the reason for its place.

    With ``limit``, only the first ``limit`` (a player needs a few to fail over to; the
    reasons are most of the cost of a long list).

    ``routes`` is each site's longest route covering the client (``RoutingTable.lookup``).
    The client's own coordinates, when it sent valid ones, are used before
    ``client_location`` (typically GeoLite2's guess from its address). An edge without
    coordinates takes its site's from ``sites``. Raises ValueError if two candidates share
    an edge id (the order could then depend on the input's order).
    """
    if len({edge.edge_id for edge in candidates}) != len(candidates):
        seen: set[str] = set()
        for edge in candidates:
            if edge.edge_id in seen:
                raise ValueError(f"edge {edge.edge_id!r} is a candidate twice")
            seen.add(edge.edge_id)
    point = _valid_point(client.lat, client.lon)
    if point is None and client_location is not None:
        point = _valid_point(*client_location)
    here = _unit(*point) if point is not None else None
    title_key = _key64(title, _TITLE)
    session_key64: int | None = None

    # Per site, not per edge: a site's edges share its route and coordinates. An edge whose
    # coordinates differ from its site-mates' gets a place of its own.
    places: dict[str, _Place] = {}
    odd_places: dict[tuple[str, float | None, float | None], _Place] = {}
    keyed: list[tuple[int, int, _Place]] = []
    for index, edge in enumerate(candidates):
        site = edge.site
        lat, lon = edge.lat, edge.lon
        place = places.get(site)
        if place is None or place.lat != lat or place.lon != lon:
            place = odd_places.get((site, lat, lon)) if place is not None else None
            if place is None:
                edge_point = _valid_point(lat, lon)
                if edge_point is None and sites is not None and (info := sites.get(site)):
                    edge_point = _valid_point(info.lat, info.lon)
                place = _Place(site, lat, lon, edge_point, here, routes.get(site))
                if site in places:
                    odd_places[site, lat, lon] = place
                else:
                    places[site] = place

        load = edge.load
        if 0.0 <= load < _LOAD_CAP_VALUE:
            band = int(load / LOAD_STEP + 1e-9)
        else:
            band = 0 if load < 0.0 else _LOAD_CAP

        # The title's rendezvous hash: splitmix64's finaliser, inline (it runs per edge).
        z = title_key ^ _edge_key(edge.edge_id)
        z = ((z ^ (z >> 30)) * _M1) & _MASK64
        z = ((z ^ (z >> 27)) * _M2) & _MASK64
        key = place.key | (band << _HASH_BITS) | z ^ (z >> 31)

        if demoted and edge.edge_id in demoted:
            key |= _DEFER_BIT
        elif edge.share < 1.0:
            if session_key64 is None:
                session_key64 = _key64(session_key, _SESSION)
            fraction = (_mix(session_key64 ^ _edge_key(edge.edge_id)) >> 11) * 2.0**-53
            if not fraction < edge.share:  # a NaN share admits nobody
                key |= _DEFER_BIT
        keyed.append((key, index, place))

    keyed.sort()
    return _explain(
        keyed, candidates, len(keyed) if limit is None else max(0, limit), demoted or {}
    )


def _explain(
    keyed: list[tuple[int, int, _Place]],
    candidates: Sequence[EdgeCandidate],
    limit: int,
    demoted: Mapping[str, str],
) -> list[RankedEdge]:
    n = len(keyed)
    ranked: list[RankedEdge] = []
    run_start = 0
    for position in range(min(n, limit)):
        key, index, place = keyed[position]
        tier = key >> _HASH_BITS
        if position == 0 or tier != keyed[position - 1][0] >> _HASH_BITS:
            run_start = position
        edge = candidates[index]
        load = edge.load
        percent = str(int(load * 100.0 + 0.5)) if 0.0 <= load < 1e6 else f"{load * 100:.0f}"
        reason = f"{place.text()}; load {percent} %"
        if (position + 1 < n and keyed[position + 1][0] >> _HASH_BITS == tier) or (
            position > run_start
        ):
            run_end = position + 1
            while run_end < n and keyed[run_end][0] >> _HASH_BITS == tier:
                run_end += 1
            reason += (
                f"; title hash puts it {position - run_start + 1} of {run_end - run_start} equals"
            )
        deferred = bool(key & _DEFER_BIT)
        why = demoted.get(edge.edge_id)
        if why is not None:
            reason += f"; ranked after the edges not demoted: {why}"
            deferred = False  # not by slow start
        elif edge.share < 1.0:
            share = f"slow start at {edge.share * 100:.0f} % share"
            if deferred:
                reason += f"; {share}: this session is outside it, so after the full-share edges"
            else:
                reason += f"; {share}: this session is in it"
        route = place.route
        km = place.km
        if route is None:
            ranked.append(
                RankedEdge(
                    edge_id=edge.edge_id,
                    base_url=edge.base_url,
                    rank=position + 1,
                    reason=reason,
                    prefix=None,
                    prefix_len=None,
                    as_path_len=None,
                    med=None,
                    relation=None,
                    distance_km=None if km is None else int(km * 10.0 + 0.5) / 10.0,
                    load=edge.load,
                    site=edge.site,
                    slow_start_deferred=deferred,
                    qos_demoted=why is not None,
                )
            )
        else:
            ranked.append(
                RankedEdge(
                    edge_id=edge.edge_id,
                    base_url=edge.base_url,
                    rank=position + 1,
                    reason=reason,
                    prefix=route.prefix,
                    prefix_len=_prefix_len(route.prefix),
                    as_path_len=None if route.source == "czmap" else len(route.as_path),
                    med=None if route.source == "czmap" else route.med,
                    relation=route.relation,
                    distance_km=None if km is None else int(km * 10.0 + 0.5) / 10.0,
                    load=edge.load,
                    site=edge.site,
                    slow_start_deferred=deferred,
                    qos_demoted=why is not None,
                )
            )
    return ranked
