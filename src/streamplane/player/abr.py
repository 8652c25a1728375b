"""ABR algorithms as pure objects: one interface, driven by the simulator, browser and swarm.

Every algorithm answers two questions about an `AbrState` (what the player knows now):

- `choose(state) -> int`: the rung (index into `state.rungs`, lowest bitrate first) of the next
  segment, `state.next_segment`;
- `should_abandon(state, progress) -> int | None`: while a segment is in flight, a lower rung to
  re-request it at, or None to let it finish.

An algorithm does no I/O and reads no clock: time comes in as `state.now_s`. It may keep a little
state of its own between calls (BBA's startup flag, BOLA-E's placeholder buffer), so a player uses
one object per session; the same calls in the same order give the same decisions.

Algorithms (see docs/abr.md for the reasoning and the references):

- `throughput`: the baseline. EWMA of throughput with a fast and a slow half-life, take the
  smaller, times a safety factor; the highest rung whose bitrate fits.
- `bba`: BBA-0 of Huang et al. (SIGCOMM 2014): reservoir, cushion, a linear rate map f(B) with
  the Rate+/Rate- hysteresis, and BBA-2's startup ramp. `bba1` is the same with BBA-1's chunk
  map: the map gives an allowed segment size, compared with the next segment's real sizes.
- `bola`: BOLA-BASIC of Spiteri et al. (INFOCOM 2016), utility v_m = ln(S_m/S_1), V and gamma_p
  chosen from the buffer range so rung 0 wins below the minimum buffer and the top rung at the
  target. `bola-e`: with the BOLA-E refinements of dash.js (Spiteri, Sitaraman, Sparacio 2018):
  throughput-based startup with a placeholder buffer, BOLA-O's oscillation cap, the
  insufficient-buffer rule and score-based abandonment.
- `streamplane`: ours, model-predictive control on the benchmark's own score (Pensieve's linear
  QoE) over the next segments at their real sizes, with a quadratic price on ending below a
  buffer target; it abandons a request in flight when, judged on its last second's rate (a drop
  model), a restart is worth more on the same score. Stateless (everything is in `AbrState` and
  `Progress`; the player measures the recent rate with `RecentRate`), so the JavaScript port in
  `web/static/abr.js` gives the same answers; `player/vectors.json` proves it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import msgspec

from streamplane.player.errors import AbrError

Phase = Literal["startup", "steady", "seek", "rebuffering"]
"""startup: playback has not begun; seek: refilling after a seek; rebuffering: stalled after
playback began; steady: playing."""

PHASES: tuple[Phase, ...] = ("startup", "steady", "seek", "rebuffering")


class RungInfo(msgspec.Struct, frozen=True):
    """One rung as the ABR sees it. Sizes and VMAF per segment when the manifest has them."""

    bitrate_kbps: float  # nominal (average) bitrate
    segment_bits: tuple[int, ...] = ()  # size of each segment in bits; () = nominal x duration
    segment_vmaf: tuple[float, ...] = ()  # VMAF of each segment; () = unknown


class Download(msgspec.Struct, frozen=True):
    """One finished (or abandoned) request: bits received and the seconds it took, request to
    last byte (so latency is in it, as a player measures it)."""

    bits: int
    seconds: float
    end_s: float | None = None  # session clock at the last byte; None: not known

    @property
    def kbps(self) -> float:
        return self.bits / self.seconds / 1000.0 if self.seconds > 0 else math.inf


class AbrState(msgspec.Struct, frozen=True):
    """What the player knows when it asks for a decision."""

    buffer_s: float  # media buffered ahead of the playhead
    max_buffer_s: float
    segment_s: float  # nominal segment duration
    rungs: tuple[RungInfo, ...]  # lowest bitrate first
    next_segment: int  # index of the segment to fetch
    last_rung: int | None = None  # rung of the previous segment; None before the first
    phase: Phase = "steady"
    downloads: tuple[Download, ...] = ()  # last requests, oldest first
    now_s: float = 0.0  # session clock (seconds since the session began)
    segment_durations_s: tuple[float, ...] = ()  # per segment when known; () = all segment_s


class Progress(msgspec.Struct, frozen=True):
    """A download in flight: the rung it was requested at and how far it has come.

    `recent_bits` and `recent_s` are the player's measurement of the request's recent rate: the
    bits received over the last `recent_s` seconds (about a second, `RecentRate`; the whole
    request while it is younger than that). 0 s: not measured, the request's average is used."""

    rung: int
    bits_done: int
    bits_total: int
    elapsed_s: float
    recent_bits: int = 0
    recent_s: float = 0.0


RECENT_WINDOW_S = 1.0  # what `RecentRate` measures over, unless told otherwise


class RecentRate:
    """The player's side of `Progress.recent_bits`/`recent_s`: fed the progress of the request
    in flight (`key` names the request, `elapsed_s` counts from its start), it answers with the
    bits received since the latest sample at least `window_s` old (since the start while there
    is none). A new key, or a clock that went back, starts a new request. The JavaScript twin
    is `RecentRate` in web/static/abr.js."""

    def __init__(self, window_s: float = RECENT_WINDOW_S) -> None:
        self.window_s = window_s
        self._key: object = None
        self._samples: list[tuple[float, int]] = [(0.0, 0)]

    def sample(self, key: object, elapsed_s: float, bits_done: int) -> tuple[int, float]:
        """(recent_bits, recent_s) now, and remember this sample."""
        if key != self._key or elapsed_s < self._samples[-1][0]:
            self._key = key
            self._samples = [(0.0, 0)]
        base = 0
        for k, (t, _) in enumerate(self._samples):
            if elapsed_s - t >= self.window_s - 1e-9:
                base = k
        del self._samples[:base]
        t0, b0 = self._samples[0]
        self._samples.append((elapsed_s, bits_done))
        return bits_done - b0, elapsed_s - t0


class Abr(Protocol):
    """The interface every algorithm implements."""

    name: str

    def choose(self, state: AbrState) -> int: ...

    def should_abandon(self, state: AbrState, progress: Progress) -> int | None: ...


# --- what every algorithm reads from the state ------------------------------------------------


def segment_duration(state: AbrState, index: int) -> float:
    """Duration of segment `index` (the nominal one past the known list)."""
    d = state.segment_durations_s
    return d[index] if 0 <= index < len(d) else state.segment_s


def segment_bits(state: AbrState, rung: int, index: int) -> float:
    """Size in bits of segment `index` at `rung`: the real size when known, else nominal."""
    r = state.rungs[rung]
    if 0 <= index < len(r.segment_bits):
        return float(r.segment_bits[index])
    return r.bitrate_kbps * 1000.0 * segment_duration(state, index)


def segment_vmaf(state: AbrState, rung: int, index: int) -> float | None:
    v = state.rungs[rung].segment_vmaf
    return v[index] if 0 <= index < len(v) else None


def ewma_kbps(
    downloads: Sequence[Download], half_life_s: float, session_clock: bool = False
) -> float | None:
    """Exponentially weighted mean throughput, each sample weighted by its download time (as
    dash.js does), corrected for the zero start. None without samples.

    `session_clock`: a sample is weighted by the session time since the previous sample ended
    (its download time when either end is unknown, and never less), so the past is forgotten
    at the pace of the session, not of the time spent downloading."""
    estimate = 0.0
    weight = 0.0
    prev_end: float | None = None
    for d in downloads:
        if d.seconds <= 0 or d.bits <= 0:
            continue
        span = d.seconds
        if session_clock and d.end_s is not None and prev_end is not None:
            span = max(span, d.end_s - prev_end)
        prev_end = d.end_s
        alpha = math.pow(0.5, span / half_life_s)
        estimate = alpha * estimate + (1.0 - alpha) * (d.bits / d.seconds / 1000.0)
        weight += span
    if weight <= 0:
        return None
    return estimate / (1.0 - math.pow(0.5, weight / half_life_s))


def throughput_estimate_kbps(
    downloads: Sequence[Download],
    fast_half_life_s: float = 3.0,
    slow_half_life_s: float = 8.0,
    session_clock: bool = False,
) -> float | None:
    """min(fast EWMA, slow EWMA): quick to fall on a drop, slow to believe a recovery."""
    fast = ewma_kbps(downloads, fast_half_life_s, session_clock)
    slow = ewma_kbps(downloads, slow_half_life_s, session_clock)
    if fast is None or slow is None:
        return None
    return min(fast, slow)


def harmonic_mean_kbps(downloads: Sequence[Download], count: int) -> float | None:
    """Harmonic mean throughput of the last `count` requests (BOLA-E's estimate)."""
    recent = [d for d in downloads if d.seconds > 0 and d.bits > 0][-count:]
    if not recent:
        return None
    return len(recent) / sum(d.seconds / (d.bits / 1000.0) for d in recent)


def highest_fitting(values: Sequence[float], limit: float) -> int:
    """The highest index whose value is at most `limit` (values ascending); 0 if none."""
    best = 0
    for i, v in enumerate(values):
        if v <= limit:
            best = i
    return best


def _check_rung(name: str, rung: int, state: AbrState) -> int:
    if not 0 <= rung < len(state.rungs):
        raise AbrError(f"{name} chose rung {rung}, but there are {len(state.rungs)} rungs")
    return rung


# --- the throughput rule ----------------------------------------------------------------------


class ThroughputRule:
    """Highest rung whose nominal bitrate fits under safety x min(fast EWMA, slow EWMA)."""

    name = "throughput"

    def __init__(
        self, safety: float = 0.9, fast_half_life_s: float = 3.0, slow_half_life_s: float = 8.0
    ) -> None:
        self.safety = safety
        self.fast_half_life_s = fast_half_life_s
        self.slow_half_life_s = slow_half_life_s

    def choose(self, state: AbrState) -> int:
        c = throughput_estimate_kbps(state.downloads, self.fast_half_life_s, self.slow_half_life_s)
        if c is None:
            return 0
        return highest_fitting([r.bitrate_kbps for r in state.rungs], self.safety * c)

    def should_abandon(self, state: AbrState, progress: Progress) -> int | None:
        return None


# --- BBA ---------------------------------------------------------------------------------------


class BbaMap(msgspec.Struct, frozen=True):
    """BBA's buffer-to-rate map: below `reservoir_s` the lowest rate, above reservoir + cushion
    the highest, linear in between."""

    reservoir_s: float
    cushion_s: float
    low: float
    high: float

    def __call__(self, buffer_s: float) -> float:
        if buffer_s <= self.reservoir_s:
            return self.low
        if buffer_s >= self.reservoir_s + self.cushion_s:
            return self.high
        return self.low + (buffer_s - self.reservoir_s) / self.cushion_s * (self.high - self.low)


def bba_map(state: AbrState, reservoir_frac: float, upper_frac: float) -> tuple[float, float]:
    """(reservoir, cushion) in seconds for this state's buffer: the upper reservoir is kept free
    at the top as in the paper, at least one segment (a player asks for the next segment only
    when it fits, so at decision time the buffer is at most max - one segment); the cushion is
    what is left."""
    reservoir = reservoir_frac * state.max_buffer_s
    upper = max(upper_frac * state.max_buffer_s, state.segment_s)
    return reservoir, max(state.max_buffer_s - reservoir - upper, 1e-9)


def bba_choice(values: Sequence[float], f: BbaMap, buffer_s: float, last: int | None) -> int:
    """Algorithm 1 of Huang et al. over rung `values` (rates, or segment sizes for the chunk
    map): move only when f(B) crosses Rate+ (the next rung up) or Rate- (the next rung down)."""
    top = len(values) - 1
    if buffer_s <= f.reservoir_s:
        return 0
    if buffer_s >= f.reservoir_s + f.cushion_s:
        return top
    prev = 0 if last is None else min(max(last, 0), top)
    fb = f(buffer_s)
    rate_plus = values[min(prev + 1, top)]
    rate_minus = values[max(prev - 1, 0)]
    if fb >= rate_plus:  # the highest rate strictly below f(B)
        below = [i for i, v in enumerate(values) if v < fb]
        return max(below) if below else 0
    if fb <= rate_minus:  # the lowest rate strictly above f(B)
        above = [i for i, v in enumerate(values) if v > fb]
        return min(above) if above else top
    return prev


class Bba:
    """BBA-0's rate map with hysteresis and BBA-2's startup ramp; `chunk_map=True` is BBA-1.

    Startup (BBA-2): while the buffer grows, step up one rung whenever the last segment came in
    fast enough: its buffer gain dB = V - download time exceeds a threshold that relaxes
    linearly from 0.875 V at an empty buffer to 0.5 V at the top of the cushion. Startup ends
    when the map asks for at least the startup rung, or when the buffer shrank (dB < 0); it
    begins again after a seek.
    """

    def __init__(
        self,
        reservoir_frac: float = 0.25,
        upper_frac: float = 0.1,
        chunk_map: bool = False,
        startup: bool = True,
    ) -> None:
        self.reservoir_frac = reservoir_frac
        self.upper_frac = upper_frac
        self.chunk_map = chunk_map
        self.name = "bba1" if chunk_map else "bba"
        self._startup = startup
        self._use_startup = startup

    def _map_choice(self, state: AbrState) -> int:
        reservoir, cushion = bba_map(state, self.reservoir_frac, self.upper_frac)
        rungs = state.rungs
        if self.chunk_map:
            i = state.next_segment
            dur = segment_duration(state, i)
            f = BbaMap(
                reservoir,
                cushion,
                rungs[0].bitrate_kbps * 1000 * dur,
                rungs[-1].bitrate_kbps * 1000 * dur,
            )
            values = [segment_bits(state, r, i) for r in range(len(rungs))]
        else:
            f = BbaMap(reservoir, cushion, rungs[0].bitrate_kbps, rungs[-1].bitrate_kbps)
            values = [r.bitrate_kbps for r in rungs]
        return bba_choice(values, f, state.buffer_s, state.last_rung)

    def choose(self, state: AbrState) -> int:
        if state.phase == "seek" and self._use_startup:
            self._startup = True
        mapped = self._map_choice(state)
        if not self._startup or state.last_rung is None or not state.downloads:
            return mapped
        last = state.last_rung
        v = segment_duration(state, max(state.next_segment - 1, 0))
        gain = v - state.downloads[-1].seconds
        _, cushion = bba_map(state, self.reservoir_frac, self.upper_frac)
        reservoir = self.reservoir_frac * state.max_buffer_s
        frac = min(max(state.buffer_s / (reservoir + cushion), 0.0), 1.0)
        threshold = (0.875 - 0.375 * frac) * v
        ramp = min(last + 1, len(state.rungs) - 1) if gain > threshold else last
        if mapped >= ramp or gain < 0:
            self._startup = False
            return mapped
        return ramp

    def should_abandon(self, state: AbrState, progress: Progress) -> int | None:
        return None


# --- BOLA --------------------------------------------------------------------------------------


class BolaParams(msgspec.Struct, frozen=True):
    """Utilities v_m = ln(S_m/S_1) and the control parameters V, gamma_p, chosen so that rung 0
    scores best below `minimum_s` of buffer and the top rung at `target_s` (the choice dash.js
    makes): V (gamma_p - 1) = minimum_s and V (v_M + gamma_p - 1) = target_s."""

    utilities: tuple[float, ...]
    v: float
    gamma_p: float

    def score(self, rung: int, buffer_s: float, size: float) -> float:
        return (self.v * (self.utilities[rung] + self.gamma_p) - buffer_s) / size

    def best(self, buffer_s: float, sizes: Sequence[float]) -> int:
        best, best_score = 0, -math.inf
        for m, s in enumerate(sizes):
            sc = self.score(m, buffer_s, s)
            if sc >= best_score:
                best, best_score = m, sc
        return best

    def buffer_for(self, rung: int, sizes: Sequence[float]) -> float:
        """The least buffer at which `rung` scores at least as well as every lower rung."""
        want = 0.0
        u, q = self.utilities, rung
        for i in range(q):
            b = self.v * (
                self.gamma_p + (sizes[q] * u[i] - sizes[i] * u[q]) / (sizes[q] - sizes[i])
            )
            want = max(want, b)
        return want


def bola_params(bitrates: Sequence[float], minimum_s: float, target_s: float) -> BolaParams:
    utilities = tuple(math.log(b / bitrates[0]) for b in bitrates)
    span = utilities[-1]
    target_s = max(target_s, minimum_s * 1.01)
    gamma_p = 1.0 + span / (target_s / minimum_s - 1.0) if span > 0 else 1.0
    v = minimum_s / (gamma_p - 1.0) if span > 0 else 0.0
    return BolaParams(utilities, v, gamma_p)


class Bola:
    """BOLA-BASIC: the rung maximising (V (v_m + gamma_p) - Q) / S_m, Q the buffer in seconds,
    S_m the nominal bitrate. Minimum buffer: `minimum_frac` of the maximum; target: the maximum
    less one segment (so the top rung is reachable before the player has to wait)."""

    name = "bola"

    def __init__(self, minimum_frac: float = 1 / 3) -> None:
        self.minimum_frac = minimum_frac

    def params(self, state: AbrState) -> BolaParams:
        minimum = self.minimum_frac * state.max_buffer_s
        target = max(state.max_buffer_s - state.segment_s, minimum + state.segment_s)
        return bola_params([r.bitrate_kbps for r in state.rungs], minimum, target)

    def choose(self, state: AbrState) -> int:
        if len(state.rungs) == 1:
            return 0
        p = self.params(state)
        return p.best(state.buffer_s, [r.bitrate_kbps for r in state.rungs])

    def should_abandon(self, state: AbrState, progress: Progress) -> int | None:
        return None


class BolaE(Bola):
    """BOLA with the BOLA-E refinements as dash.js implements them.

    - Startup (and after a seek): the rung the throughput (harmonic mean of the last 3
      requests x 0.9) sustains. Once the buffer holds two segments, steady state begins with a
      placeholder buffer: the virtual seconds that make BOLA's own choice equal that rung.
    - The placeholder grows by the time the player spent not downloading (waiting on a full
      buffer), shrinks instead of making the player wait, and is dropped on a rebuffer.
    - BOLA-O: never step up past the rung the throughput sustains (unless already there).
    - Insufficient buffer: never pick a bitrate above 0.5 x throughput x buffer / segment.
    - Abandonment: while a request runs slower than its rung's bitrate, switch to the lower
      rung with the best BOLA score if its whole segment is smaller than the bits still to come.
    """

    name = "bola-e"

    def __init__(self, minimum_frac: float = 1 / 3, safety: float = 0.9) -> None:
        super().__init__(minimum_frac)
        self.safety = safety
        self._startup = True
        self._placeholder = 0.0
        self._last_call_s: float | None = None

    def choose(self, state: AbrState) -> int:
        rates = [r.bitrate_kbps for r in state.rungs]
        if len(rates) == 1:
            return 0
        p = self.params(state)
        if state.phase == "seek":
            self._startup = True
        if state.buffer_s <= 0.1 or state.phase == "rebuffering":
            self._placeholder = 0.0
        if self._last_call_s is not None and state.downloads:
            idle = state.now_s - self._last_call_s - state.downloads[-1].seconds
            self._placeholder += max(idle, 0.0)
        self._last_call_s = state.now_s
        thr = harmonic_mean_kbps(state.downloads, 3)
        if self._startup:
            q = 0 if thr is None else highest_fitting(rates, thr * self.safety)
            if state.buffer_s > state.segment_s / 0.5:
                self._startup = False
                self._placeholder = max(p.buffer_for(q, rates) - state.buffer_s, 0.0)
            return q
        effective = state.buffer_s + self._placeholder
        q = p.best(effective, rates)
        last = 0 if state.last_rung is None else state.last_rung
        if q > last and thr is not None:  # BOLA-O
            sustainable = highest_fitting(rates, thr)
            if q > sustainable:
                q = max(sustainable, last)
        if thr is not None:  # insufficient buffer
            safe = 0.5 * thr * state.buffer_s / state.segment_s
            while q > 0 and rates[q] > safe:
                q -= 1
        want = p.v * (p.utilities[q] + p.gamma_p)
        delay = effective - want
        if delay > 0:  # spend placeholder instead of waiting
            self._placeholder = max(self._placeholder - delay, 0.0)
        return q

    def should_abandon(self, state: AbrState, progress: Progress) -> int | None:
        q = progress.rung
        if self._startup or q == 0 or progress.bits_done <= 0 or progress.elapsed_s <= 0:
            return None
        rate = progress.bits_done / progress.elapsed_s / 1000.0
        if rate >= state.rungs[q].bitrate_kbps:
            return None
        p = self.params(state)
        effective = state.buffer_s + self._placeholder
        remaining = progress.bits_total - progress.bits_done
        best, best_score = q, p.score(q, effective, max(remaining, 1) / 1000.0)
        i = state.next_segment
        for m in range(q):
            size = segment_bits(state, m, i)
            if size < remaining:
                sc = p.score(m, effective, size / 1000.0)
                if sc > best_score:
                    best, best_score = m, sc
        return best if best < q else None


# --- streamplane -------------------------------------------------------------------------------


class StreamplaneParams(msgspec.Struct, frozen=True):
    """The knobs of streamplane's algorithm. The JavaScript port has the same defaults; the
    shared test vectors use them. Tuned on trace seeds other than the benchmark's (see
    docs/abr.md)."""

    fast_half_life_s: float = 3.0  # throughput estimate: min(fast EWMA, slow EWMA)
    slow_half_life_s: float = 8.0
    session_clock: bool = True  # the EWMAs forget over session time, not download time
    horizon: int = 5  # segments planned ahead, at their real sizes
    rebuffer_penalty: float = 4.3  # QoE per second of stall (Pensieve's linear QoE)
    switch_weight: float = 2.0  # a planned switch costs this many times its bitrate change
    target_frac: float = 2 / 3  # of the maximum buffer: where the plan should leave the buffer
    target_weight: float = 1.0  # price of ending short of it: weight x shortfall^2 / target
    safety: float = 0.9  # startup/seek/rebuffering: on the throughput estimate
    start_fraction: float = 0.5  # startup/seek/rebuffering: download within half a segment
    vmaf_min_gain: float = 0.5  # a rung up must buy this much VMAF over the horizon
    abandon_after_s: float = 1.0  # judge an in-flight request only after this long
    drop_hold_s: float = 12.0  # an in-flight request's recent rate lasts at least this long
    abandon_floor_s: float = 0.5  # weigh a restart when finishing would leave less buffer
    abandon_gain: float = 1.0  # a restart must be worth this much more than finishing (QoE)


def horizon_segments(state: AbrState, horizon: int) -> range:
    """The segments a plan covers: the next `horizon`, fewer near the end of a title whose
    length is known, always at least the next one."""
    i = state.next_segment
    n = max(len(state.segment_durations_s), *(len(r.segment_bits) for r in state.rungs))
    end = i + horizon if n == 0 else max(min(i + horizon, n), i + 1)
    return range(i, end)


def fetch(
    buffer_s: float, download_s: float, duration_s: float, max_buffer_s: float
) -> tuple[float, float]:
    """One planned request, in the simulator's model: wait until the segment fits under the
    maximum (the buffer drains meanwhile, no stall), download while the buffer drains, stall if
    it runs dry, then add the segment. Returns (buffer after, stall seconds)."""
    b = min(buffer_s, max(max_buffer_s - duration_s, 0.0))
    stall = max(download_s - b, 0.0)
    return max(b - download_s, 0.0) + duration_s, stall


def shortfall_cost(buffer_s: float, target_s: float, weight: float) -> float:
    """What leaving the buffer at `buffer_s` costs the plan: weight x shortfall^2 / target.
    Quadratic, so that a second of buffer is cheap near the target and dear near empty."""
    if target_s <= 0:
        return 0.0
    short = max(target_s - buffer_s, 0.0)
    return weight * short * short / target_s


def plan_value(
    state: AbrState, plan: Sequence[int], kbps: float, p: StreamplaneParams | None = None
) -> float:
    """The MPC objective of fetching the horizon's segments at `plan`'s rungs (one per segment,
    in order) when the network carries `kbps`: per segment, bitrate Mbps - rebuffer_penalty x
    stall s - switch_weight x |bitrate change| Mbps (from the previous segment's rung; none
    before the first), less `shortfall_cost` of the buffer the plan ends with."""
    p = p or StreamplaneParams()
    window = horizon_segments(state, p.horizon)
    if len(plan) != len(window):
        raise AbrError(f"a plan needs {len(window)} rungs for this horizon, got {len(plan)}")
    bps = kbps * 1000.0
    b = state.buffer_s
    value = 0.0
    prev = state.last_rung
    for k, r in zip(window, plan, strict=True):
        mbps = state.rungs[r].bitrate_kbps / 1000.0
        b, stall = fetch(
            b, segment_bits(state, r, k) / bps, segment_duration(state, k), state.max_buffer_s
        )
        value += mbps - p.rebuffer_penalty * stall
        if prev is not None:
            value -= p.switch_weight * abs(mbps - state.rungs[prev].bitrate_kbps / 1000.0)
        prev = r
    return value - shortfall_cost(b, p.target_frac * state.max_buffer_s, p.target_weight)


def mpc_choice(state: AbrState, kbps: float, p: StreamplaneParams | None = None) -> int:
    """The first rung of the best plan of the form "rung a for the next segment, rung b for the
    rest of the horizon" (n^2 plans for n rungs). The values are `plan_value`'s, to the bit: the
    same operations in the same order, with `fetch` written out and the first step shared by
    every b (this runs for every segment of every simulated session). Ties go to the lower a."""
    p = p or StreamplaneParams()
    n = len(state.rungs)
    window = list(horizon_segments(state, p.horizon))
    bps = kbps * 1000.0
    mbps = [r.bitrate_kbps / 1000.0 for r in state.rungs]
    durations = [segment_duration(state, k) for k in window]
    room = [max(state.max_buffer_s - d, 0.0) for d in durations]
    times = [[segment_bits(state, r, k) / bps for r in range(n)] for k in window]
    target = p.target_frac * state.max_buffer_s
    penalty, weight = p.rebuffer_penalty, p.switch_weight
    last = state.last_rung
    best, best_value = 0, -math.inf
    for a in range(n):
        b0, stall = fetch(state.buffer_s, times[0][a], durations[0], state.max_buffer_s)
        head = mbps[a] - penalty * stall
        if last is not None:
            head -= weight * abs(mbps[a] - mbps[last])
        value_a = -math.inf
        for r in range(n):
            b = b0
            value = head
            for j in range(1, len(window)):
                b = min(b, room[j])
                t = times[j][r]
                value += mbps[r] - penalty * max(t - b, 0.0)
                b = max(b - t, 0.0) + durations[j]
                if j == 1:
                    value -= weight * abs(mbps[r] - mbps[a])
            value -= shortfall_cost(b, target, p.target_weight)
            if value > value_a:
                value_a = value
        if value_a > best_value:
            best, best_value = a, value_a
    return best


def streamplane_choose(state: AbrState, p: StreamplaneParams | None = None) -> int:
    """streamplane's decision: a pure function of the state (see docs/abr.md)."""
    p = p or StreamplaneParams()
    n = len(state.rungs)
    if n == 1:
        return 0
    i = state.next_segment
    c = throughput_estimate_kbps(
        state.downloads, p.fast_half_life_s, p.slow_half_life_s, p.session_clock
    )
    if c is None:  # nothing measured: the lowest rung is the one that cannot stall for long
        return 0
    window = horizon_segments(state, p.horizon)
    if state.phase != "steady":
        budget = p.start_fraction * segment_duration(state, i)
        bps = p.safety * c * 1000.0
        fits = [segment_bits(state, r, i) / bps for r in range(n)]
        return _vmaf_trim(state, highest_fitting(fits, budget), window, p)
    return _vmaf_trim(state, mpc_choice(state, c, p), window, p)


def _vmaf_trim(state: AbrState, rung: int, window: range, p: StreamplaneParams) -> int:
    """Step down while the rung above buys less than `vmaf_min_gain` VMAF over the window."""
    while rung > 0:
        hi = [segment_vmaf(state, rung, k) for k in window]
        lo = [segment_vmaf(state, rung - 1, k) for k in window]
        if any(v is None for v in hi) or any(v is None for v in lo):
            return rung
        gain = (sum(v for v in hi if v is not None) - sum(v for v in lo if v is not None)) / len(
            window
        )
        if gain >= p.vmaf_min_gain:
            return rung
        rung -= 1
    return rung


def drop_time(
    bits: float, start_s: float, slow_bps: float, after_bps: float, hold_s: float
) -> float:
    """Seconds to receive `bits` starting `start_s` from now, when the link carries `slow_bps`
    until `hold_s` from now and `after_bps` from then on (the drop model of abandonment)."""
    if start_s >= hold_s:
        return bits / after_bps
    slow_bits = slow_bps * (hold_s - start_s)
    if bits <= slow_bits:
        return bits / slow_bps
    return (hold_s - start_s) + (bits - slow_bits) / after_bps


def restart_value(
    state: AbrState,
    rung: int,
    first_s: float,
    model: tuple[float, float, float],
    p: StreamplaneParams | None = None,
) -> float:
    """What having the next segment at `rung` in `first_s` seconds is worth: `plan_value`'s
    objective over the horizon, the rest of it at the best single rung, every later request
    timed in the drop model `(slow_bps, after_bps, hold_s)` (`drop_time`, the clock running
    from now through waits and downloads)."""
    p = p or StreamplaneParams()
    slow_bps, after_bps, hold = model
    window = list(horizon_segments(state, p.horizon))
    n = len(state.rungs)
    mbps = [r.bitrate_kbps / 1000.0 for r in state.rungs]
    stall = max(first_s - state.buffer_s, 0.0)
    b0 = max(state.buffer_s - first_s, 0.0) + segment_duration(state, window[0])
    head = mbps[rung] - p.rebuffer_penalty * stall
    last = state.last_rung
    if last is not None:
        head -= p.switch_weight * abs(mbps[rung] - mbps[last])
    target = p.target_frac * state.max_buffer_s
    best = -math.inf
    for r in range(n):
        b = b0
        clock = first_s
        value = head
        for j in range(1, len(window)):
            k = window[j]
            d = segment_duration(state, k)
            room = max(state.max_buffer_s - d, 0.0)
            if b > room:  # wait (playing) until the segment fits
                clock += b - room
                b = room
            t = drop_time(segment_bits(state, r, k), clock, slow_bps, after_bps, hold)
            clock += t
            value += mbps[r] - p.rebuffer_penalty * max(t - b, 0.0)
            b = max(b - t, 0.0) + d
            if j == 1:
                value -= p.switch_weight * abs(mbps[r] - mbps[rung])
        value -= shortfall_cost(b, target, p.target_weight)
        if value > best:
            best = value
    return best


def drop_model(
    state: AbrState, progress: Progress, p: StreamplaneParams | None = None
) -> tuple[float, float, float]:
    """(slow_bps, after_bps, hold_s): what abandonment assumes of the link. The request's
    recent rate (never above its average; the average when not measured) lasts `hold_s` more,
    then the link carries the throughput estimate of the finished requests again (the
    average without one; at least the slow rate). `hold_s` is `drop_hold_s`, or as long as
    the slow rate has lasted already if that is longer: a drop that has outlasted the usual
    is taken to last as long again. How long it has lasted is judged by the bits the request
    lacks: the seconds at the slow rate instead of the other that account for them."""
    p = p or StreamplaneParams()
    avg = progress.bits_done / progress.elapsed_s
    slow = avg
    if progress.recent_s > 0:
        slow = min(progress.recent_bits / progress.recent_s, avg)
    slow = max(slow, 1.0)  # nothing in the window: a link all but stopped, not a zero division
    c = throughput_estimate_kbps(
        state.downloads, p.fast_half_life_s, p.slow_half_life_s, p.session_clock
    )
    after = max(avg if c is None else c * 1000.0, slow)
    lasted = 0.0
    if after > slow:
        lasted = (after * progress.elapsed_s - progress.bits_done) / (after - slow)
        lasted = min(max(lasted, 0.0), progress.elapsed_s)
    return slow, after, max(p.drop_hold_s, lasted)


def streamplane_abandon(
    state: AbrState, progress: Progress, p: StreamplaneParams | None = None
) -> int | None:
    """Abandon the request in flight for a lower rung when that is worth more on the plan's own
    score, in the drop model (`drop_model`: the request's recent rate lasts a while, then the
    link carries the throughput estimate again). Once finishing in that model would leave less
    than `abandon_floor_s` of buffer, every restart (the whole segment at a lower rung, in the
    same model) is valued against finishing with `restart_value`; the best lower rung wins if
    it is worth `abandon_gain` more (ties: the lower rung)."""
    p = p or StreamplaneParams()
    q = progress.rung
    if q == 0 or progress.bits_done <= 0 or progress.elapsed_s < p.abandon_after_s:
        return None
    model = drop_model(state, progress, p)
    slow, after, hold = model
    finish = drop_time(progress.bits_total - progress.bits_done, 0.0, slow, after, hold)
    if state.buffer_s - finish >= p.abandon_floor_s:
        return None
    i = state.next_segment
    best, best_value = None, restart_value(state, q, finish, model, p) + p.abandon_gain
    for r in range(q):
        t = drop_time(segment_bits(state, r, i), 0.0, slow, after, hold)
        value = restart_value(state, r, t, model, p)
        if value > best_value:
            best, best_value = r, value
    return best


class Streamplane:
    """streamplane's algorithm; holds nothing between calls (see `streamplane_choose`)."""

    name = "streamplane"

    def __init__(self, params: StreamplaneParams | None = None) -> None:
        self.params = params or StreamplaneParams()

    def choose(self, state: AbrState) -> int:
        return streamplane_choose(state, self.params)

    def should_abandon(self, state: AbrState, progress: Progress) -> int | None:
        return streamplane_abandon(state, progress, self.params)


# --- by name -----------------------------------------------------------------------------------

ALGORITHMS: dict[str, Callable[[], Abr]] = {
    "throughput": ThroughputRule,
    "bba": Bba,
    "bba1": lambda: Bba(chunk_map=True),
    "bola": Bola,
    "bola-e": BolaE,
    "streamplane": Streamplane,
}


def make_abr(name: str) -> Abr:
    """A fresh algorithm object (one per playback session)."""
    try:
        factory = ALGORITHMS[name]
    except KeyError:
        raise AbrError(
            f"no ABR algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}"
        ) from None
    return factory()


def checked_choice(abr: Abr, state: AbrState) -> int:
    """`abr.choose(state)`, raising AbrError if the rung does not exist."""
    return _check_rung(abr.name, abr.choose(state), state)


def checked_abandon(abr: Abr, state: AbrState, progress: Progress) -> int | None:
    """`abr.should_abandon(...)`, raising AbrError unless it is None or a lower rung."""
    r = abr.should_abandon(state, progress)
    if r is None:
        return None
    _check_rung(abr.name, r, state)
    return r if r < progress.rung else None
