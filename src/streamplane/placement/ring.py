"""Weighted consistent hashing: weighted rendezvous (highest random weight) hashing. Pure.

Each (title, server) pair gets a stable pseudo-random number u in (0, 1); a title's servers are
ranked by `-ln(u) / weight`, smallest first (Schindelhauer and Schomaker, 2005; the exponential
race of Moulton and Jiang's P-MinHash, 2018). The first server is chosen with probability
exactly weight / sum of weights; the first r are a weighted sample of r distinct servers, which
is how a title's replicas are placed.

Why rendezvous and not a ring of virtual nodes:
* Weights are real numbers and shares match them in expectation with no quantisation; a vnode
  ring needs hundreds of points per server to hold a share within a few per cent, and turning a
  weight from 0.31 to 0.32 means adding and removing points.
* Monotone: raising one server's weight (or adding a server) moves titles only *to* it;
  lowering it (or removing it) moves titles only *from* it. Nothing moves between bystanders.
* When weights change from p to q, a title keeps its server with probability
  J_P(p, q) = sum_i 1 / sum_j max(p_j / p_i, q_j / q_i), and J_P is Pareto optimal: no
  sampler that matches the weights keeps more for every pair of weights at once (Moulton and
  Jiang). HCA's head and tail rings share the one hash per (title, server) and differ only in
  weights, so a title that crosses the cutoff often stays on its server, and costs no refill
  when it does.
* The cost, O(servers) per title instead of O(log), is a few milliseconds for 10^5 titles and a
  site's tens of servers, as one numpy expression.

Hashes are stable across processes, machines and Python versions: blake2b of the id (never
Python's salted `hash()`), mixed per pair with the splitmix64 finaliser.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

_TITLE = b"sp-title"
_SERVER = b"sp-server"
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def stable_hash64(text: str, person: bytes = _TITLE) -> int:
    """A 64-bit hash of `text` that every machine and every Python computes alike."""
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=person).digest(), "little"
    )


def title_keys(ids: Sequence[str]) -> NDArray[np.uint64]:
    return np.fromiter((stable_hash64(t, _TITLE) for t in ids), dtype=np.uint64, count=len(ids))


def server_keys(ids: Sequence[str]) -> NDArray[np.uint64]:
    return np.fromiter((stable_hash64(s, _SERVER) for s in ids), dtype=np.uint64, count=len(ids))


def _mix(z: NDArray[np.uint64]) -> NDArray[np.uint64]:
    # splitmix64's finaliser: every input bit flips about half the output bits.
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def exponentials(titles: NDArray[np.uint64], servers: NDArray[np.uint64]) -> NDArray[np.float64]:
    """-ln(u) for every (title, server): a (titles, servers) matrix of Exp(1) variates."""
    z = _mix(titles[:, None] ^ (servers[None, :] * _GOLDEN))
    u = ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1), never 0 or 1
    return -np.log(u)


def scores(exp: NDArray[np.float64], weights: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rendezvous scores, smaller is preferred; +inf for a server of weight zero."""
    inverse = np.divide(1.0, weights, out=np.full(weights.shape, np.inf), where=weights > 0)
    return np.asarray(exp * inverse, dtype=np.float64)


def top(exp: NDArray[np.float64], weights: NDArray[np.float64], r: int) -> NDArray[np.intp]:
    """Each title's `r` most preferred servers, best first: a (titles, r) matrix."""
    s = scores(exp, weights)
    if r == 1:
        return np.asarray(np.argmin(s, axis=1)[:, None], dtype=np.intp)
    part = np.argpartition(s, r - 1, axis=1)[:, :r]
    order = np.argsort(np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def preference(exp: NDArray[np.float64], weights: NDArray[np.float64]) -> NDArray[np.intp]:
    """Each title's full ranking of servers: the weighted ones by score, then the rest.

    The servers of weight zero come last, in their unweighted rendezvous order, so that a title
    that finds every weighted server full still spills to a stable choice.
    """
    # lexsort's last key is the primary one: score, then the unweighted race for the +inf ties.
    return np.lexsort((exp, scores(exp, weights)), axis=-1)


@dataclass(frozen=True)
class WeightedRing:
    """A weighted rendezvous ring over named servers."""

    servers: tuple[str, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.servers) != len(self.weights):
            raise ValueError(f"{len(self.servers)} servers but {len(self.weights)} weights")
        if any(w < 0 for w in self.weights) or not any(w > 0 for w in self.weights):
            raise ValueError("ring weights must be non-negative and not all zero")

    def owners(self, titles: Sequence[str], replicas: int = 1) -> list[tuple[str, ...]]:
        """Each title's `replicas` servers, most preferred first."""
        positive = sum(w > 0 for w in self.weights)
        if not 1 <= replicas <= positive:
            raise ValueError(f"{replicas} replicas on a ring of {positive} weighted servers")
        exp = exponentials(title_keys(titles), server_keys(self.servers))
        picks = top(exp, np.array(self.weights, dtype=np.float64), replicas)
        return [tuple(self.servers[i] for i in row) for row in picks.tolist()]
