"""Apache Traffic Control coverage zones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from streamplane.steering import (
    Client,
    CoverageZones,
    CzmapError,
    EdgeCandidate,
    RoutingTable,
    SiteInfo,
    Steering,
    load_czmap,
    parse_czmap,
)

# The layout of Traffic Router's czmap.json (customerName and revision are informative).
CZMAP = {
    "revision": "Mon Dec 21 15:04:01 2015",
    "customerName": "Kabletown",
    "coverageZones": {
        "cache-group-ams": {
            "coordinates": {"latitude": 52.37, "longitude": 4.9},
            "network": ["192.0.2.0/24", "198.51.100.0/25"],
            "network6": ["2001:DB8:1::/48"],
        },
        "cache-group-fra": {
            "coordinates": {"latitude": 50.11, "longitude": 8.68},
            "network": ["198.51.100.0/24"],
            "network6": ["2001:db8::/32", "2001:db8::/32"],
        },
        "cache-group-bare": {},
    },
}


def test_load_czmap(tmp_path: Path) -> None:
    path = tmp_path / "czmap.json"
    path.write_text(json.dumps(CZMAP))
    routes, sites = load_czmap(path)
    assert sites == {
        "cache-group-ams": SiteInfo("cache-group-ams", 52.37, 4.9),
        "cache-group-fra": SiteInfo("cache-group-fra", 50.11, 8.68),
        "cache-group-bare": SiteInfo("cache-group-bare", None, None),
    }
    assert sorted((r.site, r.prefix) for r in routes) == [
        ("cache-group-ams", "192.0.2.0/24"),
        ("cache-group-ams", "198.51.100.0/25"),
        ("cache-group-ams", "2001:db8:1::/48"),
        ("cache-group-fra", "198.51.100.0/24"),
        ("cache-group-fra", "2001:db8::/32"),
    ]
    assert {(r.source, r.relation) for r in routes} == {("czmap", "public")}
    routes, _ = load_czmap(path, relation="embedded")
    assert {r.relation for r in routes} == {"embedded"}


def test_czmap_steers_through_the_table() -> None:
    routes, sites = parse_czmap(json.dumps(CZMAP))
    steering = Steering(RoutingTable(routes), sites=sites)
    fleet = [
        EdgeCandidate(edge_id="ams-1", site="cache-group-ams", base_url="https://ams-1"),
        EdgeCandidate(edge_id="fra-1", site="cache-group-fra", base_url="https://fra-1"),
    ]
    # In both sites' prefixes, the /25 of ams is longer.
    ranked = steering.rank(Client(address="198.51.100.10"), "t", "s", fleet)
    assert [r.edge_id for r in ranked] == ["ams-1", "fra-1"]
    assert ranked[0].prefix == "198.51.100.0/25"
    ranked = steering.rank(Client(address="198.51.100.200"), "t", "s", fleet)
    assert [r.edge_id for r in ranked] == ["fra-1", "ams-1"]
    # No prefix at all: the cache groups' coordinates still order the edges.
    in_frankfurt = Client(address="192.0.2.200", lat=50.0, lon=8.5)
    ranked = steering.rank(in_frankfurt, "t", "s", fleet)
    assert [r.edge_id for r in ranked] == ["ams-1", "fra-1"]  # ams covers 192.0.2.0/24
    ranked = steering.rank(Client(address="203.0.113.1", lat=50.0, lon=8.5), "t", "s", fleet)
    assert [r.edge_id for r in ranked] == ["fra-1", "ams-1"]
    assert ranked[0].distance_km is not None and ranked[0].distance_km < 30


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{", "not JSON"),
        ("[]", "expected a JSON object with 'coverageZones'"),
        ('{"revision": "1"}', "'coverageZones' is missing"),
        # Strict: a misspelt key is named, not ignored (it left a zone quietly empty).
        (
            '{"coverageZone": {}}',
            "unknown key 'coverageZone' .*did you mean 'coverageZones'",
        ),
        (
            '{"coverageZones": {"g": {"networks": ["10.0.0.0/8"]}}}',
            r"cache group 'g': unknown key 'networks' \(a cache group key has coordinates, "
            r"network, network6\); did you mean 'network'\?",
        ),
        (
            '{"coverageZones": {"g": {"coordinates": {"lat": 52, "longitude": 4}}}}',
            "cache group 'g', 'coordinates': unknown key 'lat'",
        ),
        # A key given twice: the second silently replaced the first.
        (
            '{"coverageZones": {"g": {"network": ["10.0.0.0/8"]}, "g": {}}}',
            "cache group 'g' is given twice in 'coverageZones'",
        ),
        (
            '{"coverageZones": {"g": {"network": ["10.0.0.0/8"], "network": []}}}',
            "cache group 'g': cache group key 'network' is given twice",
        ),
        (
            '{"coverageZones": {"g": {"coordinates": {"latitude": NaN, "longitude": 0}}}}',
            "not JSON: NaN is not a JSON number",
        ),
        ('{"coverageZones": {"g": []}}', "cache group 'g': expected an object"),
        (
            '{"coverageZones": {"g": {"network": ["10.0.0.0/8", "10.1.2.3/8"]}}}',
            r"cache group 'g', 'network'\[1\]: bad prefix '10.1.2.3/8'.*did you mean 10.0.0.0/8",
        ),
        (
            '{"coverageZones": {"g": {"network": ["2001:db8::/32"]}}}',
            "is an IPv6 prefix; it belongs in 'network6'",
        ),
        (
            '{"coverageZones": {"g": {"network6": ["10.0.0.0/8"]}}}',
            "is an IPv4 prefix; it belongs in 'network'",
        ),
        ('{"coverageZones": {"g": {"network": "10.0.0.0/8"}}}', "must be a list of CIDR"),
        ('{"coverageZones": {"g": {"network": [10]}}}', r"\[0\] must be a CIDR string"),
        (
            '{"coverageZones": {"g": {"coordinates": {"latitude": 91, "longitude": 0}}}}',
            "coordinates.latitude 91 is outside ±90",
        ),
        (
            '{"coverageZones": {"g": {"coordinates": {"latitude": "52"}}}}',
            "coordinates.latitude must be a number",
        ),
    ],
)
def test_malformed_files_are_named(document: str, message: str) -> None:
    with pytest.raises(CzmapError, match=message):
        parse_czmap(document, origin="zones.json")
    with pytest.raises(CzmapError, match=r"^zones\.json"):
        parse_czmap(document, origin="zones.json")


def test_bytes_that_are_not_utf8_are_named() -> None:
    with pytest.raises(CzmapError, match=r"^zones\.json: not JSON: .*utf-8"):
        parse_czmap(b'{"coverageZones": {"\xff": {}}}', origin="zones.json")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CzmapError, match=r"cannot read coverage-zone file .*nope\.json"):
        load_czmap(tmp_path / "nope.json")


def test_a_misspelt_key_in_a_real_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "czmap.json"
    path.write_text('{"coverageZones": {"ams": {"networks": ["192.0.2.0/24"]}}}')
    with pytest.raises(CzmapError, match=rf"^{tmp_path}/czmap\.json: cache group 'ams'"):
        load_czmap(path)


def _write(path: Path, document: object) -> None:
    # As an operator's deploy does: a new file renamed over the old one.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(document if isinstance(document, str) else json.dumps(document))
    tmp.replace(path)


def test_coverage_zones_reload_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "czmap.json"
    _write(path, {"coverageZones": {"ams": {"network": ["192.0.2.0/24"]}}})
    loaded: list[list[str]] = []
    now = [1000.0]
    zones = CoverageZones(
        path,
        on_load=lambda routes, _: loaded.append([r.prefix for r in routes]),
        clock=lambda: now[0],
    )
    assert [r.prefix for r in zones.routes] == ["192.0.2.0/24"]
    assert zones.check() is False and loaded == []  # unchanged: not read again
    assert zones.health()["status"] == "ok"

    now[0] = 2000.0
    _write(path, {"coverageZones": {"ams": {"network": ["198.51.100.0/24"]}, "fra": {}}})
    assert zones.check() is True
    assert loaded == [["198.51.100.0/24"]] and set(zones.sites) == {"ams", "fra"}
    assert (zones.loaded_at, zones.reloads) == (2000.0, 1)

    # A bad file: the table in use stays, and health and the error say why.
    _write(path, {"coverageZones": {"ams": {"networks": ["203.0.113.0/24"]}}})
    assert zones.check() is False
    assert loaded == [["198.51.100.0/24"]]
    assert [r.prefix for r in zones.routes] == ["198.51.100.0/24"]
    health = zones.health()
    assert health["status"] == "degraded"
    assert "unknown key 'networks'" in health["problems"][0]
    assert "still using the table read at" in health["problems"][0]
    assert zones.check() is False and zones.failures == 1  # the same bad file: not re-read

    # Fixed: loaded, and healthy again.
    _write(path, {"coverageZones": {"ams": {"network": ["203.0.113.0/24"]}}})
    assert zones.check() is True
    assert loaded[-1] == ["203.0.113.0/24"]
    assert zones.health()["status"] == "ok" and zones.error is None

    # Removed: the table stays too.
    path.unlink()
    assert zones.check() is False
    assert "cannot read coverage-zone file" in (zones.error or "")
    assert [r.prefix for r in zones.routes] == ["203.0.113.0/24"]


def test_reload_reads_the_file_even_if_it_looks_unchanged(tmp_path: Path) -> None:
    """What SIGHUP does: a file rewritten within one timestamp tick is still read."""
    path = tmp_path / "czmap.json"
    _write(path, {"coverageZones": {"ams": {"network": ["192.0.2.0/24"]}}})
    zones = CoverageZones(path)
    stat = path.stat()
    path.write_text(json.dumps({"coverageZones": {"ams": {"network": ["192.0.3.0/24"]}}}))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert zones.reload() is True
    assert [r.prefix for r in zones.routes] == ["192.0.3.0/24"]


def test_the_first_load_must_succeed(tmp_path: Path) -> None:
    path = tmp_path / "czmap.json"
    path.write_text('{"coverageZones": {"a": {}, "a": {}}}')
    with pytest.raises(CzmapError, match="given twice"):
        CoverageZones(path)
