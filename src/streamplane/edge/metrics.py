"""Counters each worker keeps, summed across workers, and rendered as Prometheus text.

Each worker owns a :class:`WorkerMetrics` and writes a snapshot to ``.run/metrics/`` every
second; ``/metrics`` (answered by any worker) and the heartbeat (sent by the supervisor) sum
the snapshots. Plain counters in each process, no shared memory and no locks on the hot path.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import msgspec

__all__ = ["LATENCY_BUCKETS", "MetricsSnapshot", "WorkerMetrics", "read_all", "render", "sum_up"]

LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class MetricsSnapshot(msgspec.Struct, kw_only=True):
    requests: dict[str, int] = msgspec.field(default_factory=dict)  # by status code
    bytes_sent: int = 0
    hits: int = 0
    misses: int = 0
    collapsed: int = 0  # misses served from a fetch another request started
    origin_fetches: int = 0
    origin_bytes: int = 0
    origin_errors: int = 0
    fill_bytes: int = 0
    fill_titles_done: int = 0
    token_rejections: int = 0
    connections: int = 0  # open now
    latency_buckets: list[int] = msgspec.field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1)
    )
    latency_sum: float = 0.0


_STATUS_KEYS: Final = {code: str(code) for code in range(100, 600)}


class WorkerMetrics:
    def __init__(self) -> None:
        self.s = MetricsSnapshot()

    def request(self, status: int, seconds: float) -> None:
        key = _STATUS_KEYS.get(status) or str(status)
        self.s.requests[key] = self.s.requests.get(key, 0) + 1
        self.s.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.s.latency_sum += seconds

    def dump(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(self.s))
        os.replace(tmp, path)


def read_all(directory: Path) -> list[MetricsSnapshot]:
    found = []
    for path in directory.glob("*.json"):
        with contextlib.suppress(FileNotFoundError, msgspec.DecodeError):
            found.append(msgspec.json.decode(path.read_bytes(), type=MetricsSnapshot))
    return found


def sum_up(snapshots: Iterable[MetricsSnapshot]) -> MetricsSnapshot:
    total = MetricsSnapshot()
    for s in snapshots:
        for code, n in s.requests.items():
            total.requests[code] = total.requests.get(code, 0) + n
        for field in (
            "bytes_sent",
            "hits",
            "misses",
            "collapsed",
            "origin_fetches",
            "origin_bytes",
            "origin_errors",
            "fill_bytes",
            "fill_titles_done",
            "token_rejections",
            "connections",
        ):
            setattr(total, field, getattr(total, field) + getattr(s, field))
        total.latency_buckets = [
            a + b for a, b in zip(total.latency_buckets, s.latency_buckets, strict=True)
        ]
        total.latency_sum += s.latency_sum
    return total


def render(m: MetricsSnapshot, extra: dict[str, float] | None = None) -> bytes:
    """Prometheus text exposition format 0.0.4."""
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> None:
        out.append(f"# HELP streamplane_edge_{name} {help_text}")
        out.append(f"# TYPE streamplane_edge_{name} {kind}")
        out.append(f"streamplane_edge_{name}{labels} {value}")

    out.append("# HELP streamplane_edge_requests_total Responses sent, by status code.")
    out.append("# TYPE streamplane_edge_requests_total counter")
    for code in sorted(m.requests):
        out.append(f'streamplane_edge_requests_total{{code="{code}"}} {m.requests[code]}')
    metric("bytes_sent_total", "counter", "Body bytes sent to clients.", m.bytes_sent)
    metric("cache_hits_total", "counter", "Requests served from a complete object.", m.hits)
    metric("cache_misses_total", "counter", "Requests that waited on an origin fetch.", m.misses)
    metric(
        "collapsed_total", "counter", "Misses that joined a fetch already under way.", m.collapsed
    )
    looked = m.hits + m.misses
    metric("hit_ratio", "gauge", "Hits over lookups since start.", m.hits / looked if looked else 0)
    metric("origin_fetches_total", "counter", "Objects fetched from the origin.", m.origin_fetches)
    metric("origin_bytes_total", "counter", "Bytes fetched from the origin.", m.origin_bytes)
    metric("origin_errors_total", "counter", "Origin fetches that failed.", m.origin_errors)
    metric("fill_bytes_total", "counter", "Bytes pulled by proactive fill.", m.fill_bytes)
    metric("fill_titles_total", "counter", "Titles completed by fill.", m.fill_titles_done)
    metric(
        "token_rejections_total", "counter", "Requests refused for their token.", m.token_rejections
    )
    metric("connections", "gauge", "Client connections open.", m.connections)
    for name, value in (extra or {}).items():
        metric(name, "gauge", name.replace("_", " ") + ".", value)
    out.append("# HELP streamplane_edge_request_seconds Time to answer a request.")
    out.append("# TYPE streamplane_edge_request_seconds histogram")
    cumulative = 0
    for bound, n in zip(LATENCY_BUCKETS, m.latency_buckets[:-1], strict=True):
        cumulative += n
        out.append(f'streamplane_edge_request_seconds_bucket{{le="{bound}"}} {cumulative}')
    cumulative += m.latency_buckets[-1]
    out.append(f'streamplane_edge_request_seconds_bucket{{le="+Inf"}} {cumulative}')
    out.append(f"streamplane_edge_request_seconds_sum {m.latency_sum}")
    out.append(f"streamplane_edge_request_seconds_count {cumulative}")
    return ("\n".join(out) + "\n").encode()
