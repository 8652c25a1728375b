"""Ranking the edges for one playback: the pure core of steering. No I/O, no clock.

An edge's place is decided by these rules, each consulted only when all before it tie:

1. The client is covered by a prefix its site serves (sites with none come after).
2. The longest such prefix: the most specific announcement is the one meant for this client.
3. The relation: embedded in the client's ISP, before private peering, before public.
4. The shortest AS path.
5. The lowest MED.
6. The shortest distance between the client and the edge's site, in whole kilometres.
7. The lowest load, in bands of ``LOAD_STEP`` (10 %) of capacity.
8. The title's rendezvous hash over the edge ids.

Where the relation sits. It comes before the AS path length, as LOCAL_PREF does in BGP's
own decision process: operators set LOCAL_PREF from the business relationship (customer,
then peer, then provider) precisely because path length is a weak proxy for cost and
quality. An embedded cache serves the client without crossing any interconnect; a private
peering crosses one link sized for this traffic; a public peering or transit crosses shared
capacity the CDN does not control. An AS path one hop shorter over a public exchange does
not make up for that: it is usually the same ISP seen from a route server. MED is compared
last of the BGP attributes, as BGP does, and always (like ``always-compare-med``): a sort
needs a total order, and in practice every site's routes for a client prefix come from the
same ISP, whose MEDs are comparable.

Why load is banded. The title hash (rule 8) is what makes one title's requests land on the
same few edges, so their caches hold it. If raw load ranked, the least-loaded edge would
change with every heartbeat (31.2 % against 31.4 %) and a title's viewers would be spread
over every edge of a site, each holding a cold copy. In 10 % bands, edges of about the same
load tie and the title hash decides; an edge that is clearly busier (a band or more) loses.

Sites without a prefix for the client come after those with one, ordered by distance; edges
whose distance cannot be known (no client location, or a site without coordinates) come
after those, ordered by load and hash: "any healthy edge".

Slow start. A candidate with ``share < 1`` (an edge back from a failure, ramping up) keeps
its place for the fraction ``share`` of sessions and is moved after every full-share edge
for the others. Which sessions is a hash of (session key, edge id), so a session keeps its
answer when it asks again, and raising the share only ever adds sessions.

Hashes are blake2b (never Python's salted ``hash()``) mixed with splitmix64, so every
control-plane process ranks alike.

How a decision stays cheap. A decision looks at every candidate, but only briefly: the work
per edge is reading its site, coordinates and share. The rules above are decided per
*place* (a site at one point: every edge of a site shares its route and its distance), and
only the edges of the best places, enough to fill ``limit``, get a load band, a title hash,
a sort and a reason. What does not depend on the client (each place's point on the unit
sphere, each edge id's hash key) is kept in a ``FleetIndex`` across decisions; with many
places, their distances are computed together with numpy. Rounding a distance to whole
kilometres is redone with Python's own ``math`` when numpy's arcsine lands within 1e-6 km
of a rounding boundary, so both ways give the same integer, and the distances shown in the
reasons are always Python's.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from itertools import compress
from typing import Final

import numpy as np
import numpy.typing as npt

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
    "FleetIndex",
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

# An edge's sort key is one integer, so that sorting compares machine words, not tuples.
# Its bit fields, most significant first: deferred by slow start (1), group (2: covered by a
# prefix, located, anywhere), 128 - prefix length (8), relation (2), AS path length (8),
# MED (32), distance in km (15), load band (10), title hash (64). Caps are far past real
# values (an AS path of 255, 32,767 km, 102x capacity); values beyond them tie at the cap.
# The part above the load band is the edge's *tier*: the same for every edge of a place
# (deferral aside), so it is computed once per place.
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
_GROUP_SHIFT: Final = _ROUTE_BITS + _DIST_BITS  # where the group sits in a tier
_TIER_DEFER: Final = 1 << (_GROUP_BITS + _GROUP_SHIFT)

_MATCHED, _LOCATED, _ANYWHERE = 0, 1, 2
_LOCATED_TIER: Final = _LOCATED << _GROUP_SHIFT
_ANYWHERE_TIER: Final = (_ANYWHERE << _GROUP_SHIFT) | _DIST_CAP

# Numpy's arcsine may differ from math.asin in the last bits: a distance this close to a
# rounding boundary (x.5 km) is redone with math, so the whole kilometres always agree.
_ROUNDING_GUARD: Final = 1e-6
# A FleetIndex forgets its places past this many (edges reporting ever-new coordinates).
_PLACES_MAX: Final = 1 << 14


class _EdgeKeys(dict[str, int]):
    """edge id -> its 64-bit key, pre-multiplied for the mix. Edge ids are few and
    long-lived; the bound only guards against a caller inventing ids per request."""

    def __missing__(self, edge_id: str) -> int:
        if len(self) >= 1 << 16:
            self.clear()
        key = self[edge_id] = (_key64(edge_id, _EDGE) * _GOLDEN) & _MASK64
        return key


_EDGE_KEYS: Final = _EdgeKeys()
# title key ^ edge key -> the (title, edge) rendezvous score: the mix of that one integer.
_TITLE_HASHES: Final[dict[int, int]] = {}
_TITLE_HASHES_MAX: Final = 1 << 18


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


def _mix(z: int) -> int:
    # splitmix64's finaliser: every input bit flips about half the output bits.
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def title_score(title: str, edge_id: str) -> int:
    """The rendezvous score of (title, edge): among tied edges the lowest goes first."""
    return _mix(_key64(title, _TITLE) ^ _EDGE_KEYS[edge_id])


def session_fraction(session_key: str, edge_id: str) -> float:
    """A stable number in [0, 1) per (session, edge): slow start admits it below ``share``."""
    return (_mix(_key64(session_key, _SESSION) ^ _EDGE_KEYS[edge_id]) >> 11) * 2.0**-53


def _valid_point(lat: float | None, lon: float | None) -> tuple[float, float] | None:
    if lat is None or lon is None:
        return None
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):  # also refuses NaN
        return None
    return float(lat), float(lon)


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


def _whole_km(km: float) -> int:
    return _DIST_CAP if km >= _DIST_CAP else int(km + 0.5)


def _tier(route: Route | None, dist: int | None) -> int:
    """A place's part of the sort key: group, route and whole kilometres (None: unknown)."""
    if route is not None:
        hops = len(route.as_path)
        key = 128 - _prefix_len(route.prefix)
        key = (key << _REL_BITS) | RELATION_PREFERENCE[route.relation]
        key = (key << _PATH_BITS) | (hops if hops < _PATH_CAP else _PATH_CAP)
        key = (key << _MED_BITS) | route.med
        return (key << _DIST_BITS) | (_DIST_CAP if dist is None else dist)  # group 0
    return _ANYWHERE_TIER if dist is None else _LOCATED_TIER | dist


# id(route) -> (route, its text): routes live in the routing table for long, and their
# sentence (the AS path joined) is the same for every client they win.
_ROUTE_TEXT: dict[int, tuple[Route, str]] = {}


def _route_text(route: Route) -> str:
    cached = _ROUTE_TEXT.get(id(route))
    if cached is not None and cached[0] is route:
        return cached[1]
    path = " ".join(map(str, route.as_path)) if route.as_path else "(empty: the peer's own)"
    text = (
        f"longest prefix {route.prefix} (/{_prefix_len(route.prefix)}) via AS path {path}, "
        f"MED {route.med}, {RELATION_LABEL[route.relation]}"
    )
    if len(_ROUTE_TEXT) >= 1 << 14:
        _ROUTE_TEXT.clear()
    _ROUTE_TEXT[id(route)] = (route, text)
    return text


# -- the fleet index: what is known before the client asks ---------------------------------


class _Places:
    """Every place seen: a site at one point. A site's first-seen coordinates make its
    *canonical* place, found by the site's name alone; an edge reporting other coordinates
    gets a place of its own, found by (site, lat, lon)."""

    def __init__(self, sites: Mapping[str, SiteInfo]) -> None:
        self.sites = sites
        self.lock = threading.Lock()
        self.canonical: dict[str, int] = {}  # site -> its canonical place
        self.other: dict[tuple[str, float | None, float | None], int] = {}
        self.site: list[str] = []
        self.lat: list[float | None] = []  # as the edges report them
        self.lon: list[float | None] = []
        self.unit: list[tuple[float, float, float] | None] = []  # None: no usable point
        self.by_site: dict[str, tuple[int, ...]] = {}
        self.moved = False  # most edges of the last decision sat away from their site
        self._arrays: tuple[int, npt.NDArray[np.float64], list[int]] | None = None

    def add(self, site: str, lat: float | None, lon: float | None, canonical: bool) -> int:
        with self.lock:
            found = self.canonical.get(site) if canonical else self.other.get((site, lat, lon))
            if found is not None:
                return found
            point = _valid_point(lat, lon)
            if point is None and (info := self.sites.get(site)) is not None:
                point = _valid_point(info.lat, info.lon)
            place = len(self.site)
            self.site.append(site)
            self.lat.append(lat)
            self.lon.append(lon)
            self.unit.append(_unit(*point) if point is not None else None)
            self.by_site[site] = (*self.by_site.get(site, ()), place)
            # Published last: a reader that finds the place finds everything about it.
            if canonical:
                self.canonical[site] = place
            else:
                self.other[site, lat, lon] = place
            return place

    def places_of(self, candidates: Sequence[EdgeCandidate]) -> list[int]:
        """The place of every candidate, in order."""
        names = [edge.site for edge in candidates]
        canonical = self.canonical
        try:
            places = list(map(canonical.__getitem__, names))
        except KeyError:
            for edge in candidates:
                if edge.site not in canonical:
                    self.add(edge.site, edge.lat, edge.lon, canonical=True)
            places = list(map(canonical.__getitem__, names))
        lats = [edge.lat for edge in candidates]
        lons = [edge.lon for edge in candidates]
        if lats == list(map(self.lat.__getitem__, places)) and lons == list(
            map(self.lon.__getitem__, places)
        ):
            return places
        # Some edge reports coordinates its site's other edges do not.
        odd = 0
        site_lat, site_lon = self.lat, self.lon
        for i, (place, lat, lon) in enumerate(zip(places, lats, lons, strict=True)):
            if (lat is not site_lat[place] and lat != site_lat[place]) or (
                lon is not site_lon[place] and lon != site_lon[place]
            ):
                found = self.other.get((names[i], lat, lon))
                places[i] = (
                    found if found is not None else self.add(names[i], lat, lon, canonical=False)
                )
                odd += 1
        if 2 * odd > len(places):
            self.moved = True
        return places

    def arrays(self) -> tuple[npt.NDArray[np.float64], list[int]]:
        """Every place's unit vector as a (3, n) array (0 where none) and the placeless."""
        arrays = self._arrays
        if arrays is None or arrays[0] != len(self.unit):
            with self.lock:
                units = list(self.unit)
                xyz = np.array(
                    [u if u is not None else (0.0, 0.0, 0.0) for u in units], dtype=np.float64
                ).T.copy()
                placeless = [p for p, u in enumerate(units) if u is None]
                arrays = self._arrays = (len(units), xyz, placeless)
        return arrays[1], arrays[2]


class FleetIndex:
    """What ranking keeps between decisions: where each place of the fleet is.

    A place is an edge site at one point; its point comes from the edges' coordinates, or
    ``sites`` when they report none. Nothing here depends on the client, so one index
    serves every decision; it learns new sites and coordinates as candidates bring them.
    Safe to share between threads. Pass it to ``rank_edges(index=...)``.
    """

    def __init__(self, sites: Mapping[str, SiteInfo] | None = None) -> None:
        self.sites: Mapping[str, SiteInfo] = dict(sites) if sites else {}
        self._places = _Places(self.sites)

    def _current(self) -> _Places:
        places = self._places
        # Forget everything when places pile up, or when most edges no longer sit where
        # their site was first seen (the site moved): the next decisions relearn it.
        if places.moved or len(places.site) > _PLACES_MAX:
            places = self._places = _Places(self.sites)
        return places


# -- ranking ------------------------------------------------------------------------------


def _tiers_python(
    places: _Places,
    present: Iterable[int],
    here: tuple[float, float, float] | None,
    routes: Mapping[str, Route],
    kms: dict[int, float],
) -> dict[int, int]:
    """The tier of each place in ``present``, one at a time (few places); fills ``kms``."""
    units, names = places.unit, places.site
    tiers = {}
    for place in present:
        route = routes.get(names[place]) if routes else None
        unit = units[place]
        if here is None or unit is None:
            tiers[place] = _tier(route, None)
            continue
        # _chord_km, inline: this runs per place.
        dx, dy, dz = here[0] - unit[0], here[1] - unit[1], here[2] - unit[2]
        km = kms[place] = (
            2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(dx * dx + dy * dy + dz * dz) / 2))
        )
        dist = _DIST_CAP if km >= _DIST_CAP else int(km + 0.5)
        tiers[place] = _LOCATED_TIER | dist if route is None else _tier(route, dist)
    return tiers


def _tiers_numpy(
    places: _Places, here: tuple[float, float, float], routes: Mapping[str, Route]
) -> list[int]:
    """The tier of every place of the index at once, the distances vectorised."""
    xyz, placeless = places.arrays()
    dx = here[0] - xyz[0]
    dy = here[1] - xyz[1]
    dz = here[2] - xyz[2]
    # In _chord_km's order of operations, so that the chord is bit for bit the same.
    chord = dx * dx
    chord += dy * dy
    chord += dz * dz
    np.sqrt(chord, out=chord)
    chord /= 2
    np.minimum(chord, 1.0, out=chord)
    km = np.arcsin(chord)
    km *= 2 * EARTH_RADIUS_KM
    km += 0.5
    whole = np.floor(km)
    whole_km: list[int] = np.minimum(whole, _DIST_CAP).astype(np.int64).tolist()
    km -= whole
    for place in np.flatnonzero((km < _ROUNDING_GUARD) | (km > 1 - _ROUNDING_GUARD)).tolist():
        unit = places.unit[place]
        if unit is not None:
            whole_km[place] = _whole_km(_chord_km(here, unit))
    tiers = [_LOCATED_TIER | dist for dist in whole_km]
    for place in placeless:
        tiers[place] = _ANYWHERE_TIER
        whole_km[place] = -1
    for site, route in routes.items():
        for place in places.by_site.get(site, ()):
            if place < len(tiers):
                dist = whole_km[place]
                tiers[place] = _tier(route, None if dist < 0 else dist)
    return tiers


def _refuse_duplicates(ids: Sequence[str]) -> None:
    seen: set[str] = set()
    for edge_id in ids:
        if edge_id in seen:
            raise ValueError(f"edge {edge_id!r} is a candidate twice")
        seen.add(edge_id)


# Fewer candidates than this are keyed whole: choosing the best places first costs more
# than it saves. At least this many distinct places, and a quarter of the index's, and their
# distances are computed together with numpy.
_CHOOSE_FROM: Final = 24
_NUMPY_FROM: Final = 16
_NUMPY_KEYS_FROM: Final = 64


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
    index: FleetIndex | None = None,
) -> list[RankedEdge]:
    """Every candidate, best first, each with the reason for its place.

    With ``limit``, only the first ``limit`` (a player needs a few to fail over to). The
    ranking still considers every candidate, but only the best places' edges are sorted,
    and reasons are written only for the edges returned.

    ``routes`` is each site's longest route covering the client (``RoutingTable.lookup``).
    The client's own coordinates, when it sent valid ones, are used before
    ``client_location`` (typically GeoLite2's guess from its address). An edge without
    coordinates takes its site's from ``sites``. ``index`` (a ``FleetIndex`` built from
    ``sites``, which is then not passed) carries what is known of the fleet from one
    decision to the next; without it every call starts afresh, with the same result.
    Raises ValueError if two candidates share an edge id (the order could then depend on
    the input's order).
    """
    n = len(candidates)
    ids = [edge.edge_id for edge in candidates]
    if len(set(ids)) != n:
        _refuse_duplicates(ids)
    want = n if limit is None else min(n, max(0, limit))
    if want == 0:
        return []
    if index is None:
        index = FleetIndex(sites)
    elif sites is not None:
        raise ValueError("pass sites or an index built from them, not both")
    point = _valid_point(client.lat, client.lon)
    if point is None and client_location is not None:
        point = _valid_point(*client_location)
    here = _unit(*point) if point is not None else None

    places = index._current()
    place_of = places.places_of(candidates)
    counts = Counter(place_of) if n >= _CHOOSE_FROM and want < n else None
    present = counts if counts is not None else set(place_of)
    kms: dict[int, float] = {}
    tiers: Mapping[int, int] | Sequence[int]
    if here is not None and len(present) >= _NUMPY_FROM and 4 * len(present) >= len(places.site):
        tiers = _tiers_numpy(places, here, routes)
    else:
        tiers = _tiers_python(places, present, here, routes, kms)

    # Slow start: which of the edges ramping up this session is outside of.
    shares = [edge.share for edge in candidates]
    deferred: set[int] = set()
    if not min(shares) >= 1.0:  # a NaN share counts as full, as in the comparisons below
        session64 = _key64(session_key, _SESSION)
        for i, share in enumerate(shares):
            if share < 1.0:
                fraction = (_mix(session64 ^ _EDGE_KEYS[ids[i]]) >> 11) * 2.0**-53
                if not fraction < share:  # a NaN share admits nobody
                    deferred.add(i)
                    if counts is not None:
                        counts[place_of[i]] -= 1

    # Only the best places' edges can be among the first ``want``: enough places, best
    # first, to hold ``want`` full-share edges, and every place tied with the last one.
    chosen: Iterable[int] = range(n)
    if counts is not None:
        total, last, best = 0, -1, set()
        for tier, place in sorted((tiers[p], p) for p, count in counts.items() if count > 0):
            if total >= want and tier != last:
                break
            best.add(place)
            total += counts[place]
            last = tier
        if total >= want:
            chosen = compress(range(n), map(best.__contains__, place_of))
            if deferred:
                chosen = [i for i in chosen if i not in deferred]

    title64 = _key64(title, _TITLE)
    if not isinstance(chosen, list):
        chosen = list(chosen)
    if len(chosen) >= _NUMPY_KEYS_FROM:
        rows = _order_numpy(chosen, candidates, ids, place_of, tiers, deferred, title64, want)
    else:
        rows = _order_python(chosen, candidates, ids, place_of, tiers, deferred, title64, want)
    return _explain(rows, candidates, places, here, routes, kms)


# One returned edge: its index among the candidates, its place, whether slow start moved
# it, its position among the edges it ties with up to the title hash (1-based), how many.
_Row = tuple[int, int, bool, int, int]


def _order_python(
    chosen: list[int],
    candidates: Sequence[EdgeCandidate],
    ids: Sequence[str],
    place_of: Sequence[int],
    tiers: Mapping[int, int] | Sequence[int],
    deferred: set[int],
    title64: int,
    want: int,
) -> list[_Row]:
    edge_keys = _EDGE_KEYS
    hashes = _TITLE_HASHES
    if len(hashes) >= _TITLE_HASHES_MAX:
        hashes.clear()
    # (tier and load band, title hash, index, place): the edge's sort key split in two,
    # which sorts as the one integer would and spares building it.
    keyed: list[tuple[int, int, int, int]] = []
    for i in chosen:
        place = place_of[i]
        tier = tiers[place]
        if deferred and i in deferred:
            tier |= _TIER_DEFER
        load = candidates[i].load
        if 0.0 <= load < _LOAD_CAP_VALUE:
            band = int(load / LOAD_STEP + 1e-9)
        else:
            band = 0 if load < 0.0 else _LOAD_CAP
        # The title's rendezvous hash: splitmix64's finaliser, inline (it runs per edge),
        # remembered: a popular title meets the same edges decision after decision.
        x = title64 ^ edge_keys[ids[i]]
        score = hashes.get(x)
        if score is None:
            z = ((x ^ (x >> 30)) * _M1) & _MASK64
            z = ((z ^ (z >> 27)) * _M2) & _MASK64
            score = hashes[x] = z ^ (z >> 31)
        keyed.append(((tier << _LOAD_BITS) | band, score, i, place))
    keyed.sort()
    # ``keyed`` holds every edge tied with any of the first ``want``: runs are counted whole.
    n = len(keyed)
    rows: list[_Row] = []
    run_start = run_end = 0
    for position in range(min(n, want)):
        tied, _, i, place = keyed[position]
        if position >= run_end:
            run_start = run_end = position
            while run_end < n and keyed[run_end][0] == tied:
                run_end += 1
        rows.append(
            (
                i,
                place,
                bool(tied >> _LOAD_BITS & _TIER_DEFER),
                position - run_start + 1,
                run_end - run_start,
            )
        )
    return rows


def _order_numpy(
    chosen: list[int],
    candidates: Sequence[EdgeCandidate],
    ids: Sequence[str],
    place_of: Sequence[int],
    tiers: Mapping[int, int] | Sequence[int],
    deferred: set[int],
    title64: int,
    want: int,
) -> list[_Row]:
    """``_order_python`` for many edges: the same order, load bands and hashes vectorised."""
    edge_tiers = [tiers[place_of[i]] for i in chosen]
    if deferred:
        edge_tiers = [
            t | _TIER_DEFER if i in deferred else t for i, t in zip(chosen, edge_tiers, strict=True)
        ]
    # Tiers are wider than a machine word; their ranks are not, and order the same.
    ranks = {tier: rank for rank, tier in enumerate(sorted(set(edge_tiers)))}
    tied = np.array(list(map(ranks.__getitem__, edge_tiers)), dtype=np.int64)
    loads = np.array([candidates[i].load for i in chosen], dtype=np.float64)
    usual = (loads >= 0.0) & (loads < _LOAD_CAP_VALUE)  # NaN is neither
    bands = np.where(usual, loads, 0.0)
    bands /= LOAD_STEP
    bands += 1e-9
    band = bands.astype(np.int64)
    band[~usual & ~(loads < 0.0)] = _LOAD_CAP
    tied <<= _LOAD_BITS
    tied |= band
    z = np.array([_EDGE_KEYS[ids[i]] for i in chosen], dtype=np.uint64)
    z ^= np.uint64(title64)
    z ^= z >> np.uint64(30)
    z *= np.uint64(_M1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_M2)
    z ^= z >> np.uint64(31)
    order = np.lexsort((z, tied))  # stable: a full tie keeps the candidates' order
    in_order = tied[order]
    top = order[:want].tolist()
    firsts = in_order[:want]
    starts = np.searchsorted(in_order, firsts, side="left").tolist()
    ends = np.searchsorted(in_order, firsts, side="right").tolist()
    rows: list[_Row] = []
    for position, j in enumerate(top):
        i = chosen[j]
        rows.append(
            (
                i,
                place_of[i],
                bool(deferred) and i in deferred,
                position - starts[position] + 1,
                ends[position] - starts[position],
            )
        )
    return rows


def _place_reason(
    places: _Places,
    place: int,
    here: tuple[float, float, float] | None,
    route: Route | None,
    kms: Mapping[int, float],
) -> tuple[str, float | None]:
    """What every returned edge of one place shares: its sentence, and its distance."""
    site, unit = places.site[place], places.unit[place]
    km = None if here is None or unit is None else kms.get(place)
    if km is None and here is not None and unit is not None:
        km = _chord_km(here, unit)
    text = _route_text(route) if route else f"no prefix of site {site} covers the client"
    if km is not None:
        return f"{text}; {km:.0f} km", km
    why = (
        f"site {site} has no coordinates" if here is not None else "the client could not be located"
    )
    return (
        f"{text}; distance unknown: {why}" if route else f"{text} and {why}: any healthy edge"
    ), None


def _explain(
    rows: list[_Row],
    candidates: Sequence[EdgeCandidate],
    places: _Places,
    here: tuple[float, float, float] | None,
    routes: Mapping[str, Route],
    kms: Mapping[int, float],
) -> list[RankedEdge]:
    ranked: list[RankedEdge] = []
    reasons: dict[int, tuple[str, float | None, Route | None]] = {}
    for position, (index, place, deferred, run_position, run_size) in enumerate(rows):
        edge = candidates[index]
        why = reasons.get(place)
        if why is None:
            route = routes.get(places.site[place]) if routes else None
            why = reasons[place] = (*_place_reason(places, place, here, route, kms), route)
        text, km, route = why
        reason = f"{text}; load {edge.load * 100:.0f} %"
        if run_size > 1:
            reason += f"; title hash puts it {run_position} of {run_size} equals"
        if edge.share < 1.0:
            share = f"slow start at {edge.share * 100:.0f} % share"
            if deferred:
                reason += f"; {share}: this session is outside it, so after the full-share edges"
            else:
                reason += f"; {share}: this session is in it"
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
                    distance_km=None if km is None else round(km, 1),
                    load=edge.load,
                    site=edge.site,
                    slow_start_deferred=deferred,
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
                    as_path_len=len(route.as_path),
                    med=route.med,
                    relation=route.relation,
                    distance_km=None if km is None else round(km, 1),
                    load=edge.load,
                    site=edge.site,
                    slow_start_deferred=deferred,
                )
            )
    return ranked
