"""Who the client is behind proxies: the chain walk (pure) and the real app under uvicorn."""

from __future__ import annotations

import ipaddress
import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st

from streamplane.control import create_app, server_config
from streamplane.edge.forwarded import (
    client_address,
    forwarded_chain,
    parse_networks,
    x_forwarded_for_chain,
)

from .conftest import Db, control_settings, free_port, heartbeat, serving, write_title

TRUSTED = parse_networks(["10.0.0.0/8", "2001:db8:1::/48"])

_trusted_v4 = st.integers(0, 2**24 - 1).map(lambda n: str(ipaddress.IPv4Address((10 << 24) + n)))
_trusted_v6 = st.integers(0, 2**80 - 1).map(
    lambda n: str(ipaddress.IPv6Address((0x20010DB80001 << 80) + n))
)
trusted_hop = st.one_of(_trusted_v4, _trusted_v6)
# public addresses, outside both trusted networks
untrusted_hop = st.one_of(
    st.integers(11 << 24, (224 << 24) - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
    st.integers(0, 2**64 - 1).map(lambda n: str(ipaddress.IPv6Address((0x2A00 << 112) + n))),
)
# anything a client may write into the left of the chain
forged = st.lists(st.one_of(untrusted_hop, trusted_hop, st.text(max_size=20)), max_size=5)


@given(st.one_of(trusted_hop, untrusted_hop), forged)
def test_without_trusted_proxies_the_peer_is_the_client(peer: str, chain: list[str]) -> None:
    assert client_address(peer, chain, ()) == peer


@given(untrusted_hop, forged)
def test_an_untrusted_peer_is_the_client_whatever_it_forwards(peer: str, chain: list[str]) -> None:
    assert client_address(peer, chain, TRUSTED) == peer


@given(forged, untrusted_hop, st.lists(trusted_hop, max_size=4), trusted_hop)
def test_the_client_is_the_first_untrusted_hop_from_the_right(
    left: list[str], client: str, proxies: list[str], peer: str
) -> None:
    # whatever the client wrote to its left is never read
    assert client_address(peer, [*left, client, *proxies], TRUSTED) == client


@given(st.lists(trusted_hop, min_size=1, max_size=4), trusted_hop)
def test_when_every_hop_is_trusted_the_leftmost_is_the_client(chain: list[str], peer: str) -> None:
    assert client_address(peer, chain, TRUSTED) == chain[0]


@given(forged, st.lists(trusted_hop, max_size=3), trusted_hop)
def test_a_hop_that_is_no_address_where_the_walk_needs_it_is_unknown(
    left: list[str], proxies: list[str], peer: str
) -> None:
    assert client_address(peer, [*left, "unknown", *proxies], TRUSTED) is None


@given(st.lists(st.tuples(st.one_of(untrusted_hop, trusted_hop), st.integers(1, 65535))))
def test_both_headers_give_the_same_chain(hops: list[tuple[str, int]]) -> None:
    def bracket(a: str) -> str:
        return f"[{a}]" if ":" in a else a

    xff = ", ".join(bracket(a) + f":{port}" for a, port in hops)
    fwd = ", ".join(f'for="{bracket(a)}:{port}";proto=https' for a, port in hops)
    peer = "10.0.0.1"
    expected = client_address(peer, [a for a, _ in hops], TRUSTED)
    assert client_address(peer, x_forwarded_for_chain([xff] if hops else []), TRUSTED) == expected
    assert client_address(peer, forwarded_chain([fwd] if hops else []), TRUSTED) == expected


def test_forwarded_as_rfc_7239_writes_it() -> None:
    values = [
        'for=192.0.2.43, for="[2001:db8:cafe::17]:4711"',
        'For="198.51.100.17";by=10.0.0.1;proto=https, proto=http;for=10.1.1.1',
    ]
    assert forwarded_chain(values) == [
        "192.0.2.43",
        "[2001:db8:cafe::17]:4711",
        "198.51.100.17",
        "10.1.1.1",
    ]
    # a comma inside a quoted string does not split elements; a bad element is no address
    assert forwarded_chain(['for="a,b";by=x, garbage, for=_hidden']) == ["a,b", "", "_hidden"]
    assert client_address("10.0.0.1", forwarded_chain(["for=_hidden"]), TRUSTED) is None


def test_ipv4_mapped_peers_match_ipv4_networks() -> None:
    assert client_address("::ffff:10.1.2.3", ["198.51.100.7"], TRUSTED) == "198.51.100.7"


def test_a_bad_network_is_named() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33'"):
        parse_networks(["10.0.0.0/8", "10.0.0.0/33"])


# -- the real app, served as `streamplane control` serves it ---------------------------------


def _app(tmp_path: Path, **control: object) -> FastAPI:
    catalog = tmp_path / "catalog"
    write_title(catalog, "demo")
    czmap = tmp_path / "czmap.json"
    czmap.write_text(
        json.dumps(
            {
                "coverageZones": {
                    "lb": {"network": ["127.0.0.0/8"]},  # where the balancer is
                    "near": {"network": ["203.0.113.0/24"]},  # where the viewer is
                    "spoofed": {"network": ["198.51.100.0/24"]},
                }
            }
        )
    )
    db = Db("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'control.db'}")
    # development mode: the edges heartbeat unsigned (who the client is is under test here)
    settings = control_settings(
        db, catalog, czmap=str(czmap), slow_start_s=0.0, dev_mode=True, **control
    )
    return create_app(settings)


def _first_edge(base: str, headers: dict[str, str]) -> str:
    with httpx.Client(base_url=base) as client:
        for edge_id in ("lb", "near", "spoofed"):
            hb = heartbeat(f"e-{edge_id}", ("demo",), site=edge_id, sent_at=time.time())
            assert client.post("/v1/fleet/heartbeat", json=hb).status_code == 200
        body = {"email": f"v-{uuid.uuid4().hex[:8]}@example.com", "password": "correct horse"}
        assert client.post("/v1/accounts", json=body).status_code == 201
        token = client.post("/v1/auth/login", json=body).json()["access_token"]
        r = client.post(
            "/v1/playback",
            json={"title": "demo", "device": "tv"},
            headers={"Authorization": f"Bearer {token}", **headers},
        )
        assert r.status_code == 200, r.text
        return str(r.json()["edges"][0]["edge_id"])


def test_forwarded_headers_are_believed_only_from_trusted_proxies(tmp_path: Path) -> None:
    # The client connects from 127.0.0.1, the balancer's zone. Untrusted (the default), what
    # it says it forwards for changes nothing (uvicorn's own default would have believed
    # X-Forwarded-For from 127.0.0.1); trusted, the first hop left of it that it does not
    # trust is the client, and what the client wrote further left is ignored.
    chain = {"X-Forwarded-For": "198.51.100.66, 203.0.113.9"}
    app = _app(tmp_path / "a")
    with serving(app, server_config(app, "127.0.0.1", free_port(), log_level="warning")) as base:
        assert _first_edge(base, chain) == "e-lb"
    app = _app(tmp_path / "b", trusted_proxies=("127.0.0.1/32",))
    with serving(app, server_config(app, "127.0.0.1", free_port(), log_level="warning")) as base:
        assert _first_edge(base, chain) == "e-near"
        assert _first_edge(base, {}) == "e-lb"  # no header: the peer itself
    app = _app(tmp_path / "c", trusted_proxies=("127.0.0.0/8",), trusted_proxy_header="forwarded")
    with serving(app, server_config(app, "127.0.0.1", free_port(), log_level="warning")) as base:
        fwd = {"Forwarded": 'for=198.51.100.66, for="203.0.113.9:4711";proto=https'}
        assert _first_edge(base, fwd) == "e-near"
        assert _first_edge(base, chain) == "e-lb"  # the other header is not read
