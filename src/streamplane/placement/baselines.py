"""The placements HCA is measured against. Pure, one copy per title, densest titles first.

* uniform: consistent hashing with every server weighted alike. A full server drops what
  hashes to it (a hole), as a ring that knows nothing of capacity does.
* capacity: consistent hashing weighted by storage. Bytes fit; traffic follows bytes.
* bounded: consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018)
  on both resources: a title goes to the first server in its uniform ranking that has room
  and whose expected traffic stays within (1 + epsilon) of its throughput share; when none
  does, to the first with room.

All three use the same rendezvous hash as HCA (`ring.py`): with equal weights that is
consistent hashing with infinitely many virtual nodes, the most even a ring can be, so any gap
to HCA is the algorithm's and not the hash's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from streamplane.placement import ring
from streamplane.placement.assign import assign
from streamplane.placement.model import Catalog, Placement, Server, check_servers

BOUNDED_EPSILON = 0.25


def uniform(servers: Sequence[Server], catalog: Catalog) -> Placement:
    return _hashed("uniform", servers, catalog, np.ones(len(servers)), spill=False)


def capacity_weighted(servers: Sequence[Server], catalog: Catalog) -> Placement:
    storage = np.array([s.storage_bytes for s in servers], dtype=np.float64)
    return _hashed("capacity", servers, catalog, storage / storage.sum(), spill=False)


def bounded_loads(
    servers: Sequence[Server], catalog: Catalog, epsilon: float = BOUNDED_EPSILON
) -> Placement:
    tput = np.array([s.throughput_bps for s in servers], dtype=np.float64)
    cap = (1 + epsilon) * tput / tput.sum()
    return _hashed("bounded", servers, catalog, np.ones(len(servers)), spill=True, traffic_cap=cap)


def _hashed(
    name: str,
    servers: Sequence[Server],
    catalog: Catalog,
    weights: NDArray[np.float64],
    *,
    spill: bool,
    traffic_cap: NDArray[np.float64] | None = None,
) -> Placement:
    check_servers(servers)
    exp = ring.exponentials(ring.title_keys(catalog.ids), ring.server_keys([s.id for s in servers]))
    prefs = ring.preference(exp, weights) if spill else ring.top(exp, weights, 1)
    storage = np.array([s.storage_bytes for s in servers], dtype=np.float64)
    done = assign(
        catalog.size_bytes,
        catalog.traffic,
        catalog.ranking(),
        prefs,
        np.ones(len(catalog), dtype=np.int64),
        storage,
        spill=spill,
        traffic_cap=traffic_cap,
    )
    return Placement.build(name, servers, catalog, done.holders)


ALGORITHMS = {
    "uniform": uniform,
    "capacity": capacity_weighted,
    "bounded": bounded_loads,
}
