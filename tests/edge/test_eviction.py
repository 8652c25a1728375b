"""The eviction policies: hand-checked sequences, then properties every policy keeps."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.edge.eviction import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    EvictionPolicy,
    LruPolicy,
    PolicyName,
    S3FifoPolicy,
    make_policy,
)


def _seg(n: int) -> str:
    return f"demo-mix/v/720p/seg_{n}.m4s"


def _fill(policy: EvictionPolicy, keys: list[str], size: int) -> list[str]:
    evicted: list[str] = []
    for key in keys:
        evicted += policy.admit(key, size)
    return evicted


# --- LRU ---------------------------------------------------------------------------------


def test_lru_evicts_the_least_recently_requested() -> None:
    lru = LruPolicy(30)
    assert _fill(lru, ["a", "b", "c"], 10) == []
    lru.hit("a")
    assert lru.keys() == ["b", "c", "a"]
    assert lru.admit("d", 10) == ["b"]
    assert lru.admit("e", 15) == ["c", "a"]
    assert lru.keys() == ["d", "e"]
    assert (lru.used_bytes, len(lru)) == (25, 2)


def test_lru_ignores_hits_on_unknown_keys_and_removes_quietly() -> None:
    lru = LruPolicy(30)
    _fill(lru, ["a", "b"], 10)
    lru.hit("nope")
    lru.remove("nope")
    lru.remove("a")
    assert lru.keys() == ["b"]
    assert lru.used_bytes == 10
    assert "a" not in lru


def test_lru_readmission_takes_the_new_size_and_counts_as_a_request() -> None:
    lru = LruPolicy(30)
    _fill(lru, ["a", "b", "c"], 10)
    assert lru.admit("a", 20) == ["b"]  # a grows by 10 and becomes the most recent
    assert lru.keys() == ["c", "a"]
    assert lru.used_bytes == 30
    assert lru.admit("a", 31) == ["a"]  # grown past the capacity: gone
    assert lru.keys() == ["c"]
    assert lru.used_bytes == 10


def test_an_object_larger_than_the_capacity_is_refused_by_every_policy() -> None:
    for name in POLICY_NAMES:
        policy = make_policy(name, 100)
        policy.admit("small", 60)
        assert policy.admit("huge", 101) == ["huge"], name
        assert "huge" not in policy
        assert policy.keys() == ["small"]
        assert policy.admit("exact", 100) == ["small"], name
        assert policy.keys() == ["exact"]


# --- S3-FIFO -----------------------------------------------------------------------------


def _s3fifo_with_hot_main() -> S3FifoPolicy:
    """Capacity 100: small queue 10 bytes, main 90. Nine hot 10-byte objects, then x1, x2."""
    s3 = S3FifoPolicy(100)
    hot = [f"h{i}" for i in range(1, 10)]
    # Until the first eviction the small queue takes h1 and main the rest.
    assert _fill(s3, hot, 10) == []
    assert s3.keys() == hot
    for key in hot:
        s3.hit(key)
        s3.hit(key)
    s3.hit("h1")  # h1: 3 requests, the others 2
    assert s3.admit("x1", 10) == []  # still filling: main
    # The first eviction: main is over its 90 bytes; every h goes round once, one lower.
    assert s3.admit("x2", 10) == ["x1"]
    assert s3.keys() == ["h1", "x2", *hot[1:]]
    return s3


def test_s3fifo_main_is_fifo_with_reinsertion_by_frequency() -> None:
    _s3fifo_with_hot_main()


def test_a_one_hit_wonder_scan_flushes_lru_but_not_s3fifo() -> None:
    s3 = _s3fifo_with_hot_main()
    lru = LruPolicy(100)
    hot = [f"h{i}" for i in range(1, 10)]
    _fill(lru, hot, 10)
    for key in hot:
        lru.hit(key)
        lru.hit(key)
    scan = [f"scan-{i}" for i in range(30)]  # 3x the capacity, each object requested once

    # S3-FIFO: scan-0 makes h1 (requested enough) move to main, which pushes out x2 (never
    # requested); from then on each scan object only pushes the previous one out of the small
    # queue into the ghost.
    assert s3.admit(scan[0], 10) == ["x2"]
    assert _fill(s3, scan[1:], 10) == scan[:-1]
    assert sorted(s3.keys()) == sorted([*hot, scan[-1]])
    # The ghost remembers 90 bytes of what left the small queue: scan-20 to scan-28.
    assert s3.admit(scan[0], 10) == [scan[-1]]  # forgotten: a newcomer, small queue
    assert s3.admit(scan[-2], 10) == ["h1"]  # remembered: main; main's first at 0 leaves
    assert s3.keys() == [scan[0], scan[-2], *hot[1:]]  # h2..h9 went round behind it

    assert _fill(lru, scan, 10) == hot + scan[:-10]
    assert lru.keys() == scan[-10:]


def test_s3fifo_ghost_sends_a_returning_object_to_main() -> None:
    s3 = _s3fifo_with_hot_main()
    hot = [f"h{i}" for i in range(2, 10)]
    assert s3.admit("s1", 10) == ["x2"]  # h1 (3 requests) moves to main, x2 leaves it
    assert s3.admit("s2", 10) == ["s1"]  # s1: small -> ghost
    assert s3.keys() == ["s2", *hot, "h1"]
    # s1 again, while remembered: straight into main, at its tail. Main (100 bytes) is over
    # its 90: h2..h9 go round one lower, to 0, and h1, which left the small queue at
    # frequency 0 as the paper has it, leaves.
    assert s3.admit("s1", 10) == ["h1"]
    assert s3.keys() == ["s2", "s1", *hot]
    # A new object goes to the small queue instead, and the small queue's oldest leaves.
    assert s3.admit("s3", 10) == ["s2"]
    assert s3.keys() == ["s3", "s1", *hot]


def test_s3fifo_frequency_is_capped_at_three() -> None:
    # A 1-byte small queue: a 10-byte object is refused on its first miss and enters main on
    # its second (through the ghost), so only main evicts. It holds ten objects.
    s3 = S3FifoPolicy(100, small_fraction=0.01)
    assert _fill(s3, [f"m{i}" for i in range(10)], 10) == []  # filling up: all in main
    for _ in range(100):
        s3.hit("m0")
    evicted: list[str] = []
    n = 0
    while "m0" not in evicted and n < 100:
        key = f"n{n}"
        n += 1
        first = s3.admit(key, 10)
        evicted += s3.admit(key, 10) if first == [key] else first
    # m0 reaches main's head four times: three times it goes back to the tail (frequency
    # 3 -> 2 -> 1 -> 0) behind the objects admitted meanwhile, the fourth time it leaves;
    # uncapped, its 100 requests would have kept it for 100 rounds.
    assert evicted == [*(f"m{i}" for i in range(1, 10)), *(f"n{i}" for i in range(21)), "m0"]


def test_s3fifo_refuses_an_object_too_large_for_its_small_queue_until_it_returns() -> None:
    s3 = S3FifoPolicy(100)  # small queue: 10 bytes
    assert _fill(s3, ["a", *(f"m{i}" for i in range(1, 10))], 10) == []
    assert s3.admit("c", 10) == ["m1"]  # the first eviction
    assert s3.admit("big", 30) == ["big"]  # remembered in the ghost, not cached
    assert "big" not in s3
    assert s3.admit("big", 30) == ["m2", "m3", "m4"]  # missed again: into main
    assert "big" in s3
    assert s3.used_bytes == 100


def test_s3fifo_before_the_first_eviction_large_objects_fill_main() -> None:
    s3 = S3FifoPolicy(100)
    assert s3.admit("big", 50) == []
    assert s3.admit("a", 5) == []
    assert s3.keys() == ["a", "big"]


def test_s3fifo_readmission_and_removal() -> None:
    s3 = _s3fifo_with_hot_main()
    assert s3.admit("h3", 20) == ["x2"]  # h3 grows by 10: something must go, x2 (frequency 0)
    assert s3.used_bytes == 100
    s3.remove("h3")
    s3.remove("h3")
    s3.remove("never")
    assert "h3" not in s3
    assert s3.used_bytes == 80
    assert s3.admit("h1", 200) == ["h1"]
    assert "h1" not in s3


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="capacity_bytes"):
        LruPolicy(0)
    with pytest.raises(TypeError, match="capacity_bytes"):
        S3FifoPolicy(10.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="small_fraction"):
        S3FifoPolicy(100, small_fraction=1.0)
    with pytest.raises(ValueError, match="negative"):
        LruPolicy(10).admit("a", -1)
    with pytest.raises(TypeError, match="int"):
        S3FifoPolicy(10).admit("a", 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lru, s3fifo"):
        make_policy("fifo", 10)  # type: ignore[arg-type]


def test_the_default_is_a_known_policy() -> None:
    assert DEFAULT_POLICY in POLICY_NAMES
    assert type(make_policy("lru", 1)) is LruPolicy
    assert type(make_policy("s3fifo", 1)) is S3FifoPolicy


# --- Properties of every policy ----------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    key: str


@dataclass(frozen=True)
class Admit:
    key: str
    size: int


@dataclass(frozen=True)
class Remove:
    key: str


Op = Hit | Admit | Remove

# Few keys, so that hits, re-admissions, ghost returns and removals of residents are common.
keys = st.integers(0, 15).map(_seg)
ops = st.one_of(
    keys.map(Hit),
    st.builds(Admit, keys, st.integers(0, 60)),
    st.builds(Admit, keys, st.integers(0, 6)),
    keys.map(Remove),
)
cases = st.tuples(st.sampled_from(POLICY_NAMES), st.integers(1, 120), st.lists(ops, max_size=150))


def _apply(policy: EvictionPolicy, op: Op) -> list[str] | None:
    if isinstance(op, Hit):
        policy.hit(op.key)
        return None
    if isinstance(op, Remove):
        policy.remove(op.key)
        return None
    return policy.admit(op.key, op.size)


@settings(max_examples=300, deadline=None)
@given(cases)
def test_every_policy_keeps_its_budget_and_its_books(
    case: tuple[PolicyName, int, list[Op]],
) -> None:
    name, capacity, sequence = case
    policy = make_policy(name, capacity)
    residents: dict[str, int] = {}  # what the shell would hold on disk
    for op in sequence:
        evicted = _apply(policy, op)
        if isinstance(op, Remove):
            residents.pop(op.key, None)
        elif isinstance(op, Admit):
            assert evicted is not None
            assert len(evicted) == len(set(evicted))
            assert all(k in residents or k == op.key for k in evicted)
            residents[op.key] = op.size
            for key in evicted:
                del residents[key]
                assert key not in policy
            assert (op.key in policy) == (op.key not in evicted)
            assert policy.used_bytes <= capacity
        assert policy.used_bytes == sum(residents.values())
        assert sorted(policy.keys()) == sorted(residents)
        assert len(policy) == len(residents)
        assert all(k in policy for k in residents)


@settings(max_examples=150, deadline=None)
@given(cases)
def test_every_policy_is_deterministic(case: tuple[PolicyName, int, list[Op]]) -> None:
    name, capacity, sequence = case
    one, two = make_policy(name, capacity), make_policy(name, capacity)
    for op in sequence:
        assert _apply(one, op) == _apply(two, op)
        assert one.keys() == two.keys()


@settings(max_examples=150, deadline=None)
@given(cases)
def test_readmitting_keys_in_order_restores_every_resident(
    case: tuple[PolicyName, int, list[Op]],
) -> None:
    name, capacity, sequence = case
    policy = make_policy(name, capacity)
    sizes: dict[str, int] = {}
    for op in sequence:
        _apply(policy, op)
        if isinstance(op, Admit):
            sizes[op.key] = op.size
    restored = make_policy(name, capacity)
    order = policy.keys()
    for key in order:
        assert restored.admit(key, sizes[key]) == []
    assert sorted(restored.keys()) == sorted(policy.keys())
    if name == "lru":
        assert restored.keys() == policy.keys()


def test_many_operations_stay_cheap() -> None:
    """O(1) per operation: 200,000 requests over 20,000 keys, a few seconds at worst."""
    for name in POLICY_NAMES:
        policy = make_policy(name, 5_000 * 1_000)
        for i in range(200_000):
            key = _seg((i * 7919) % 20_000 if i % 3 else i % 500)
            if key in policy:
                policy.hit(key)
            else:
                policy.admit(key, 500 + (i % 7) * 300)
        assert policy.used_bytes <= policy.capacity_bytes


@settings(max_examples=200, deadline=None)
@given(cases, st.integers(1, 6))
def test_a_counted_hit_is_that_many_hits(
    case: tuple[PolicyName, int, list[Op]], count: int
) -> None:
    # Workers tell the keeper each key's hits as one count per second; the policy must end in
    # the state the hits one by one would have left it in.
    name, capacity, sequence = case
    counted, single = make_policy(name, capacity), make_policy(name, capacity)
    for op in sequence:
        if isinstance(op, Hit):
            counted.hit(op.key, count)
            for _ in range(count):
                single.hit(op.key)
            continue
        assert _apply(counted, op) == _apply(single, op)
    assert counted.keys() == single.keys()
