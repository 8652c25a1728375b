// streamplane's ABR algorithm and heartbeat cadence, for the browser player (and node).
//
// A port of src/streamplane/player/abr.py (streamplane_choose, mpc_choice, plan_value, fetch,
// shortfall_cost, streamplane_abandon, drop_time, restart_value, drop_model, RecentRate) and
// src/streamplane/player/cadence.py, from the same specification (docs/abr.md). Both are pure
// functions of plain objects whose field names are the Python structs' (snake_case), so the
// shared vectors in src/streamplane/player/vectors.json feed both unchanged; tests/player runs
// them through node. Change one side, change the other, regenerate the vectors.
//
// state = {
//   buffer_s, max_buffer_s, segment_s,
//   rungs: [{bitrate_kbps, segment_bits: [...], segment_vmaf: [...]}],   // lowest first
//   next_segment, last_rung (null before the first), phase ("startup"|"steady"|"seek"|"rebuffering"),
//   downloads: [{bits, seconds, end_s}],   // oldest first, request to last byte; end_s:
//                                          // session clock at the last byte (may be null)
//   now_s, segment_durations_s: [...]
// }
// progress = {rung, bits_done, bits_total, elapsed_s, recent_bits, recent_s}
//   recent_*: bits received over the last ~1 s of the request, from a RecentRate (0 s: not
//   measured, the request's average is used)

export const DEFAULT_PARAMS = Object.freeze({
  fast_half_life_s: 3.0,
  slow_half_life_s: 8.0,
  session_clock: true,
  horizon: 5,
  rebuffer_penalty: 4.3,
  switch_weight: 2.0,
  target_frac: 2 / 3,
  target_weight: 1.0,
  safety: 0.9,
  start_fraction: 0.5,
  vmaf_min_gain: 0.5,
  abandon_after_s: 1.0,
  drop_hold_s: 12.0,
  abandon_floor_s: 0.5,
  abandon_gain: 1.0,
});

export const RECENT_WINDOW_S = 1.0;

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

// sessionClock: a sample is weighted by the session time since the previous sample ended (its
// download time when either end is unknown, and never less), so the past is forgotten at the
// pace of the session, not of the time spent downloading.
export function ewmaKbps(downloads, halfLifeS, sessionClock = false) {
  let estimate = 0.0;
  let weight = 0.0;
  let prevEnd = null;
  for (const d of list(downloads)) {
    if (d.seconds <= 0 || d.bits <= 0) continue;
    const end = d.end_s === undefined ? null : d.end_s;
    let span = d.seconds;
    if (sessionClock && end !== null && prevEnd !== null) span = Math.max(span, end - prevEnd);
    prevEnd = end;
    const alpha = Math.pow(0.5, span / halfLifeS);
    estimate = alpha * estimate + (1.0 - alpha) * (d.bits / d.seconds / 1000.0);
    weight += span;
  }
  if (weight <= 0) return null;
  return estimate / (1.0 - Math.pow(0.5, weight / halfLifeS));
}

export function throughputEstimateKbps(
  downloads, fastHalfLifeS = 3.0, slowHalfLifeS = 8.0, sessionClock = false,
) {
  const fast = ewmaKbps(downloads, fastHalfLifeS, sessionClock);
  const slow = ewmaKbps(downloads, slowHalfLifeS, sessionClock);
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

function horizon(state, h) {
  const i = state.next_segment;
  let n = list(state.segment_durations_s).length;
  for (const r of state.rungs) n = Math.max(n, list(r.segment_bits).length);
  const end = n === 0 ? i + h : Math.max(Math.min(i + h, n), i + 1);
  const out = [];
  for (let k = i; k < end; k++) out.push(k);
  return out;
}

// One planned request, in the simulator's model: wait until the segment fits under the maximum
// (no stall), download while the buffer drains, stall if it runs dry, add the segment.
// Returns [buffer after, stall seconds].
export function fetchStep(bufferS, downloadS, durationS, maxBufferS) {
  const b = Math.min(bufferS, Math.max(maxBufferS - durationS, 0.0));
  const stall = Math.max(downloadS - b, 0.0);
  return [Math.max(b - downloadS, 0.0) + durationS, stall];
}

// Quadratic, so that a second of buffer is cheap near the target and dear near empty.
export function shortfallCost(bufferS, targetS, weight) {
  if (targetS <= 0) return 0.0;
  const short = Math.max(targetS - bufferS, 0.0);
  return (weight * short * short) / targetS;
}

/** The MPC objective of fetching the horizon at plan's rungs when the network carries kbps. */
export function planValue(state, plan, kbps, params = DEFAULT_PARAMS) {
  const p = { ...DEFAULT_PARAMS, ...params };
  const window = horizon(state, p.horizon);
  if (plan.length !== window.length) {
    throw new Error(`a plan needs ${window.length} rungs for this horizon, got ${plan.length}`);
  }
  const bps = kbps * 1000.0;
  let b = state.buffer_s;
  let value = 0.0;
  let prev = state.last_rung === undefined ? null : state.last_rung;
  window.forEach((k, j) => {
    const r = plan[j];
    const mbps = state.rungs[r].bitrate_kbps / 1000.0;
    let stall;
    [b, stall] = fetchStep(
      b, segmentBits(state, r, k) / bps, segmentDuration(state, k), state.max_buffer_s,
    );
    value += mbps - p.rebuffer_penalty * stall;
    if (prev !== null) value -= p.switch_weight * Math.abs(mbps - state.rungs[prev].bitrate_kbps / 1000.0);
    prev = r;
  });
  return value - shortfallCost(b, p.target_frac * state.max_buffer_s, p.target_weight);
}

// The first rung of the best plan "rung a for the next segment, rung b for the rest of the
// horizon": planValue's values to the bit (same operations, same order), the first step shared.
export function mpcChoice(state, kbps, params = DEFAULT_PARAMS) {
  const p = { ...DEFAULT_PARAMS, ...params };
  const n = state.rungs.length;
  const window = horizon(state, p.horizon);
  const bps = kbps * 1000.0;
  const mbps = state.rungs.map((r) => r.bitrate_kbps / 1000.0);
  const durations = window.map((k) => segmentDuration(state, k));
  const room = durations.map((d) => Math.max(state.max_buffer_s - d, 0.0));
  const times = window.map((k) => {
    const row = [];
    for (let r = 0; r < n; r++) row.push(segmentBits(state, r, k) / bps);
    return row;
  });
  const target = p.target_frac * state.max_buffer_s;
  const penalty = p.rebuffer_penalty;
  const weight = p.switch_weight;
  const last = state.last_rung === undefined ? null : state.last_rung;
  let best = 0;
  let bestValue = -Infinity;
  for (let a = 0; a < n; a++) {
    const [b0, stall0] = fetchStep(state.buffer_s, times[0][a], durations[0], state.max_buffer_s);
    let head = mbps[a] - penalty * stall0;
    if (last !== null) head -= weight * Math.abs(mbps[a] - mbps[last]);
    let valueA = -Infinity;
    for (let r = 0; r < n; r++) {
      let b = b0;
      let value = head;
      for (let j = 1; j < window.length; j++) {
        b = Math.min(b, room[j]);
        const t = times[j][r];
        value += mbps[r] - penalty * Math.max(t - b, 0.0);
        b = Math.max(b - t, 0.0) + durations[j];
        if (j === 1) value -= weight * Math.abs(mbps[r] - mbps[a]);
      }
      value -= shortfallCost(b, target, p.target_weight);
      if (value > valueA) valueA = value;
    }
    if (valueA > bestValue) {
      best = a;
      bestValue = valueA;
    }
  }
  return best;
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
  const c = throughputEstimateKbps(
    state.downloads, p.fast_half_life_s, p.slow_half_life_s, p.session_clock,
  );
  if (c === null) return 0; // nothing measured: the lowest rung is the one that cannot stall for long
  const window = horizon(state, p.horizon);
  if (state.phase !== "steady") {
    const budget = p.start_fraction * segmentDuration(state, i);
    const bps = p.safety * c * 1000.0;
    const fits = [];
    for (let r = 0; r < n; r++) fits.push(segmentBits(state, r, i) / bps);
    return vmafTrim(state, highestFitting(fits, budget), window, p);
  }
  return vmafTrim(state, mpcChoice(state, c, p), window, p);
}

// Seconds to receive `bits` starting startS from now, when the link carries slowBps until
// holdS from now and afterBps from then on (the drop model of abandonment).
export function dropTime(bits, startS, slowBps, afterBps, holdS) {
  if (startS >= holdS) return bits / afterBps;
  const slowBits = slowBps * (holdS - startS);
  if (bits <= slowBits) return bits / slowBps;
  return holdS - startS + (bits - slowBits) / afterBps;
}

// What having the next segment at `rung` in firstS seconds is worth: planValue's objective over
// the horizon, the rest at the best single rung, every later request timed by dropTime in the
// drop model [slowBps, afterBps, holdS].
export function restartValue(state, rung, firstS, model, params = DEFAULT_PARAMS) {
  const p = { ...DEFAULT_PARAMS, ...params };
  const [slowBps, afterBps, hold] = model;
  const window = horizon(state, p.horizon);
  const n = state.rungs.length;
  const mbps = state.rungs.map((r) => r.bitrate_kbps / 1000.0);
  const stall = Math.max(firstS - state.buffer_s, 0.0);
  const b0 = Math.max(state.buffer_s - firstS, 0.0) + segmentDuration(state, window[0]);
  let head = mbps[rung] - p.rebuffer_penalty * stall;
  const last = state.last_rung === undefined ? null : state.last_rung;
  if (last !== null) head -= p.switch_weight * Math.abs(mbps[rung] - mbps[last]);
  const target = p.target_frac * state.max_buffer_s;
  let best = -Infinity;
  for (let r = 0; r < n; r++) {
    let b = b0;
    let clock = firstS;
    let value = head;
    for (let j = 1; j < window.length; j++) {
      const k = window[j];
      const d = segmentDuration(state, k);
      const room = Math.max(state.max_buffer_s - d, 0.0);
      if (b > room) {
        clock += b - room; // wait (playing) until the segment fits
        b = room;
      }
      const t = dropTime(segmentBits(state, r, k), clock, slowBps, afterBps, hold);
      clock += t;
      value += mbps[r] - p.rebuffer_penalty * Math.max(t - b, 0.0);
      b = Math.max(b - t, 0.0) + d;
      if (j === 1) value -= p.switch_weight * Math.abs(mbps[r] - mbps[rung]);
    }
    value -= shortfallCost(b, target, p.target_weight);
    if (value > best) best = value;
  }
  return best;
}

// [slowBps, afterBps, holdS]: the request's recent rate (never above its average; its average
// when not measured) lasts holdS more, then the link carries the throughput estimate again (at
// least the slow rate). holdS: drop_hold_s, or how long the slow rate has lasted if longer,
// judged by the bits the request lacks.
export function dropModel(state, progress, params = DEFAULT_PARAMS) {
  const p = { ...DEFAULT_PARAMS, ...params };
  const avg = progress.bits_done / progress.elapsed_s;
  let slow = avg;
  if (progress.recent_s > 0) slow = Math.min(progress.recent_bits / progress.recent_s, avg);
  slow = Math.max(slow, 1.0); // nothing in the window: a link all but stopped
  const c = throughputEstimateKbps(
    state.downloads, p.fast_half_life_s, p.slow_half_life_s, p.session_clock,
  );
  const after = Math.max(c === null ? avg : c * 1000.0, slow);
  let lasted = 0.0;
  if (after > slow) {
    lasted = (after * progress.elapsed_s - progress.bits_done) / (after - slow);
    lasted = Math.min(Math.max(lasted, 0.0), progress.elapsed_s);
  }
  return [slow, after, Math.max(p.drop_hold_s, lasted)];
}

/** A lower rung to re-request the in-flight segment at, or null to let it finish. */
export function shouldAbandon(state, progress, params = DEFAULT_PARAMS) {
  const p = { ...DEFAULT_PARAMS, ...params };
  const q = progress.rung;
  if (q === 0 || progress.bits_done <= 0 || progress.elapsed_s < p.abandon_after_s) return null;
  const model = dropModel(state, progress, p);
  const [slow, after, hold] = model;
  const finish = dropTime(progress.bits_total - progress.bits_done, 0.0, slow, after, hold);
  if (state.buffer_s - finish >= p.abandon_floor_s) return null;
  const i = state.next_segment;
  let best = null;
  let bestValue = restartValue(state, q, finish, model, p) + p.abandon_gain;
  for (let r = 0; r < q; r++) {
    const t = dropTime(segmentBits(state, r, i), 0.0, slow, after, hold);
    const value = restartValue(state, r, t, model, p);
    if (value > bestValue) {
      best = r;
      bestValue = value;
    }
  }
  return best;
}

/**
 * The player's measurement behind progress.recent_bits / recent_s: fed the progress of the
 * request in flight (key: a string or number naming it; elapsedS from its start), it answers
 * with the bits received since the latest sample at least windowS old (since the start while
 * there is none). A new key, or a clock that went back, starts a new request.
 */
export class RecentRate {
  constructor(windowS = RECENT_WINDOW_S) {
    this.windowS = windowS;
    this.key = null;
    this.samples = [[0.0, 0]];
  }

  sample(key, elapsedS, bitsDone) {
    if (key !== this.key || elapsedS < this.samples[this.samples.length - 1][0]) {
      this.key = key;
      this.samples = [[0.0, 0]];
    }
    let base = 0;
    this.samples.forEach(([t], k) => {
      if (elapsedS - t >= this.windowS - 1e-9) base = k;
    });
    this.samples.splice(0, base);
    const [t0, b0] = this.samples[0];
    this.samples.push([elapsedS, bitsDone]);
    return { recent_bits: bitsDone - b0, recent_s: elapsedS - t0 };
  }
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

/**
 * Seconds between heartbeats. state = {now_s, phase, last_event_s, last_heartbeat_s,
 * min_interval_s, not_before_s}: the last two are what the control plane asked for (a floor
 * under the interval; 429's Retry-After as a session time nothing is sent before).
 */
export function heartbeatInterval(state, rule = DEFAULT_CADENCE) {
  return Math.max(ruleInterval(state, rule), state.min_interval_s || 0);
}

function ruleInterval(state, rule) {
  const r = { ...DEFAULT_CADENCE, ...rule };
  if (state.phase !== "steady") return r.urgent_s;
  const lastEvent = state.last_event_s === null || state.last_event_s === undefined ? 0.0 : state.last_event_s;
  const since = state.now_s - lastEvent;
  if (since < r.settle_s) return r.event_s;
  return Math.min(Math.max(r.growth * since, r.event_s), r.max_s);
}

/** When the next heartbeat is due (session clock); now_s if none was sent yet. */
export function nextHeartbeatAt(state, rule = DEFAULT_CADENCE) {
  const due =
    state.last_heartbeat_s === null || state.last_heartbeat_s === undefined
      ? state.now_s
      : state.last_heartbeat_s + heartbeatInterval(state, rule);
  const notBefore = state.not_before_s;
  return notBefore === null || notBefore === undefined ? due : Math.max(due, notBefore);
}

export function heartbeatDue(state, rule = DEFAULT_CADENCE) {
  return state.now_s >= nextHeartbeatAt(state, rule);
}
