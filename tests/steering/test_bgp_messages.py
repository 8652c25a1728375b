"""ExaBGP's JSON API, parsed: lines as ExaBGP 5 writes them (captured from a real session)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streamplane.steering import (
    BgpMessageError,
    BgpNeighbor,
    Route,
    RouteChange,
    RoutingTable,
    apply_changes,
    exabgp_config,
    parse_exabgp_message,
)

HEAD = (
    '{ "exabgp": "5.0.0", "time": 1796162395.65, "host" : "vm", "pid" : 11681, "ppid" : 11679, '
    '"counter": 13, '
)
NEIGHBOR = (
    '"neighbor": { "address": { "local": "127.0.0.3", "peer": "127.0.0.2" }, '
    '"asn": { "local": 64512, "peer": 64500 }, "router-id": "127.0.0.3" , '
)
ANNOUNCE_V4 = (
    HEAD + '"type": "update", ' + NEIGHBOR + '"direction": "receive", "message": { "update": { '
    '"attribute": { "origin": "igp", "as-path": {"0": {"element": "as-sequence", '
    '"value": [64500, 64501]}}, "med": 10 }, '
    '"announce": { "ipv4 unicast": { "127.0.0.2": [ { "nlri": "203.0.113.0/24" }, '
    '{ "nlri": "198.51.100.0/24" } ] } } } } } }'
)
ANNOUNCE_V6 = (
    HEAD + '"type": "update", ' + NEIGHBOR + '"direction": "receive", "message": { "update": { '
    '"attribute": { "origin": "igp", "as-path": {"0": {"element": "as-sequence", '
    '"value": [64500]}}, "med": 5 }, '
    '"announce": { "ipv6 unicast": { "2001:db8::1": [ { "nlri": "2001:db8::/32" } ] } } } } } }'
)
WITHDRAW_V4 = (
    HEAD + '"type": "update", ' + NEIGHBOR + '"direction": "receive", "message": { "update": { '
    '"withdraw": { "ipv4 unicast": [ { "nlri": "203.0.113.0/24" } ] } } } } }'
)
EOR = (
    HEAD + '"type": "update", ' + NEIGHBOR + '"direction": "receive", '
    '"message": { "eor": { "afi" : "ipv4", "safi" : "unicast" } } } }'
)
STATE = HEAD + '"type": "state", ' + NEIGHBOR + '"state": "%s" } }'


def test_announcements() -> None:
    changes = parse_exabgp_message(ANNOUNCE_V4, "ams", relations={"127.0.0.2": "private"})
    assert [c.action for c in changes] == ["announce", "announce"]
    assert changes[0].route == Route(
        prefix="203.0.113.0/24",
        site="ams",
        as_path=(64500, 64501),
        med=10,
        relation="private",
        source="bgp",
        peer="127.0.0.2",
        next_hop="127.0.0.2",
    )
    assert changes[1].prefix == "198.51.100.0/24"
    (v6,) = parse_exabgp_message(ANNOUNCE_V6.encode(), "ams")
    assert v6.route is not None
    assert (v6.route.prefix, v6.route.med, v6.route.relation) == ("2001:db8::/32", 5, "public")


def test_withdrawals_state_and_the_rest() -> None:
    assert parse_exabgp_message(WITHDRAW_V4, "ams") == [
        RouteChange(action="withdraw", site="ams", peer="127.0.0.2", prefix="203.0.113.0/24")
    ]
    assert parse_exabgp_message(STATE % "down", "ams") == [
        RouteChange(action="reset", site="ams", peer="127.0.0.2", session="down")
    ]
    assert parse_exabgp_message(STATE % "up", "ams")[0].session == "up"
    assert parse_exabgp_message(STATE % "connected", "ams") == []
    assert parse_exabgp_message(EOR, "ams") == []
    assert parse_exabgp_message("done\n", "ams") == []
    assert parse_exabgp_message("", "ams") == []
    keepalive = HEAD + '"type": "keepalive", ' + NEIGHBOR + '"direction": "receive" } }'
    assert parse_exabgp_message(keepalive, "ams") == []


def _update(update: dict[str, Any]) -> str:
    return json.dumps(
        {
            "type": "update",
            "neighbor": {
                "address": {"local": "127.0.0.3", "peer": "192.0.2.1"},
                "message": {"update": update},
            },
        }
    )


def test_as_sets_count_as_one_and_other_shapes() -> None:
    (change,) = parse_exabgp_message(
        _update(
            {
                "attribute": {
                    "as-path": {
                        "0": {"element": "as-sequence", "value": [1, 2]},
                        "1": {"element": "as-set", "value": [9, 7, 8]},
                    }
                },
                "announce": {"ipv4 unicast": {"192.0.2.1": ["10.0.0.0/8"]}},  # compact NLRI
            }
        ),
        "ams",
    )
    assert change.route is not None
    assert change.route.as_path == (1, 2, 7) and change.route.med == 0
    # ExaBGP 4's flat list, and families steering ignores.
    changes = parse_exabgp_message(
        _update(
            {
                "attribute": {"as-path": [5, 6, 7], "med": 3},
                "announce": {
                    "ipv4 flow": {"no-nexthop": [{"destination-ipv4": "10.0.0.0/8"}]},
                    "ipv6 unicast": {"::1": [{"nlri": "2001:DB8::/32"}]},
                },
            }
        ),
        "ams",
    )
    assert [(c.prefix, c.route and c.route.as_path) for c in changes] == [
        ("2001:db8::/32", (5, 6, 7))
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"type": "update"}', "without a neighbor"),
        ('{"type": "update", "neighbor": {"address": {}}}', "neighbor.address.peer"),
        (
            _update({"announce": {"ipv4 unicast": {"x": [{"nlri": "10.1.2.3/8"}]}}}),
            "bad prefix '10.1.2.3/8'",
        ),
        (
            _update({"attribute": {"med": -1}, "announce": {}}),
            "MED -1",
        ),
        (_update({"attribute": {"as-path": "1 2"}}), "as-path"),
        (_update({"withdraw": {"ipv4 unicast": "10.0.0.0/8"}}), "expected a list of NLRI"),
    ],
)
def test_malformed_lines_are_named(line: str, message: str) -> None:
    with pytest.raises(BgpMessageError, match=message):
        parse_exabgp_message(line, "ams")


def test_applying_changes_keeps_peers_apart() -> None:
    table = RoutingTable([Route(prefix="203.0.113.0/24", site="ams", source="czmap")])
    apply_changes(table, parse_exabgp_message(ANNOUNCE_V4, "ams"))
    other_peer = ANNOUNCE_V4.replace('"peer": "127.0.0.2"', '"peer": "127.0.0.9"')
    apply_changes(table, parse_exabgp_message(other_peer, "ams"))
    assert table.lookup("198.51.100.1")["ams"].source == "bgp"
    apply_changes(table, parse_exabgp_message(WITHDRAW_V4, "ams"))
    # the czmap path and the other peer's path remain; the peer's path, whose AS path is
    # known, is preferred to the file's
    assert table.lookup("203.0.113.1")["ams"].peer == "127.0.0.9"
    apply_changes(table, parse_exabgp_message(STATE % "down", "ams"))
    assert table.lookup("198.51.100.1")["ams"].peer == "127.0.0.9"
    apply_changes(
        table, parse_exabgp_message(STATE.replace("127.0.0.2", "127.0.0.9") % "down", "ams")
    )
    assert table.lookup("198.51.100.1") == {}
    assert table.lookup("203.0.113.1")["ams"].source == "czmap"


def test_exabgp_config() -> None:
    config = exabgp_config(
        [
            BgpNeighbor(
                address="192.0.2.1", peer_as=64500, local_as=64512, local_address="192.0.2.2"
            ),
            BgpNeighbor(
                address="2001:db8::1",
                peer_as=64501,
                local_as=64512,
                local_address="2001:db8::2",
                passive=True,
            ),
        ],
        process="feed",
        command="/usr/bin/python3 /x/_relay.py /tmp/s.sock",
    )
    assert "run /usr/bin/python3 /x/_relay.py /tmp/s.sock;" in config
    assert "encoder json;" in config
    assert config.count("receive { parsed; update; }") == 2
    assert "neighbor 2001:db8::1 {" in config and "passive true;" in config
    assert "router-id 192.0.2.2;" in config and "router-id 127.0.0.1;" in config
