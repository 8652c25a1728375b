"""Coverage zones from Apache Traffic Control's ``czmap.json``.

The layout Traffic Router reads (``JSONCoverageZones`` in Traffic Monitor and Traffic
Router)::

    {
      "revision": "...", "customerName": "...",
      "coverageZones": {
        "<cache group>": {
          "coordinates": {"latitude": 52.37, "longitude": 4.89},
          "network":  ["192.0.2.0/24", ...],
          "network6": ["2001:db8:1::/48", ...]
        }
      }
    }

A cache group is an edge site; each network becomes a route of that site with
``source="czmap"``. The file carries no AS path or MED: its routes rank after a BGP route of
the same prefix length and relation, and tie with each other on those rules, so geography
decides between cache groups that cover the same client (see ``rank``). ``coordinates``,
``network`` and ``network6`` are each optional, as in Traffic Router.

Read strictly: a key the layout does not have (``"networks"`` for ``"network"``) or a key
given twice (two cache groups of one name, the second silently replacing the first) is an
error naming the file, the place and the key, never a zone left quietly empty.
:class:`CoverageZones` keeps a file loaded and reloads it when it changes, keeping the last
good table when the new file is bad.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from streamplane.steering.errors import CzmapError, PrefixError
from streamplane.steering.model import Relation, Route, SiteInfo, normalise_prefix

__all__ = ["CoverageZones", "load_czmap", "parse_czmap"]

log = logging.getLogger(__name__)

_TOP_KEYS: Final = ("revision", "customerName", "coverageZones")
_ZONE_KEYS: Final = ("coordinates", "network", "network6")
_POINT_KEYS: Final = ("latitude", "longitude")


def load_czmap(
    path: Path, *, relation: Relation = "public"
) -> tuple[list[Route], dict[str, SiteInfo]]:
    """Read a czmap.json file: its routes, and its cache groups as sites.

    ``relation`` is what every route of the file gets (the file has no way to say).
    Raises CzmapError naming the file and the first thing wrong in it.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CzmapError(f"cannot read coverage-zone file {path}: {exc.strerror}") from None
    return parse_czmap(data, relation=relation, origin=str(path))


class _Object(dict[str, Any]):
    """A JSON object that remembers the keys it was given more than once."""

    duplicates: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice: list[str] = []
        for key, _ in pairs:
            if key in seen:
                twice.append(key)
            seen.add(key)
        obj.duplicates = tuple(dict.fromkeys(twice))
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_keys(obj: dict[str, Any], known: tuple[str, ...], where: str, what: str) -> None:
    for key in getattr(obj, "duplicates", ()):
        raise CzmapError(f"{where}: {what} {key!r} is given twice; give each once")
    for key in obj:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CzmapError(
                f"{where}: unknown key {key!r} (a {what} has {', '.join(known)}){hint}"
            )


def parse_czmap(
    data: bytes | str, *, relation: Relation = "public", origin: str = "czmap"
) -> tuple[list[Route], dict[str, SiteInfo]]:
    """:func:`load_czmap` on the file's contents; ``origin`` names it in errors."""
    try:
        # The standard parser, not msgspec: only it shows the pairs of an object, so a key
        # given twice can be refused rather than silently replaced by its second value.
        document: Any = json.loads(data, object_pairs_hook=_object, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise CzmapError(f"{origin}: not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise CzmapError(f"{origin}: expected a JSON object with 'coverageZones'")
    _check_keys(document, _TOP_KEYS, origin, "czmap key")
    zones = document.get("coverageZones")
    if not isinstance(zones, dict):
        raise CzmapError(f"{origin}: 'coverageZones' is missing or not an object of cache groups")
    for group in getattr(zones, "duplicates", ()):
        raise CzmapError(
            f"{origin}: cache group {group!r} is given twice in 'coverageZones'; merge them"
        )
    routes: list[Route] = []
    sites: dict[str, SiteInfo] = {}
    for group, zone in zones.items():
        where = f"{origin}: cache group {group!r}"
        if not group:
            raise CzmapError(f"{origin}: a cache group has an empty name")
        if not isinstance(zone, dict):
            raise CzmapError(f"{where}: expected an object with coordinates/network/network6")
        _check_keys(zone, _ZONE_KEYS, where, "cache group key")
        lat, lon = _coordinates(zone.get("coordinates"), where)
        sites[group] = SiteInfo(group, lat, lon)
        seen: set[str] = set()
        for key, version in (("network", 4), ("network6", 6)):
            for prefix in _prefixes(zone.get(key), version, f"{where}, {key!r}"):
                if prefix not in seen:
                    seen.add(prefix)
                    routes.append(
                        Route(prefix=prefix, site=group, relation=relation, source="czmap")
                    )
    return routes, sites


def _coordinates(value: Any, where: str) -> tuple[float | None, float | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise CzmapError(f"{where}: 'coordinates' must be an object with latitude, longitude")
    _check_keys(value, _POINT_KEYS, f"{where}, 'coordinates'", "coordinates key")
    point: list[float] = []
    for name, bound in (("latitude", 90.0), ("longitude", 180.0)):
        number = value.get(name)
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise CzmapError(f"{where}: coordinates.{name} must be a number, not {number!r}")
        if not math.isfinite(number) or abs(number) > bound:
            raise CzmapError(f"{where}: coordinates.{name} {number} is outside ±{bound:g}")
        point.append(float(number))
    return point[0], point[1]


def _prefixes(value: Any, version: int, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise CzmapError(f"{where} must be a list of CIDR strings")
    out = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise CzmapError(f"{where}[{index}] must be a CIDR string, not {item!r}")
        try:
            prefix = normalise_prefix(item)
        except PrefixError as exc:
            raise CzmapError(f"{where}[{index}]: {exc}") from None
        if (":" in prefix) != (version == 6):
            other = "network6" if version == 4 else "network"
            raise CzmapError(
                f"{where}[{index}]: {prefix} is an IPv{10 - version} prefix; "
                f"it belongs in {other!r}"
            )
        out.append(prefix)
    return out


# -- a file kept loaded -------------------------------------------------------------------

_Signature = tuple[int, int, int, int]  # device, inode, size, mtime in ns


class CoverageZones:
    """A czmap.json file kept loaded, and reloaded when it changes.

    The first load must succeed (CzmapError otherwise). After that, :meth:`check` (call it
    on a timer) reloads when the file's inode, size or modification time changed, and
    :meth:`reload` (on SIGHUP, say) reloads whatever they say. A reload hands the new routes
    and sites to ``on_load``; a file that cannot be read or is invalid leaves the last good
    table in place, and says why in ``error`` and the log until a good file replaces it.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        relation: Relation = "public",
        on_load: Callable[[list[Route], dict[str, SiteInfo]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.relation: Relation = relation
        self.on_load = on_load
        self._clock = clock
        signature = self._stat()
        self.routes, self.sites = load_czmap(self.path, relation=relation)
        self._signature = signature
        self.loaded_at = clock()  # when the table in use was read
        self.reloads = 0  # good reloads since the first load
        self.failures = 0  # reloads refused (bad or unreadable file)
        self.error: str | None = None  # why the file on disk is not the table in use

    def check(self) -> bool:
        """Reload if the file changed since it was last read; True if a new table is in use."""
        if self._stat() == self._signature:
            return False
        return self.reload()

    def reload(self) -> bool:
        """Read the file again; True if its table is now in use (False: the old one stays)."""
        signature = self._stat()
        try:
            routes, sites = load_czmap(self.path, relation=self.relation)
        except CzmapError as exc:
            # Remembered, so that polling does not read (and log) the same bad file again.
            self._signature = signature
            self.failures += 1
            self.error = f"{exc}; still using the table read at {_when(self.loaded_at)}"
            log.warning("coverage zones not reloaded: %s", self.error)
            return False
        self._signature = signature
        self.routes, self.sites = routes, sites
        self.loaded_at = self._clock()
        self.reloads += 1
        self.error = None
        log.info(
            "coverage zones reloaded from %s: %d routes, %d cache groups",
            self.path,
            len(routes),
            len(sites),
        )
        if self.on_load is not None:
            self.on_load(routes, sites)
        return True

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` shows of the file: ok, or degraded with the reason."""
        out: dict[str, Any] = {
            "status": "ok" if self.error is None else "degraded",
            "file": str(self.path),
            "routes": len(self.routes),
            "cache_groups": len(self.sites),
            "loaded_at": self.loaded_at,
            "reloads": self.reloads,
        }
        if self.error is not None:
            out["problems"] = [self.error]
        return out

    def _stat(self) -> _Signature | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
