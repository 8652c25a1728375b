"""Fill plans: what each edge must hold, fetch and delete to go from yesterday to today. Pure.

An edge receives its plan as JSON on `POST /fill` and works through it off-peak:
1. `drop`, coldest first: frees room before anything arrives;
2. `add`, densest first (most requests per byte), so that if the fill window closes early the
   titles it did fetch are the ones that earn the most traffic for the bytes moved. Each entry
   names `peers`, servers of the same site that hold the title already: fetching from a peer
   keeps the fill off the upstream link; with no peer, the edge fetches from the origin;
3. `hold` is the whole inventory after the fill, densest first: an edge that lost its disk
   rebuilds from it.

Churn is the bytes refilled (copies added, summed over servers) over the bytes stored: the fill
traffic a day of placement costs. Copies dropped cost no fill and are counted apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec

from streamplane.placement.model import Placement

FILL_FORMAT = "streamplane.fill/1"


class FillTitle(msgspec.Struct, omit_defaults=True):
    title: str
    size_bytes: int
    peers: list[str] = []


class FillPlan(msgspec.Struct):
    format: str
    server: str
    site: str
    storage_bytes: int
    hold_bytes: int
    add_bytes: int
    drop_bytes: int
    add: list[FillTitle]
    drop: list[FillTitle]
    hold: list[str]


@dataclass(frozen=True)
class Churn:
    added_bytes: int  # refilled: summed over servers, a copy on a new server counts
    dropped_bytes: int
    stored_bytes: int
    added_copies: int
    dropped_copies: int

    @property
    def ratio(self) -> float:
        return self.added_bytes / self.stored_bytes if self.stored_bytes else 0.0


def churn(
    placement: Placement,
    previous: Mapping[str, Sequence[str]] | None,
    previous_sizes: Mapping[str, int] | None = None,
) -> Churn:
    """Bytes the edges must fetch to go from `previous` (title -> servers) to `placement`."""
    previous = previous or {}
    sizes = placement.catalog.size_bytes.tolist()
    now = placement.holder_map()
    index = placement.catalog.index()
    added = dropped = added_copies = dropped_copies = 0
    for title, servers in now.items():
        old = previous.get(title, ())
        fresh = sum(1 for s in servers if s not in old)
        gone = sum(1 for s in old if s not in servers)
        size = sizes[index[title]]
        added += fresh * size
        added_copies += fresh
        dropped += gone * size
        dropped_copies += gone
    known = previous_sizes or {}
    for title, old in previous.items():
        if title not in now:
            dropped_copies += len(old)
            i = index.get(title)
            dropped += len(old) * (sizes[i] if i is not None else known.get(title, 0))
    return Churn(added, dropped, int(placement.server_bytes.sum()), added_copies, dropped_copies)


def fill_plans(
    placement: Placement,
    previous: Mapping[str, Sequence[str]] | None = None,
    previous_sizes: Mapping[str, int] | None = None,
) -> list[FillPlan]:
    """One plan per server of `placement`, against `previous` (title -> servers), if any."""
    previous = previous or {}
    known = previous_sizes or {}
    cat = placement.catalog
    sizes = cat.size_bytes.tolist()
    names = [s.id for s in placement.servers]
    slot = {name: i for i, name in enumerate(names)}
    rows = placement.holders.tolist()
    hold: list[list[str]] = [[] for _ in names]
    add: list[list[FillTitle]] = [[] for _ in names]
    drop: list[list[FillTitle]] = [[] for _ in names]
    for j in cat.ranking().tolist():  # densest first
        title = cat.ids[j]
        servers = [names[s] for s in rows[j] if s >= 0]
        old = previous.get(title, ())
        peers = [s for s in servers if s in old]
        for s in servers:
            hold[slot[s]].append(title)
            if s not in old:
                add[slot[s]].append(FillTitle(title, sizes[j], peers))
        for s in old:
            if s in slot and s not in servers:
                drop[slot[s]].append(FillTitle(title, sizes[j]))
    # Drops go coldest first; titles gone from today's catalog go before any of them.
    in_catalog = cat.index()
    retired: list[list[FillTitle]] = [[] for _ in names]
    for title in sorted(t for t in previous if t not in in_catalog):
        for s in previous[title]:
            if s in slot:
                retired[slot[s]].append(FillTitle(title, known.get(title, 0)))
    plans = []
    for i, server in enumerate(placement.servers):
        drops = retired[i] + drop[i][::-1]
        plans.append(
            FillPlan(
                format=FILL_FORMAT,
                server=server.id,
                site=server.site,
                storage_bytes=server.storage_bytes,
                hold_bytes=int(placement.server_bytes[i]),
                add_bytes=sum(a.size_bytes for a in add[i]),
                drop_bytes=sum(d.size_bytes for d in drops),
                add=add[i],
                drop=drops,
                hold=hold[i],
            )
        )
    return plans
