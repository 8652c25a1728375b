"""GeoLite2 answers cached per network: the same answer as the database, for every address."""

from __future__ import annotations

import random

import pytest

from streamplane.steering import GeoLocator


@pytest.fixture(scope="module")
def uncached() -> GeoLocator:
    return GeoLocator(cache_size=0)


def _addresses(count: int) -> list[str]:
    rng = random.Random(4)
    out = [
        f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
        for _ in range(count)
    ]
    out += [
        f"2a0{rng.randrange(10)}:{rng.randrange(65536):x}::{rng.randrange(65536):x}"
        for _ in range(count // 5)
    ]
    # Neighbours of those, so that most of these hit a cached network.
    out += [a.rsplit(".", 1)[0] + f".{rng.randrange(256)}" for a in out[:count] if "." in a]
    return out


def test_the_cache_answers_as_the_database(uncached: GeoLocator) -> None:
    cached = GeoLocator(cache_size=1_000)  # small: it also starts afresh along the way
    odd = [
        "81.2.69.160",
        "::ffff:81.2.69.160",
        "10.0.0.1",
        "::1",
        "192.0.2.1",
        "not an address",
        "203.0.113.0/24",
        "",
        "fe80::1%eth0",
        "1.2.3",
        "01.2.3.4",
        "0x1.2.3.4",
        " 1.2.3.4",
        "::1.2.3.4",
        "2001:DB8::1",
    ]
    for address in _addresses(3_000) + odd + odd:
        assert cached.locate(address) == uncached.locate(address), address


def test_a_network_is_looked_up_once(uncached: GeoLocator) -> None:
    cached = GeoLocator()
    london = cached.locate("81.2.69.160")
    assert london is not None
    cached._reader.close()  # from here on, only the cache can answer
    assert cached.locate("81.2.69.161") == london  # same GeoLite2 network
    assert cached.locate("81.2.69.160") == london
