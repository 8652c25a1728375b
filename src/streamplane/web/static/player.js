// streamplane's browser player: HLS with hls.js or DASH with dash.js, driven by streamplane's
// ABR (abr.js), failover down the ranked edges of a playback, and heartbeats on the cadence of
// abr.js.
//
//   const Hls = await loadHls();                 // or: const dashjs = await loadDash();
//   const player = new StreamplanePlayer({ Hls, video, playback, catalogTitle });
//   //            new StreamplanePlayer({ format: "dash", dashjs, video, playback, catalogTitle })
//   await player.start();          // player.state is a plain object, updated as it plays
//
// StreamplanePlayer holds what does not depend on the library: the edges and failover, the
// ladder and the ABR's state, stalls, the chart's samples and the heartbeats. An engine
// (HlsEngine, DashEngine) wires one library into it. Both route every request to the active
// edge with that edge's token (the edges check a token on every request, and relative URLs
// inside manifests drop the query string): hls.js through a custom loader, dash.js through a
// request interceptor. Failing over is then only "change the active edge": the request that
// failed is retried by the library, and now goes to the next edge.
import {
  RecentRate,
  chooseRung,
  heartbeatDue,
  heartbeatInterval,
  shouldAbandon,
  throughputEstimateKbps,
} from "./abr.js";

export const HLS_MODULE = new URL("./vendor/hls.min.mjs", import.meta.url).href;
export const DASH_MODULE = new URL("./vendor/dash.all.min.js", import.meta.url).href;
/** The manifest formats the player plays: the playback answer has one URL of each per edge. */
export const FORMATS = Object.freeze(["hls", "dash"]);
const LIBRARY = Object.freeze({ hls: "hls.js", dash: "dash.js" });
const TOKEN = "__token__";
const TICK_MS = 250;
const HISTORY = 20; // downloads the ABR sees
const SAMPLE_S = 0.5; // chart sample period
const SAMPLES_KEPT = 240;
const MAX_BATCH = 100; // heartbeat events per request (the control plane's body limit is 64 KiB)
const NEAR_END_S = 5; // a resume position closer than this to the end starts from the beginning

/** The page cannot play here: the library is not vendored (`vendorMissing`), or no MSE. */
export class PlayerSetupError extends Error {
  constructor(message, { vendorMissing = false } = {}) {
    super(message);
    this.vendorMissing = vendorMissing;
  }
}

function missing(format, url) {
  return new PlayerSetupError(
    `${LIBRARY[format]} is missing (${url}): run \`make install\`, which copies it from npm ` +
      "into src/streamplane/web/static/vendor/",
    { vendorMissing: true },
  );
}

/** hls.js from static/vendor/, or a PlayerSetupError saying how to get it. */
export async function loadHls() {
  let mod;
  try {
    mod = await import(HLS_MODULE);
  } catch (err) {
    throw missing("hls", HLS_MODULE);
  }
  const Hls = mod.default;
  if (!Hls.isSupported()) throw new PlayerSetupError("this browser has no Media Source Extensions");
  return Hls;
}

/** dash.js (its `dashjs` namespace: MediaPlayer, FactoryMaker, Debug) from static/vendor/. */
export async function loadDash() {
  let mod;
  try {
    mod = await import(DASH_MODULE);
  } catch (err) {
    throw missing("dash", DASH_MODULE);
  }
  const supported = mod.supportsMediaSource ? mod.supportsMediaSource() : "MediaSource" in window;
  if (!supported) throw new PlayerSetupError("this browser has no Media Source Extensions");
  return mod.default;
}

/** The library that plays `format`: hls.js for "hls", dash.js for "dash". */
export function loadLibrary(format) {
  if (format === "dash") return loadDash();
  if (format === "hls") return loadHls();
  return Promise.reject(new PlayerSetupError(`unknown format ${JSON.stringify(format)}`));
}

/** The per-segment ladder the ABR decides on, from an edge's title.json (rungs lowest first). */
export function ladderFromTitle(doc) {
  const durations = (doc.segments || []).map((s) => s.duration_s);
  const rungs = [...doc.rungs]
    .sort((a, b) => a.average_bitrate_bps - b.average_bitrate_bps)
    .map((r) => ({
      id: r.id,
      width: r.width,
      height: r.height,
      vmaf: r.vmaf,
      bitrate_kbps: r.average_bitrate_bps / 1000,
      segment_bits: (r.segment_bytes || []).map((b) => b * 8),
      segment_vmaf: r.segment_vmaf || [],
    }));
  return { durations, rungs, duration_s: doc.duration_s };
}

/** The same from the catalog's summary (no per-segment sizes: the ABR uses nominal ones). */
export function ladderFromCatalog(title) {
  const rungs = [...title.rungs]
    .sort((a, b) => a.average_bitrate_bps - b.average_bitrate_bps)
    .map((r) => ({
      id: r.id,
      width: r.width,
      height: r.height,
      vmaf: r.vmaf,
      bitrate_kbps: r.average_bitrate_bps / 1000,
      segment_bits: [],
      segment_vmaf: [],
    }));
  return { durations: [], rungs, duration_s: title.duration_s };
}

function tokenOf(url) {
  try {
    return new URL(url).searchParams.get(TOKEN);
  } catch {
    return null;
  }
}

function pathOf(url) {
  return String(url || "").split("?")[0];
}

export class StreamplanePlayer {
  /**
   * playback: the answer of POST /v1/playback. format: "hls" (with `Hls`, hls.js) or "dash"
   * (with `dashjs`, dash.js). catalogTitle: the title from /v1/titles (a fallback ladder when
   * no edge answers for title.json). maxBufferS: how far ahead the library fetches.
   */
  constructor({
    Hls = null,
    dashjs = null,
    format = "hls",
    video,
    playback,
    catalogTitle = null,
    maxBufferS = 20,
    loop = false,
    stallFailoverS = 5,
    onEvent = () => {},
  }) {
    if (!FORMATS.includes(format)) throw new Error(`unknown format ${JSON.stringify(format)}`);
    this.Hls = Hls;
    this.dashjs = dashjs;
    this.format = format;
    this.video = video;
    this.playback = playback;
    this.catalogTitle = catalogTitle;
    this.maxBufferS = maxBufferS;
    this.loop = loop;
    this.stallFailoverS = stallFailoverS;
    this.onEvent = onEvent;
    this.t0 = performance.now();
    // One token signs the whole title (its ACL is the title's path), on every edge.
    this.edges = playback.edges.map((e) => ({
      ...e,
      token: tokenOf(e[format]) || tokenOf(e.hls) || tokenOf(playback[format]) || tokenOf(playback.hls),
      status: "standby",
      errors: 0,
      failedAt: null,
    }));
    this.active = 0;
    this.engine = null;
    this.hls = null; // the hls.js instance (format "hls")
    this.dash = null; // the dash.js MediaPlayer (format "dash")
    this.ladder = null;
    this.abrRungs = [];
    this.renditionOfRung = []; // the library's key (hls.js level, DASH Representation id) per rung
    this.rungOfRendition = new Map();
    this.downloads = [];
    this.recentRate = new RecentRate(); // the in-flight video segment's rate over the last second
    this.pending = [];
    this.timer = null;
    this.lastT = 0;
    this.lastProgressAt = 0;
    this.stallStartedAt = null;
    this.seekPending = false;
    this.seekStartedAt = 0;
    this.loadStartedAt = 0;
    this.lastFailoverAt = -Infinity;
    this.lastSample = -Infinity;
    this.mediaErrorRecoveries = 0;
    this.fatalRecoveries = 0; // fatal network errors since the last good answer
    this.stopped = false;
    const interval = playback.heartbeat.interval_s;
    this.cadence = { max_s: Math.max(2, interval) };
    this.state = {
      sessionId: playback.session_id,
      title: playback.title,
      format, // hls | dash
      library: LIBRARY[format],
      phase: "startup", // startup | steady | seek | rebuffering
      position: 0,
      playedS: 0,
      bufferS: 0,
      rung: null, // index into the ABR's rungs of the last video segment requested
      rungId: null,
      loadedRung: null, // rung of the last video segment that arrived
      playingRung: null,
      rungs: 0,
      bitrateKbps: null,
      throughputKbps: null,
      switches: 0,
      rebuffers: 0,
      rebufferS: 0,
      startupS: null,
      resumedAt: 0,
      edge: this.edges[0] ? this.edges[0].edge_id : null,
      edgeIndex: 0,
      errors: 0,
      failovers: 0,
      failoverLog: [], // {at_s, position_s, from, to, reason}
      abandons: 0,
      heartbeats: 0,
      heartbeatErrors: 0,
      heartbeatsThrottled: 0,
      minIntervalS: 0, // the control plane's floor under the cadence
      notBeforeS: null, // its 429 said: not before then (session clock)
      heartbeatInterval: null,
      lastHeartbeatS: null,
      lastEventS: null,
      resumePositionS: playback.resume_position_s,
      sessionEnded: false,
      fatal: null,
      samples: [], // {t, kbps, buffer, rung}
      events: [], // the log the page shows
    };
  }

  // -- clock and edges --------------------------------------------------------------------

  now() {
    return (performance.now() - this.t0) / 1000;
  }

  get edge() {
    return this.edges[this.active];
  }

  /** `url` on the active edge (or edge `index`), with that edge's token. */
  rewrite(url, index = this.active) {
    const edge = this.edges[index];
    const u = new URL(url, edge.base_url);
    const base = new URL(edge.base_url);
    u.protocol = base.protocol;
    u.host = base.host;
    u.searchParams.delete(TOKEN);
    if (edge.token) u.searchParams.set(TOKEN, edge.token);
    return u.href;
  }

  /** The manifest of the player's format on the active edge (or edge `index`), signed. */
  manifestUrl(index = this.active) {
    const edge = this.edges[index];
    return this.rewrite(edge[this.format] || this.playback[this.format], index);
  }

  edgeIndexOf(url) {
    let origin;
    try {
      origin = new URL(url).origin;
    } catch {
      return -1;
    }
    return this.edges.findIndex((e) => new URL(e.base_url).origin === origin);
  }

  /** A request to edge `index` failed (no answer, an HTTP error, a timeout). Fail over if it
   * is the active edge; a late failure from an edge already left behind changes nothing. */
  edgeError(index, what) {
    this.state.errors += 1;
    if (index < 0) return;
    const edge = this.edges[index];
    edge.errors += 1;
    this.record("error", `${edge.edge_id}: ${what}`);
    if (index === this.active) this.failover(what);
  }

  edgeOk(index) {
    if (index >= 0 && index === this.active) {
      this.edges[index].status = "active";
      this.fatalRecoveries = 0;
    }
  }

  /** Move to the next ranked edge; the request in flight is retried there by the library. */
  failover(reason, { restart = false } = {}) {
    if (this.edges.length < 2) return false;
    const from = this.active;
    const now = this.now();
    this.edges[from].status = "failed";
    this.edges[from].failedAt = now;
    // The next edge down the ranking that has not failed; else the one that failed longest ago.
    let to = -1;
    for (let k = 1; k < this.edges.length && to < 0; k++) {
      const i = (from + k) % this.edges.length;
      if (this.edges[i].failedAt === null) to = i;
    }
    if (to < 0) {
      to = this.edges
        .map((e, i) => [e.failedAt, i])
        .filter(([, i]) => i !== from)
        .sort((a, b) => a[0] - b[0])[0][1];
    }
    this.active = to;
    this.edges[to].status = "active";
    this.edges[to].failedAt = null;
    const entry = {
      at_s: now,
      position_s: this.video.currentTime,
      from: this.edges[from].edge_id,
      to: this.edges[to].edge_id,
      reason,
    };
    this.state.failovers += 1;
    this.state.failoverLog.push(entry);
    this.state.edge = this.edges[to].edge_id;
    this.state.edgeIndex = to;
    this.record("failover", `failover ${entry.from} → ${entry.to}: ${reason}`);
    if (restart && this.engine) {
      // Nothing failed outright (a stall): drop what is in flight and reload from the new edge.
      const engine = this.engine;
      setTimeout(() => {
        if (this.engine === engine && !this.stopped) engine.restart();
      }, 0);
    }
    return true;
  }

  // -- the ladder, renditions and the ABR -------------------------------------------------

  async loadLadder() {
    const title = this.playback.title;
    for (let k = 0; k < this.edges.length; k++) {
      const i = this.active;
      const url = this.rewrite(`/${encodeURIComponent(title)}/title.json`, i);
      try {
        const r = await fetch(url, { cache: "no-store" });
        if (r.ok) {
          this.ladder = ladderFromTitle(await r.json());
          this.edgeOk(i);
          return;
        }
        this.edgeError(i, `title.json answered ${r.status}`);
      } catch (err) {
        this.edgeError(i, `title.json: ${err.message}`);
      }
    }
    if (this.catalogTitle) {
      this.ladder = ladderFromCatalog(this.catalogTitle);
      this.record("warning", "no edge gave title.json: deciding on nominal bitrates");
      return;
    }
    throw new Error("no edge answered for title.json");
  }

  /**
   * Map the library's video renditions to rungs: by rung id (the `v/<rung>/` of an HLS
   * playlist path, a DASH Representation's id), else by bitrate order. `renditions` are
   * {key, id, bitrate} in the library's order; key is what the library calls it (an hls.js
   * level index, a DASH Representation id).
   */
  mapRenditions(renditions) {
    const rungs = this.ladder.rungs;
    const byId = new Map(rungs.map((r, i) => [r.id, i]));
    const found = new Map();
    for (const { key, id } of renditions) {
      if (id !== null && id !== undefined && byId.has(id)) found.set(key, byId.get(id));
    }
    if (found.size !== renditions.length) {
      found.clear();
      const order = renditions.map((r) => [r.bitrate, r.key]).sort((a, b) => a[0] - b[0]);
      order.forEach(([, key], k) => found.set(key, Math.min(k, rungs.length - 1)));
    }
    // The ABR decides among the rungs that have a rendition, lowest first.
    const used = [...new Set(found.values())].sort((a, b) => a - b);
    this.abrRungs = used.map((r) => rungs[r]);
    this.renditionOfRung = used.map((r) => [...found].find(([, rr]) => rr === r)[0]);
    this.rungOfRendition = new Map([...found].map(([key, r]) => [key, used.indexOf(r)]));
    this.state.rungs = this.abrRungs.length;
  }

  /** startup (nothing played yet), rebuffering (stalled), seek (refilling after one), steady. */
  phase() {
    if (this.state.startupS === null) return "startup";
    if (this.stallStartedAt !== null) return "rebuffering";
    if (this.seekPending || this.video.seeking) return "seek";
    return "steady";
  }

  bufferAhead() {
    const v = this.video;
    const t = v.currentTime;
    for (let i = 0; i < v.buffered.length; i++) {
      if (v.buffered.start(i) <= t + 0.5 && v.buffered.end(i) > t) return v.buffered.end(i) - t;
    }
    return 0;
  }

  segmentAt(time) {
    const d = this.ladder.durations;
    let start = 0;
    for (let i = 0; i < d.length; i++) {
      if (time < start + d[i] - 0.05) return i;
      start += d[i];
    }
    return Math.max(d.length - 1, 0);
  }

  abrState(nextSegment) {
    const d = this.ladder.durations;
    return {
      buffer_s: this.bufferAhead(),
      max_buffer_s: this.maxBufferS,
      segment_s: d.length ? Math.max(...d) : 4,
      rungs: this.abrRungs,
      next_segment: nextSegment,
      last_rung: this.state.rung,
      phase: this.phase(),
      downloads: this.downloads.slice(-HISTORY),
      now_s: this.now(),
      segment_durations_s: d,
    };
  }

  /** The rung (index into abrRungs) of the next video segment: the one at the buffer's end. */
  nextRung() {
    const end = this.video.currentTime + this.bufferAhead();
    return chooseRung(this.abrState(this.segmentAt(end)));
  }

  /**
   * A lower rung to fetch the in-flight video segment at instead, or null. rung: its rung;
   * startS: where it starts in the title; bytes loaded so far and in all (0 when unknown);
   * elapsedS: since it was requested.
   */
  abandonRung(rung, startS, loadedBytes, totalBytes, elapsedS) {
    if (rung === undefined || rung === null || rung === 0) return null;
    const index = this.segmentAt(startS + 0.05);
    const known = this.abrRungs[rung].segment_bits[index];
    const recent = this.recentRate.sample(`${index}/${rung}`, elapsedS, loadedBytes * 8);
    const progress = {
      rung,
      bits_done: loadedBytes * 8,
      bits_total: known || Math.max(totalBytes || 0, loadedBytes) * 8,
      elapsed_s: elapsedS,
      recent_bits: recent.recent_bits,
      recent_s: recent.recent_s,
    };
    const to = shouldAbandon(this.abrState(index), progress);
    if (to === null) return null;
    this.state.abandons += 1;
    this.record("abandon", `abandoned segment ${index + 1} at rung ${rung}, again at rung ${to}`);
    return to;
  }

  /** A video segment at `rung` is being requested. */
  segmentLoading(rung) {
    if (rung === undefined || rung === null) return;
    if (this.state.rung !== null && rung !== this.state.rung) {
      this.state.switches += 1;
      this.record("bitrate", `rung ${this.state.rung} → ${rung} (${this.abrRungs[rung].id})`);
    }
    this.state.rung = rung;
    this.state.rungId = this.abrRungs[rung].id;
    this.state.bitrateKbps = this.abrRungs[rung].bitrate_kbps;
  }

  /** A video segment arrived: `bytes` in `seconds`, request to last byte. */
  segmentLoaded(rung, bytes, seconds) {
    if (bytes > 0 && seconds > 0) {
      this.downloads.push({ bits: bytes * 8, seconds, end_s: this.now() });
      if (this.downloads.length > HISTORY) this.downloads.shift();
    }
    if (rung !== undefined && rung !== null) this.state.loadedRung = rung;
  }

  /** The video on screen is now from `rung`. */
  segmentPlaying(rung) {
    if (rung !== undefined && rung !== null) this.state.playingRung = rung;
  }

  // -- starting and stopping --------------------------------------------------------------

  async start() {
    if (!this.edges.length) throw new Error("the playback answer lists no edge");
    if (this.format === "hls" && !this.Hls) throw new Error("format hls needs hls.js (Hls)");
    if (this.format === "dash" && !this.dashjs) throw new Error("format dash needs dash.js (dashjs)");
    this.edges[0].status = "active";
    const how = `${this.format.toUpperCase()}, ${this.state.library}`;
    this.record("session", `session ${this.playback.session_id} on ${this.edge.edge_id} (${how})`);
    await this.loadLadder();
    const duration = this.ladder.duration_s || 0;
    const resume = this.playback.resume_position_s || 0;
    const startAt = resume > 0 && (!duration || resume < duration - NEAR_END_S) ? resume : null;
    this.state.resumedAt = startAt === null ? 0 : startAt;
    this.engine = this.format === "dash" ? new DashEngine(this, this.dashjs) : new HlsEngine(this, this.Hls);
    if (startAt !== null) this.record("resume", `resuming at ${startAt.toFixed(1)} s`);
    this.listen();
    this.loadStartedAt = this.now();
    this.engine.start(startAt);
    this.timer = setInterval(() => this.tick(), TICK_MS);
  }

  /** The library gave up on the network: move on (unless a request already did) and reload. */
  fatalNetworkError(what, url) {
    if (this.fatalRecoveries >= 2 * this.edges.length) return false;
    this.fatalRecoveries += 1;
    const index = this.edgeIndexOf(url || "");
    if (index === this.active || index < 0) this.failover(`fatal ${what}`);
    this.record("recover", `fatal ${what}: reloading from ${this.edge.edge_id}`);
    return true;
  }

  fatalError(what) {
    this.state.fatal = what;
    this.record("fatal", `fatal ${what}`);
  }

  // -- what the video element does --------------------------------------------------------

  listen() {
    const v = this.video;
    v.loop = this.loop && this.engine.nativeLoop;
    this.handlers = {
      playing: () => {
        if (this.state.startupS === null) {
          this.state.startupS = this.now();
          this.record("play", `playing after ${this.state.startupS.toFixed(2)} s`);
        }
      },
      seeking: () => {
        if (this.state.startupS === null || this.seekPending) return;
        this.seekPending = true;
        this.seekStartedAt = this.now();
      },
    };
    for (const [name, fn] of Object.entries(this.handlers)) v.addEventListener(name, fn);
  }

  tick() {
    if (this.stopped) return;
    const v = this.video;
    const now = this.now();
    const t = v.currentTime;
    const s = this.state;
    const delta = t - this.lastT;
    if (delta > 0 && delta < 2) s.playedS += delta;
    const moving = Math.abs(delta) > 0.005;
    this.lastT = t;
    s.position = t;
    s.bufferS = this.bufferAhead();
    s.throughputKbps = throughputEstimateKbps(this.downloads);
    const started = s.startupS !== null;
    if (moving) this.lastProgressAt = now;
    // seeking (incl. the jump back to 0 of a loop): until it plays again
    if (this.seekPending && !v.seeking && v.readyState >= 3) {
      this.seekPending = false;
      this.record("seek", `seeked to ${t.toFixed(1)} s`);
    }
    // stalls: playing, not seeking, and the playhead does not move
    const wants = started && !v.paused && !v.ended && !v.seeking && !this.seekPending;
    if (this.stallStartedAt === null && wants && !moving && now - this.lastProgressAt > 0.6) {
      this.stallStartedAt = now;
      s.rebuffers += 1;
      this.record("rebuffer", `stalled at ${t.toFixed(1)} s (buffer ${s.bufferS.toFixed(1)} s)`);
    } else if (this.stallStartedAt !== null && (moving || !wants)) {
      const lasted = now - this.stallStartedAt;
      s.rebufferS += lasted;
      this.stallStartedAt = null;
      this.record("rebuffered", `playing again after ${lasted.toFixed(1)} s`);
    }
    s.phase = this.phase();
    // Waiting on this edge for too long (to start, after a seek, in a stall): the next edge.
    let waiting = null;
    if (!started) waiting = this.loadStartedAt;
    else if (this.stallStartedAt !== null) waiting = this.stallStartedAt;
    else if (this.seekPending && !moving) waiting = this.seekStartedAt;
    if (waiting !== null) {
      const limit = started ? this.stallFailoverS : 2 * this.stallFailoverS;
      if (now - Math.max(waiting, this.lastFailoverAt) > limit) {
        this.failover(started ? "no progress (stall)" : "no start", { restart: true });
        this.lastFailoverAt = now;
      }
    }
    if (now - this.lastSample >= SAMPLE_S) {
      this.lastSample = now;
      s.samples.push({ t: now, kbps: s.throughputKbps, buffer: s.bufferS, rung: s.playingRung });
      if (s.samples.length > SAMPLES_KEPT) s.samples.shift();
    }
    this.maybeHeartbeat(now);
  }

  // -- telemetry --------------------------------------------------------------------------

  /** Log an event; events other than a plain heartbeat make the cadence quicken. */
  record(kind, message) {
    const at_s = this.now();
    this.state.events.push({ at_s, kind, message });
    if (this.state.events.length > 200) this.state.events.shift();
    if (kind !== "session" && kind !== "warning") {
      this.state.lastEventS = at_s;
      this.queue(kind);
    }
    this.onEvent({ at_s, kind, message });
  }

  snapshot(kind) {
    const s = this.state;
    return {
      at: Date.now() / 1000,
      position_s: Math.max(0, this.video ? this.video.currentTime : 0),
      kind,
      format: this.format,
      buffer_s: s.bufferS,
      rung: s.rung,
      rung_id: s.rungId,
      bitrate_kbps: s.bitrateKbps,
      throughput_kbps: s.throughputKbps,
      rebuffers: s.rebuffers,
      rebuffer_s: s.rebufferS,
      startup_s: s.startupS,
      edge: s.edge,
      errors: s.errors,
      failovers: s.failovers,
    };
  }

  queue(kind) {
    this.pending.push(this.snapshot(kind));
    if (this.pending.length > 10 * MAX_BATCH) this.pending.splice(0, this.pending.length - 10 * MAX_BATCH);
  }

  maybeHeartbeat(now) {
    if (this.state.sessionEnded || this.sending) return;
    const cad = {
      now_s: now,
      phase: this.state.phase,
      last_event_s: this.state.lastEventS,
      last_heartbeat_s: this.state.lastHeartbeatS,
      min_interval_s: this.state.minIntervalS,
      not_before_s: this.state.notBeforeS,
    };
    this.state.heartbeatInterval = heartbeatInterval(cad, this.cadence);
    if (heartbeatDue(cad, this.cadence)) this.sendHeartbeat("position");
  }

  heartbeatUrls() {
    // The control plane's public URL; the same path on this page's origin if that is refused
    // (the page opened under another name for the same host).
    const url = this.playback.heartbeat.url;
    const local = new URL(new URL(url).pathname, location.href).href;
    return local === url ? [url] : [url, local];
  }

  async sendHeartbeat(kind, { keepalive = false } = {}) {
    this.sending = true;
    this.state.lastHeartbeatS = this.now();
    const events = this.pending.splice(0, MAX_BATCH - 1);
    events.push(this.snapshot(kind));
    const body = JSON.stringify({ session_id: this.playback.session_id, events });
    const headers = {
      authorization: `Bearer ${this.playback.heartbeat.token}`,
      "content-type": "application/json",
    };
    try {
      for (const url of this.heartbeatUrls()) {
        let r;
        try {
          r = await fetch(url, { method: "POST", headers, body, keepalive });
        } catch (err) {
          continue; // unreachable or refused across origins: the next URL
        }
        if (r.ok) {
          const reply = await r.json();
          this.state.heartbeats += 1;
          this.state.resumePositionS = reply.resume_position_s;
          this.state.minIntervalS = reply.min_interval_s || 0;
          return;
        }
        if (r.status === 429) {
          // slowed down: wait as told (Retry-After), keep the events for the next one
          const wait = Number(r.headers.get("retry-after"));
          this.state.notBeforeS = this.now() + (Number.isFinite(wait) && wait >= 0 ? wait : 1);
          const reply = await r.json().catch(() => ({}));
          if (reply.interval_s) this.state.minIntervalS = reply.interval_s;
          this.state.heartbeatsThrottled += 1;
          if (!keepalive) this.pending.unshift(...events.slice(0, -1));
          return;
        }
        if (r.status === 410) {
          this.state.sessionEnded = true;
          this.record("warning", "the control plane ended this session (410): start again");
          return;
        }
        break;
      }
      this.state.heartbeatErrors += 1;
      if (!keepalive) this.pending.unshift(...events.slice(0, -1));
    } finally {
      this.sending = false;
    }
  }

  /** Stop playing; tell the control plane the screen is free. */
  async stop() {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.timer);
    const sent = this.state.sessionEnded ? null : this.sendHeartbeat("stop", { keepalive: true });
    if (this.handlers) {
      for (const [name, fn] of Object.entries(this.handlers)) this.video.removeEventListener(name, fn);
    }
    if (this.engine) {
      this.engine.destroy();
      this.engine = null;
    }
    await sent;
  }
}

// -- HLS: hls.js ----------------------------------------------------------------------------

class HlsEngine {
  constructor(player, Hls) {
    this.player = player;
    this.Hls = Hls;
    this.nativeLoop = true; // looping is the video element's
    this.hls = null;
    this.mapped = null;
    this.mappedCount = 0;
  }

  /** The level <-> rung maps, rebuilt whenever hls.js changes its list of levels. */
  levels() {
    const levels = this.hls ? this.hls.levels : null;
    if (!levels || !levels.length) return false;
    if (this.mapped !== levels || this.mappedCount !== levels.length) {
      this.player.mapRenditions(
        levels.map((level, li) => {
          const uri = level.uri || (Array.isArray(level.url) ? level.url[0] : level.url) || "";
          const m = /\/v\/([^/]+)\//.exec(new URL(uri, "http://x/").pathname);
          return { key: li, id: m ? m[1] : null, bitrate: level.bitrate };
        }),
      );
      this.mapped = levels;
      this.mappedCount = levels.length;
    }
    return true;
  }

  rungOf(level) {
    return this.levels() ? this.player.rungOfRendition.get(level) : undefined;
  }

  /** The hls.js level of the next video segment. */
  chooseLevel() {
    if (!this.levels()) return 0;
    return this.player.renditionOfRung[this.player.nextRung()];
  }

  firstLevel() {
    return this.levels() ? this.player.renditionOfRung[0] : 0;
  }

  /** A lower level to re-request the in-flight segment at, or null. */
  abandonLevel(frag) {
    const rung = this.rungOf(frag.level);
    const stats = frag.stats;
    const elapsedS = (performance.now() - stats.loading.start) / 1000;
    const to = this.player.abandonRung(rung, frag.start, stats.loaded, stats.total, elapsedS);
    return to === null ? null : this.player.renditionOfRung[to];
  }

  config(startAt) {
    const engine = this;
    const player = this.player;
    const Hls = this.Hls;
    const BaseLoader = Hls.DefaultConfig.loader;
    const BaseAbr = Hls.DefaultConfig.abrController;

    class EdgeLoader extends BaseLoader {
      load(context, config, callbacks) {
        const index = player.active;
        context.url = player.rewrite(context.url, index);
        super.load(context, config, {
          ...callbacks,
          onSuccess: (response, stats, ctx, details) => {
            player.edgeOk(index);
            callbacks.onSuccess(response, stats, ctx, details);
          },
          onError: (error, ctx, details, stats) => {
            player.edgeError(index, `HTTP ${error.code || "no answer"} for ${pathOf(ctx.url)}`);
            callbacks.onError(error, ctx, details, stats);
          },
          onTimeout: (stats, ctx, details) => {
            player.edgeError(index, `timeout for ${pathOf(ctx.url)}`);
            callbacks.onTimeout(stats, ctx, details);
          },
        });
      }
    }

    class StreamplaneAbrController extends BaseAbr {
      constructor(hls) {
        super(hls);
        this.forced = -1;
        // hls.js checks the in-flight segment every 100 ms through this; ours decides instead.
        this._abandonRulesCheck = () => this.abandonCheck();
      }

      get firstAutoLevel() {
        return engine.firstLevel();
      }

      get nextAutoLevel() {
        if (!this.hls) return -1;
        if (this.forced !== -1) return this.forced;
        const { minAutoLevel, maxAutoLevel } = this.hls;
        return Math.min(Math.max(engine.chooseLevel(), minAutoLevel), maxAutoLevel);
      }

      set nextAutoLevel(level) {
        this.forced = typeof level === "number" ? level : -1;
      }

      onFragLoaded(event, data) {
        super.onFragLoaded(event, data);
        if (data.frag.type === "main" && data.frag.level === this.forced) this.forced = -1;
      }

      abandonCheck() {
        const frag = this.fragCurrent;
        const hls = this.hls;
        if (!hls || !frag || frag.type !== "main" || frag.stats.aborted || frag.stats.loading.end) {
          return;
        }
        const level = engine.abandonLevel(frag);
        if (level === null) return;
        this.clearTimer();
        hls.nextLoadLevel = hls.nextAutoLevel = level;
        frag.abortRequests();
        this.fragCurrent = this.partCurrent = null;
        hls.trigger(Hls.Events.FRAG_LOAD_EMERGENCY_ABORTED, { frag, part: null, stats: frag.stats });
      }
    }

    // Retry soon: a retry goes to the next edge, so waiting longer only stalls the viewer.
    const policy = (ttfbMs, loadMs) => ({
      default: {
        maxTimeToFirstByteMs: ttfbMs,
        maxLoadTimeMs: loadMs,
        timeoutRetry: { maxNumRetry: 4, retryDelayMs: 0, maxRetryDelayMs: 0 },
        errorRetry: { maxNumRetry: 8, retryDelayMs: 250, maxRetryDelayMs: 2000 },
      },
    });
    return {
      loader: EdgeLoader,
      abrController: StreamplaneAbrController,
      startPosition: startAt === null ? -1 : startAt,
      testBandwidth: false,
      capLevelToPlayerSize: false,
      maxBufferLength: player.maxBufferS,
      maxMaxBufferLength: player.maxBufferS,
      backBufferLength: player.loop ? 0 : 30,
      manifestLoadPolicy: policy(10000, 20000),
      playlistLoadPolicy: policy(10000, 20000),
      fragLoadPolicy: policy(10000, 120000),
    };
  }

  start(startAt) {
    const Hls = this.Hls;
    const player = this.player;
    const hls = new Hls(this.config(startAt));
    this.hls = hls;
    player.hls = hls;
    hls.on(Hls.Events.MANIFEST_PARSED, () => {
      this.levels();
      player.video.play().catch((err) => player.record("warning", `play(): ${err.message}`));
    });
    hls.on(Hls.Events.FRAG_LOADING, (_e, { frag }) => {
      if (frag.type !== "main" || frag.sn === "initSegment") return;
      player.segmentLoading(this.rungOf(frag.level));
    });
    hls.on(Hls.Events.FRAG_LOADED, (_e, { frag }) => {
      if (frag.type !== "main" || frag.sn === "initSegment") return;
      const s = frag.stats;
      player.segmentLoaded(this.rungOf(frag.level), s.loaded, (s.loading.end - s.loading.start) / 1000);
    });
    hls.on(Hls.Events.FRAG_CHANGED, (_e, { frag }) => player.segmentPlaying(this.rungOf(frag.level)));
    hls.on(Hls.Events.ERROR, (_e, data) => this.onError(data));
    hls.loadSource(player.manifestUrl());
    hls.attachMedia(player.video);
  }

  onError(data) {
    if (!data.fatal || this.player.stopped) return;
    const Hls = this.Hls;
    const player = this.player;
    const what = `${data.type}/${data.details}`;
    if (data.type === Hls.ErrorTypes.NETWORK_ERROR) {
      // hls.js gave up retrying: move on (if the loader has not already) and load again.
      const url = (data.context && data.context.url) || (data.frag && data.frag.url) || "";
      if (player.fatalNetworkError(what, url)) {
        if (!this.hls.levels || !this.hls.levels.length) {
          this.hls.loadSource(player.manifestUrl());
        } else {
          this.hls.startLoad(player.video.currentTime);
        }
        return;
      }
    }
    if (data.type === Hls.ErrorTypes.MEDIA_ERROR && player.mediaErrorRecoveries < 3) {
      player.mediaErrorRecoveries += 1;
      player.record("recover", `fatal ${what}: recovering the media element`);
      this.hls.recoverMediaError();
      return;
    }
    player.fatalError(what);
  }

  /** After a stall: drop what is in flight and load again from the playhead (new edge). */
  restart() {
    if (!this.hls) return;
    this.hls.stopLoad();
    this.hls.startLoad(this.player.video.currentTime);
  }

  destroy() {
    if (this.hls) this.hls.destroy();
    this.hls = null;
    this.player.hls = null;
  }
}

// -- DASH: dash.js --------------------------------------------------------------------------

// dash.js error codes (dashjs.MediaPlayer.errors): downloads that failed after every retry.
const DASH_NETWORK_ERRORS = new Set([11, 12, 17, 25, 26, 27, 28, 29]);
// The MPD or the media cannot be played as it is (parse, no streams, MSE refused a segment,
// the video element's own errors 1-5): reloaded a few times, then fatal.
const DASH_MEDIA_ERRORS = new Set([1, 2, 3, 4, 5, 10, 20, 31, 32, 34, 35]);
const DASH_RULES = [
  "throughputRule",
  "bolaRule",
  "insufficientBufferRule",
  "switchHistoryRule",
  "droppedFramesRule",
  "abandonRequestsRule",
  "l2ARule",
  "loLPRule",
];
const RETRY = { attempts: 8, intervalMs: 250 };

class DashEngine {
  constructor(player, dashjs) {
    this.player = player;
    this.dashjs = dashjs;
    this.nativeLoop = false; // see ended()
    this.mp = null;
    this.mappedIds = null;
    this.attemptStarted = new WeakMap(); // FragmentRequest -> performance.now() of its attempt
    this.abandoned = new WeakSet();
  }

  /** dash.js's settings: its ABR rules off (ours decides), buffer, retries, no caching. */
  settings() {
    // hls.js fetches while the buffer ahead is under maxBufferS; dash.js while the buffer plus
    // the segment it would fetch is under its target. One segment more keeps the page's
    // *buffer* meaning the same in both.
    const durations = this.player.ladder.durations;
    const b = this.player.maxBufferS + (durations.length ? Math.max(...durations) : 4);
    const types = ["MPD", "MediaSegment", "InitializationSegment", "IndexSegment", "other"];
    const each = (value) => Object.fromEntries(types.map((t) => [t, value]));
    return {
      debug: { logLevel: this.dashjs.Debug.LOG_LEVEL_WARNING },
      streaming: {
        // Right after an abandonment dash.js lets only a lower rung through, for this long.
        abandonLoadTimeout: 0,
        // No clock to sync for a static MPD; and no requests to a time server after a 404.
        utcSynchronization: { enabled: false, enableBackgroundSyncAfterSegmentDownloadError: false },
        buffer: {
          fastSwitchEnabled: false, // an up-switch appends, as with hls.js; nothing refetched
          bufferTimeDefault: b,
          bufferTimeAtTopQuality: b,
          bufferTimeAtTopQualityLongForm: b,
          // Looping, keep nothing behind the playhead (as hls.js's backBufferLength 0): each
          // time round is fetched again, through the ABR, from the active edge.
          bufferToKeep: this.player.loop ? 0 : 30,
          bufferPruningInterval: this.player.loop ? 1 : 10,
        },
        lastBitrateCachingInfo: { enabled: false },
        lastMediaSettingsCachingInfo: { enabled: false },
        manifestRequestTimeout: 20000,
        fragmentRequestTimeout: 120000,
        // Retry soon: a retry goes to the next edge, so waiting longer only stalls the viewer.
        retryIntervals: each(RETRY.intervalMs),
        retryAttempts: each(RETRY.attempts),
        abr: {
          limitBitrateByPortal: false,
          // dash.js's own first pick, before it first asks the rule: the lowest rung too (1 kbit/s
          // is below every rung). The rule then also starts at the lowest: nothing measured yet.
          initialBitrate: { video: 1 },
          autoSwitchBitrate: { video: true, audio: true },
          rules: Object.fromEntries(DASH_RULES.map((name) => [name, { active: false }])),
        },
      },
    };
  }

  /** The Representation <-> rung maps, rebuilt whenever dash.js lists other Representations. */
  map(representations) {
    if (!representations || !representations.length) return false;
    const ids = representations.map((r) => r.id).join("\n");
    if (ids !== this.mappedIds) {
      this.player.mapRenditions(representations.map((r) => ({ key: r.id, id: r.id, bitrate: r.bandwidth })));
      this.mappedIds = ids;
    }
    return true;
  }

  rungOf(representation) {
    if (!representation || this.mappedIds === null) return undefined;
    return this.player.rungOfRendition.get(representation.id);
  }

  switchRequest(representation, reason) {
    const SwitchRequest = this.dashjs.FactoryMaker.getClassFactoryByName("SwitchRequest");
    const request = SwitchRequest ? SwitchRequest({}).create() : { priority: 0.5 };
    request.representation = representation;
    request.reason = reason;
    request.rule = "StreamplaneRule";
    return request;
  }

  /** The video Representations dash.js may switch between (mapped to rungs), or null. */
  representations(rulesContext) {
    const info = rulesContext.getMediaInfo();
    if (!info || info.type !== "video") return null;
    const abr = rulesContext.getAbrController();
    const representations = abr.getPossibleVoRepresentationsFilteredBySettings(info, true);
    return this.map(representations) ? representations : null;
  }

  /** A switch to `rung`'s Representation. */
  switchTo(representations, rung, why) {
    const id = this.player.renditionOfRung[rung];
    const representation = representations.find((r) => r.id === id) || null;
    return this.switchRequest(representation, { rung, message: `streamplane: ${why} rung ${rung}` });
  }

  /** streamplane's ABR as dash.js's only quality rule: asked before every segment request. */
  qualityRule() {
    const engine = this;
    return {
      getClassName: () => "StreamplaneRule",
      getSwitchRequest(rulesContext) {
        const representations = engine.representations(rulesContext);
        if (!representations) return engine.switchRequest(null, null);
        return engine.switchTo(representations, engine.player.nextRung(), "to");
      },
      reset() {},
    };
  }

  /** streamplane's abandonment check, asked by dash.js on each progress of a download. */
  abandonRule() {
    const engine = this;
    const player = this.player;
    return {
      getClassName: () => "StreamplaneAbandonRule",
      shouldAbandon(rulesContext) {
        const request = rulesContext.getCurrentRequest();
        const none = engine.switchRequest(null, null);
        if (!request || request.mediaType !== "video" || request.type !== "MediaSegment") return none;
        if (engine.abandoned.has(request) || !(request.bytesLoaded > 0)) return none;
        const started = engine.attemptStarted.get(request);
        if (started === undefined) return none;
        const representations = engine.representations(rulesContext);
        if (!representations) return none;
        const rung = engine.rungOf(request.representation);
        const elapsedS = (performance.now() - started) / 1000;
        const { startTime, bytesLoaded, bytesTotal } = request;
        const to = player.abandonRung(rung, startTime, bytesLoaded, bytesTotal, elapsedS);
        if (to === null) return none;
        engine.abandoned.add(request);
        return engine.switchTo(representations, to, "abandon to");
      },
      reset() {},
    };
  }

  /** Every request to an edge goes to the active edge, with its token. */
  onRequest(request) {
    const player = this.player;
    const index = player.edgeIndexOf(request.url);
    if (index >= 0 && !player.stopped) {
      request.url = player.rewrite(request.url, player.active);
      const fragment = request.customData && request.customData.request;
      if (fragment) this.attemptStarted.set(fragment, performance.now());
    }
    return Promise.resolve(request);
  }

  /** Each answer (or its absence) counts for or against the edge that was asked. */
  onResponse(response) {
    const player = this.player;
    const request = response.request || {};
    const index = player.edgeIndexOf(request.url);
    if (index < 0 || player.stopped) return Promise.resolve(response);
    const status = response.status || 0;
    // dash.js clears a request's onloadend before it aborts it on purpose (a seek, a switch,
    // an abandonment): such an end without an answer is not the edge's fault.
    const aborted = !!request.customData && request.customData.onloadend === undefined;
    if (status >= 200 && status < 300) player.edgeOk(index);
    else if (status >= 400) player.edgeError(index, `HTTP ${status} for ${pathOf(request.url)}`);
    else if (!aborted) player.edgeError(index, `no answer for ${pathOf(request.url)}`);
    return Promise.resolve(response);
  }

  start(startAt) {
    const player = this.player;
    const dashjs = this.dashjs;
    const events = dashjs.MediaPlayer.events;
    const mp = dashjs.MediaPlayer().create();
    this.mp = mp;
    player.dash = mp;
    mp.updateSettings(this.settings());
    mp.addRequestInterceptor((request) => this.onRequest(request));
    mp.addResponseInterceptor((response) => this.onResponse(response));
    const rule = (r) => () => ({ create: () => r }); // dash.js builds rules as rule(context).create()
    mp.addABRCustomRule("qualitySwitchRules", "StreamplaneRule", rule(this.qualityRule()));
    mp.addABRCustomRule("abandonFragmentRules", "StreamplaneAbandonRule", rule(this.abandonRule()));
    mp.on(events.STREAM_INITIALIZED, () => {
      this.map(mp.getRepresentationsByType("video"));
    });
    mp.on(events.FRAGMENT_LOADING_STARTED, ({ request }) => {
      if (request.mediaType !== "video" || request.type !== "MediaSegment") return;
      player.segmentLoading(this.rungOf(request.representation));
    });
    mp.on(events.FRAGMENT_LOADING_COMPLETED, ({ request, response, error }) => {
      if (error || !response || request.mediaType !== "video" || request.type !== "MediaSegment") return;
      const { startDate, endDate } = request; // this attempt: request to last byte
      const seconds = startDate && endDate ? (endDate - startDate) / 1000 : 0;
      const bytes = response.byteLength || request.bytesLoaded;
      player.segmentLoaded(this.rungOf(request.representation), bytes, seconds);
    });
    mp.on(events.QUALITY_CHANGE_RENDERED, (e) => {
      if (e.mediaType === "video") player.segmentPlaying(this.rungOf(e.newRepresentation));
    });
    mp.on(events.PLAYBACK_ENDED, () => this.ended());
    mp.on(events.ERROR, (e) => this.onError(e.error || {}));
    mp.initialize(player.video, player.manifestUrl(), true, startAt === null ? NaN : startAt);
  }

  onError(error) {
    const player = this.player;
    if (player.stopped) return;
    const code = error.code;
    const what = `dash.js error ${code}: ${error.message || "?"}`;
    if (DASH_NETWORK_ERRORS.has(code)) {
      // dash.js gave up retrying: move on (if a request has not already) and load again there.
      // The URL the last attempt went to (the request's own URL is the unrewritten one).
      const response = error.data && error.data.response;
      const url = response && response.request ? response.request.url : "";
      if (player.fatalNetworkError(what, url)) {
        this.reload();
        return;
      }
      player.fatalError(what);
      return;
    }
    if (DASH_MEDIA_ERRORS.has(code)) {
      if (player.mediaErrorRecoveries < 3) {
        player.mediaErrorRecoveries += 1;
        player.record("recover", `fatal ${what}: reloading`);
        this.reload();
        return;
      }
      player.fatalError(what);
      return;
    }
    player.record("warning", what);
  }

  /**
   * The title ended, by dash.js's clock: looping, start again from 0. dash.js ends a static
   * MPD at its mediaPresentationDuration, checking every 200 ms; it can find the playhead at the
   * end before the element's own loop seeks back, and then seeks to 0.5 s before the end and
   * pauses there: with the element's own loop the title would now and then stop instead of
   * looping. So dash.js's end, not the element's, loops it. This runs right after dash.js's
   * own handler (which has the higher priority), before the element reports that seek: dash.js
   * then sees a seek to 0, not one to the end.
   */
  ended() {
    if (!this.player.loop || !this.mp || this.player.stopped) return;
    this.mp.seek(0);
    this.mp.play();
  }

  /** Load the MPD again from the active edge and play on from the playhead. */
  reload() {
    if (!this.mp) return;
    const player = this.player;
    const at = player.state.startupS === null ? player.state.resumedAt : player.video.currentTime;
    this.mp.attachSource(player.manifestUrl(), at > 0 ? at : NaN);
  }

  /** After a stall: drop what is in flight and load again from the playhead (new edge). */
  restart() {
    this.reload();
  }

  destroy() {
    if (this.mp) this.mp.destroy();
    this.mp = null;
    this.player.dash = null;
  }
}
