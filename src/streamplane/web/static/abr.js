// streamplane's ABR algorithm and heartbeat cadence, for the browser player (and node).
//
// A port of src/streamplane/player/abr.py (streamplane_choose, streamplane_abandon) and
// src/streamplane/player/cadence.py, from the same specification (docs/abr.md). Both are pure
// functions of plain objects whose field names are the Python structs' (snake_case), so the
// shared vectors in src/streamplane/player/vectors.json feed both unchanged; tests/player runs
// them through node. Change one side, change the other, regenerate the vectors.
//
// state = {
//   buffer_s, max_buffer_s, segment_s,
//   rungs: [{bitrate_kbps, segment_bits: [...], segment_vmaf: [...]}],   // lowest first
//   next_segment, last_rung (null before the first), phase ("startup"|"steady"|"seek"|"rebuffering"),
//   downloads: [{bits, seconds}],   // oldest first, request to last byte
//   now_s, segment_durations_s: [...]
// }
// progress = {rung, bits_done, bits_total, elapsed_s}

export const DEFAULT_PARAMS = Object.freeze({
  safety: 0.9,
  safety_full: 1.0,
  fast_half_life_s: 3.0,
  slow_half_life_s: 8.0,
  reservoir_frac: 0.2,
  upper_frac: 0.1,
  horizon: 5,
  floor_s: 4.0,
  up_margin: 0.9,
  start_fraction: 0.5,
  vmaf_min_gain: 0.5,
  abandon_after_s: 1.0,
  abandon_floor_s: 0.5,
  restart_margin: 0.8,
});

function list(x) {
  return Array.isArray(x) ? x : [];
}

export function segmentDuration(state, index) {
  const d = list(state.segment_durations_s);
  return index >= 0 && index < d.length ? d[index] : state.segment_s;
}

export function segmentBits(state, rung, index) {
  const r = state.rungs[rung];
  const sizes = list(r.segment_bits);
  if (index >= 0 && index < sizes.length) return sizes[index];
  return r.bitrate_kbps * 1000.0 * segmentDuration(state, index);
}

export function segmentVmaf(state, rung, index) {
  const v = list(state.rungs[rung].segment_vmaf);
  return index >= 0 && index < v.length ? v[index] : null;
}

export function ewmaKbps(downloads, halfLifeS) {
  let estimate = 0.0;
  let weight = 0.0;
  for (const d of list(downloads)) {
    if (d.seconds <= 0 || d.bits <= 0) continue;
    const alpha = Math.pow(0.5, d.seconds / halfLifeS);
    estimate = alpha * estimate + (1.0 - alpha) * (d.bits / d.seconds / 1000.0);
    weight += d.seconds;
  }
  if (weight <= 0) return null;
  return estimate / (1.0 - Math.pow(0.5, weight / halfLifeS));
}

export function throughputEstimateKbps(downloads, fastHalfLifeS = 3.0, slowHalfLifeS = 8.0) {
  const fast = ewmaKbps(downloads, fastHalfLifeS);
  const slow = ewmaKbps(downloads, slowHalfLifeS);
  if (fast === null || slow === null) return null;
  return Math.min(fast, slow);
}

function highestFitting(values, limit) {
  let best = 0;
  values.forEach((v, i) => {
    if (v <= limit) best = i;
  });
  return best;
}

function bbaMap(state, reservoirFrac, upperFrac) {
  const reservoir = reservoirFrac * state.max_buffer_s;
  const upper = Math.max(upperFrac * state.max_buffer_s, state.segment_s);
  return [reservoir, Math.max(state.max_buffer_s - reservoir - upper, 1e-9)];
}

function mapValue(reservoir, cushion, low, high, b) {
  if (b <= reservoir) return low;
  if (b >= reservoir + cushion) return high;
  return low + ((b - reservoir) / cushion) * (high - low);
}

// Huang et al., Algorithm 1: move only when f(B) crosses Rate+ or Rate-.
function bbaChoice(values, reservoir, cushion, low, high, b, last) {
  const top = values.length - 1;
  if (b <= reservoir) return 0;
  if (b >= reservoir + cushion) return top;
  const prev = last === null || last === undefined ? 0 : Math.min(Math.max(last, 0), top);
  const fb = mapValue(reservoir, cushion, low, high, b);
  const plus = values[Math.min(prev + 1, top)];
  const minus = values[Math.max(prev - 1, 0)];
  if (fb >= plus) {
    let best = -1;
    values.forEach((v, i) => {
      if (v < fb) best = Math.max(best, i);
    });
    return best >= 0 ? best : 0;
  }
  if (fb <= minus) {
    let best = -1;
    values.forEach((v, i) => {
      if (v > fb && best < 0) best = i;
    });
    return best >= 0 ? best : top;
  }
  return prev;
}

function horizon(state, h) {
  const i = state.next_segment;
  let n = list(state.segment_durations_s).length;
  for (const r of state.rungs) n = Math.max(n, list(r.segment_bits).length);
  const end = n === 0 ? i + h : Math.max(Math.min(i + h, n), i + 1);
  const out = [];
  for (let k = i; k < end; k++) out.push(k);
  return out;
}

function survives(state, rung, bps, window, floor) {
  let b = state.buffer_s;
  for (const k of window) {
    b -= segmentBits(state, rung, k) / bps;
    if (b < floor) return false;
    b = Math.min(b + segmentDuration(state, k), state.max_buffer_s);
  }
  return true;
}

function vmafTrim(state, rung, window, p) {
  while (rung > 0) {
    const hi = window.map((k) => segmentVmaf(state, rung, k));
    const lo = window.map((k) => segmentVmaf(state, rung - 1, k));
    if (hi.some((v) => v === null) || lo.some((v) => v === null)) return rung;
    const gain = (hi.reduce((a, v) => a + v, 0) - lo.reduce((a, v) => a + v, 0)) / window.length;
    if (gain >= p.vmaf_min_gain) return rung;
    rung -= 1;
  }
  return rung;
}

/** The rung of state.next_segment (index into state.rungs, lowest bitrate first). */
export function chooseRung(state, params = DEFAULT_PARAMS) {
  const p = { ...DEFAULT_PARAMS, ...params };
  const n = state.rungs.length;
  if (n === 1) return 0;
  const i = state.next_segment;
  const c = throughputEstimateKbps(state.downloads, p.fast_half_life_s, p.slow_half_life_s);
  const window = horizon(state, p.horizon);
  if (state.phase !== "steady") {
    if (c === null) return 0;
    const budget = p.start_fraction * segmentDuration(state, i);
    const bps = p.safety * c * 1000.0;
    const fits = [];
    for (let r = 0; r < n; r++) fits.push(segmentBits(state, r, i) / bps);
    return vmafTrim(state, highestFitting(fits, budget), window, p);
  }
  const [reservoir, cushion] = bbaMap(state, p.reservoir_frac, p.upper_frac);
  const rates = state.rungs.map((r) => r.bitrate_kbps);
  let candidate = bbaChoice(
    rates, reservoir, cushion, rates[0], rates[n - 1], state.buffer_s, state.last_rung,
  );
  if (c !== null) {
    const fill = Math.min(
      Math.max(state.buffer_s / Math.max(state.max_buffer_s - state.segment_s, 1e-9), 0.0),
      1.0,
    );
    const bps = (p.safety + (p.safety_full - p.safety) * fill) * c * 1000.0;
    const play = window.reduce((a, k) => a + segmentDuration(state, k), 0);
    const last = state.last_rung === null || state.last_rung === undefined ? -1 : state.last_rung;
    let sustainable = 0;
    for (let r = 0; r < n; r++) {
      const ratio = window.reduce((a, k) => a + segmentBits(state, r, k), 0) / bps / play;
      if (ratio <= (r <= last ? 1.0 : p.up_margin)) sustainable = r;
    }
    candidate = Math.max(candidate, sustainable);
    const floor = Math.min(p.floor_s, 0.5 * state.buffer_s);
    while (candidate > 0 && !survives(state, candidate, bps, window, floor)) candidate -= 1;
  }
  return vmafTrim(state, candidate, window, p);
}

/** A lower rung to re-request the in-flight segment at, or null to let it finish. */
export function shouldAbandon(state, progress, params = DEFAULT_PARAMS) {
  const p = { ...DEFAULT_PARAMS, ...params };
  const q = progress.rung;
  if (q === 0 || progress.bits_done <= 0 || progress.elapsed_s < p.abandon_after_s) return null;
  const bps = progress.bits_done / progress.elapsed_s;
  const leftS = (progress.bits_total - progress.bits_done) / bps;
  if (state.buffer_s - leftS >= p.abandon_floor_s) return null;
  const i = state.next_segment;
  for (let r = q - 1; r >= 0; r--) {
    const t = segmentBits(state, r, i) / bps;
    if (t <= p.restart_margin * leftS && state.buffer_s - t >= p.abandon_floor_s) return r;
  }
  if (segmentBits(state, 0, i) / bps <= p.restart_margin * leftS) return 0;
  return null;
}

/** The same interface as the Python objects: one per playback session. */
export class StreamplaneAbr {
  constructor(params = DEFAULT_PARAMS) {
    this.name = "streamplane";
    this.params = { ...DEFAULT_PARAMS, ...params };
  }

  choose(state) {
    return chooseRung(state, this.params);
  }

  shouldAbandon(state, progress) {
    return shouldAbandon(state, progress, this.params);
  }
}

// --- heartbeat cadence (player/cadence.py) ---------------------------------------------------

export const DEFAULT_CADENCE = Object.freeze({
  urgent_s: 1.0,
  event_s: 2.0,
  settle_s: 10.0,
  growth: 0.5,
  max_s: 60.0,
});

/** Seconds between heartbeats. state = {now_s, phase, last_event_s, last_heartbeat_s}. */
export function heartbeatInterval(state, rule = DEFAULT_CADENCE) {
  const r = { ...DEFAULT_CADENCE, ...rule };
  if (state.phase !== "steady") return r.urgent_s;
  const lastEvent = state.last_event_s === null || state.last_event_s === undefined ? 0.0 : state.last_event_s;
  const since = state.now_s - lastEvent;
  if (since < r.settle_s) return r.event_s;
  return Math.min(Math.max(r.growth * since, r.event_s), r.max_s);
}

/** When the next heartbeat is due (session clock); now_s if none was sent yet. */
export function nextHeartbeatAt(state, rule = DEFAULT_CADENCE) {
  if (state.last_heartbeat_s === null || state.last_heartbeat_s === undefined) return state.now_s;
  return state.last_heartbeat_s + heartbeatInterval(state, rule);
}

export function heartbeatDue(state, rule = DEFAULT_CADENCE) {
  return state.now_s >= nextHeartbeatAt(state, rule);
}
