"""Where a client address is: GeoLite2 City, from the ``maxminddb-geolite2`` wheel or a file.

The wheel's database dates from 2018: good enough to tell continents and countries apart,
often wrong about cities. In production pass ``path`` to a current GeoLite2/GeoIP2 City
file. A City record is decoded whole (names in eight languages), ~15 us a lookup, so
answers are cached, per network: the database tells, with each answer, the network it
holds for (every address in it has the same record), and the cache is a prefix trie of
those networks. A viewer's devices and retries, and every other viewer of the same
network, are answered from it, exactly as the database would.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import threading
from pathlib import Path
from typing import Any

import maxminddb
import pytricia

from streamplane.steering.errors import GeoError

__all__ = ["GeoLocator", "bundled_database"]


def bundled_database() -> Path:
    """The GeoLite2 City file inside the maxminddb-geolite2 wheel."""
    # Found without importing the wheel's module, which opens the database itself.
    spec = importlib.util.find_spec("_maxminddb_geolite2")
    if spec is None or not spec.submodule_search_locations:
        raise GeoError(
            "no GeoLite2 database: install the maxminddb-geolite2 package or pass the path "
            "of a GeoLite2 City .mmdb file"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "GeoLite2-City.mmdb"


def _location(record: Any) -> tuple[float, float] | None:
    if not isinstance(record, dict):
        return None
    location = record.get("location")
    if not isinstance(location, dict):
        return None
    lat, lon = location.get("latitude"), location.get("longitude")
    if not isinstance(lat, int | float) or not isinstance(lon, int | float):
        return None
    return float(lat), float(lon)


class GeoLocator:
    """``locate(address)`` -> (latitude, longitude), or None if the database does not know.

    Answers are cached for up to ``cache_size`` networks (0: no cache); past that the
    cache starts afresh. Safe to share between threads.
    """

    def __init__(self, path: Path | None = None, *, cache_size: int = 65_536) -> None:
        self.path = Path(path) if path is not None else bundled_database()
        try:
            self._reader = maxminddb.open_database(str(self.path))
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoError(f"cannot open GeoLite2 database {self.path}: {exc}") from None
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._networks = 0
        # network -> (its answer,): a tuple, so that "no location" is cached too.
        self._tries: tuple[Any, Any] = (pytricia.PyTricia(32), pytricia.PyTricia(128))

    def locate(self, address: str) -> tuple[float, float] | None:
        if self.cache_size <= 0:
            return self._locate(address)
        if "/" in address or "\x00" in address:  # forms the trie would read otherwise
            return self._locate(address)
        trie = self._tries[1] if ":" in address else self._tries[0]
        try:
            hit: tuple[tuple[float, float] | None] | None = trie.get(address)
        except ValueError:  # not an address in the usual form: the database decides
            return self._locate(address)
        if hit is not None:
            return hit[0]
        try:
            record, length = self._reader.get_with_prefix_len(address)
        except ValueError:
            return None
        location = _location(record)
        try:
            network = str(ipaddress.ip_network((address, length), strict=False))
        except ValueError:
            return location
        with self._lock:
            if self._networks >= self.cache_size:
                self._tries = (pytricia.PyTricia(32), pytricia.PyTricia(128))
                self._networks = 0
            self._tries[1 if ":" in network else 0].insert(network, (location,))
            self._networks += 1
        return location

    def _locate(self, address: str) -> tuple[float, float] | None:
        """One database lookup, no cache."""
        try:
            record: Any = self._reader.get(address)
        except ValueError:  # not an address: nothing to say about it
            return None
        return _location(record)

    def close(self) -> None:
        self._reader.close()
