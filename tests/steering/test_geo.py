"""GeoLite2 City from the maxminddb-geolite2 wheel."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamplane.steering import (
    Client,
    EdgeCandidate,
    GeoError,
    GeoLocator,
    RoutingTable,
    Steering,
    distance_km,
)


@pytest.fixture(scope="module")
def geo() -> GeoLocator:
    return GeoLocator()


def test_locates_public_addresses(geo: GeoLocator) -> None:
    london = geo.locate("81.2.69.160")  # MaxMind's own test address, in London
    assert london is not None
    assert distance_km(*london, 51.51, -0.13) < 50
    assert geo.locate("2001:4860:4860::8888") is not None


@pytest.mark.parametrize("address", ["10.0.0.1", "192.0.2.1", "::1", "not an address"])
def test_unknown_or_private_addresses(geo: GeoLocator, address: str) -> None:
    assert geo.locate(address) is None


def test_a_bad_database_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(GeoError, match=r"missing\.mmdb"):
        GeoLocator(tmp_path / "missing.mmdb")
    junk = tmp_path / "junk.mmdb"
    junk.write_bytes(b"not a database")
    with pytest.raises(GeoError, match=r"junk\.mmdb"):
        GeoLocator(junk)


def test_steering_uses_the_geolocation_unless_the_client_sends_coordinates(
    geo: GeoLocator,
) -> None:
    steering = Steering(RoutingTable(), geo)
    fleet = [
        EdgeCandidate(edge_id="lon", site="lon", base_url="https://lon", lat=51.51, lon=-0.13),
        EdgeCandidate(edge_id="nyc", site="nyc", base_url="https://nyc", lat=40.71, lon=-74.0),
    ]
    ranked = steering.rank(Client(address="81.2.69.160"), "t", "s", fleet)
    assert [r.edge_id for r in ranked] == ["lon", "nyc"]
    in_nyc = Client(address="81.2.69.160", lat=40.7, lon=-73.9)
    assert [r.edge_id for r in steering.rank(in_nyc, "t", "s", fleet)] == ["nyc", "lon"]
