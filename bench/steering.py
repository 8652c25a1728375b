"""Steering decisions per second: Steering.rank end to end on 500k prefixes and 1,000 edges.

Method: a routing table of 500,000 prefixes (400k IPv4 /16-/24 and 100k IPv6 /32-/48, in
the proportions of the public tables, each served by one to three of 100 sites with random
AS paths, MEDs and relations) and a fleet of 1,000 edges (10 per site, random load, 2 % in
slow start). Each decision is one Steering.rank call: the table lookup, the GeoLite2 lookup
of the client's address (the wheel's real database; clients send no coordinates) and the
ranking, returning the best 5 edges with their reasons, as the control plane asks
(Steering.rank's default limit). Clients are addresses inside random prefixes of the table
(90 %) or anywhere (10 %), each asking once. A decision ranks the edges that hold the title:
k of them (10, 100, all 1,000), titles drawn from a Zipf catalog. The candidates come two
ways: as a CandidateSet prepared once per title (Steering.prepare: what a fleet change
costs is measured apart) and as a plain list, grouped afresh in every call. GeoLite2 runs
two ways: uncached (every decision decodes a City record) and with its per-network cache,
which these clients, scattered over the whole address space, hit far less than real viewers
would. The ranking is the module the package imports: rank.py compiled with mypyc, which
make install builds (the header says which ran). Baselines, in the same run: rank.py
interpreted, behind the same lookups; the ranking as first written
(tests/steering/reference_rank.py: every rule for every edge, then the best 5, or every
edge), ranking by geography alone, and two longest-prefix-match lookups without a trie.
Throughput is decisions per CPU second of the one thread the loop runs on, best of 3 runs
(the machine is shared: CPU time leaves out the time other processes hold the core); p50
and p99 are per call, in CPU time and in wall time. A comparison, not a pass/fail check.

    .venv/bin/python bench/steering.py [--prefixes 500000] [--edges 1000] [--seed 7]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import ipaddress
import math
import os
import platform
import pstats
import random
import resource
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from streamplane.steering import (
    DEFAULT_LIMIT,
    AddressError,
    CandidateSet,
    Client,
    EdgeCandidate,
    GeoLocator,
    RankedEdge,
    Relation,
    Route,
    RoutingTable,
    Steering,
    distance_km,
    rank_edges,
)
from streamplane.steering import rank as ranking_module
from streamplane.steering._build import compiled_rank, load_rank_source

# The ranking as first written, kept with the tests as the oracle of the current one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.steering import reference_rank

# rank.py interpreted, beside the module the package imports (compiled by make, if it could).
interpreted = load_rank_source("streamplane.steering._rank_interpreted")

V4_LENGTHS = {
    24: 0.58,
    23: 0.09,
    22: 0.11,
    21: 0.05,
    20: 0.06,
    19: 0.04,
    18: 0.03,
    17: 0.02,
    16: 0.02,
}
V6_LENGTHS = {48: 0.52, 44: 0.08, 40: 0.06, 36: 0.04, 32: 0.30}
RELATIONS: tuple[Relation, ...] = ("embedded", "private", "public")


def _pick(rng: random.Random, weights: dict[int, float]) -> int:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def build_routes(rng: random.Random, count: int, sites: Sequence[str]) -> list[Route]:
    """``count`` distinct prefixes (80 % IPv4), each served by one to three sites."""
    seen: set[tuple[int, int, int]] = set()
    routes: list[Route] = []
    v4_target = count * 4 // 5
    while len(seen) < count:
        v4 = len(seen) < v4_target
        bits = 32 if v4 else 128
        length = _pick(rng, V4_LENGTHS if v4 else V6_LENGTHS)
        if v4:
            value = rng.getrandbits(32) & ~((1 << (32 - length)) - 1)
            value = (value & 0x1FFFFFFF) | rng.choice([1, 2, 3, 4, 5, 6]) << 29  # 32/3 .. 223/3
        else:
            value = (
                (0x2001 << 112 | rng.getrandbits(112))
                if rng.random() < 0.2
                else (0x2 << 124 | rng.getrandbits(124))
            )
            value &= ~((1 << (128 - length)) - 1)
        key = (bits, value, length)
        if key in seen:
            continue
        seen.add(key)
        net = (
            ipaddress.IPv4Network((value, length)) if v4 else ipaddress.IPv6Network((value, length))
        )
        prefix = str(net)
        for site in rng.sample(sites, rng.choices([1, 2, 3], weights=[70, 25, 5])[0]):
            routes.append(
                Route(
                    prefix=prefix,
                    site=site,
                    as_path=tuple(rng.randrange(64512, 65535) for _ in range(rng.randint(1, 5))),
                    med=rng.choice([0, 0, 10, 20, 50, 100]),
                    relation=rng.choices(RELATIONS, weights=[10, 30, 60])[0],
                )
            )
    return routes


def build_fleet(rng: random.Random, edges: int, sites: Sequence[str]) -> list[EdgeCandidate]:
    places = {s: (rng.uniform(-45, 65), rng.uniform(-125, 150)) for s in sites}
    return [
        EdgeCandidate(
            edge_id=f"edge-{i:04d}",
            site=sites[i % len(sites)],
            base_url=f"https://edge-{i:04d}.cdn.example",
            load=rng.uniform(0.0, 0.9),
            share=0.5 if rng.random() < 0.02 else 1.0,
            lat=places[sites[i % len(sites)]][0],
            lon=places[sites[i % len(sites)]][1],
        )
        for i in range(edges)
    ]


def client_addresses(rng: random.Random, routes: Sequence[Route], count: int) -> list[str]:
    out = []
    for _ in range(count):
        if rng.random() < 0.9:
            net = ipaddress.ip_network(rng.choice(routes).prefix)
            out.append(str(net[rng.randrange(net.num_addresses)]))
        elif rng.random() < 0.8:
            out.append(str(ipaddress.IPv4Address(rng.getrandbits(32))))
        else:
            out.append(str(ipaddress.IPv6Address(0x2 << 124 | rng.getrandbits(124))))
    return out


# -- baselines ----------------------------------------------------------------------------


class StdlibLpm:
    """Longest-prefix match the way one would without a trie: a dict per prefix length,
    probed from the longest length down, with the ipaddress module doing the masking."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.by_length: dict[tuple[int, int], dict[int, list[Route]]] = {}
        for route in routes:
            net = ipaddress.ip_network(route.prefix)
            key = (net.version, net.prefixlen)
            self.by_length.setdefault(key, {}).setdefault(int(net.network_address), []).append(
                route
            )
        self.lengths = {
            v: sorted((n for (ver, n) in self.by_length if ver == v), reverse=True) for v in (4, 6)
        }

    def lookup(self, address: str) -> dict[str, Route]:
        ip = ipaddress.ip_address(address)
        bits = ip.max_prefixlen
        value = int(ip)
        found: dict[str, Route] = {}
        for length in self.lengths[ip.version]:
            for route in self.by_length[(ip.version, length)].get(
                value >> (bits - length) << (bits - length), ()
            ):
                found.setdefault(route.site, route)
        return found


class LinearScan:
    """Every prefix checked against the address: the floor a real LPM structure must beat."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.entries: dict[int, list[tuple[int, int, int, Route]]] = {4: [], 6: []}
        for route in routes:
            net = ipaddress.ip_network(route.prefix)
            self.entries[net.version].append(
                (int(net.network_address), int(net.netmask), net.prefixlen, route)
            )

    def lookup(self, address: str) -> dict[str, Route]:
        ip = ipaddress.ip_address(address)
        value = int(ip)
        best: dict[str, tuple[int, Route]] = {}
        for network, mask, length, route in self.entries[ip.version]:
            if value & mask == network and length > best.get(route.site, (-1, route))[0]:
                best[route.site] = (length, route)
        return {site: route for site, (_, route) in best.items()}


def rank_by_geography(
    client: Client, geo: GeoLocator, candidates: Sequence[EdgeCandidate]
) -> list[EdgeCandidate]:
    here = geo.locate(client.address)
    if here is None:
        return list(candidates)
    return sorted(
        candidates,
        key=lambda e: (
            distance_km(*here, e.lat, e.lon)
            if e.lat is not None and e.lon is not None
            else math.inf
        ),
    )


# -- measuring ----------------------------------------------------------------------------


class Result(NamedTuple):
    rate_cpu: float  # decisions per CPU second, best run
    p50_cpu: float  # us
    p99_cpu: float
    p50_wall: float
    p99_wall: float


def measure(decide: Callable[[int], object], count: int, repeats: int = 3) -> Result:
    """Decisions per CPU second (best of ``repeats`` runs) and per-call latencies."""
    for i in range(min(200, count)):  # warm the caches a long-running process would have warm
        decide(i)
    best = 0.0
    cpu_ns: list[int] = []
    wall_ns: list[int] = []
    clock, perf = time.thread_time_ns, time.perf_counter_ns
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            cpu0 = clock()
            for i in range(count):
                decide(i)
            best = max(best, count / ((clock() - cpu0) / 1e9))
            for i in range(count):  # again, each call timed alone (the clocks cost ~1 us)
                c0, w0 = clock(), perf()
                decide(i)
                w1, c1 = perf(), clock()
                cpu_ns.append(c1 - c0)
                wall_ns.append(w1 - w0)
        finally:
            gc.enable()

    def pct(values: list[int], q: float) -> float:
        values.sort()
        return values[min(len(values) - 1, int(len(values) * q))] / 1e3

    return Result(best, pct(cpu_ns, 0.5), pct(cpu_ns, 0.99), pct(wall_ns, 0.5), pct(wall_ns, 0.99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=500_000)
    parser.add_argument("--edges", type=int, default=1_000)
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--titles", type=int, default=10_000)
    parser.add_argument("--holders", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--decisions", type=int, default=10_000, help="per row (fewer for big k)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    print(__doc__.split("\n\n")[1].replace("\n", " "))
    print()
    load = os.getloadavg()
    print(
        f"python {platform.python_version()} on {platform.machine()}, {platform.system()}, "
        f"{os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at start"
    )
    built = compiled_rank()
    print(
        f"ranking: {Path(ranking_module.__file__).name}"
        + (" (rank.py compiled with mypyc)" if built else " (interpreted: no compiled build)")
        + "; the interpreted rank.py runs beside it"
    )
    rng = random.Random(args.seed)
    sites = [f"site-{i:03d}" for i in range(args.sites)]

    t0 = time.perf_counter()
    routes = build_routes(rng, args.prefixes, sites)
    generated = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    table = RoutingTable()
    t0 = time.perf_counter()
    table.replace(routes)
    built = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    v6 = len({r.prefix for r in routes if ":" in r.prefix})
    print(
        f"table: {args.prefixes:,} prefixes ({v6:,} IPv6; {len(routes):,} site routes) generated "
        f"in {generated:.1f} s, loaded (RoutingTable.replace) in {built:.1f} s, "
        f"+{(rss1 - rss0) / 1024:.0f} MiB peak RSS"
    )
    fleet = build_fleet(rng, args.edges, sites)
    geo = GeoLocator(cache_size=0)  # every decision pays a real GeoLite2 lookup
    steering = Steering(table, geo)
    cached_geo = GeoLocator()  # the default: answers cached per GeoLite2 network
    cached = Steering(table, cached_geo)
    addresses = client_addresses(rng, routes, 50_000)
    clients = [Client(address=a) for a in addresses]
    weights = [1 / (i + 1) for i in range(args.titles)]
    titles = [f"title-{i}" for i in rng.choices(range(args.titles), weights=weights, k=50_000)]

    def holders_of(k: int) -> dict[str, list[EdgeCandidate]]:
        held = {}
        for title in set(titles):
            pick = random.Random(f"{args.seed}-{title}-{k}")
            held[title] = fleet if k >= len(fleet) else pick.sample(fleet, k)
        return held

    # Updates on the full table: what a BGP feed costs the writer.
    extra = [
        Route(
            prefix=f"{rng.randrange(1, 223)}.{rng.randrange(256)}.{rng.randrange(256)}.0/24",
            site=rng.choice(sites),
            med=1,
        )
        for _ in range(2_000)
    ]
    t0 = time.perf_counter()
    for route in extra:
        table.announce(route)
    announce_us = (time.perf_counter() - t0) / len(extra) * 1e6
    t0 = time.perf_counter()
    for route in extra:
        table.withdraw(route.site, route.prefix)
    withdraw_us = (time.perf_counter() - t0) / len(extra) * 1e6
    print(
        f"updates on the loaded table: announce {announce_us:.0f} us, withdraw {withdraw_us:.0f} us"
    )
    print()

    def steered(
        ranking: Callable[..., list[RankedEdge]],
        client: Client,
        title: str,
        session: str,
        held: Sequence[EdgeCandidate],
        limit: int | None,
    ) -> list[RankedEdge]:
        """Steering.rank's steps (GeoLite2 uncached) around another ranking."""
        try:
            looked = table.lookup(client.address)
        except AddressError:
            looked = {}
        return ranking(
            client=client,
            client_location=geo.locate(client.address),
            title=title,
            session_key=session,
            candidates=held,
            routes=looked,
            limit=limit,
        )

    def first_written(
        client: Client, title: str, session: str, held: Sequence[EdgeCandidate], limit: int | None
    ) -> list[RankedEdge]:
        """Steering.rank as it was: the same lookups around the reference ranking."""
        return steered(reference_rank.rank_edges, client, title, session, held, limit)

    print(
        "| decision | edges ranked (k) | returned | decisions/s (CPU) | p50 us (CPU) "
        "| p99 us (CPU) | p50 us (wall) | p99 us (wall) |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    results: dict[tuple[str, int], Result] = {}
    prepare_us: dict[int, float] = {}
    for k in args.holders:
        held = holders_of(k)
        # What the control plane would do when a title's holders change, once per title.
        t0 = time.thread_time()
        prepared = {title: steering.prepare(edges) for title, edges in held.items()}
        prepare_us[k] = (time.thread_time() - t0) / len(prepared) * 1e6
        prepared_source = {
            title: interpreted.CandidateSet(edges, steering.sites)._complete()
            for title, edges in held.items()
        }
        n = args.decisions
        slow = max(200, n * 10 // k) if k > 10 else n  # for the rankings of every edge
        listed = n if k <= 100 else max(500, n * 100 // k)

        def ours(i: int, sets: dict[str, CandidateSet] = prepared) -> object:
            title = titles[i]
            return steering.rank(clients[i], title, f"s-{i}", sets[title])

        def ours_cached(i: int, sets: dict[str, CandidateSet] = prepared) -> object:
            title = titles[i]
            return cached.rank(clients[i], title, f"s-{i}", sets[title])

        def ours_interpreted(i: int, sets: dict[str, Any] = prepared_source) -> object:
            title = titles[i]
            return steered(
                interpreted.rank_edges, clients[i], title, f"s-{i}", sets[title], DEFAULT_LIMIT
            )

        def ours_list(i: int, held: dict[str, list[EdgeCandidate]] = held) -> object:
            title = titles[i]
            return steering.rank(clients[i], title, f"s-{i}", held[title])

        def ours_all(i: int, sets: dict[str, CandidateSet] = prepared) -> object:
            title = titles[i]
            return steering.rank(clients[i], title, f"s-{i}", sets[title], limit=None)

        def before(i: int, held: dict[str, list[EdgeCandidate]] = held) -> object:
            title = titles[i]
            return first_written(clients[i], title, f"s-{i}", held[title], DEFAULT_LIMIT)

        def before_all(i: int, held: dict[str, list[EdgeCandidate]] = held) -> object:
            title = titles[i]
            return first_written(clients[i], title, f"s-{i}", held[title], None)

        def geography(i: int, held: dict[str, list[EdgeCandidate]] = held) -> object:
            title = titles[i]
            return rank_by_geography(clients[i], geo, held[title])

        for i in range(50):  # they agree
            assert ours(i) == before(i) == ours_list(i) == ours_interpreted(i), i
            assert ours_all(i) == before_all(i), i
        rows: list[tuple[str, str, Callable[[int], object], int]] = [
            ("Steering.rank, prepared (GeoLite2 uncached)", f"{DEFAULT_LIMIT}", ours, n),
            ("Steering.rank, prepared (GeoLite2 cached)", f"{DEFAULT_LIMIT}", ours_cached, n),
            (
                "the same, rank.py interpreted (GeoLite2 uncached)",
                f"{DEFAULT_LIMIT}",
                ours_interpreted,
                n,
            ),
            ("Steering.rank, a list (GeoLite2 uncached)", f"{DEFAULT_LIMIT}", ours_list, listed),
            ("Steering.rank, prepared, limit=None", "all", ours_all, slow),
            ("before: first ranking, limit=5", f"{DEFAULT_LIMIT}", before, slow),
            ("before: first ranking, every edge", "all", before_all, slow),
            ("geography only (baseline)", "all", geography, n),
        ]
        for label, returned, decide, count in rows:
            results[(label, k)] = r = measure(decide, count)
            print(
                f"| {label} | {k} | {returned} | {r.rate_cpu:,.0f} | {r.p50_cpu:.0f} "
                f"| {r.p99_cpu:,.0f} | {r.p50_wall:.0f} | {r.p99_wall:,.0f} |"
            )
    print()
    print(
        f"GeoLite2 cache after the run: {cached_geo._networks:,} networks cached "
        f"for {min(len(addresses), args.decisions):,}+ distinct clients"
    )
    print(
        "Steering.prepare, once per title when its holders change (CPU us per set): "
        + ", ".join(f"{us:,.0f} at k = {k}" for k, us in prepare_us.items())
    )
    print()

    # Where the time goes, for one k: each stage alone on the same inputs.
    k = 100 if 100 in args.holders else args.holders[0]
    held = holders_of(k)
    n = 5_000
    located = [geo.locate(a) for a in addresses[:n]]
    looked = [table.lookup(a) for a in addresses[:n]]
    sets = {title: CandidateSet(edges) for title, edges in held.items()}

    def looked_up(
        rank: Callable[..., object], sets: Mapping[str, object]
    ) -> Callable[[int], object]:
        """Decision i by ``rank`` on the candidates in ``sets``, the lookups done beforehand."""

        def decide(i: int) -> object:
            return rank(
                client=clients[i],
                client_location=located[i],
                title=titles[i],
                session_key=f"s-{i}",
                candidates=sets[titles[i]],
                routes=looked[i],
                limit=DEFAULT_LIMIT,
            )

        return decide

    def grouping(i: int) -> object:
        return CandidateSet(held[titles[i]])

    ranking = looked_up(rank_edges, sets)
    reference = looked_up(reference_rank.rank_edges, held)
    # rank.py interpreted beside it (profiled too: compiled, rank_edges is one opaque call).
    ranking_source = looked_up(
        interpreted.rank_edges,
        {title: interpreted.CandidateSet(edges) for title, edges in held.items()},
    )

    warm = GeoLocator()
    for a in addresses[:n]:
        warm.locate(a)
    stages: list[tuple[str, Callable[[int], object]]] = [
        ("RoutingTable.lookup (pytricia)", lambda i: table.lookup(addresses[i])),
        ("GeoLocator.locate, uncached (GeoLite2)", lambda i: geo.locate(addresses[i])),
        ("GeoLocator.locate, network cached", lambda i: warm.locate(addresses[i])),
        (f"rank_edges, {k} edges prepared, best {DEFAULT_LIMIT}", ranking),
        ("the same, rank.py interpreted", ranking_source),
        (f"CandidateSet of {k} edges (a list grouped by place)", grouping),
        (f"before: first ranking, {k} edges, best {DEFAULT_LIMIT}", reference),
    ]
    print(f"| stage (k = {k}) | mean us (CPU) | p99 us (CPU) |")
    print("|---|--:|--:|")
    for label, call in stages:
        r = measure(call, n)
        print(f"| {label} | {1e6 / r.rate_cpu:.1f} | {r.p99_cpu:.0f} |")
    profile = cProfile.Profile()
    profile.enable()
    for i in range(2_000):
        ranking_source(i)
    profile.disable()
    stats = pstats.Stats(profile)
    total = stats.total_tt  # type: ignore[attr-defined]
    print()
    print(
        f"profile of rank_edges, rank.py interpreted, {k} edges prepared, best {DEFAULT_LIMIT} "
        "(share of its time, cProfile):"
    )
    rows_: list[tuple[float, str]] = []
    for (filename, _, name), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows_.append((tottime, f"{name} ({filename.rsplit('/', 1)[-1]})"))
    for tottime, label in sorted(rows_, reverse=True)[:6]:
        print(f"  {tottime / total:5.1%}  {label}")
    print()

    # LPM lookups alone: the trie against two ways without one.
    stdlib = StdlibLpm(routes)
    scan = LinearScan(routes)
    sample = addresses[:20]
    for address in sample:  # the three agree
        want = {s: r.prefix for s, r in table.lookup(address).items()}
        assert {s: r.prefix for s, r in stdlib.lookup(address).items()} == want, address
    for address in sample[:3]:
        assert {s: r.prefix for s, r in scan.lookup(address).items()} == {
            s: r.prefix for s, r in table.lookup(address).items()
        }
    trie_us = 1e6 / measure(lambda i: table.lookup(addresses[i]), 20_000).rate_cpu
    stdlib_us = 1e6 / measure(lambda i: stdlib.lookup(addresses[i]), 20_000).rate_cpu
    t0 = time.thread_time()
    for address in sample[:5]:
        scan.lookup(address)
    scan_us = (time.thread_time() - t0) / 5 * 1e6
    print("| longest-prefix match, per lookup | CPU us | vs pytricia |")
    print("|---|--:|--:|")
    print(f"| RoutingTable (pytricia, per-site values precomputed) | {trie_us:.2f} | 1.0x |")
    stdlib_ratio, scan_ratio = stdlib_us / trie_us, scan_us / trie_us
    print(
        f"| ipaddress stdlib, one dict per prefix length | {stdlib_us:.2f} | {stdlib_ratio:.0f}x |"
    )
    print(f"| linear scan of {args.prefixes:,} prefixes | {scan_us:,.0f} | {scan_ratio:,.0f}x |")
    print()

    def verdict(r: Result) -> str:
        return "met" if r.rate_cpu > 20_000 and r.p99_cpu < 1_000 else "not met"

    for k in args.holders:
        now = results[("Steering.rank, prepared (GeoLite2 uncached)", k)]
        now_cached = results[("Steering.rank, prepared (GeoLite2 cached)", k)]
        now_list = results[("Steering.rank, a list (GeoLite2 uncached)", k)]
        was = results[("before: first ranking, every edge", k)]
        was5 = results[("before: first ranking, limit=5", k)]
        source = results[("the same, rank.py interpreted (GeoLite2 uncached)", k)]
        print(
            f"k = {k}: Steering.rank (best {DEFAULT_LIMIT}, prepared) makes "
            f"{now.rate_cpu / was.rate_cpu:.1f}x the decisions/s (CPU) of the first ranking "
            f"of every edge, {now.rate_cpu / was5.rate_cpu:.1f}x that of its best "
            f"{DEFAULT_LIMIT}; goal (20,000/s, p99 < 1 ms): {verdict(now)} with GeoLite2 "
            f"uncached, {verdict(now_cached)} with its cache, {verdict(now_list)} from a list; "
            f"{now.rate_cpu / source.rate_cpu:.2f}x the decisions/s of rank.py interpreted"
        )
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")
    print()
    print("reproduce: .venv/bin/python bench/steering.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
