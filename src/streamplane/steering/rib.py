"""The routing table: per edge site, the longest prefix that covers a client address.

Every prefix in the table is a node of a longest-prefix-match trie (pytricia, one for IPv4
and one for IPv6). A node's value is not just the routes at that prefix: it is, for every
site, that site's longest route covering the prefix, its own or inherited from a shorter
prefix. A lookup is therefore one trie search that returns one finished mapping, and the
cost of the inheritance is paid by writers, once per change, not by every request.

Concurrency: readers take no lock. A node's value is a dict that is never mutated once it
is in the trie (a change stores a new dict), and a pytricia call runs whole under the GIL,
so a reader sees a node's old value or its new one, never a half-built one. Writers are
serialised by a lock; an announcement updates its node, then the nodes below it, so for the
few microseconds that takes a reader of a more specific prefix may still see the old route,
which is the answer it would have had a moment earlier. ``replace`` builds new tries aside
and swaps them in with one assignment. (This relies on the GIL; a free-threaded build
would need readers to go through an immutable snapshot instead.)

A site may learn the same prefix from several places (two BGP neighbours, BGP and the
czmap): the table keeps every such path and uses the best, as BGP does between paths to
one prefix: relation, then AS path length, then MED, then BGP before files. A file route
has no AS path or MED, and compares as the longest path with the highest MED: a BGP path
of the same relation is preferred to it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeAlias

import pytricia

from streamplane.steering.errors import AddressError
from streamplane.steering.model import (
    RELATION_PREFERENCE,
    SOURCE_PREFERENCE,
    Route,
    check_route,
    normalise_prefix,
    path_preference,
)

__all__ = ["RoutingTable"]

_Trie: TypeAlias = Any  # pytricia.PyTricia ships no type information
_PathKey: TypeAlias = tuple[str, str]  # (source, peer)
_EMPTY: dict[str, Route] = {}


def _path_preference(route: Route) -> tuple[int, int, int, int, str]:
    hops, med = path_preference(route)  # a file route's: the longest, the highest
    return (
        RELATION_PREFERENCE[route.relation],
        hops,
        med,
        SOURCE_PREFERENCE.get(route.source, len(SOURCE_PREFERENCE)),
        route.peer,
    )


def _length(prefix: str) -> int:
    return int(prefix.rpartition("/")[2])


class _Tables:
    """Everything a writer changes; readers only ever touch ``tries``."""

    def __init__(self) -> None:
        # (prefix, site) -> every path to it, keyed by (source, peer)
        self.paths: dict[tuple[str, str], dict[_PathKey, Route]] = {}
        # prefix -> the best path of each site at exactly this prefix
        self.own: dict[str, dict[str, Route]] = {}
        self.tries: tuple[_Trie, _Trie] = (pytricia.PyTricia(32), pytricia.PyTricia(128))
        self.count = 0  # (prefix, site) pairs that have a route
        # (site, source, peer) -> how many prefixes it has a path to: what a BGP session
        # has taught, without walking the table
        self.per_origin: dict[tuple[str, str, str], int] = {}

    def counted(self, site: str, key: _PathKey, delta: int) -> None:
        origin = (site, *key)
        left = self.per_origin.get(origin, 0) + delta
        if left:
            self.per_origin[origin] = left
        else:
            self.per_origin.pop(origin, None)

    def trie_of(self, prefix: str) -> _Trie:
        return self.tries[1] if ":" in prefix else self.tries[0]


class RoutingTable:
    """Routes of every edge site, IPv4 and IPv6, with per-site longest-prefix lookup.

    Thread-safe: any number of readers run alongside one writer at a time and never wait
    for it (see the module docstring).
    """

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._lock = threading.Lock()
        self._t = _Tables()
        # Readers use this reference only; replace() swaps it in one assignment.
        self._tries: tuple[_Trie, _Trie] = self._t.tries
        if routes:
            self.replace(routes)

    # -- reading ------------------------------------------------------------------------

    def lookup(self, address: str) -> dict[str, Route]:
        """For every site with a prefix that covers ``address``, its longest such route.

        Raises AddressError if ``address`` is not an IPv4 or IPv6 address.
        """
        v4, v6 = self._tries
        if ":" in address:
            trie = v6
            if "." in address and address[:7].lower() == "::ffff:":
                # An IPv4 client on a dual-stack socket: route it as the IPv4 address it is.
                address, trie = address[7:], v4
        else:
            trie = v4
        if "/" in address:
            raise AddressError(f"bad client address {address!r}: a prefix, not an address")
        try:
            found: dict[str, Route] | None = trie.get(address)
        except ValueError:
            raise AddressError(
                f"bad client address {address!r}: not an IPv4 or IPv6 address"
            ) from None
        return dict(found) if found else {}

    def routes(self) -> Iterator[Route]:
        """Every route in effect (the best path of each site at each prefix)."""
        own = self._t.own
        for prefix in list(own):
            yield from list(own.get(prefix, _EMPTY).values())

    def __len__(self) -> int:
        """How many (prefix, site) pairs have a route."""
        return self._t.count

    def count_paths(
        self, *, site: str | None = None, source: str | None = None, peer: str | None = None
    ) -> int:
        """How many paths match all the given filters (a BGP peer's: the prefixes it gave).

        Takes no lock, as lookups do not: copying a dict is one step under the GIL, so a
        writer in another thread (a czmap reload) never holds up the caller.
        """
        origins = dict(self._t.per_origin).items()
        return sum(
            n
            for (path_site, path_source, path_peer), n in origins
            if (site is None or path_site == site)
            and _matches((path_source, path_peer), source, peer)
        )

    def __contains__(self, prefix: object) -> bool:
        if not isinstance(prefix, str):
            return False
        return normalise_prefix(prefix) in self._t.own

    # -- writing ------------------------------------------------------------------------

    def announce(self, route: Route) -> None:
        """Add ``route``, or replace the path from the same (site, prefix, source, peer)."""
        route = check_route(route)
        with self._lock:
            t = self._t
            paths = t.paths.setdefault((route.prefix, route.site), {})
            key = (route.source, route.peer)
            if key not in paths:
                t.counted(route.site, key, 1)
            paths[key] = route
            self._settle(route.prefix, route.site)

    def withdraw(
        self, site: str, prefix: str, *, source: str | None = None, peer: str | None = None
    ) -> None:
        """Remove ``site``'s paths to ``prefix``: all of them, or those from ``source``/``peer``.

        Withdrawing what is not there does nothing (BGP withdraws are idempotent too).
        """
        prefix = normalise_prefix(prefix)
        with self._lock:
            paths = self._t.paths.get((prefix, site))
            if not paths:
                return
            for key in [k for k in paths if _matches(k, source, peer)]:
                del paths[key]
                self._t.counted(site, key, -1)
            self._settle(prefix, site)

    def clear(
        self, *, site: str | None = None, source: str | None = None, peer: str | None = None
    ) -> int:
        """Remove every path matching all the given filters; returns how many went."""
        removed = 0
        with self._lock:
            t = self._t
            touched = []
            for (prefix, path_site), paths in list(t.paths.items()):
                if site is not None and path_site != site:
                    continue
                gone = [k for k in paths if _matches(k, source, peer)]
                for key in gone:
                    del paths[key]
                    t.counted(path_site, key, -1)
                if gone:
                    removed += len(gone)
                    touched.append((prefix, path_site))
            # Shortest first, so a long prefix is settled after the ones it inherits from.
            touched.sort(key=lambda pair: _length(pair[0]))
            for prefix, path_site in touched:
                self._settle(prefix, path_site)
        return removed

    def replace(self, routes: Iterable[Route], *, source: str | None = None) -> None:
        """Load ``routes`` in place of the whole table, or of the paths from ``source`` only.

        Built aside and swapped in: lookups meanwhile answer from the old table.
        """
        checked = [check_route(r) for r in routes]
        with self._lock:
            old = self._t
            fresh = _Tables()
            if source is not None:
                for (prefix, site), paths in old.paths.items():
                    for (path_source, peer), route in paths.items():
                        if path_source != source:
                            fresh.paths.setdefault((prefix, site), {})[(path_source, peer)] = route
            for route in checked:
                fresh.paths.setdefault((route.prefix, route.site), {})[
                    (route.source, route.peer)
                ] = route
            for (prefix, site), paths in fresh.paths.items():
                fresh.own.setdefault(prefix, {})[site] = min(paths.values(), key=_path_preference)
                for key in paths:
                    fresh.counted(site, key, 1)
            fresh.count = len(fresh.paths)
            # Shortest prefixes first: when a prefix goes in, every prefix that covers it is
            # already there, so a plain longest-match search finds what it inherits.
            for prefix in sorted(fresh.own, key=_length):
                trie = fresh.trie_of(prefix)
                inherited: dict[str, Route] | None = trie.get(prefix)
                own = fresh.own[prefix]
                trie.insert(prefix, {**inherited, **own} if inherited else dict(own))
            self._t = fresh
            self._tries = fresh.tries

    # -- internals (under the lock) -----------------------------------------------------

    def _settle(self, prefix: str, site: str) -> None:
        """Re-pick ``site``'s best path to ``prefix`` and refresh the trie if it changed."""
        t = self._t
        paths = t.paths.get((prefix, site))
        best = min(paths.values(), key=_path_preference) if paths else None
        if not paths:
            t.paths.pop((prefix, site), None)
        own = t.own.get(prefix)
        current = own.get(site) if own else None
        if best is current:
            return
        if best is None:
            assert own is not None
            del own[site]
            t.count -= 1
            if not own:
                del t.own[prefix]
        else:
            if own is None:
                own = t.own[prefix] = {}
            if current is None:
                t.count += 1
            own[site] = best
        self._refresh(prefix)

    def _refresh(self, prefix: str) -> None:
        """Recompute the values of ``prefix``'s node and of every node below it."""
        t = self._t
        trie = t.trie_of(prefix)
        own = t.own.get(prefix)
        present = trie.has_key(prefix)
        below: list[str] = trie.children(prefix) if present else _children_of_absent(trie, prefix)
        if own is None:
            if present:
                trie.delete(prefix)
        else:
            trie.insert(prefix, {**_inherited(trie, prefix, present), **own})
        for child in sorted(below, key=_length):
            # pytricia names a node in inet_ntop's words, which write the low 32 bits of
            # ::/96 and ::ffff:0:0/96 as a dotted quad ("::0.1.0.0/112"); ``own`` keeps the
            # canonical text ("::1:0/112").
            own_child = t.own.get(child)
            if own_child is None:
                own_child = t.own[normalise_prefix(child)]
            trie.insert(child, {**_inherited(trie, child, True), **own_child})


def _inherited(trie: _Trie, prefix: str, present: bool) -> dict[str, Route]:
    """The value of the nearest node strictly above ``prefix``."""
    if present:
        parent = trie.parent(prefix)
        return trie[parent] if parent is not None else _EMPTY
    found: dict[str, Route] | None = trie.get(prefix)
    return found or _EMPTY


def _children_of_absent(trie: _Trie, prefix: str) -> list[str]:
    # pytricia lists the descendants of stored prefixes only: store a placeholder, ask,
    # remove it. Readers may meet the placeholder for an instant, so it carries what a
    # lookup there would have answered anyway.
    trie.insert(prefix, trie.get(prefix) or _EMPTY)
    try:
        return list(trie.children(prefix))
    finally:
        trie.delete(prefix)


def _matches(key: _PathKey, source: str | None, peer: str | None) -> bool:
    return (source is None or key[0] == source) and (peer is None or key[1] == peer)
