"""From each title's ranked servers to an assignment that never overfills a server. Pure.

Titles are taken densest first, so when a server runs out of room it is the least valuable
bytes (the fewest requests per byte) that go elsewhere. With `spill`, a replica whose server is
full walks down the title's own ranking to the next server with room, which keeps the choice
stable from day to day; without it the replica is dropped, as a plain hash ring drops a title
its server cannot hold (a hole when it was the only copy).

Most titles fit where their hash sends them, so the prefix of the order up to the first
overflow is accepted as one vector operation; only the rest is walked title by title.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True, eq=False)
class Assignment:
    holders: NDArray[np.int32]  # (titles, max replicas), -1 where none
    spilled: int  # replicas placed off their first-choice servers
    dropped: int  # extra replicas that found no room (not holes: the title has a copy)


def assign(
    sizes: NDArray[np.int64],
    traffic: NDArray[np.float64],
    order: NDArray[np.intp],
    prefs: NDArray[np.intp],
    replicas: NDArray[np.int64],
    capacity: NDArray[np.float64],
    *,
    spill: bool = True,
    traffic_cap: NDArray[np.float64] | None = None,
) -> Assignment:
    """Assign `replicas[j]` distinct servers to each title j, in `order`, within `capacity`.

    `prefs[j]` ranks the servers for title j (at least `replicas[j]` of them). With
    `traffic_cap`, a server also refuses a replica that would take its expected traffic past
    its cap (bounded loads); when no server has both room and load to spare, storage alone
    decides.
    """
    n_titles = len(sizes)
    width = int(replicas.max()) if n_titles else 1
    holders = np.full((n_titles, width), -1, dtype=np.int32)
    if n_titles == 0:
        return Assignment(holders, 0, 0)
    start = (
        0 if traffic_cap is not None else _fitting_prefix(sizes, order, prefs, replicas, capacity)
    )
    used = np.zeros(len(capacity), dtype=np.float64)
    if start:
        head = order[:start]
        slots = np.arange(width)[None, :] < replicas[head, None]
        chosen = prefs[head, :width]
        holders[head, :] = np.where(slots, chosen, -1)
        used += np.bincount(
            chosen[slots],
            weights=np.broadcast_to(sizes[head, None], slots.shape)[slots],
            minlength=len(capacity),
        )
    free = (capacity - used).tolist()
    load = [0.0] * len(capacity)
    caps = None if traffic_cap is None else traffic_cap.tolist()
    rest = order[start:]
    size_of = sizes[rest].tolist()
    share_of = (traffic[rest] / np.maximum(replicas[rest], 1)).tolist()
    want_of = replicas[rest].tolist()
    rows = prefs[rest].tolist()
    out = holders[rest]
    spilled = dropped = 0
    for k, (size, share, want, ranked) in enumerate(
        zip(size_of, share_of, want_of, rows, strict=True)
    ):
        candidates = ranked if spill else ranked[:want]
        got: list[int] = []
        if caps is not None:
            for s in candidates:
                if free[s] >= size and load[s] + share <= caps[s]:
                    got.append(s)
                    if len(got) == want:
                        break
        if len(got) < want:
            for s in candidates:
                if s not in got and free[s] >= size:
                    got.append(s)
                    if len(got) == want:
                        break
        for i, s in enumerate(got):
            free[s] -= size
            load[s] += share
            out[k, i] = s
        spilled += sum(1 for s in got if s not in ranked[:want])
        if got:
            dropped += want - len(got)
    holders[rest] = out
    return Assignment(holders, spilled, dropped)


def _fitting_prefix(
    sizes: NDArray[np.int64],
    order: NDArray[np.intp],
    prefs: NDArray[np.intp],
    replicas: NDArray[np.int64],
    capacity: NDArray[np.float64],
) -> int:
    """How many titles, in `order`, fit on their first-choice servers before any overflows."""
    width = int(replicas.max())
    slots = np.arange(width)[None, :] < replicas[order, None]
    server = prefs[order, :width][slots]  # flat, in processing order
    size = np.broadcast_to(sizes[order, None], slots.shape)[slots].astype(np.float64)
    position = np.broadcast_to(np.arange(len(order))[:, None], slots.shape)[slots]
    by_server = np.argsort(server, kind="stable")
    cum = np.cumsum(size[by_server])
    s_sorted = server[by_server]
    starts = np.searchsorted(s_sorted, np.arange(len(capacity)))
    before = np.concatenate(([0.0], cum))[starts]  # bytes of earlier servers' groups
    within = cum - before[s_sorted]
    over = within > capacity[s_sorted]
    if not over.any():
        return len(order)
    return int(position[by_server][over].min())
