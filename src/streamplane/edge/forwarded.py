"""Who the client is, behind proxies that say whom they forward for.

Steering ranks edges by the client's address. Behind a load balancer, the TCP peer is the
balancer; the balancer names the client in ``X-Forwarded-For`` (``client, proxy1, proxy2``:
each proxy appends the address it received from) or ``Forwarded`` (RFC 7239:
``for=192.0.2.60;proto=https, for="[2001:db8::17]:4711"``). Anyone can send those headers,
so they are believed only from a trusted proxy, and only as far as trusted proxies wrote them:
:func:`client_address` walks the chain from the TCP peer leftwards while each hop is trusted,
and the first hop that is not is the client. Entries to the left of it were written by the
client itself (or by proxies nobody vouches for) and are never read.

A pure core: plain strings in, an address (or None: unknown) out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "Network",
    "client_address",
    "forwarded_chain",
    "forwarded_client",
    "parse_networks",
    "x_forwarded_for_chain",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# One parameter of a Forwarded element: a token, "=", a token or a quoted string.
_PAIR: Final = re.compile(
    r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[!#$%&\'*+.^_`|~0-9A-Za-z:\[\]-]*)\s*'
)


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """The networks of ``cidrs`` (``10.0.0.0/8``, ``2001:db8::/32``, a lone address);
    ValueError naming the first that is none."""
    out = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError as err:
            raise ValueError(f"{cidr!r} is not a network (CIDR) or an address: {err}") from None
    return tuple(out)


def client_address(peer: str, chain: Sequence[str], trusted: Sequence[Network]) -> str | None:
    """The client's address, or None when it cannot be known.

    ``peer`` is the TCP peer; ``chain`` the forwarded-for entries, leftmost (furthest) first,
    as :func:`x_forwarded_for_chain` or :func:`forwarded_chain` read them from the headers.
    The peer and then each entry from the right are the client unless they are in
    ``trusted``; an entry that is no address (``unknown``, an obfuscated name, garbage) where
    the walk needs it means the client is unknown. When every hop is trusted, the leftmost is
    the client.
    """
    hop = _address(peer)
    if hop is None or not _trusted(hop, trusted):
        return None if hop is None else str(hop)
    for entry in reversed(chain):
        hop = _address(entry)
        if hop is None:
            return None
        if not _trusted(hop, trusted):
            return str(hop)
    return str(hop)


def forwarded_client(
    peer: str, values: Sequence[str], trusted: Sequence[Network], header: str
) -> str | None:
    """The client of a request from ``peer`` whose ``header`` lines (``x-forwarded-for`` or
    ``forwarded``) are ``values``: :func:`client_address` over that header's chain. Without
    ``trusted`` proxies the headers are not even parsed: the peer is the client."""
    if not trusted or not values:
        return client_address(peer, [], trusted)
    chain = forwarded_chain(values) if header == "forwarded" else x_forwarded_for_chain(values)
    return client_address(peer, chain, trusted)


def x_forwarded_for_chain(values: Iterable[str]) -> list[str]:
    """The entries of X-Forwarded-For header lines (in order), leftmost first."""
    return [entry.strip() for value in values for entry in value.split(",")]


def forwarded_chain(values: Iterable[str]) -> list[str]:
    """The ``for=`` node of each element of Forwarded header lines (RFC 7239), leftmost first.

    An element without ``for`` or that does not parse gives ``""`` (no address): the walk
    stops there if it gets that far.
    """
    return [_for_node(element) for value in values for element in _elements(value)]


def _elements(value: str) -> list[str]:
    """``value`` split at the commas outside quoted strings."""
    out: list[str] = []
    start = 0
    quoted = escaped = False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append(value[start:i])
            start = i + 1
    out.append(value[start:])
    return out


def _for_node(element: str) -> str:
    node = ""
    pos = 0
    while pos < len(element):
        m = _PAIR.match(element, pos)
        if m is None:
            return ""
        if m.group(1).lower() == "for":
            text = m.group(2)
            if text.startswith('"'):
                text = re.sub(r"\\(.)", r"\1", text[1:-1])
            node = text
        pos = m.end()
        if pos < len(element):
            if element[pos] != ";":
                return ""
            pos += 1
    return node


def _address(text: str) -> _Address | None:
    """The address of a node: ``1.2.3.4``, ``1.2.3.4:80``, ``2001:db8::1``, ``[2001:db8::1]:80``."""
    host = text.strip()
    if host.startswith("["):
        end = host.find("]")
        if end < 0 or (end + 1 < len(host) and host[end + 1] != ":"):
            return None
        host = host[1:end]
    elif host.count(":") == 1:  # an IPv4 address and a port
        host = host.partition(":")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1, and matches 10.0.0.0/8
    return address


def _trusted(address: _Address, trusted: Sequence[Network]) -> bool:
    return any(address in network for network in trusted)
