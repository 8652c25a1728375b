"""Which cached objects an edge keeps: eviction policies over a byte budget. Pure.

The edge's disk cache (the shell) tells a policy what happens to objects, and the policy
answers what to delete. It does no I/O, reads no clock and draws no random numbers: the
same calls give the same answers on every machine, which is what makes a cache's contents
reproducible in tests and the benchmark (``bench/cache.py``) a fair comparison.

The shell calls :meth:`~EvictionPolicy.hit` for every request served from the cache,
:meth:`~EvictionPolicy.admit` when a missed object has been written completely (partial
objects are the shell's business and never reach the policy), and
:meth:`~EvictionPolicy.remove` when an object vanished (deleted, found corrupt). ``admit``
returns the keys to delete, in order, after which the residents fit in ``capacity_bytes``.
A policy may refuse the object it is given: then its key is among those returned. An
object larger than the whole capacity is always refused. Re-admitting a resident key
counts as a request for it and takes its new size.

Sizes are bytes and objects vary in size (segments of 0.5 to 2.5 MB, playlists of a few
KB), so every budget here is in bytes, not in entries. Every operation is O(1), amortised
where a queue re-inserts objects: the edge calls the policy on every request.

Policies:

- :class:`LruPolicy`: least recently used, the classic. One pass over many objects
  requested once (a crawler, a catalog fill, the long tail) flushes everything else.
- :class:`S3FifoPolicy`: S3-FIFO (Yang et al., "FIFO queues are all you need for cache
  eviction", SOSP 2023), in bytes. New objects enter a small FIFO (10 % of the bytes); an
  object requested at least twice while there (after the miss that brought it) moves on to
  the main FIFO, the others leave and are remembered, key only, in a ghost FIFO. An object
  missed again while its key is in the ghost goes straight to main. Main is FIFO with
  re-insertion: each object has a frequency capped at 3 (two bits); at the head, a
  non-zero one goes back to the tail one lower, a zero one is evicted. One-hit wonders
  thus pass through the small queue and never touch main.

Choices, where the paper leaves room or bytes change things (the reference is the
authors' libCacheSim ``S3FIFO.c``):

- The ghost remembers evicted objects up to 90 % of the capacity in their bytes, not a
  count of entries (libCacheSim's ``ghost-size-ratio``).
- Until the first eviction, an object that would overflow the small queue goes to main,
  as in libCacheSim's current version (the SOSP one kept filling the small queue): the
  cache fills completely before anything is judged, and a fresh policy given a previous
  one's :meth:`~EvictionPolicy.keys` in order holds them all, small queue first.
- An object larger than the small queue cannot pass through it (it would flush the queue
  on its own). After the first eviction such an object is refused at once and its key goes
  to the ghost, so its next miss admits it into main: it must be missed twice, as an object
  passing through the small queue unrequested would. libCacheSim refuses it for good.
- An object moving from small to main starts at frequency 0, as the authors describe.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, Literal, Protocol, get_args

__all__ = [
    "DEFAULT_POLICY",
    "POLICY_NAMES",
    "EvictionPolicy",
    "LruPolicy",
    "PolicyName",
    "S3FifoPolicy",
    "make_policy",
]

PolicyName = Literal["lru", "s3fifo"]
POLICY_NAMES: Final[tuple[PolicyName, ...]] = get_args(PolicyName)
DEFAULT_POLICY: Final[PolicyName] = "s3fifo"

# S3-FIFO's constants, the paper's and libCacheSim's defaults.
_MAX_FREQUENCY: Final = 3  # two bits
_MOVE_TO_MAIN: Final = 2  # requests while in the small queue that earn a place in main
_GHOST_FRACTION: Final = 0.9  # of the capacity, in the bytes of the objects remembered


class EvictionPolicy(Protocol):
    """What the edge's cache asks of a policy. Keys are cache paths, sizes bytes."""

    capacity_bytes: int  # fixed at construction: for another capacity, make a new policy

    @property
    def used_bytes(self) -> int:
        """The sum of the residents' sizes; at most ``capacity_bytes`` after each call."""
        ...

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...

    def hit(self, key: str, count: int = 1) -> None:
        """``count`` requests were served from the cached ``key``; unknown keys are ignored."""
        ...

    def admit(self, key: str, size: int) -> list[str]:
        """``key`` (``size`` bytes) is now complete in the cache: the keys to delete, in order.

        ``key`` itself is among them if the policy refuses it. A resident ``key`` takes the
        new size and counts as a request.
        """
        ...

    def remove(self, key: str) -> None:
        """``key`` is gone from the cache (deleted, corrupt); nothing happens if absent."""
        ...

    def keys(self) -> list[str]:
        """The residents, the next to be evicted first.

        Admitting them in this order into a fresh policy of the same capacity keeps them
        all. For a policy with more state than an order (frequencies, a ghost) the order
        is approximate: the queue structure survives, the history does not.
        """
        ...


def make_policy(name: PolicyName, capacity_bytes: int) -> EvictionPolicy:
    """The policy called ``name`` (one of :data:`POLICY_NAMES`) over ``capacity_bytes``."""
    if name == "lru":
        return LruPolicy(capacity_bytes)
    if name == "s3fifo":
        return S3FifoPolicy(capacity_bytes)
    raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


def _check_capacity(capacity_bytes: int) -> int:
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
        raise TypeError(f"capacity_bytes must be an int, not {type(capacity_bytes).__name__}")
    if capacity_bytes < 1:
        raise ValueError(f"capacity_bytes must be at least 1, not {capacity_bytes}")
    return capacity_bytes


def _check_size(key: str, size: int) -> None:
    if type(size) is int and size >= 0:  # the common case, in one test
        return
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"the size of {key!r} must be an int, not {type(size).__name__}")
    if size < 0:
        raise ValueError(f"the size of {key!r} is negative ({size})")


class LruPolicy:
    """Least recently used, in bytes: evict the objects requested longest ago."""

    __slots__ = ("_entries", "_used", "capacity_bytes")

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = _check_capacity(capacity_bytes)
        self._entries: OrderedDict[str, int] = OrderedDict()  # key -> size, oldest first
        self._used = 0

    def __repr__(self) -> str:
        return f"LruPolicy({self.capacity_bytes}): {len(self)} objects, {self._used} bytes"

    @property
    def used_bytes(self) -> int:
        return self._used

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def hit(self, key: str, count: int = 1) -> None:
        if key in self._entries:
            self._entries.move_to_end(key)

    def admit(self, key: str, size: int) -> list[str]:
        _check_size(key, size)
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self._used -= old
        if size > self.capacity_bytes:
            return [key]
        entries[key] = size
        self._used += size
        evicted: list[str] = []
        while self._used > self.capacity_bytes:
            victim, victim_size = entries.popitem(last=False)
            self._used -= victim_size
            evicted.append(victim)
        return evicted

    def remove(self, key: str) -> None:
        size = self._entries.pop(key, None)
        if size is not None:
            self._used -= size

    def keys(self) -> list[str]:
        return list(self._entries)


class S3FifoPolicy:
    """S3-FIFO in bytes: a small FIFO for newcomers, a main FIFO with 2-bit frequencies,
    and a ghost FIFO of keys recently evicted from the small one (see the module docstring).
    """

    __slots__ = (
        "_evicted_once",
        "_freq",
        "_ghost",
        "_ghost_bytes",
        "_ghost_capacity",
        "_main",
        "_main_bytes",
        "_main_capacity",
        "_small",
        "_small_bytes",
        "_small_capacity",
        "capacity_bytes",
    )

    def __init__(self, capacity_bytes: int, small_fraction: float = 0.1) -> None:
        self.capacity_bytes = _check_capacity(capacity_bytes)
        if not 0.0 < small_fraction < 1.0:
            raise ValueError(f"small_fraction must be between 0 and 1, not {small_fraction}")
        self._small_capacity = max(1, int(capacity_bytes * small_fraction))
        self._main_capacity = capacity_bytes - self._small_capacity
        self._ghost_capacity = int(capacity_bytes * _GHOST_FRACTION)
        # key -> size, oldest first; a resident is in exactly one of small and main.
        self._small: OrderedDict[str, int] = OrderedDict()
        self._main: OrderedDict[str, int] = OrderedDict()
        self._freq: dict[str, int] = {}  # every resident -> 0.._MAX_FREQUENCY
        self._ghost: OrderedDict[str, int] = OrderedDict()  # evicted from small: key -> size
        self._small_bytes = 0
        self._main_bytes = 0
        self._ghost_bytes = 0
        self._evicted_once = False

    def __repr__(self) -> str:
        return (
            f"S3FifoPolicy({self.capacity_bytes}): small {len(self._small)} objects "
            f"{self._small_bytes} bytes, main {len(self._main)} objects {self._main_bytes} "
            f"bytes, ghost {len(self._ghost)} keys {self._ghost_bytes} bytes"
        )

    @property
    def used_bytes(self) -> int:
        return self._small_bytes + self._main_bytes

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def hit(self, key: str, count: int = 1) -> None:
        freq = self._freq.get(key)
        if freq is not None and freq < _MAX_FREQUENCY:
            self._freq[key] = min(freq + count, _MAX_FREQUENCY)

    def admit(self, key: str, size: int) -> list[str]:
        _check_size(key, size)
        if key in self._freq:
            return self._resize(key, size)
        if size > self.capacity_bytes:
            return [key]
        ghost_size = self._ghost.pop(key, None)
        if ghost_size is not None:
            self._ghost_bytes -= ghost_size
            self._main[key] = size
            self._main_bytes += size
        elif self._small_bytes + size <= self._small_capacity:
            self._small[key] = size
            self._small_bytes += size
        elif not self._evicted_once:
            # Filling up: the small queue is full but the cache is not; nothing is judged yet.
            self._main[key] = size
            self._main_bytes += size
        elif size > self._small_capacity:
            # Too large to pass through the small queue: remembered as if it had, unrequested.
            self._remember(key, size)
            return [key]
        else:
            self._small[key] = size
            self._small_bytes += size
        self._freq[key] = 0
        return self._evict()

    def remove(self, key: str) -> None:
        if self._freq.pop(key, None) is None:
            return
        size = self._small.pop(key, None)
        if size is not None:
            self._small_bytes -= size
        else:
            self._main_bytes -= self._main.pop(key)

    def keys(self) -> list[str]:
        return [*self._small, *self._main]

    def _resize(self, key: str, size: int) -> list[str]:
        self.hit(key)
        if size > self.capacity_bytes:
            self.remove(key)
            return [key]
        if key in self._small:
            self._small_bytes += size - self._small[key]
            self._small[key] = size
        else:
            self._main_bytes += size - self._main[key]
            self._main[key] = size
        return self._evict()

    def _evict(self) -> list[str]:
        """Evict until the residents fit. One loop, not a method per queue: this runs on
        every admission and Python's calls cost more than the queue operations."""
        evicted: list[str] = []
        if self._small_bytes + self._main_bytes <= self.capacity_bytes:
            return evicted
        self._evicted_once = True
        small, main, freq = self._small, self._main, self._freq
        while self._small_bytes + self._main_bytes > self.capacity_bytes:
            if self._main_bytes > self._main_capacity or not small:
                # Main's oldest goes back to the tail one frequency lower while it has any.
                key, size = main.popitem(last=False)
                count = freq[key]
                if count:
                    main[key] = size
                    freq[key] = count - 1
                else:
                    self._main_bytes -= size
                    del freq[key]
                    evicted.append(key)
            else:
                # The small queue's oldest moves to main if requested enough, else leaves.
                key, size = small.popitem(last=False)
                self._small_bytes -= size
                if freq[key] >= _MOVE_TO_MAIN:
                    main[key] = size
                    self._main_bytes += size
                    freq[key] = 0
                else:
                    del freq[key]
                    evicted.append(key)
                    self._remember(key, size)
        return evicted

    def _remember(self, key: str, size: int) -> None:
        size = max(size, 1)  # so that empty objects cannot grow the ghost without bound
        ghost = self._ghost
        ghost[key] = size
        self._ghost_bytes += size
        while self._ghost_bytes > self._ghost_capacity and ghost:
            self._ghost_bytes -= ghost.popitem(last=False)[1]
