"""Edge cache eviction: LRU against S3-FIFO (and a W-TinyLFU candidate) on a segment stream.

Method
  Trace (seeded, `make_trace`): a catalog of titles whose popularity follows the placement
  plane's Zipf-Mandelbrot model (`placement/popularity.py`: exponent 1, plateau 5). Each
  title lasts 10 to 60 minutes of 4-second segments in 4 rungs (mean segment 0.5, 0.9, 1.4
  and 2.2 MB; each segment's size varies with its content, the same factor in every rung,
  lognormal sd 0.15, so segments run from ~0.4 to ~2.8 MB). Viewing sessions arrive
  uniformly over 24 hours (and before, so the first hour is already busy), pick a title by
  popularity and a rung (10/20/30/40 % from the lowest), and request segments from the
  first, one every 4 s, 2 % of segments one rung lower, 1 % one higher. They abandon:
  a quarter zap away (geometric, mean 8 segments), of the others 45 % watch to the end and
  the rest stop at a point uniform over the title, so early segments are the hottest.
  Interleaved between hours 10 and 14, a scan of one-hit wonders: objects nobody requests
  again (a catalog fill, a crawler) totalling a quarter of the working set.
  Replay: every request asks the policy `key in policy`; a hit calls `hit(key)`, a miss
  `admit(key, size)` (the whole object, as the edge does once it is written). The working
  set is the bytes of the distinct objects viewers request over the whole trace; caches are
  1, 5, 10 and 20 % of it. The first 6 hours warm the cache and are not counted; the scan's
  requests are never counted (they cannot hit), viewers' requests all are.
  Measures: object hit ratio (hits / requests) and byte hit ratio (bytes served from the
  cache / bytes requested: the origin traffic saved), each also as a ratio to LRU's; and
  requests per second through each policy (the `in` test plus `hit` or `admit`), in CPU
  time, best of several replays of the trace's first requests at 5 %, in one process.
  Policies: `lru` and `s3fifo` as shipped (`streamplane.edge.eviction`); `w-tinylfu*`, a
  candidate defined in this script (see `WTinyLfuCandidate`) and measured, not shipped.
  For reference, a static oracle: the counted hours' most requested objects, as many as
  fit, placed beforehand and never changed (a perfect day-ahead fill; not an upper bound).

Reproduce: .venv/bin/python bench/cache.py [--seed 7] [--sessions 4000] [--scan 0.25]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shlex
import sys
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final

import numpy as np

from streamplane.edge.eviction import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    EvictionPolicy,
    make_policy,
)
from streamplane.placement.popularity import CatalogShape, zipf_weights
from streamplane.reporting import Table, figure, markdown_table

MB: Final = 1_000_000
SEGMENT_S: Final = 4.0
RUNGS: Final = ("360p", "540p", "720p", "1080p")
RUNG_MEAN_BYTES: Final = np.array([0.5, 0.9, 1.4, 2.2]) * MB
RUNG_SHARE: Final = np.array([0.1, 0.2, 0.3, 0.4])
CANDIDATE: Final = "w-tinylfu*"
ORACLE: Final = "static oracle"


@dataclass(frozen=True)
class Trace:
    keys: list[str]  # one per distinct object; viewers' objects first, then the scan's
    sizes: list[int]  # bytes, per object
    requests: list[int]  # object index per request, in time order
    viewer_objects: int  # objects below this index are viewers', the rest the scan's
    first_counted: int  # requests before this index only warm the cache
    working_set_bytes: int  # distinct bytes viewers request over the whole trace
    sessions: int
    scan_bytes: int


def make_trace(
    seed: int,
    titles: int = 200,
    sessions: int = 4000,
    hours: float = 24.0,
    warmup_hours: float = 6.0,
    scan: float = 0.25,
) -> Trace:
    """The request stream described in the module docstring."""
    rng = np.random.default_rng(seed)
    n_segments = rng.integers(150, 901, titles)  # 10 to 60 minutes
    offsets = np.concatenate(([0], np.cumsum(n_segments)))
    content = np.exp(0.15 * rng.standard_normal(int(offsets[-1])))  # per (title, segment)

    title = rng.choice(titles, sessions, p=zipf_weights(titles, CatalogShape()))
    length = n_segments[title]
    horizon = hours * 3600
    start = rng.uniform(-float(n_segments.max()) * SEGMENT_S, horizon, sessions)
    fate = rng.random(sessions)
    watched = np.where(
        fate < 0.25,
        rng.geometric(1 / 8, sessions),
        np.where(fate < 0.25 + 0.75 * 0.45, length, (rng.random(sessions) * length).astype(int)),
    )
    watched = np.clip(watched, 1, length)

    # One row per request. A session keeps its rung but fetches 2 % of segments one rung
    # lower and 1 % one rung higher (throughput dips and probes).
    session = np.repeat(np.arange(sessions), watched)
    first = np.concatenate(([0], np.cumsum(watched)[:-1]))
    segment = np.arange(len(session)) - first[session]
    home = rng.choice(len(RUNGS), sessions, p=RUNG_SHARE)
    deviation = rng.choice([-1, 0, 1], len(session), p=[0.02, 0.97, 0.01])
    rung = np.clip(home[session] + deviation, 0, len(RUNGS) - 1)
    when = start[session] + SEGMENT_S * segment
    inside = (when >= 0) & (when < horizon)
    t, r, n, when = title[session][inside], rung[inside], segment[inside], when[inside]

    object_id = (offsets[t] + n) * len(RUNGS) + r
    distinct, request_object = np.unique(object_id, return_inverse=True)
    flat, o_rung = np.divmod(distinct, len(RUNGS))
    o_title = np.searchsorted(offsets, flat, side="right") - 1
    o_segment = flat - offsets[o_title]
    o_size = np.clip(RUNG_MEAN_BYTES[o_rung] * content[flat], 0.4 * MB, 2.8 * MB).astype(np.int64)
    keys = [
        f"title-{a:04d}/v/{RUNGS[b]}/seg_{c}.m4s"
        for a, b, c in zip(o_title.tolist(), o_rung.tolist(), o_segment.tolist(), strict=True)
    ]
    sizes = o_size.tolist()
    working_set = int(o_size.sum())

    # The scan: 720p-sized segments of titles nobody watches, spread over hours 10 to 14.
    scan_sizes: list[int] = []
    if scan > 0:
        mean = float(RUNG_MEAN_BYTES[2])
        drawn = mean * np.exp(0.15 * rng.standard_normal(int(scan * working_set / mean * 1.2)))
        drawn = np.clip(drawn, 0.4 * MB, 2.8 * MB).astype(np.int64)
        enough = int(np.searchsorted(np.cumsum(drawn), scan * working_set)) + 1
        scan_sizes = drawn[:enough].tolist()
    viewer_objects = len(keys)
    keys += [f"fill-{i // 600:04d}/v/720p/seg_{i % 600}.m4s" for i in range(len(scan_sizes))]
    sizes += scan_sizes
    scan_when = rng.uniform(10 / 24 * horizon, 14 / 24 * horizon, len(scan_sizes))

    all_when = np.concatenate((when, scan_when))
    order = np.argsort(all_when, kind="stable")
    requests = np.concatenate((request_object, viewer_objects + np.arange(len(scan_sizes))))
    return Trace(
        keys=keys,
        sizes=sizes,
        requests=requests[order].tolist(),
        viewer_objects=viewer_objects,
        first_counted=int(np.searchsorted(all_when[order], warmup_hours * 3600)),
        working_set_bytes=working_set,
        sessions=sessions,
        scan_bytes=sum(scan_sizes),
    )


class WTinyLfuCandidate:
    """W-TinyLFU in bytes, the candidate: measured against S3-FIFO here, not shipped.

    After Einziger, Friedman and Manes, "TinyLFU: A Highly Efficient Cache Admission
    Policy" (ACM ToS 2017) as Caffeine builds it: a window LRU of 1 % of the bytes, then a
    segmented LRU (protected 80 %, probation the rest). A count-min sketch (depth 4,
    counters capped at 15, all halved every 10 x width additions, width the power of two
    above the resident count) counts every request. When the cache is over budget, the
    oldest object that left the window (a candidate) meets probation's oldest (the victim):
    the candidate stays only if strictly more frequent. Left out: Caffeine's hill climbing
    of the window size and its random admission against hash flooding.
    """

    _WINDOW, _PROBATION, _PROTECTED = 0, 1, 2
    _HALVE = bytes(b >> 1 for b in range(256))

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._window_capacity = max(1, capacity_bytes // 100)
        self._protected_capacity = (capacity_bytes - self._window_capacity) * 4 // 5
        self._queues: tuple[OrderedDict[str, int], ...] = (
            OrderedDict(),
            OrderedDict(),
            OrderedDict(),
        )
        self._bytes = [0, 0, 0]
        self._where: dict[str, int] = {}
        self._resize_sketch(1024)

    @property
    def used_bytes(self) -> int:
        return sum(self._bytes)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def keys(self) -> list[str]:
        return [*self._queues[1], *self._queues[0], *self._queues[2]]

    def _resize_sketch(self, width: int) -> None:
        self._width = width
        self._shift = 64 - (width.bit_length() - 1)
        self._table = bytearray(4 * width)
        self._added = 0

    def _slots(self, key: str) -> tuple[int, int, int, int]:
        h = zlib.crc32(key.encode()) * 0x100000001  # the 32-bit hash twice, in 64 bits
        w, s, m = self._width, self._shift, 0xFFFFFFFFFFFFFFFF
        return (
            ((h * 0x9E3779B97F4A7C15) & m) >> s,
            w + (((h * 0xC2B2AE3D27D4EB4F) & m) >> s),
            2 * w + (((h * 0x165667B19E3779F9) & m) >> s),
            3 * w + (((h * 0xD6E8FEB86659FD93) & m) >> s),
        )

    def _count(self, key: str) -> None:
        table = self._table
        a, b, c, d = self._slots(key)
        if table[a] < 15:
            table[a] += 1
        if table[b] < 15:
            table[b] += 1
        if table[c] < 15:
            table[c] += 1
        if table[d] < 15:
            table[d] += 1
        self._added += 1
        if self._added >= 10 * self._width:
            self._table = bytearray(table.translate(self._HALVE))
            self._added //= 2

    def _frequency(self, key: str) -> int:
        table = self._table
        a, b, c, d = self._slots(key)
        return min(table[a], table[b], table[c], table[d])

    def hit(self, key: str) -> None:
        where = self._where.get(key)
        if where is None:
            return
        self._count(key)
        queues = self._queues
        if where != self._PROBATION:
            queues[where].move_to_end(key)
            return
        size = queues[1].pop(key)
        queues[2][key] = size
        self._where[key] = self._PROTECTED
        self._bytes[1] -= size
        self._bytes[2] += size
        while self._bytes[2] > self._protected_capacity:
            demoted, demoted_size = queues[2].popitem(last=False)
            queues[1][demoted] = demoted_size
            self._where[demoted] = self._PROBATION
            self._bytes[2] -= demoted_size
            self._bytes[1] += demoted_size

    def admit(self, key: str, size: int) -> list[str]:
        self.remove(key)
        if size > self.capacity_bytes:
            return [key]
        self._count(key)
        window, probation, protected = self._queues
        where, used = self._where, self._bytes
        window[key] = size
        where[key] = self._WINDOW
        used[0] += size
        candidates: deque[str] = deque()  # at probation's tail, oldest first
        while used[0] > self._window_capacity:
            moved, moved_size = window.popitem(last=False)
            probation[moved] = moved_size
            where[moved] = self._PROBATION
            used[0] -= moved_size
            used[1] += moved_size
            candidates.append(moved)
        evicted: list[str] = []
        while used[0] + used[1] + used[2] > self.capacity_bytes:
            if candidates and len(probation) > len(candidates):
                victim = next(iter(probation))
                if self._frequency(candidates[0]) > self._frequency(victim):
                    loser = victim
                else:
                    loser = candidates.popleft()
                used[1] -= probation.pop(loser)
            elif probation:
                loser, loser_size = probation.popitem(last=False)
                used[1] -= loser_size
                if candidates and candidates[0] == loser:
                    candidates.popleft()
            elif protected:
                loser, loser_size = protected.popitem(last=False)
                used[2] -= loser_size
            else:
                loser, loser_size = window.popitem(last=False)
                used[0] -= loser_size
            del where[loser]
            evicted.append(loser)
        if len(where) > self._width:
            self._resize_sketch(1 << len(where).bit_length())
        return evicted

    def remove(self, key: str) -> None:
        where = self._where.pop(key, None)
        if where is not None:
            self._bytes[where] -= self._queues[where].pop(key)


Factory = Callable[[int], EvictionPolicy]


def _factories() -> dict[str, Factory]:
    made: dict[str, Factory] = {name: partial(make_policy, name) for name in POLICY_NAMES}
    made[CANDIDATE] = WTinyLfuCandidate
    return made


@dataclass(frozen=True)
class Outcome:
    policy: str
    percent: float
    object_hit_ratio: float
    byte_hit_ratio: float


_TRACE: Trace | None = None  # the trace, handed to pool workers by fork


def _replay(job: tuple[str, float]) -> Outcome:
    name, percent = job
    trace = _TRACE
    assert trace is not None
    policy = _factories()[name](int(trace.working_set_bytes * percent / 100))
    keys, sizes, viewers, first = trace.keys, trace.sizes, trace.viewer_objects, trace.first_counted
    hits = hit_bytes = requests = requested_bytes = 0
    for position, i in enumerate(trace.requests):
        key = keys[i]
        counted = position >= first and i < viewers
        if key in policy:
            policy.hit(key)
            if counted:
                hits += 1
                hit_bytes += sizes[i]
        else:
            policy.admit(key, sizes[i])
        if counted:
            requests += 1
            requested_bytes += sizes[i]
    return Outcome(name, percent, hits / requests, hit_bytes / requested_bytes)


def static_oracle(trace: Trace, percent: float) -> Outcome:
    """A reference, not a policy: the cache filled beforehand with the objects viewers
    request most during the counted hours, as many as fit, and never changed. It knows the
    day's popularity in advance but cannot follow it through the day."""
    requests = np.asarray(trace.requests[trace.first_counted :])
    counts = np.bincount(requests[requests < trace.viewer_objects], minlength=trace.viewer_objects)
    sizes = np.asarray(trace.sizes[: trace.viewer_objects])
    order = np.argsort(-counts, kind="stable")
    kept = order[np.cumsum(sizes[order]) <= trace.working_set_bytes * percent / 100]
    served = counts * sizes
    return Outcome(
        ORACLE,
        percent,
        float(counts[kept].sum() / counts.sum()),
        float(served[kept].sum() / served.sum()),
    )


def requests_per_second(
    factory: Factory, trace: Trace, capacity: int, n: int, repeat: int
) -> float:
    """The best of `repeat` replays of the first `n` requests, policy calls only, in CPU
    time: the machine may be shared, and CPU time suffers much less from that than wall time."""
    requests = trace.requests[:n]
    keys, sizes = trace.keys, trace.sizes
    best = float("inf")
    for _ in range(repeat):
        policy = factory(capacity)
        started = time.process_time()
        for i in requests:
            key = keys[i]
            if key in policy:
                policy.hit(key)
            else:
                policy.admit(key, sizes[i])
        best = min(best, time.process_time() - started)
    return len(requests) / best


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _table(outcomes: Sequence[Outcome], names: Sequence[str], percents: Sequence[float]) -> Table:
    by = {(o.policy, o.percent): o for o in outcomes}
    rows = []
    for p in percents:
        lru = by.get(("lru", p))
        for name in names:
            o = by[(name, p)]
            vs = (
                (
                    f"{o.object_hit_ratio / lru.object_hit_ratio:.2f}x",
                    f"{o.byte_hit_ratio / lru.byte_hit_ratio:.2f}x",
                )
                if lru is not None
                else ("-", "-")
            )
            rows.append(
                [f"{p:g} %", name, _pct(o.object_hit_ratio), vs[0], _pct(o.byte_hit_ratio), vs[1]]
            )
    return Table(
        ["cache", "policy", "object hit ratio", "x LRU", "byte hit ratio", "x LRU"],
        rows,
        right=frozenset({0, 2, 3, 4, 5}),
    )


def _plot(
    path: Path, outcomes: Sequence[Outcome], names: Sequence[str], percents: Sequence[float]
) -> None:
    by = {(o.policy, o.percent): o for o in outcomes}
    with figure(path, 10, 4) as fig:
        for column, label in enumerate(("object hit ratio", "byte hit ratio")):
            ax = fig.add_subplot(1, 2, column + 1)
            for name in names:
                ratios = [by[(name, p)] for p in percents]
                ax.plot(
                    percents,
                    [100 * (o.byte_hit_ratio if column else o.object_hit_ratio) for o in ratios],
                    marker="o",
                    label=name,
                    color="0.6" if name == ORACLE else None,
                    linestyle="--" if name == ORACLE else "-",
                )
            ax.set_xscale("log")
            ax.set_xticks(list(percents), [f"{p:g}" for p in percents])
            ax.set_xlabel("cache size, % of the working set")
            ax.set_ylabel(f"{label}, %")
            ax.set_title(label)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle("Edge cache eviction on a segment stream (bench/cache.py)")


def main() -> None:
    global _TRACE
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--titles", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=4000)
    parser.add_argument("--scan", type=float, default=0.25, help="scan bytes / working set")
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[1, 5, 10, 20], help="cache, %% of working set"
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=[*POLICY_NAMES, CANDIDATE],
        choices=[*POLICY_NAMES, CANDIDATE],
    )
    parser.add_argument("--timing-requests", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3, help="timing replays; the best is kept")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="processes for the replays"
    )
    parser.add_argument("--plot", type=Path, default=Path("build/bench/cache-hit-ratio.png"))
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/cache.py", *sys.argv[1:]])

    print((__doc__ or "").split("\n\n")[1])
    print()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPU(s)")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    trace = make_trace(args.seed, titles=args.titles, sessions=args.sessions, scan=args.scan)
    _TRACE = trace
    viewer_requests = sum(1 for i in trace.requests if i < trace.viewer_objects)
    print(
        f"trace: {trace.sessions} sessions, {viewer_requests:,} viewer requests for "
        f"{trace.viewer_objects:,} objects ({trace.working_set_bytes / 1e9:.0f} GB working set, "
        f"{viewer_requests / trace.viewer_objects:.1f} requests per object), "
        f"{len(trace.keys) - trace.viewer_objects:,} scan objects "
        f"({trace.scan_bytes / 1e9:.0f} GB); "
        f"built in {time.perf_counter() - started:.1f} s"
    )

    # The slowest policy's replays first, so that the processes finish together.
    jobs = sorted(
        ((name, p) for p in args.sizes for name in args.policies), key=lambda j: j[0] != CANDIDATE
    )
    fork = multiprocessing.get_context("fork")  # the workers inherit the trace
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=fork) as pool:
        outcomes = list(pool.map(_replay, jobs))
    outcomes += [static_oracle(trace, p) for p in args.sizes]
    print()
    shown = [*args.policies, ORACLE]
    print("\n".join(markdown_table(_table(outcomes, shown, args.sizes))))

    print()
    capacity = int(trace.working_set_bytes * 0.05)
    factories = _factories()
    print(
        f"requests per CPU second through each policy (first {args.timing_requests:,} "
        f"requests, 5 % cache, best of {args.repeat}):"
    )
    print()
    print("| policy | requests/s | us/request |")
    print("|---|---:|---:|")
    for name in args.policies:
        rate = requests_per_second(
            factories[name], trace, capacity, args.timing_requests, args.repeat
        )
        print(f"| {name} | {rate:,.0f} | {1e6 / rate:.2f} |")

    args.plot.parent.mkdir(parents=True, exist_ok=True)
    _plot(args.plot, outcomes, shown, args.sizes)
    print()
    print(
        f"default policy: {DEFAULT_POLICY}; figure: {args.plot}; "
        f"{time.perf_counter() - started:.0f} s in all; load average (1 min) "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(f"reproduce: {command}")


if __name__ == "__main__":
    main()
