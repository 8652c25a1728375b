"""Ranking the edges for one playback: the pure core of steering. No I/O, no clock.

An edge's place is decided by these rules, each consulted only when all before it tie:

1. The client is covered by a prefix its site serves (sites with none come after).
2. The longest such prefix: the most specific announcement is the one meant for this client.
3. The relation: embedded in the client's ISP, before private peering, before public
   peering, before transit.
4. The shortest AS path.
5. The lowest MED.
6. The shortest distance between the client and the edge's site, in whole kilometres.
7. The lowest load, in bands of ``LOAD_STEP`` (10 %) of capacity.
8. The title's rendezvous hash over the edge ids.

A route from a coverage-zone file (``source="czmap"``) has no AS path and no MED: rules 4
and 5 rank it after every BGP route of the same prefix length and relation, and tie it with
other file routes (``model.path_preference``), so distance decides between those.

Where the relation sits. It comes before the AS path length, as LOCAL_PREF does in BGP's
own decision process: operators set LOCAL_PREF from the business relationship (customer,
then peer, then provider) precisely because path length is a weak proxy for cost and
quality. An embedded cache serves the client without crossing any interconnect; a private
peering crosses one link sized for this traffic; a public peering crosses shared capacity
the CDN does not control, and transit a provider's network too, paid by the bit. An AS path
one hop shorter over a public exchange does not make up for that: it is usually the same
ISP seen from a route server. MED is compared last of the BGP attributes, as BGP does, and
always (like ``always-compare-med``): a sort needs a total order, and in practice every
site's routes for a client prefix come from the same ISP, whose MEDs are comparable.

Why load is banded. The title hash (rule 8) is what makes one title's requests land on the
same few edges, so their caches hold it. If raw load ranked, the least-loaded edge would
change with every heartbeat (31.2 % against 31.4 %) and a title's viewers would be spread
over every edge of a site, each holding a cold copy. In 10 % bands, edges of about the same
load tie and the title hash decides; an edge that is clearly busier (a band or more) loses.

Sites without a prefix for the client come after those with one, ordered by distance; edges
whose distance cannot be known (no client location, or a site without coordinates) come
after those, ordered by load and hash: "any healthy edge".

Quality of experience. A candidate in ``demoted`` (edge id -> why: its viewers in the
client's network rebuffer far more than other edges' viewers there, judged by
``telemetry.qos.judge_edges``) is moved after every edge not moved, as slow start moves the
sessions outside an edge's share, and its reason says why. It stays in the list, a last
resort before the origin. The control plane decides which edges, per client network; the
ranking only takes the answer.

Slow start. A candidate with ``share < 1`` (an edge back from a failure, ramping up) keeps
its place for the fraction ``share`` of sessions and is moved after every full-share edge
for the others. Which sessions is a hash of (session key, edge id), so a session keeps its
answer when it asks again, and raising the share only ever adds sessions.

Hashes are blake2b (never Python's salted ``hash()``) mixed with splitmix64, so every
control-plane process ranks alike.

How a decision stays cheap. Rules 1-6 are properties of an edge's *place* (its site at one
point: every edge there shares the site's route and distance); only rules 7-8 and slow
start tell the edges of one place apart. A ``CandidateSet`` groups the candidates by place
once, when they change, not per decision. A decision then ranks places, not edges: the
places of the sites whose prefixes cover the client (a few), then the nearest of the
others, then those whose distance is unknown, and stops as soon as the places taken hold
``limit`` full-share edges and the next place ranks strictly after the last one taken. Only
the edges of those places get a load band, a title hash, a sort and, for the ones
returned, a reason (and of a last tie group larger than needed, only those of its lowest
load bands). Where candidates sit changes far less often than their loads, so the grouping
itself is kept by value (the sites and coordinates of the candidates, in order), and a
plain list of a title's holders is grouped at the cost of reading it. The places are read
nearest first (with many places, in the order of one numpy product over their unit
vectors; with few, of their squared chords); that order is only a guide: every distance
that decides is computed exactly with ``math``, and places keep being read until one is far
enough past the last needed (``_NEAR_MARGIN_KM``) that nothing read later can tie with it.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from itertools import repeat
from typing import Any, Final, TypeVar, cast, overload

import numpy as np
import numpy.typing as npt

from streamplane.steering.model import (
    FILE_SOURCES,
    RELATION_LABEL,
    RELATION_PREFERENCE,
    Client,
    EdgeCandidate,
    RankedEdge,
    Relation,
    Route,
    SiteInfo,
    path_preference,
)

__all__ = [
    "LOAD_STEP",
    "CandidateSet",
    "distance_km",
    "load_band",
    "rank_edges",
    "session_fraction",
    "title_score",
]

LOAD_STEP: Final = 0.1
EARTH_RADIUS_KM: Final = 6371.0088  # IUGG mean radius
_DIAMETER_KM: Final = 2 * EARTH_RADIUS_KM  # what 2 * EARTH_RADIUS_KM * x computes first

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
# model.PATH_CAP (255) and MAX_MED (2^32 - 1) fill the path and MED fields.
_ROUTE_BITS: Final = _LEN_BITS + _REL_BITS + _PATH_BITS + _MED_BITS
_GROUP_SHIFT: Final = _ROUTE_BITS + _DIST_BITS  # where the group sits in a tier
_TIER_DEFER: Final = 1 << (_GROUP_BITS + _GROUP_SHIFT)

_MATCHED, _LOCATED, _ANYWHERE = 0, 1, 2
_LOCATED_TIER: Final = _LOCATED << _GROUP_SHIFT
_ANYWHERE_TIER: Final = (_ANYWHERE << _GROUP_SHIFT) | _DIST_CAP

# The thresholds of the paths below are plain globals, not Final: the compiled module
# (see ``_build``) then reads them at run time as the source does, so that the tests can
# force every path in both.
# From this many located places on, the nearest are ordered through one numpy product;
# below it, by their squared chords in Python (the fixed cost of numpy loses).
_NEAREST_FROM = 24
# A place this much farther than the farthest one needed (whole km + 0.5) cannot tie
# with it, however numpy's order and math's distances differ: they differ by under a
# metre even for coincident points (an error of 1e-15 in a dot product near 1).
_NEAR_MARGIN_KM: Final = 0.01
# A last tie group (places of one tier) of at least this many edges, and a quarter of the
# candidates, is cut to the load bands it needs before any edge is hashed.
_BAND_CUT_FROM = 64
# A plain list shorter than this is ranked whole, edge by edge, without grouping it first.
_DIRECT_BELOW = 24


class _EdgeKeys(dict[str, int]):
    """edge id -> its 64-bit key, pre-multiplied for the mix. Edge ids are few and
    long-lived; the bound only guards against a caller inventing ids per request."""

    def __missing__(self, edge_id: str) -> int:
        if len(self) >= 1 << 16:
            self.clear()
        key = self[edge_id] = (_key64(edge_id, _EDGE) * _GOLDEN) & _MASK64
        return key


_EDGE_KEYS: Final = _EdgeKeys()


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


# (lat, lon) as reported -> its unit vector, or None when it is no point: a place's point is
# looked up once per place of every set, with the check.
_POINT_UNIT: dict[tuple[float | None, float | None], tuple[float, float, float] | None] = {}


def _point_unit(lat: float | None, lon: float | None) -> tuple[float, float, float] | None:
    try:
        return _POINT_UNIT[lat, lon]
    except KeyError:
        point = _valid_point(lat, lon)
        unit = _unit(*point) if point is not None else None
        if len(_POINT_UNIT) >= _UNIT_MAX:
            _POINT_UNIT.clear()
        _POINT_UNIT[lat, lon] = unit
        return unit


@lru_cache(maxsize=1 << 16)
def _prefix_len(prefix: str) -> int:
    return int(prefix.rpartition("/")[2])


def _chord_km(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    # The great-circle distance from the chord: 2 R asin(|a - b| / 2), as exact as haversine.
    dx, dy, dz = a[0] - b[0], a[1] - b[1], a[2] - b[2]
    return _DIAMETER_KM * math.asin(min(1.0, math.sqrt(dx * dx + dy * dy + dz * dz) / 2))


def _whole_km(km: float) -> int:
    return _DIST_CAP if km >= _DIST_CAP else int(km + 0.5)


def _tier(route: Route | None, dist: int | None) -> int:
    """A place's part of the sort key: group, route and whole kilometres (None: unknown)."""
    if route is not None:
        return _route_parts(route)[6] | (_DIST_CAP if dist is None else dist)  # group 0
    return _ANYWHERE_TIER if dist is None else _LOCATED_TIER | dist


# id(route) -> (route, what every edge it wins shares: its sentence (the AS path joined),
# prefix, prefix length, AS path length and MED (None for a file route, which has neither),
# relation, and its part of a tier (rules 1-5, shifted past the distance)): routes live in
# the routing table for long, and are the same for every client they win.
_RouteParts = tuple[str, str, int, int | None, int | None, Relation, int]
_ROUTE_PARTS: dict[int, tuple[Route, _RouteParts]] = {}


def _route_parts(route: Route) -> _RouteParts:
    cached = _ROUTE_PARTS.get(id(route))
    if cached is not None and cached[0] is route:
        return cached[1]
    length = _prefix_len(route.prefix)
    hops: int | None = None
    med: int | None = None
    if route.source in FILE_SOURCES:
        # No AS path or MED to show: a file says which site serves the prefix, not how.
        via = "czmap file route"
    else:
        hops, med = len(route.as_path), route.med
        path = " ".join(map(str, route.as_path)) if route.as_path else "(empty: the peer's own)"
        via = f"AS path {path}, MED {route.med}"
    text = f"longest prefix {route.prefix} (/{length}) via {via}, {RELATION_LABEL[route.relation]}"
    path_key, med_key = path_preference(route)
    key = 128 - length
    key = (key << _REL_BITS) | RELATION_PREFERENCE[route.relation]
    key = (key << _PATH_BITS) | path_key
    key = (key << _MED_BITS) | med_key
    parts = (text, route.prefix, length, hops, med, route.relation, key << _DIST_BITS)
    if len(_ROUTE_PARTS) >= 1 << 14:
        _ROUTE_PARTS.clear()
    _ROUTE_PARTS[id(route)] = (route, parts)
    return parts


def _refuse_duplicates(ids: Sequence[str]) -> None:
    seen: set[str] = set()
    for edge_id in ids:
        if edge_id in seen:
            raise ValueError(f"edge {edge_id!r} is a candidate twice")
        seen.add(edge_id)


# -- the candidates, grouped by place ------------------------------------------------------

_Where = tuple[str, float | None, float | None]  # an edge's site and reported coordinates


def _as_columns(units: Sequence[tuple[float, float, float]]) -> npt.NDArray[np.float64]:
    return np.array(units, dtype=np.float64).reshape(-1, 3).T.copy()


class _Layout:
    """Where a sequence of candidates sits, from each one's (site, lat, lon) alone: its
    places, the edges at each, each place's own point. Loads and shares change from one
    request to the next; where a title's holders sit seldom does, so a layout is kept
    (``_layout``) and shared by every set whose candidates sit alike."""

    __slots__ = (
        "_place_of",
        "_xyz",
        "count",
        "first",
        "located",
        "located_unit",
        "members",
        "more",
        "placeless",
        "site",
        "unit",
    )

    def __init__(self, where: Sequence[_Where]) -> None:
        # (site, lat, lon) -> the edges there. Grouping on equal coordinates (rather than
        # on the site's first-seen ones, as the reference does) ranks alike: places that
        # share a site and a point share every rule up to the load band.
        groups: dict[_Where, list[int]] = {}
        for i, key in enumerate(where):
            members = groups.get(key)
            if members is None:
                groups[key] = [i]
            else:
                members.append(i)
        points = _POINT_UNIT
        try:
            unit_of = [points[lat, lon] for _, lat, lon in groups]
        except KeyError:  # a point not seen before
            unit_of = [_point_unit(lat, lon) for _, lat, lon in groups]
        site_of = [site for site, _, _ in groups]
        places = len(site_of)
        located_unit = [unit for unit in unit_of if unit is not None]
        if len(located_unit) == places:
            located, placeless = list(range(places)), []
        else:
            located = [place for place, unit in enumerate(unit_of) if unit is not None]
            placeless = [place for place, unit in enumerate(unit_of) if unit is None]
        self.site = site_of
        self.unit = unit_of  # the point its edges report (None: none usable)
        self.members = list(groups.values())
        self.count = [len(members) for members in self.members]
        # site -> its first place; and, for the sites with several, all of them
        self.first = dict(zip(reversed(site_of), range(places - 1, -1, -1), strict=True))
        self.more: dict[str, list[int]] = {}
        if len(self.first) < places:
            for place, site in enumerate(site_of):
                self.more.setdefault(site, []).append(place)
            self.more = {site: all_ for site, all_ in self.more.items() if len(all_) > 1}
        self.located = located
        self.located_unit = located_unit
        self.placeless = placeless
        self._place_of: list[int] | None = None
        self._xyz: npt.NDArray[np.float64] | None = None

    def place_of(self) -> list[int]:
        """Each edge's place."""
        place_of = self._place_of
        if place_of is None:
            place_of = [0] * sum(self.count)
            for place, members in enumerate(self.members):
                for i in members:
                    place_of[i] = place
            self._place_of = place_of
        return place_of

    def located_xyz(self) -> npt.NDArray[np.float64]:
        xyz = self._xyz
        if xyz is None:
            xyz = self._xyz = _as_columns(self.located_unit)
        return xyz


# (site, lat, lon) of every candidate, in order -> its layout; bounded by the candidates
# held, so that a control plane's thousands of titles cannot grow it without end.
_LAYOUTS: dict[tuple[_Where, ...], _Layout] = {}
_LAYOUTS_HELD: list[int] = [0]
_LAYOUTS_MAX: Final = 1 << 18


def _layout(where: tuple[_Where, ...]) -> _Layout:
    layout = _LAYOUTS.get(where)
    if layout is None:
        layout = _Layout(where)
        if _LAYOUTS_HELD[0] + len(where) > _LAYOUTS_MAX:
            _LAYOUTS.clear()
            _LAYOUTS_HELD[0] = 0
        _LAYOUTS[where] = layout
        _LAYOUTS_HELD[0] += len(where)
    return layout


# A sequence by registration (below), not by inheritance: compiled, a subclass of
# ``Sequence`` would share its ABC state (the caches of which classes are subclasses), and
# answering "is a list a CandidateSet?" would teach ``Sequence`` that a list is not one.
class CandidateSet:
    """Candidate edges grouped by place, built once and ranked for many clients.

    A place is a site at one point: the point its edges report, or the site's own from
    ``sites`` when they report none (an edge whose coordinates differ from its
    site-mates' is at a place of its own). Rules 1-6 of the ranking are properties of a
    place, so a decision ranks places and reads only the edges of the best few. What does
    not depend on the client is worked out once per set: which edges sit at which place,
    each place's point on the unit sphere, which edges are in slow start; each place's load
    bands on first use. Build one when the candidates change (the control plane: when a
    title's holders or their state change; ``Steering.prepare`` also works out every
    place's bands at once) and pass it to ``rank_edges`` or ``Steering.rank`` for every
    decision until then. Where the candidates sit (their sites and coordinates, not their
    loads or shares) is kept between sets, so a fresh list of the same holders, as the
    control plane builds for each request, is grouped for little more than reading it.

    It is a sequence of its candidates, in the order given, and immutable. Raises
    ValueError if two candidates share an edge id. Safe to share between threads (what it
    computes on first use, it computes identically whoever gets there first).
    """

    __slots__ = (
        "_band_order",
        "_banded",
        "_count",
        "_edges",
        "_first",
        "_ids",
        "_layout",
        "_load_text",
        "_located",
        "_located_unit",
        "_members",
        "_more",
        "_placeless",
        "_position",
        "_scored",
        "_site",
        "_slow",
        "_unit",
        "_xyz",
        "sites",
    )

    def __init__(
        self, candidates: Iterable[EdgeCandidate], sites: Mapping[str, SiteInfo] | None = None
    ) -> None:
        edges = candidates if isinstance(candidates, tuple) else tuple(candidates)
        ids = [edge.edge_id for edge in edges]
        if len(set(ids)) != len(ids):
            _refuse_duplicates(ids)
        self.sites: Mapping[str, SiteInfo] = sites if sites is not None else {}
        self._edges: tuple[EdgeCandidate, ...] = edges
        self._ids = ids
        layout = _layout(tuple([(edge.site, edge.lat, edge.lon) for edge in edges]))
        self._layout = layout
        self._site = layout.site
        self._members = layout.members
        self._count = layout.count
        self._first = layout.first
        self._more = layout.more
        self._unit = layout.unit
        self._located = layout.located
        self._located_unit = layout.located_unit
        self._placeless = layout.placeless
        self._xyz: npt.NDArray[np.float64] | None = None
        if layout.placeless and self.sites:
            self._place_by_sites()
        # place -> its edges in slow start (a NaN share is a full one, as in every
        # comparison below)
        self._slow: dict[int, list[int]] = {}
        slow = [i for i, edge in enumerate(edges) if edge.share < 1.0]
        if slow:
            place_of = layout.place_of()
            for i in slow:
                self._slow.setdefault(place_of[i], []).append(i)
        self._banded: list[list[tuple[int, int]] | None] = [None] * len(layout.site)
        self._band_order: list[tuple[int, int, int]] | None = None
        self._load_text: dict[int, str] = {}  # edge -> its "; load N %", once returned
        # (title, its key, each edge's rendezvous score for it or -1): the last title ranked
        self._scored: tuple[str, int, list[int]] | None = None
        self._position: dict[str, int] | None = None  # edge id -> index, on first demotion

    def __len__(self) -> int:
        return len(self._edges)

    @overload
    def __getitem__(self, index: int) -> EdgeCandidate: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[EdgeCandidate]: ...

    def __getitem__(self, index: int | slice) -> EdgeCandidate | Sequence[EdgeCandidate]:
        return self._edges[index]

    def __iter__(self) -> Iterator[EdgeCandidate]:
        return iter(self._edges)

    def __reversed__(self) -> Iterator[EdgeCandidate]:
        return reversed(self._edges)

    def __contains__(self, value: object) -> bool:
        return value in self._edges

    def index(self, value: object, start: int = 0, stop: int = sys.maxsize) -> int:
        return self._edges.index(value, start, stop)

    def count(self, value: object) -> int:
        return self._edges.count(value)

    def __repr__(self) -> str:
        return f"CandidateSet({len(self._edges)} edges at {len(self._site)} places)"

    def _complete(self) -> CandidateSet:
        """Works out now what is otherwise worked out on first use; returns the set."""
        for place in range(len(self._site)):
            self._bands(place)
        self._by_band()
        if len(self._located) >= _NEAREST_FROM:
            self._located_xyz()
        return self

    def _bands(self, place: int) -> list[tuple[int, int]]:
        """``place``'s edges as (load band, index), by band then index."""
        banded = self._banded[place]
        if banded is None:
            edges = self._edges
            banded = sorted([(load_band(edges[i].load), i) for i in self._members[place]])
            self._banded[place] = banded
        return banded

    def _by_band(self) -> list[tuple[int, int, int]]:
        """Every edge as (load band, index, place), by band then index."""
        order = self._band_order
        if order is None:
            order = sorted(
                [
                    (band, i, place)
                    for place in range(len(self._site))
                    for band, i in self._bands(place)
                ]
            )
            self._band_order = order
        return order

    def _demoted_at(self, demoted: Mapping[str, str]) -> dict[int, list[int]]:
        """place -> its edges in ``demoted`` (by index)."""
        position = self._position
        if position is None:
            position = self._position = {edge_id: i for i, edge_id in enumerate(self._ids)}
        place_of = self._layout.place_of()
        out: dict[int, list[int]] = {}
        for edge_id in demoted:
            i = position.get(edge_id)
            if i is not None:
                out.setdefault(place_of[i], []).append(i)
        return out

    def _place_by_sites(self) -> None:
        """Places whose edges report no usable point take their site's, from ``sites``."""
        unit_of = list(self._unit)
        for place in self._placeless:
            info = self.sites.get(self._site[place])
            if info is not None:
                unit_of[place] = _point_unit(info.lat, info.lon)
        if unit_of != self._unit:
            self._unit = unit_of
            self._located = [place for place, unit in enumerate(unit_of) if unit is not None]
            self._located_unit = [unit for unit in unit_of if unit is not None]
            self._placeless = [place for place, unit in enumerate(unit_of) if unit is None]

    def _located_xyz(self) -> npt.NDArray[np.float64]:
        """The unit vectors of the located places as a (3, n) array, columns in
        ``_located`` order."""
        if self._unit is self._layout.unit:
            return self._layout.located_xyz()
        xyz = self._xyz
        if xyz is None:
            xyz = self._xyz = _as_columns(self._located_unit)
        return xyz


Sequence.register(CandidateSet)


# -- ranking ------------------------------------------------------------------------------


def rank_edges(
    *,
    client: Client,
    client_location: tuple[float, float] | None,
    title: str,
    session_key: str,
    candidates: Sequence[EdgeCandidate] | CandidateSet,
    routes: Mapping[str, Route],
    sites: Mapping[str, SiteInfo] | None = None,
    limit: int | None = None,
    demoted: Mapping[str, str] | None = None,
) -> list[RankedEdge]:
    """Every candidate, best first, each with the reason for its place.

    With ``limit``, only the first ``limit`` (a player needs a few to fail over to). The
    ranking still considers every candidate, but reads only the places that can hold the
    first ``limit``, and writes reasons only for the edges returned.

    ``routes`` is each site's longest route covering the client (``RoutingTable.lookup``).
    The client's own coordinates, when it sent valid ones, are used before
    ``client_location`` (typically GeoLite2's guess from its address). An edge without
    coordinates takes its site's from ``sites``. ``candidates`` may be a ``CandidateSet``
    (built once for many decisions; it carries its own ``sites``, so ``sites`` is then not
    passed) or any sequence, grouped afresh for this call with the same result. Raises
    ValueError if two candidates share an edge id (the order could then depend on the
    input's order). ``demoted`` (edge id -> why) moves those edges after the others (see
    "Quality of experience" in the module's docstring).
    """
    grouped: CandidateSet | None = None
    listed: tuple[EdgeCandidate, ...] = ()
    if isinstance(candidates, CandidateSet):
        if sites is not None:
            raise ValueError("a CandidateSet carries its sites: pass them when building it")
        grouped = candidates
    elif len(candidates) >= _DIRECT_BELOW:
        grouped = CandidateSet(candidates, sites)
    else:
        listed = tuple(candidates)
        ids = [edge.edge_id for edge in listed]
        if len(set(ids)) != len(ids):
            _refuse_duplicates(ids)
    n = len(candidates)
    want = n if limit is None else min(n, max(0, limit))
    if want == 0:
        return []
    here = None
    if client.lat is not None and client.lon is not None:
        here = _point_unit(client.lat, client.lon)
    if here is None and client_location is not None:
        here = _point_unit(*client_location)
    if not demoted:
        demoted = None
    if grouped is None:
        return _rank_direct(listed, sites or {}, here, routes, title, session_key, want, demoted)
    return _rank(grouped, here, routes, title, session_key, want, demoted)


def _rank_direct(
    edges: Sequence[EdgeCandidate],
    sites: Mapping[str, SiteInfo],
    here: tuple[float, float, float] | None,
    routes: Mapping[str, Route],
    title: str,
    session_key: str,
    want: int,
    demoted: Mapping[str, str] | None,
) -> list[RankedEdge]:
    """``_rank`` for a short list: every edge keyed in one pass (each place's tier once)
    and sorted, which for a handful of edges costs less than grouping them first."""
    places: dict[_Where, int] = {}
    site_of: list[str] = []
    unit_of: list[tuple[float, float, float] | None] = []
    tier_of: list[int] = []
    kms: dict[int, float] = {}
    title64 = _key64(title, _TITLE)
    session64 = -1
    edge_keys = _EDGE_KEYS
    keyed: list[tuple[int, int, int, int]] = []
    for i, edge in enumerate(edges):
        site = edge.site
        where = (site, edge.lat, edge.lon)
        place = places.get(where)
        if place is None:
            place = places[where] = len(site_of)
            unit = _point_unit(edge.lat, edge.lon)
            if unit is None and (info := sites.get(site)) is not None:
                unit = _point_unit(info.lat, info.lon)
            dist = None
            if here is not None and unit is not None:
                km = kms[place] = _chord_km(here, unit)
                dist = _whole_km(km)
            site_of.append(site)
            unit_of.append(unit)
            tier_of.append(_tier(routes.get(site) if routes else None, dist) << _LOAD_BITS)
        tied = tier_of[place]
        key = edge_keys[edge.edge_id]
        if demoted is not None and edge.edge_id in demoted:
            tied |= _TIER_DEFER << _LOAD_BITS
        elif edge.share < 1.0:
            if session64 < 0:
                session64 = _key64(session_key, _SESSION)
            if not (_mix(session64 ^ key) >> 11) * 2.0**-53 < edge.share:
                tied |= _TIER_DEFER << _LOAD_BITS
        keyed.append((tied | load_band(edge.load), _mix(title64 ^ key), i, place))
    keyed.sort()
    return _explain(keyed, want, edges, site_of, unit_of, {}, here, routes, kms, demoted)


def _rank(
    grouped: CandidateSet,
    here: tuple[float, float, float] | None,
    routes: Mapping[str, Route],
    title: str,
    session_key: str,
    want: int,
    demoted: Mapping[str, str] | None,
) -> list[RankedEdge]:
    """The best ``want`` (>= 1) of ``grouped`` for a client at ``here``, explained."""
    count, slow, unit_of = grouped._count, grouped._slow, grouped._unit
    if demoted is not None:
        # Demoted edges are deferred like slow-start edges outside their share: every rule
        # below that counts a place's full-share edges counts them out.
        at = grouped._demoted_at(demoted)
        if at:
            slow = dict(slow)
            for place, members in at.items():
                slow[place] = sorted({*slow.get(place, ()), *members})
    edges, ids = grouped._edges, grouped._ids
    kms: dict[int, float] = {}  # place -> exact km, for every place whose distance was needed
    deferred: set[int] = set()  # edges moved after the full-share ones for this session
    eligible: dict[int, int] = {}  # place -> its full-share edges, for places with slow ones
    session64 = [-1]

    def full_share(place: int) -> int:
        """How many edges of ``place`` this session does not defer (they fill the list)."""
        found = eligible.get(place)
        if found is not None:
            return found
        if session64[0] < 0:
            session64[0] = _key64(session_key, _SESSION)
        left = count[place]
        for i in slow[place]:
            if demoted is not None and ids[i] in demoted:
                deferred.add(i)
                left -= 1
                continue
            fraction = (_mix(session64[0] ^ _EDGE_KEYS[ids[i]]) >> 11) * 2.0**-53
            if not fraction < edges[i].share:  # a NaN share admits nobody
                deferred.add(i)
                left -= 1
        eligible[place] = left
        return left

    # 1. Sites with a prefix covering the client: their own tier each (a few).
    matched: set[int] = set()
    tiers: list[tuple[int, int]] = []  # (tier, place)
    held = 0  # full-share edges at the places in ``tiers``
    if routes:
        first, more = grouped._first, grouped._more
        for site, route in routes.items():
            found = first.get(site)
            if found is None:
                continue
            base = _route_parts(route)[6]  # _tier, with the route's part kept
            for place in more.get(site, (found,)) if more else (found,):
                matched.add(place)
                unit = unit_of[place]
                if here is None or unit is None:
                    tiers.append((base | _DIST_CAP, place))
                else:
                    km = kms[place] = _chord_km(here, unit)
                    tiers.append((base | _whole_km(km), place))
                held += count[place] if place not in slow else full_share(place)
        tiers.sort()
    # 2. The other located places, nearest first (groups never tie: 1 ranks before 2).
    if held < want and here is not None:
        tiers += _nearest(grouped, here, matched, kms, want - held, full_share, slow)
    # Places in rank order, until they hold ``want`` full-share edges and the next one
    # ranks strictly after the last taken: every edge that can be among the first ``want``
    # (or tie with one of them up to the title hash) is then at a place taken.
    chosen: list[tuple[int, int, int]] = []  # (tier, place, its full-share edges), best first
    total, last = 0, -1
    group, group_held = 0, 0  # where the places of tier ``last`` start in ``chosen``; their edges
    for tier, place in tiers:
        if tier != last:
            if total >= want:
                break
            group, group_held, last = len(chosen), 0, tier
        held = count[place] if place not in slow else full_share(place)
        chosen.append((tier, place, held))
        total += held
        group_held += held
    # 3. Places whose distance is unknown: one tier, so all of them (most of the places,
    # for a client that cannot be placed) or none.
    cut: list[tuple[int, int, int]] | None = None
    if total < want:
        need = want - total
        if here is None:  # every place: counted without listing them
            held = len(ids) - sum([count[place] for place in matched])
            for place in slow:
                if place not in matched:
                    held -= count[place] - full_share(place)
            places = len(count) - len(matched)
        else:
            rest: Sequence[int] = grouped._placeless
            if matched:
                rest = [place for place in rest if place not in matched]
            held = sum([count[place] if place not in slow else full_share(place) for place in rest])
            places = len(rest)
        total += held
        if held > need and places > 1 and held >= _BAND_CUT_FROM and 4 * held >= len(ids):
            # A large last tie group: only its lowest load bands are keyed.
            # (Filtered lazily: only the lowest bands are read.)
            by_band: Iterable[tuple[int, int, int]] = grouped._by_band()
            if here is not None:
                by_band = (entry for entry in by_band if unit_of[entry[2]] is None)
            if matched:
                by_band = (entry for entry in by_band if entry[2] not in matched)
            cut = _lowest_bands(by_band, deferred, need)
            group, group_held, last = len(chosen), held, _ANYWHERE_TIER
        elif places:
            if here is None:
                rest = range(len(count))
                if matched:
                    rest = [place for place in rest if place not in matched]
            group, group_held, last = len(chosen), held, _ANYWHERE_TIER
            chosen.extend(
                zip(
                    repeat(_ANYWHERE_TIER),
                    rest,
                    [count[place] if place not in slow else full_share(place) for place in rest],
                )
            )
    # Every place is taken and still fewer than ``want`` full-share edges: the deferred
    # ones fill the list, after them (their tier carries the deferral bit).
    with_deferred = total < want

    keyed = _order(
        grouped,
        chosen,
        deferred,
        with_deferred,
        title,
        want - (total - group_held),
        group,
        group_held,
        cut,
    )
    return _explain(
        keyed,
        want,
        grouped._edges,
        grouped._site,
        grouped._unit,
        grouped._load_text,
        here,
        routes,
        kms,
        demoted,
    )


def _nearest(
    grouped: CandidateSet,
    here: tuple[float, float, float],
    matched: set[int],
    kms: dict[int, float],
    need: int,
    full_share: Callable[[int], int],
    slow: Mapping[int, list[int]],
) -> list[tuple[int, int]]:
    """The located places not in ``matched`` that can hold the nearest ``need`` full-share
    edges, with their tiers, nearest first: every place within whole-km reach of them.
    """
    located, units = grouped._located, grouped._located_unit
    hx, hy, hz = here
    order: list[int]  # positions in ``located``, nearest first
    if len(located) >= _NEAREST_FROM:
        # The largest dot product is the nearest. Method calls, not np.argsort(...): numpy's
        # dispatch costs more than the sort here.
        order = np.array(here).dot(grouped._located_xyz()).argsort().tolist()
        order.reverse()
    else:
        # The squared chord, as _chord_km computes it: the same order as the distances.
        chords = [
            (dx := hx - ux) * dx + (dy := hy - uy) * dy + (dz := hz - uz) * dz
            for ux, uy, uz in units
        ]
        order = sorted(range(len(chords)), key=chords.__getitem__)
    count = grouped._count
    asin, sqrt = math.asin, math.sqrt
    near: list[tuple[int, int]] = []
    held, reach, bound = 0, 0, math.inf
    for j in order:
        place = located[j]
        if place in matched:
            continue
        ux, uy, uz = units[j]
        # _chord_km, inline and in its order of operations
        km = _DIAMETER_KM * asin(
            min(1.0, sqrt((dx := hx - ux) * dx + (dy := hy - uy) * dy + (dz := hz - uz) * dz) / 2)
        )
        # Past the bound nothing can round to ``reach`` km or less: the order of the dot
        # products and the exact distances disagree by far less than the margin.
        if km >= bound:
            break
        kms[place] = km
        dist = _DIST_CAP if km >= _DIST_CAP else int(km + 0.5)
        near.append((_LOCATED_TIER | dist, place))
        if held < need:
            held += count[place] if place not in slow else full_share(place)
            if dist > reach:
                reach = dist
            if held >= need:
                bound = reach + 0.5 + _NEAR_MARGIN_KM
    near.sort()
    return near


def _order(
    grouped: CandidateSet,
    chosen: list[tuple[int, int, int]],
    deferred: set[int],
    with_deferred: bool,
    title: str,
    need: int,
    start: int,
    held: int,
    cut: list[tuple[int, int, int]] | None,
) -> list[tuple[int, int, int, int]]:
    """Every edge that can be among the first asked for, sorted by (tier and load band,
    title hash, index) as (that, hash, index, place): the edges of the places ``chosen``
    (tier order), whose last tier starts at ``start``, holds ``held`` full-share edges and
    is asked for ``need`` of them, and the edges ``cut`` ((load band, index, place), of the
    anywhere tier) if given.
    """
    members, ids, edges = grouped._members, grouped._ids, grouped._edges
    end = len(chosen)
    if cut is not None:
        cut_tier = _ANYWHERE_TIER << _LOAD_BITS
    elif not with_deferred:
        # The last tie group needs only its lowest load bands, up to the edges still
        # missing: one site of ten edges when five are asked for.
        cut_tier = chosen[-1][0] << _LOAD_BITS
        if held > need:
            if start == end - 1:
                place = chosen[start][1]
                lowest = _lowest_bands(grouped._bands(place), deferred, need)
                cut = [(band, i, place) for band, i in lowest]
                end = start
            elif held >= _BAND_CUT_FROM and 4 * held >= len(ids):
                group = {entry[1] for entry in chosen[start:]}
                by_band = [entry for entry in grouped._by_band() if entry[2] in group]
                cut = _lowest_bands(by_band, deferred, need)
                end = start

    # The title's rendezvous scores, remembered per set: a popular title meets the same
    # edges decision after decision.
    scored = grouped._scored
    if scored is None or scored[0] != title:
        scored = grouped._scored = (title, _key64(title, _TITLE), [-1] * len(ids))
    _, title64, scores = scored
    # (tier and load band, title hash, index, place): the edge's sort key split in two,
    # which sorts as the one integer would and spares building it.
    keyed: list[tuple[int, int, int, int]] = []
    for tier, place, _ in chosen[:end]:
        tier <<= _LOAD_BITS
        for i in members[place]:
            if deferred and i in deferred:
                if not with_deferred:
                    continue
                tied = (_TIER_DEFER << _LOAD_BITS) | tier
            else:
                tied = tier
            load = edges[i].load  # load_band, inline
            if 0.0 <= load < _LOAD_CAP_VALUE:
                tied |= int(load / LOAD_STEP + 1e-9)
            elif not load < 0.0:
                tied |= _LOAD_CAP
            score = scores[i]
            if score < 0:
                score = scores[i] = _mix(title64 ^ _EDGE_KEYS[ids[i]])
            keyed.append((tied, score, i, place))
    if cut:
        for band, i, place in cut:
            score = scores[i]
            if score < 0:
                score = scores[i] = _mix(title64 ^ _EDGE_KEYS[ids[i]])
            keyed.append((cut_tier | band, score, i, place))
    keyed.sort()
    return keyed


_Banded = TypeVar("_Banded", tuple[int, int], tuple[int, int, int])


def _lowest_bands(by_band: Iterable[_Banded], deferred: set[int], need: int) -> list[_Banded]:
    """The full-share edges of ``by_band`` ((load band, index, ...) in band order) in the
    lowest bands that hold ``need`` of them, every edge of the last such band included
    (its run is counted whole).
    """
    out: list[_Banded] = []
    last = -1
    for entry in by_band:
        band = entry[0]
        if len(out) >= need and band != last:
            break
        if not (deferred and entry[1] in deferred):
            out.append(entry)
            last = band
    return out


# What every returned edge of one place shares: its sentence, its distance (rounded), and
# its route's prefix, prefix length, AS path length, MED and relation.
_Shared = tuple[str, float | None, str | None, int | None, int | None, int | None, Relation | None]


def _shared(
    site: str,
    unit: tuple[float, float, float] | None,
    place: int,
    here: tuple[float, float, float] | None,
    route: Route | None,
    kms: Mapping[int, float],
) -> _Shared:
    if route is not None:
        text, prefix, length, hops, med, relation, _ = _route_parts(route)
    else:
        text = _NO_ROUTE_TEXT.get(site) or _no_route_text(site)
    if here is not None and unit is not None:
        km = kms.get(place)
        if km is None:
            km = _chord_km(here, unit)
        # Whole km as the ranking compared them, and tenths rounded half up; the texts are
        # kept. Building strings is most of what a reason costs: float formatting and
        # round() (correctly rounded, through decimal digits) alone were a third of it.
        whole = int(km + 0.5)
        text += _KM_TEXT.get(whole) or _km_text(whole)
        rounded: float | None = int(km * 10.0 + 0.5) / 10.0
    else:
        why = (
            f"site {site} has no coordinates"
            if here is not None
            else "the client could not be located"
        )
        text = (
            f"{text}; distance unknown: {why}" if route else f"{text} and {why}: any healthy edge"
        )
        rounded = None
    if route is None:
        return text, rounded, None, None, None, None, None
    return text, rounded, prefix, length, hops, med, relation


_NO_ROUTE_TEXT: dict[str, str] = {}  # site -> its sentence when no prefix of it covers the client
_KM_TEXT: dict[int, str] = {}  # whole km (at most half the Earth's circumference) -> its text


def _no_route_text(site: str) -> str:
    if len(_NO_ROUTE_TEXT) >= 1 << 14:
        _NO_ROUTE_TEXT.clear()
    text = _NO_ROUTE_TEXT[site] = f"no prefix of site {site} covers the client"
    return text


def _km_text(whole: int) -> str:
    text = f"; {whole} km"
    if whole <= 25_000:
        _KM_TEXT[whole] = text
    return text


def _percent(fraction: float) -> str:
    """``fraction`` in whole per cent, rounded half up (as cheaply as the kilometres)."""
    if 0.0 <= fraction < 1e6:
        return str(int(fraction * 100.0 + 0.5))
    return f"{fraction * 100:.0f}"  # negative, huge, infinite or NaN: a broken report


def _explain(
    keyed: list[tuple[int, int, int, int]],
    want: int,
    candidates: Sequence[EdgeCandidate],
    site_of: Sequence[str],
    unit_of: Sequence[tuple[float, float, float] | None],
    loads: dict[int, str],
    here: tuple[float, float, float] | None,
    routes: Mapping[str, Route],
    kms: Mapping[int, float],
    demoted: Mapping[str, str] | None = None,
) -> list[RankedEdge]:
    """The first ``want`` of ``keyed`` (sorted (tier and band, hash, index, place), holding
    every edge tied with any of them, so that runs are counted whole) as RankedEdges;
    ``loads`` keeps each edge's load text for later calls.

    A RankedEdge carries its candidate's load as the very object reported, read untyped:
    compiled, a float read as one is unboxed and boxed anew, and a NaN load (a broken
    report) would then make two rankings of the same candidates unequal.
    """
    ranked: list[RankedEdge] = []
    shared: dict[int, _Shared] = {}
    n = len(keyed)
    stop = min(n, want)
    start = 0
    while start < stop:
        # A run: the edges that tie up to the title hash.
        tied = keyed[start][0]
        end = start + 1
        while end < n and keyed[end][0] == tied:
            end += 1
        size = end - start
        deferred = bool(tied >> _LOAD_BITS & _TIER_DEFER)
        for position in range(start, min(end, stop)):
            _, _, index, place = keyed[position]
            edge = candidates[index]
            why = shared.get(place)
            if why is None:
                route = routes.get(site_of[place]) if routes else None
                why = shared[place] = _shared(
                    site_of[place], unit_of[place], place, here, route, kms
                )
            text, rounded, prefix, prefix_len, path_len, med, relation = why
            load = loads.get(index)
            if load is None:  # the same for every decision the set serves
                load = loads[index] = f"; load {_percent(edge.load)} %"
            reason = text + load
            if size > 1:
                reason += f"; title hash puts it {position - start + 1} of {size} equals"
            qos = demoted.get(edge.edge_id) if demoted is not None else None
            if qos is not None:
                reason += f"; ranked after the edges not demoted: {qos}"
            elif edge.share < 1.0:
                share = f"slow start at {edge.share * 100:.0f} % share"
                if deferred:
                    reason += (
                        f"; {share}: this session is outside it, so after the full-share edges"
                    )
                else:
                    reason += f"; {share}: this session is in it"
            ranked.append(
                RankedEdge(
                    edge_id=edge.edge_id,
                    base_url=edge.base_url,
                    rank=position + 1,
                    reason=reason,
                    prefix=prefix,
                    prefix_len=prefix_len,
                    as_path_len=path_len,
                    med=med,
                    relation=relation,
                    distance_km=rounded,
                    load=cast(Any, edge).load,  # the very float reported: see below
                    site=edge.site,
                    slow_start_deferred=deferred and qos is None,
                    qos_demoted=qos is not None,
                )
            )
        start = end
    return ranked
