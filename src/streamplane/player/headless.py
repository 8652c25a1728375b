"""The pure core of the headless viewers and the swarm: no I/O, no clock, no randomness.

`player/viewer.py` (one viewer) and `player/swarm.py` (many) are thin asyncio shells around
what is here; every time is an argument.

- `Playout`: one session's buffer and play-out clock. The model is the simulator's (see
  `player/sim.py`): a segment's duration joins the buffer when its last byte arrives; while
  playing, the buffer drains one second per second; when it runs dry a stall (a rebuffer
  event) begins and lasts until the next segment arrives. Playback starts once
  `startup_buffer_s` is buffered, when the next segment would not fit under the maximum, or at
  the end of the stream. Startup delay counts from the session's start (t = 0: the viewer
  asked to play, before the control plane answered) to the first frame.
- `Ledger`: what the session did: segments (rung, bytes, VMAF, download time, edge), bytes and
  requests per edge, errors, failovers, abandoned requests, heartbeats.
- `TraceBucket`: a token bucket whose rate follows a network trace (looping), so a viewer on
  loopback can be throttled to a 3G or LTE link.
- `viewer_result`, `summarise`, `percentile`, `parse_edge_metrics`: the per-viewer result and
  the swarm's QoE percentiles and edge load.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from streamplane.player.abr import Phase
from streamplane.player.traces import Trace

__all__ = [
    "Distribution",
    "EdgeLoad",
    "Ledger",
    "Playout",
    "SegmentRecord",
    "SwarmSummary",
    "TraceBucket",
    "ViewerResult",
    "audio_plan",
    "heartbeat_event",
    "parse_edge_metrics",
    "percentile",
    "summarise",
    "viewer_result",
]


# --- the play-out clock ------------------------------------------------------------------------


class Playout:
    """Buffer, play-out clock, stalls and startup of one session, in session seconds."""

    def __init__(
        self,
        max_buffer_s: float,
        startup_buffer_s: float,
        position_s: float = 0.0,
        now_s: float = 0.0,
    ) -> None:
        if max_buffer_s <= 0:
            raise ValueError(f"max_buffer_s must be > 0, not {max_buffer_s}")
        if not 0 < startup_buffer_s <= max_buffer_s:
            raise ValueError(f"startup_buffer_s must be in (0, {max_buffer_s:g}]")
        self.max_buffer_s = max_buffer_s
        self.startup_buffer_s = startup_buffer_s
        self.start_position_s = position_s
        self.t = now_s
        self.buffer_s = 0.0
        self.playing = False
        self.stalled = False
        self.started_at_s: float | None = None
        self.played_s = 0.0
        self.rebuffer_s = 0.0
        self.rebuffer_events = 0
        self.draining = False  # no more segments will come: running dry ends playback
        self.ended = False
        self.rate = 1.0  # media seconds played per session second (a live player's catch-up)

    @property
    def phase(self) -> Phase:
        if not self.playing:
            return "startup"
        return "rebuffering" if self.stalled else "steady"

    @property
    def position_s(self) -> float:
        """Media position of the playhead."""
        return self.start_position_s + self.played_s

    @property
    def startup_s(self) -> float | None:
        """Seconds from the session's start to the first frame; None before it."""
        return self.started_at_s

    def advance(self, now_s: float) -> None:
        """Let session time run to `now_s` (earlier times are ignored: time only moves on)."""
        dt = now_s - self.t
        if dt <= 0:
            return
        self.t = now_s
        if not self.playing or self.ended:
            return
        drain = dt * self.rate
        if self.buffer_s >= drain:
            self.buffer_s -= drain
            self.played_s += drain
            return
        stall = dt - self.buffer_s / self.rate
        self.played_s += self.buffer_s
        self.buffer_s = 0.0
        if self.draining:
            self.ended = True
            return
        if not self.stalled:
            self.stalled = True
            self.rebuffer_events += 1
        self.rebuffer_s += stall

    def _start(self) -> None:
        if not self.playing:
            self.playing = True
            self.started_at_s = self.t

    def make_room(self, duration_s: float) -> float:
        """Seconds to wait (from `t`) before a segment of `duration_s` fits under the maximum.

        A segment that does not fit while playback has not begun starts it (the buffer is as
        full as it may get), as in the simulator."""
        over = self.buffer_s + duration_s - self.max_buffer_s
        if over <= 1e-9:
            return 0.0
        self._start()
        return over

    def arrived(self, now_s: float, duration_s: float) -> None:
        """A segment's last byte arrived at `now_s`: its media joins the buffer, a stall ends,
        and playback starts if the startup buffer is reached."""
        self.advance(now_s)
        self.buffer_s += duration_s
        self.stalled = False
        if not self.playing and self.buffer_s >= self.startup_buffer_s - 1e-9:
            self._start()

    def finish(self, now_s: float) -> float:
        """No more segments: start playing if not yet, and return when play-out ends (the
        buffer running dry from now on is the end, not a stall)."""
        self.advance(now_s)
        self._start()
        self.draining = True
        self.stalled = False
        return self.t + self.buffer_s

    def end(self, now_s: float) -> None:
        """Play out to `now_s` and stop the clock (further time adds nothing)."""
        self.advance(now_s)
        self.ended = True
        self.stalled = False


# --- the link ----------------------------------------------------------------------------------


class TraceBucket:
    """A token bucket whose fill rate follows `trace`: how a throttled link lets bits through.

    Tokens (bits) accrue at the trace's bandwidth of each instant (the trace loops; t = 0 is
    its start) up to `burst_bits`; the bucket starts full. Sending n bits takes n tokens,
    waiting for any missing: `take(now, n)` answers when the last of them has passed. Requests
    of one viewer share the bucket, one after the other. `latency_s(t)` is the period's
    latency, which a request pays before its first byte.
    """

    def __init__(self, trace: Trace, burst_bits: float = 65536.0, start_s: float = 0.0) -> None:
        if burst_bits < 0:
            raise ValueError("burst_bits must be >= 0")
        self.trace = trace
        self.burst_bits = burst_bits
        self.tokens = burst_bits
        self.t = start_s
        self._starts: list[float] = []
        self._cum: list[float] = []  # bits delivered from the loop's start to each period's start
        self._rate: list[float] = []
        self._latency: list[float] = []
        at = bits = 0.0
        for p in trace.periods:
            self._starts.append(at)
            self._cum.append(bits)
            rate = max(p.bandwidth_kbps, 0.0) * 1000.0
            self._rate.append(rate)
            self._latency.append(p.latency_ms / 1000.0)
            at += p.duration_s
            bits += rate * p.duration_s
        self._loop_s = at
        self._loop_bits = bits
        self._cum_end = [*self._cum[1:], bits]
        if self._loop_s <= 0 or self._loop_bits <= 0:
            raise ValueError(f"trace {trace.name!r} delivers nothing")

    def _period(self, t: float) -> tuple[int, int, float]:
        """(loops, period index, time into the loop) at absolute time `t` >= 0."""
        loops = math.floor(t / self._loop_s)
        rem = t - loops * self._loop_s
        k = max(bisect.bisect_right(self._starts, rem) - 1, 0)
        return loops, k, rem

    def rate_bps(self, t: float) -> float:
        return self._rate[self._period(max(t, 0.0))[1]]

    def latency_s(self, t: float) -> float:
        return self._latency[self._period(max(t, 0.0))[1]]

    def delivered(self, t: float) -> float:
        """Bits the trace delivers from 0 to `t`."""
        loops, k, rem = self._period(max(t, 0.0))
        return loops * self._loop_bits + self._cum[k] + self._rate[k] * (rem - self._starts[k])

    def time_for(self, start_s: float, bits: float) -> float:
        """The earliest time by which `bits` more have been delivered after `start_s`."""
        if bits <= 0:
            return start_s
        target = self.delivered(start_s) + bits
        loops = math.ceil(target / self._loop_bits) - 1
        rem = target - loops * self._loop_bits
        k = min(bisect.bisect_left(self._cum_end, rem), len(self._rate) - 1)
        while self._rate[k] <= 0 and k + 1 < len(self._rate):  # only through rounding
            k += 1
        t = loops * self._loop_s + self._starts[k] + (rem - self._cum[k]) / self._rate[k]
        return max(t, start_s)

    def take(self, now_s: float, bits: float) -> float:
        """Send `bits` at `now_s`: when the last of them has passed the link."""
        now = max(now_s, self.t)
        self.tokens = min(
            self.burst_bits, self.tokens + self.delivered(now) - self.delivered(self.t)
        )
        self.t = now
        if self.tokens >= bits:
            self.tokens -= bits
            return now
        done = self.time_for(now, bits - self.tokens)
        self.tokens = 0.0
        self.t = done
        return done


# --- what a session did ------------------------------------------------------------------------


class SegmentRecord(msgspec.Struct, frozen=True):
    index: int  # position in the session's schedule (the title repeats for long sessions)
    rung: int  # lowest bitrate first
    bitrate_kbps: float
    bytes: int
    vmaf: float | None
    download_s: float  # session seconds, request to last byte (latency included)
    edge: str
    abandoned: int  # requests of this segment abandoned for a lower rung first


class Ledger:
    """Everything a session counts, besides the play-out clock."""

    def __init__(self) -> None:
        self.segments: list[SegmentRecord] = []
        self.edge_bytes: dict[str, int] = {}
        self.edge_requests: dict[str, int] = {}
        self.edge_errors: dict[str, int] = {}
        self.errors: list[str] = []
        self.failovers = 0
        self.abandoned = 0
        self.switches = 0
        self.edge: str | None = None
        self.heartbeats_sent = 0
        self.heartbeats_ok = 0
        self.heartbeats_throttled = 0  # answered 429: sent again later, as told
        self.acknowledged_position_s: float | None = None
        self.last_throughput_kbps: float | None = None
        self.latencies: list[float] | None = None  # a live session's samples of latency to live

    @property
    def last_rung(self) -> int | None:
        return self.segments[-1].rung if self.segments else None

    @property
    def bytes(self) -> int:
        return sum(self.edge_bytes.values())

    @property
    def requests(self) -> int:
        return sum(self.edge_requests.values())

    def request(self, edge: str, nbytes: int) -> None:
        """A request to `edge` ended (complete, abandoned or failed) after `nbytes` of body."""
        self.edge_requests[edge] = self.edge_requests.get(edge, 0) + 1
        self.edge_bytes[edge] = self.edge_bytes.get(edge, 0) + nbytes

    def error(self, edge: str, message: str, keep: int = 20) -> None:
        self.edge_errors[edge] = self.edge_errors.get(edge, 0) + 1
        if len(self.errors) < keep:
            self.errors.append(message)

    def segment(self, record: SegmentRecord) -> bool:
        """Record a segment; True if it switched rung."""
        switched = bool(self.segments) and self.segments[-1].rung != record.rung
        self.switches += switched
        self.segments.append(record)
        self.edge = record.edge
        if record.download_s > 0:
            self.last_throughput_kbps = record.bytes * 8 / record.download_s / 1000.0
        return switched


def _finite(x: float | None, digits: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, digits)


def heartbeat_event(kind: str, at: float, playout: Playout, ledger: Ledger) -> dict[str, Any]:
    """One event of a `POST /v1/heartbeat` batch: what the player is doing at `at` (epoch s).

    `at`, `position_s` and `kind` are what the control plane records; the rest (buffer, rung,
    throughput, rebuffers, startup, edge, errors) rides along for telemetry."""
    last = ledger.segments[-1] if ledger.segments else None
    return {
        "at": round(at, 3),
        "position_s": round(max(playout.position_s, 0.0), 3),
        "kind": kind,
        "phase": playout.phase,
        "buffer_s": round(playout.buffer_s, 3),
        "rung": None if last is None else last.rung,
        "bitrate_kbps": None if last is None else round(last.bitrate_kbps, 1),
        "throughput_kbps": _finite(ledger.last_throughput_kbps, 1),
        "rebuffers": playout.rebuffer_events,
        "rebuffer_s": round(playout.rebuffer_s, 3),
        "startup_s": _finite(playout.startup_s),
        "edge": ledger.edge,
        "errors": sum(ledger.edge_errors.values()),
        "failovers": ledger.failovers,
    }


def audio_plan(
    video_ends_s: Sequence[float], audio_starts_s: Sequence[float]
) -> list[tuple[int, ...]]:
    """Which audio segments to fetch before each video segment: those starting before the video
    segment ends and not fetched before it. Every audio segment lands somewhere (the last video
    segment takes any left)."""
    plan: list[tuple[int, ...]] = []
    nxt = 0
    for k, end in enumerate(video_ends_s):
        last = k == len(video_ends_s) - 1
        take = []
        while nxt < len(audio_starts_s) and (last or audio_starts_s[nxt] < end - 1e-9):
            take.append(nxt)
            nxt += 1
        plan.append(tuple(take))
    return plan


# --- results -----------------------------------------------------------------------------------


class ViewerResult(msgspec.Struct, frozen=True):
    """One viewer's session, as the swarm reports it. Times are session seconds."""

    viewer: int
    ok: bool  # played to the end without a fatal error
    error: str | None
    session_id: str | None
    startup_s: float | None
    rebuffer_s: float
    rebuffer_events: int
    rebuffer_ratio: float  # rebuffer time / (media played + rebuffer time)
    media_s: float  # media played
    session_s: float  # session time from the start to the last frame (or the failure)
    segments: int
    avg_bitrate_kbps: float | None  # mean of the segments' nominal bitrates
    avg_vmaf: float | None
    switches: int
    failovers: int
    abandoned: int
    errors: int  # errors the viewer recovered from or died of
    bytes: int
    requests: int
    edge: str | None  # the edge of the last segment
    edge_bytes: dict[str, int]
    edge_requests: dict[str, int]
    edge_errors: dict[str, int]  # errors by where: an edge id, or "control" (playback, heartbeats)
    heartbeats_sent: int
    heartbeats_ok: int
    acknowledged_position_s: float | None  # the resume position the control plane answered
    position_s: float
    trace: str | None = None
    source: str | None = None
    error_log: tuple[str, ...] = ()
    live: bool = False
    latency_p50_s: float | None = None  # a live session's latency to the live edge
    latency_p95_s: float | None = None


def viewer_result(
    viewer: int,
    playout: Playout,
    ledger: Ledger,
    *,
    session_id: str | None,
    error: str | None,
    trace: str | None = None,
    source: str | None = None,
) -> ViewerResult:
    n = len(ledger.segments)
    live = ledger.latencies is not None
    vmafs = [s.vmaf for s in ledger.segments if s.vmaf is not None]
    media = playout.played_s
    stalled = playout.rebuffer_s
    return ViewerResult(
        viewer=viewer,
        ok=error is None,
        error=error,
        session_id=session_id,
        startup_s=playout.startup_s,
        rebuffer_s=stalled,
        rebuffer_events=playout.rebuffer_events,
        rebuffer_ratio=stalled / (media + stalled) if media + stalled > 0 else 0.0,
        media_s=media,
        session_s=playout.t,
        segments=n,
        avg_bitrate_kbps=sum(s.bitrate_kbps for s in ledger.segments) / n if n else None,
        avg_vmaf=sum(vmafs) / len(vmafs) if n and len(vmafs) == n else None,
        switches=ledger.switches,
        failovers=ledger.failovers,
        abandoned=ledger.abandoned,
        errors=sum(ledger.edge_errors.values()) + (error is not None),
        bytes=ledger.bytes,
        requests=ledger.requests,
        edge=ledger.edge,
        edge_bytes=dict(ledger.edge_bytes),
        edge_requests=dict(ledger.edge_requests),
        edge_errors=dict(ledger.edge_errors),
        heartbeats_sent=ledger.heartbeats_sent,
        heartbeats_ok=ledger.heartbeats_ok,
        acknowledged_position_s=ledger.acknowledged_position_s,
        position_s=playout.position_s,
        trace=trace,
        source=source,
        error_log=tuple(ledger.errors),
        live=live,
        latency_p50_s=percentile(ledger.latencies or [], 50),
        latency_p95_s=percentile(ledger.latencies or [], 95),
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default); None if
    there are no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], not {q}")
    xs = sorted(values)
    pos = q / 100 * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Distribution(msgspec.Struct, frozen=True):
    count: int
    mean: float | None
    p10: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        return cls(
            count=len(values),
            mean=sum(values) / len(values) if values else None,
            p10=percentile(values, 10),
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
        )


class EdgeLoad(msgspec.Struct, frozen=True):
    """One edge's share of the swarm: by the viewers' own accounting and by its /metrics."""

    edge_id: str
    base_url: str
    first_choice: int  # viewers whose playback answer ranked it first
    finished_on: int  # viewers whose last segment came from it
    bytes: int  # body bytes the viewers received from it
    requests: int
    errors: int  # requests to it that failed
    metrics_bytes: int | None = None  # streamplane_edge_bytes_sent_total, during the run
    metrics_requests: int | None = None  # streamplane_edge_requests_total, during the run
    metrics_note: str | None = None  # why the metrics are missing


class SwarmSummary(msgspec.Struct, frozen=True):
    viewers: int
    finished: int
    failed: int
    startup_s: Distribution
    rebuffer_ratio: Distribution
    avg_bitrate_kbps: Distribution
    avg_vmaf: Distribution
    rebuffer_events: int
    viewers_rebuffered: int
    switches: int
    failovers: int
    abandoned: int
    errors: int
    bytes: int
    requests: int
    heartbeats_sent: int
    heartbeats_ok: int
    failures: dict[str, int]  # fatal error message (first line) -> viewers
    # live sessions: each viewer's median and p95 latency to the live edge
    latency_p50_s: Distribution = Distribution(0, None, None, None, None, None)
    latency_p95_s: Distribution = Distribution(0, None, None, None, None, None)


def summarise(results: Sequence[ViewerResult]) -> SwarmSummary:
    """QoE distributions over the viewers that finished; counts over all of them."""
    ok = [r for r in results if r.ok]
    failures: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            key = r.error.splitlines()[0][:200]
            failures[key] = failures.get(key, 0) + 1

    def vals(xs: Iterable[float | None]) -> list[float]:
        return [x for x in xs if x is not None]

    return SwarmSummary(
        viewers=len(results),
        finished=len(ok),
        failed=len(results) - len(ok),
        startup_s=Distribution.of(vals(r.startup_s for r in ok)),
        rebuffer_ratio=Distribution.of([r.rebuffer_ratio for r in ok]),
        avg_bitrate_kbps=Distribution.of(vals(r.avg_bitrate_kbps for r in ok)),
        avg_vmaf=Distribution.of(vals(r.avg_vmaf for r in ok)),
        rebuffer_events=sum(r.rebuffer_events for r in results),
        viewers_rebuffered=sum(r.rebuffer_events > 0 for r in results),
        switches=sum(r.switches for r in results),
        failovers=sum(r.failovers for r in results),
        abandoned=sum(r.abandoned for r in results),
        errors=sum(r.errors for r in results),
        bytes=sum(r.bytes for r in results),
        requests=sum(r.requests for r in results),
        heartbeats_sent=sum(r.heartbeats_sent for r in results),
        heartbeats_ok=sum(r.heartbeats_ok for r in results),
        failures=failures,
        latency_p50_s=Distribution.of(vals(r.latency_p50_s for r in ok)),
        latency_p95_s=Distribution.of(vals(r.latency_p95_s for r in ok)),
    )


def parse_edge_metrics(text: str) -> tuple[int, int]:
    """(bytes sent, responses) from an edge's Prometheus text: `streamplane_edge_bytes_sent_total`
    and the sum of `streamplane_edge_requests_total` over status codes."""
    sent = requests = 0.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            number = float(value)
        except ValueError:
            continue
        metric = name.split("{", 1)[0]
        if metric == "streamplane_edge_bytes_sent_total":
            sent += number
        elif metric == "streamplane_edge_requests_total":
            requests += number
    return int(sent), int(requests)
