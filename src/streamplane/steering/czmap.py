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
``source="czmap"``. The file carries no AS path or MED, so these routes tie on those rules
and geography decides between sites that cover the same client. ``coordinates``,
``network`` and ``network6`` are each optional, as in Traffic Router.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec

from streamplane.steering.errors import CzmapError, PrefixError
from streamplane.steering.model import Relation, Route, SiteInfo, normalise_prefix

__all__ = ["load_czmap", "parse_czmap"]


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


def parse_czmap(
    data: bytes | str, *, relation: Relation = "public", origin: str = "czmap"
) -> tuple[list[Route], dict[str, SiteInfo]]:
    """:func:`load_czmap` on the file's contents; ``origin`` names it in errors."""
    try:
        document: Any = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise CzmapError(f"{origin}: not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise CzmapError(f"{origin}: expected a JSON object with 'coverageZones'")
    zones = document.get("coverageZones")
    if not isinstance(zones, dict):
        raise CzmapError(f"{origin}: 'coverageZones' is missing or not an object of cache groups")
    routes: list[Route] = []
    sites: dict[str, SiteInfo] = {}
    for group, zone in zones.items():
        where = f"{origin}: cache group {group!r}"
        if not group:
            raise CzmapError(f"{origin}: a cache group has an empty name")
        if not isinstance(zone, dict):
            raise CzmapError(f"{where}: expected an object with coordinates/network/network6")
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
