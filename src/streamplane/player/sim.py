"""The trace-driven simulator: one viewer, one ABR object, one network trace, one manifest.

The model (the same for every algorithm):

- The player requests segments one at a time. A request first waits the current period's
  latency (no bytes flow), then receives bits at the trace's bandwidth, period after period;
  the trace loops when the video outlasts it. Every `tick_s` of a request the algorithm may
  abandon it for a lower rung (`Progress` carries the bits so far and those of the last second,
  as a player measures them): the bits so far are wasted and the new request pays latency again.
- The buffer gains a segment's duration when its last bit arrives and drains in real time while
  playing. Before a request, if the segment would not fit under `max_buffer_s`, the player waits
  (playing) until it does: the buffer is never negative and never above the maximum.
- Playback starts once `startup_buffer_s` is buffered (default: the first segment), or when the
  next segment would not fit. A stall begins when the buffer runs dry while playing and ends when
  the next segment arrives.
- Time is conserved: wall time = startup delay + media duration + rebuffer time.

Metrics follow Pensieve's linear QoE: per segment, bitrate (Mbps, the rung's nominal bitrate)
- 4.3 x rebuffer seconds during its request - |bitrate change from the previous segment|,
summed (and averaged per segment). Startup delay is reported apart, not in the rebuffer time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from streamplane.player.abr import (
    Abr,
    AbrState,
    Download,
    Phase,
    Progress,
    RecentRate,
    RungInfo,
    checked_abandon,
    checked_choice,
)
from streamplane.player.errors import ManifestError, PlayerError
from streamplane.player.traces import Trace

if TYPE_CHECKING:
    from streamplane.media.title import Title

REBUFFER_PENALTY = 4.3  # QoE units per second of rebuffering (Pensieve's QoE_lin)


class Manifest(msgspec.Struct, frozen=True):
    """What the simulator needs of a title: segment durations and each rung's sizes."""

    name: str
    segment_durations_s: tuple[float, ...]
    rungs: tuple[RungInfo, ...]  # lowest bitrate first; sizes known for every segment

    @property
    def duration_s(self) -> float:
        return sum(self.segment_durations_s)

    @property
    def segment_s(self) -> float:
        return max(self.segment_durations_s)


class _JsonManifest(msgspec.Struct, forbid_unknown_fields=True):
    segment_duration_ms: float
    bitrates_kbps: list[float]
    segment_sizes_bits: list[list[int]]
    segment_vmaf: list[list[float]] | None = None


def _check_manifest(m: Manifest) -> Manifest:
    if not m.rungs:
        raise ManifestError(f"{m.name}: no rungs")
    if not m.segment_durations_s:
        raise ManifestError(f"{m.name}: no segments")
    if any(d <= 0 for d in m.segment_durations_s):
        raise ManifestError(f"{m.name}: every segment duration must be > 0")
    rates = [r.bitrate_kbps for r in m.rungs]
    if any(r <= 0 for r in rates):
        raise ManifestError(f"{m.name}: every bitrate must be > 0")
    if len(set(rates)) != len(rates) or rates != sorted(rates):
        raise ManifestError(f"{m.name}: bitrates must ascend strictly, found {rates}")
    n = len(m.segment_durations_s)
    for k, r in enumerate(m.rungs):
        if len(r.segment_bits) != n:
            raise ManifestError(
                f"{m.name}: rung {k} has {len(r.segment_bits)} segment sizes for {n} segments"
            )
        if any(b <= 0 for b in r.segment_bits):
            raise ManifestError(f"{m.name}: rung {k} has a segment size <= 0")
        if r.segment_vmaf and len(r.segment_vmaf) != n:
            raise ManifestError(
                f"{m.name}: rung {k} has {len(r.segment_vmaf)} VMAF values for {n} segments"
            )
    return m


def parse_manifest(data: bytes, name: str = "manifest") -> Manifest:
    """A simulator manifest (`segment_duration_ms`, `bitrates_kbps`, `segment_sizes_bits` per
    segment per rung, optional `segment_vmaf` likewise) or a streamplane title.json."""
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{name}: not valid JSON ({exc})") from None
    if isinstance(raw, dict) and "rungs" in raw and "segments" in raw:
        from streamplane.media import Title

        try:
            title = msgspec.convert(raw, type=Title)
        except msgspec.ValidationError as exc:
            raise ManifestError(f"{name}: not a valid title.json: {exc}") from None
        return manifest_from_title(title, name)
    try:
        m = msgspec.convert(raw, type=_JsonManifest)
    except msgspec.ValidationError as exc:
        raise ManifestError(f"{name}: {exc}") from None
    if m.segment_duration_ms <= 0:
        raise ManifestError(f"{name}: segment_duration_ms must be > 0")
    nr = len(m.bitrates_kbps)
    for i, sizes in enumerate(m.segment_sizes_bits):
        if len(sizes) != nr:
            raise ManifestError(
                f"{name}: segment_sizes_bits[{i}] has {len(sizes)} sizes for {nr} bitrates"
            )
    if m.segment_vmaf is not None:
        if len(m.segment_vmaf) != len(m.segment_sizes_bits):
            raise ManifestError(f"{name}: segment_vmaf must have one row per segment")
        for i, row in enumerate(m.segment_vmaf):
            if len(row) != nr:
                raise ManifestError(f"{name}: segment_vmaf[{i}] has {len(row)} values for {nr}")
    rungs = tuple(
        RungInfo(
            m.bitrates_kbps[k],
            tuple(seg[k] for seg in m.segment_sizes_bits),
            tuple(row[k] for row in m.segment_vmaf) if m.segment_vmaf else (),
        )
        for k in range(nr)
    )
    durations = (m.segment_duration_ms / 1000.0,) * len(m.segment_sizes_bits)
    return _check_manifest(Manifest(name, durations, rungs))


def manifest_from_title(title: Title, name: str | None = None) -> Manifest:
    """Sizes (bytes x 8), per-segment VMAF and segment durations of a title package; rungs by
    average bitrate."""
    rungs = sorted(title.rungs, key=lambda r: r.average_bitrate_bps)
    info = tuple(
        RungInfo(
            r.average_bitrate_bps / 1000.0,
            tuple(b * 8 for b in r.segment_bytes),
            tuple(r.segment_vmaf),
        )
        for r in rungs
    )
    durations = tuple(s.duration_s for s in title.segments)
    return _check_manifest(Manifest(name or title.title, durations, info))


def load_manifest(path: Path) -> Manifest:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest file") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc})") from None
    return parse_manifest(data, str(path))


def loop_manifest(m: Manifest, min_duration_s: float) -> Manifest:
    """The title played back to back until it lasts at least `min_duration_s`."""
    times = max(1, math.ceil(min_duration_s / m.duration_s))
    return Manifest(
        m.name,
        m.segment_durations_s * times,
        tuple(
            RungInfo(r.bitrate_kbps, r.segment_bits * times, r.segment_vmaf * times)
            for r in m.rungs
        ),
    )


# --- the link ----------------------------------------------------------------------------------


class _Link:
    """Walks a trace (looping) as time passes and bits flow."""

    def __init__(self, trace: Trace) -> None:
        self.durations = [p.duration_s for p in trace.periods]
        self.bps = [p.bandwidth_kbps * 1000.0 for p in trace.periods]
        self.latency = [p.latency_ms / 1000.0 for p in trace.periods]
        self.idx = 0
        self.offset = 0.0

    def _next(self) -> None:
        self.idx = (self.idx + 1) % len(self.durations)
        self.offset = 0.0

    def latency_s(self) -> float:
        return self.latency[self.idx]

    def bandwidth_kbps(self) -> float:
        return self.bps[self.idx] / 1000.0

    def advance(self, dt: float) -> None:
        while dt > 0:
            rem = self.durations[self.idx] - self.offset
            if dt < rem:
                self.offset += dt
                return
            dt -= rem
            self._next()

    def transfer(self, bits: float, max_dt: float) -> tuple[float, float]:
        """Send up to `bits` within `max_dt`: (bits sent, time used)."""
        sent = used = 0.0
        while used < max_dt and sent < bits:
            rem = self.durations[self.idx] - self.offset
            step = min(rem, max_dt - used)
            bw = self.bps[self.idx]
            if bw > 0 and (bits - sent) / bw <= step:
                dt = (bits - sent) / bw
                sent = bits
            else:
                dt = step
                sent += bw * step
            used += dt
            self.offset += dt
            if self.offset >= self.durations[self.idx] - 1e-12:
                self._next()
        return sent, used


# --- the session -------------------------------------------------------------------------------


class SimSettings(msgspec.Struct, frozen=True):
    max_buffer_s: float = 30.0
    startup_buffer_s: float | None = None  # None: the first segment's duration
    tick_s: float = 0.25  # how often an in-flight request is offered for abandonment
    history: int = 20  # downloads kept in the state
    # A request that has run this long without its segment arriving ends the session with an
    # error, as a player gives up: a trace can be all but dead (a minute at zero, then a
    # millisecond of bandwidth, looping) and would otherwise take simulated days per segment.
    give_up_s: float = 600.0


class SegmentRecord(msgspec.Struct, frozen=True):
    index: int
    rung: int
    bitrate_kbps: float
    bits: int
    vmaf: float | None
    request_s: float  # wall time of the (last) request
    arrival_s: float
    download_s: float
    rebuffer_s: float  # stall time while this segment was being fetched
    abandoned: int  # requests of this segment abandoned before it


class Sample(msgspec.Struct, frozen=True):
    """The player's state at an instant, for the plots."""

    t: float
    buffer_s: float
    rung: int
    bitrate_kbps: float


class Metrics(msgspec.Struct, frozen=True):
    segments: int
    avg_bitrate_kbps: float
    avg_vmaf: float | None
    rebuffer_s: float
    rebuffer_ratio: float  # rebuffer time / (media duration + rebuffer time)
    rebuffer_events: int
    startup_s: float
    switches: int
    avg_switch_kbps: float
    qoe: float
    qoe_per_segment: float
    abandoned: int
    wall_s: float
    media_s: float


class SimResult(msgspec.Struct, frozen=True):
    abr: str
    trace: str
    manifest: str
    metrics: Metrics
    segments: tuple[SegmentRecord, ...]
    samples: tuple[Sample, ...]


def simulate(
    manifest: Manifest, trace: Trace, abr: Abr, settings: SimSettings | None = None
) -> SimResult:
    """Play `manifest` over `trace` with `abr` (a fresh object: it may keep session state)."""
    s = settings or SimSettings()
    seg_max = manifest.segment_s
    if not (math.isfinite(s.max_buffer_s) and s.max_buffer_s > 0):
        raise PlayerError(
            f"max buffer must be a finite number of seconds > 0, found {s.max_buffer_s}"
        )
    if s.max_buffer_s < seg_max:
        raise PlayerError(
            f"max buffer {s.max_buffer_s:g} s is shorter than a segment ({seg_max:g} s)"
        )
    if not (math.isfinite(s.tick_s) and s.tick_s > 0):
        raise PlayerError("tick_s must be a finite number of seconds > 0")
    if not s.give_up_s > 0:
        raise PlayerError("give_up_s must be > 0")
    startup_at = (
        manifest.segment_durations_s[0] if s.startup_buffer_s is None else s.startup_buffer_s
    )
    if not 0 < startup_at <= s.max_buffer_s:
        raise PlayerError(f"startup buffer must be in (0, {s.max_buffer_s:g}] s")
    link = _Link(trace)
    rungs = manifest.rungs
    durs = manifest.segment_durations_s
    n = len(durs)

    t = 0.0
    buffer = 0.0
    playing = False
    stalled = False
    startup_s = 0.0
    played = 0.0
    rebuffer = 0.0
    events = 0
    downloads: list[Download] = []
    records: list[SegmentRecord] = []
    samples: list[Sample] = []
    last: int | None = None
    seg_rebuffer = 0.0
    recent = RecentRate()  # the in-flight request's rate over the last second

    def phase() -> Phase:
        if not playing:
            return "startup"
        return "rebuffering" if stalled else "steady"

    def state(i: int) -> AbrState:
        return AbrState(
            buffer_s=buffer,
            max_buffer_s=s.max_buffer_s,
            segment_s=seg_max,
            rungs=rungs,
            next_segment=i,
            last_rung=last,
            phase=phase(),
            downloads=tuple(downloads[-s.history :]),
            now_s=t,
            segment_durations_s=durs,
        )

    def play(dt: float) -> None:
        nonlocal buffer, played, rebuffer, stalled, events, seg_rebuffer
        if not playing:
            return
        if buffer >= dt:
            buffer -= dt
            played += dt
            return
        played += buffer
        stall = dt - buffer
        buffer = 0.0
        if stall > 0:
            if not stalled:
                events += 1
                stalled = True
            rebuffer += stall
            seg_rebuffer += stall

    def note(r: int) -> None:
        samples.append(Sample(t, buffer, r, rungs[r].bitrate_kbps))

    for i in range(n):
        d = durs[i]
        if buffer + d > s.max_buffer_s:
            if not playing:
                playing, startup_s = True, t
            wait = buffer + d - s.max_buffer_s
            link.advance(wait)
            play(wait)
            t += wait
        seg_rebuffer = 0.0
        r = checked_choice(abr, state(i))
        note(r)
        abandoned = 0
        while True:
            request_s = t
            total = rungs[r].segment_bits[i]
            done = 0.0
            elapsed = 0.0
            latency_left = link.latency_s()
            next_check = s.tick_s
            finished = False
            while not finished:
                dt_max = next_check - elapsed
                if latency_left > 0:
                    dt = min(latency_left, dt_max)
                    link.advance(dt)
                    latency_left -= dt
                else:
                    sent, dt = link.transfer(total - done, dt_max)
                    done += sent
                    finished = done >= total
                play(dt)
                elapsed += dt
                t += dt
                if finished:
                    continue
                if elapsed >= s.give_up_s:
                    raise PlayerError(
                        f"{trace.name}: segment {i} (rung {r}, {total} bits) did not arrive "
                        f"within {s.give_up_s:g} s of its request (the trace averages "
                        f"{trace.mean_kbps:.3g} kbps); the session was given up"
                    )
                if elapsed < next_check - 1e-9:
                    continue
                next_check += s.tick_s
                recent_bits, recent_s = recent.sample((i, abandoned), elapsed, int(done))
                progress = Progress(r, int(done), total, elapsed, recent_bits, recent_s)
                lower = checked_abandon(abr, state(i), progress)
                if lower is not None:
                    if done > 0:
                        downloads.append(Download(int(done), elapsed, t))
                    abandoned += 1
                    r = lower
                    note(r)
                    break
            if finished:
                break
        downloads.append(Download(total, elapsed, t))
        buffer += d
        stalled = False
        records.append(
            SegmentRecord(
                index=i,
                rung=r,
                bitrate_kbps=rungs[r].bitrate_kbps,
                bits=total,
                vmaf=rungs[r].segment_vmaf[i] if rungs[r].segment_vmaf else None,
                request_s=request_s,
                arrival_s=t,
                download_s=elapsed,
                rebuffer_s=seg_rebuffer,
                abandoned=abandoned,
            )
        )
        last = r
        if not playing and (buffer >= startup_at - 1e-9 or i == n - 1):
            playing, startup_s = True, t
        note(r)
    # play out what is buffered
    played += buffer
    t += buffer
    buffer = 0.0
    samples.append(Sample(t, 0.0, last or 0, rungs[last or 0].bitrate_kbps))
    metrics = _metrics(records, startup_s, rebuffer, events, t, manifest.duration_s)
    return SimResult(abr.name, trace.name, manifest.name, metrics, tuple(records), tuple(samples))


def _metrics(
    records: list[SegmentRecord],
    startup_s: float,
    rebuffer: float,
    events: int,
    wall: float,
    media: float,
) -> Metrics:
    n = len(records)
    mbps = [r.bitrate_kbps / 1000.0 for r in records]
    qoe = 0.0
    switch_sizes: list[float] = []
    for k, rec in enumerate(records):
        qoe += mbps[k] - REBUFFER_PENALTY * rec.rebuffer_s
        if k > 0:
            change = abs(mbps[k] - mbps[k - 1])
            qoe -= change
            if rec.rung != records[k - 1].rung:
                switch_sizes.append(change * 1000.0)
    vmafs = [r.vmaf for r in records if r.vmaf is not None]
    return Metrics(
        segments=n,
        avg_bitrate_kbps=sum(mbps) / n * 1000.0,
        avg_vmaf=sum(vmafs) / len(vmafs) if len(vmafs) == n else None,
        rebuffer_s=rebuffer,
        rebuffer_ratio=rebuffer / (media + rebuffer),
        rebuffer_events=events,
        startup_s=startup_s,
        switches=len(switch_sizes),
        avg_switch_kbps=sum(switch_sizes) / len(switch_sizes) if switch_sizes else 0.0,
        qoe=qoe,
        qoe_per_segment=qoe / n,
        abandoned=sum(r.abandoned for r in records),
        wall_s=wall,
        media_s=media,
    )


def mean_metrics(results: list[Metrics]) -> Metrics:
    """The mean of each metric over sessions (counts as means, VMAF only if every run has it)."""
    if not results:
        raise PlayerError("no results to average")
    k = len(results)

    def avg(name: str) -> float:
        return sum(float(getattr(m, name)) for m in results) / k

    vmafs = [m.avg_vmaf for m in results]
    return Metrics(
        segments=round(avg("segments")),
        avg_bitrate_kbps=avg("avg_bitrate_kbps"),
        avg_vmaf=None if any(v is None for v in vmafs) else sum(v or 0.0 for v in vmafs) / k,
        rebuffer_s=avg("rebuffer_s"),
        rebuffer_ratio=avg("rebuffer_ratio"),
        rebuffer_events=round(avg("rebuffer_events")),
        startup_s=avg("startup_s"),
        switches=round(avg("switches")),
        avg_switch_kbps=avg("avg_switch_kbps"),
        qoe=avg("qoe"),
        qoe_per_segment=avg("qoe_per_segment"),
        abandoned=round(avg("abandoned")),
        wall_s=avg("wall_s"),
        media_s=avg("media_s"),
    )


# --- pictures ----------------------------------------------------------------------------------


def plot_sessions(results: list[SimResult], trace: Trace, path: Path) -> Path:
    """Buffer, bitrate and throughput over time for one trace and one or more algorithms."""
    from streamplane.reporting import figure

    end = max(r.samples[-1].t for r in results)
    with figure(path, 10, 7.5) as fig:
        ax_buf, ax_rate, ax_net = fig.subplots(3, 1, sharex=True)
        for res in results:
            ts = [p.t for p in res.samples]
            ax_buf.plot(ts, [p.buffer_s for p in res.samples], lw=1, label=res.abr)
            ax_rate.step(
                ts, [p.bitrate_kbps for p in res.samples], where="post", lw=1, label=res.abr
            )
            ax_net.plot(
                [rec.arrival_s for rec in res.segments],
                [rec.bits / rec.download_s / 1000 for rec in res.segments],
                ".",
                ms=3,
                label=f"{res.abr}: measured",
            )
        xs, ys, at = [], [], 0.0
        while at < end:
            for p in trace.periods:
                xs += [at, at + p.duration_s]
                ys += [p.bandwidth_kbps, p.bandwidth_kbps]
                at += p.duration_s
                if at >= end:
                    break
        ax_net.plot(xs, ys, color="black", lw=0.8, label="trace bandwidth")
        ax_buf.set_ylabel("buffer (s)")
        ax_rate.set_ylabel("rung bitrate (kbps)")
        ax_net.set_ylabel("throughput (kbps)")
        ax_net.set_yscale("log")
        ax_net.set_xlabel("wall time (s)")
        ax_buf.set_title(f"{trace.name}: buffer, rung and throughput")
        ax_buf.legend(loc="upper right", ncols=3)
        ax_net.legend(loc="lower right", ncols=2, fontsize=7)
    return path
