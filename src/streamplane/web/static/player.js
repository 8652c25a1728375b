// streamplane's browser player: hls.js driven by streamplane's ABR (abr.js), failover down the
// ranked edges of a playback, and heartbeats on the cadence of abr.js.
//
//   const Hls = await loadHls();
//   const player = new StreamplanePlayer({ Hls, video, playback, catalogTitle });
//   await player.start();          // player.state is a plain object, updated as it plays
//
// Every request hls.js makes goes through EdgeLoader, which points it at the active edge and
// appends that edge's token (the edges check a token on every request, and the relative URLs
// inside playlists drop the query string). Failing over is then only "change the active edge":
// the request that failed is retried by hls.js, and now goes to the next edge.
import {
  chooseRung,
  heartbeatDue,
  heartbeatInterval,
  shouldAbandon,
  throughputEstimateKbps,
} from "./abr.js";

export const HLS_MODULE = new URL("./vendor/hls.min.mjs", import.meta.url).href;
const TOKEN = "__token__";
const TICK_MS = 250;
const HISTORY = 20; // downloads the ABR sees
const SAMPLE_S = 0.5; // chart sample period
const SAMPLES_KEPT = 240;
const MAX_BATCH = 100; // heartbeat events per request (the control plane's body limit is 64 KiB)
const NEAR_END_S = 5; // a resume position closer than this to the end starts from the beginning

/** The page cannot play here: hls.js is not vendored (`vendorMissing`), or no MSE. */
export class PlayerSetupError extends Error {
  constructor(message, { vendorMissing = false } = {}) {
    super(message);
    this.vendorMissing = vendorMissing;
  }
}

/** hls.js from static/vendor/, or a PlayerSetupError saying how to get it. */
export async function loadHls() {
  let mod;
  try {
    mod = await import(HLS_MODULE);
  } catch (err) {
    throw new PlayerSetupError(
      `hls.js is missing (${HLS_MODULE}): run \`make install\`, which copies it from npm ` +
        "into src/streamplane/web/static/vendor/",
      { vendorMissing: true },
    );
  }
  const Hls = mod.default;
  if (!Hls.isSupported()) throw new PlayerSetupError("this browser has no Media Source Extensions");
  return Hls;
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

export class StreamplanePlayer {
  /**
   * playback: the answer of POST /v1/playback. catalogTitle: the title from /v1/titles (a
   * fallback ladder when no edge answers for title.json). maxBufferS: hls.js's forward buffer.
   */
  constructor({
    Hls,
    video,
    playback,
    catalogTitle = null,
    maxBufferS = 20,
    loop = false,
    stallFailoverS = 5,
    onEvent = () => {},
  }) {
    this.Hls = Hls;
    this.video = video;
    this.playback = playback;
    this.catalogTitle = catalogTitle;
    this.maxBufferS = maxBufferS;
    this.loop = loop;
    this.stallFailoverS = stallFailoverS;
    this.onEvent = onEvent;
    this.t0 = performance.now();
    this.edges = playback.edges.map((e) => ({
      ...e,
      token: tokenOf(e.hls) || tokenOf(playback.hls),
      status: "standby",
      errors: 0,
      failedAt: null,
    }));
    this.active = 0;
    this.hls = null;
    this.ladder = null;
    this.levelOfRung = [];
    this.rungOfLevel = new Map();
    this.downloads = [];
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
      phase: "startup", // startup | steady | seek | rebuffering
      position: 0,
      playedS: 0,
      bufferS: 0,
      rung: null, // index into ladder.rungs of the last video segment requested
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
      failoverLog: [], // {at_s, from, to, reason}
      abandons: 0,
      heartbeats: 0,
      heartbeatErrors: 0,
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

  /** Move to the next ranked edge; the request in flight is retried there by hls.js. */
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
    const entry = { at_s: now, from: this.edges[from].edge_id, to: this.edges[to].edge_id, reason };
    this.state.failovers += 1;
    this.state.failoverLog.push(entry);
    this.state.edge = this.edges[to].edge_id;
    this.state.edgeIndex = to;
    this.record("failover", `failover ${entry.from} → ${entry.to}: ${reason}`);
    if (restart && this.hls) {
      // Nothing failed outright (a stall): drop what is in flight and reload from the new edge.
      const hls = this.hls;
      const at = this.video.currentTime;
      setTimeout(() => {
        if (this.hls !== hls) return;
        hls.stopLoad();
        hls.startLoad(at);
      }, 0);
    }
    return true;
  }

  // -- the ladder, levels and the ABR -----------------------------------------------------

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

  /** Map hls.js levels to rungs by their playlist path (v/<rung>/...), else by bitrate order. */
  mapLevels(levels) {
    const rungs = this.ladder.rungs;
    const byId = new Map(rungs.map((r, i) => [r.id, i]));
    const found = new Map();
    levels.forEach((level, li) => {
      const uri = level.uri || (Array.isArray(level.url) ? level.url[0] : level.url) || "";
      const m = /\/v\/([^/]+)\//.exec(new URL(uri, "http://x/").pathname);
      if (m && byId.has(m[1])) found.set(li, byId.get(m[1]));
    });
    if (found.size !== levels.length) {
      found.clear();
      const order = levels.map((l, li) => [l.bitrate, li]).sort((a, b) => a[0] - b[0]);
      order.forEach(([, li], k) => found.set(li, Math.min(k, rungs.length - 1)));
    }
    // The ABR decides among the rungs that have a level, lowest first.
    const used = [...new Set(found.values())].sort((a, b) => a - b);
    this.abrRungs = used.map((r) => rungs[r]);
    this.levelOfRung = used.map((r) => [...found].find(([, rr]) => rr === r)[0]);
    this.rungOfLevel = new Map([...found].map(([li, r]) => [li, used.indexOf(r)]));
    this.state.rungs = this.abrRungs.length;
  }

  /** The level <-> rung maps, rebuilt whenever hls.js changes its list of levels. */
  levels() {
    const levels = this.hls ? this.hls.levels : null;
    if (!levels || !levels.length) return false;
    if (this.mapped !== levels || this.mappedCount !== levels.length) {
      this.mapLevels(levels);
      this.mapped = levels;
      this.mappedCount = levels.length;
    }
    return true;
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

  /** The hls.js level of the next video segment. */
  chooseLevel() {
    if (!this.levels()) return 0;
    const v = this.video;
    const end = v.currentTime + this.bufferAhead();
    const rung = chooseRung(this.abrState(this.segmentAt(end)));
    return this.levelOfRung[rung];
  }

  firstLevel() {
    return this.levels() ? this.levelOfRung[0] : 0;
  }

  /** A lower level to re-request the in-flight segment at, or null. */
  abandonLevel(frag) {
    if (!this.levels()) return null;
    const rung = this.rungOfLevel.get(frag.level);
    if (rung === undefined || rung === 0) return null;
    const stats = frag.stats;
    const index = this.segmentAt(frag.start + 0.05);
    const known = this.abrRungs[rung].segment_bits[index];
    const progress = {
      rung,
      bits_done: stats.loaded * 8,
      bits_total: known || Math.max(stats.total, stats.loaded) * 8,
      elapsed_s: (performance.now() - stats.loading.start) / 1000,
    };
    const to = shouldAbandon(this.abrState(index), progress);
    if (to === null) return null;
    this.state.abandons += 1;
    this.record("abandon", `abandoned segment ${index + 1} at rung ${rung}, again at rung ${to}`);
    return this.levelOfRung[to];
  }

  // -- hls.js -----------------------------------------------------------------------------

  hlsConfig() {
    const player = this;
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
            player.edgeError(index, `HTTP ${error.code || "no answer"} for ${ctx.url.split("?")[0]}`);
            callbacks.onError(error, ctx, details, stats);
          },
          onTimeout: (stats, ctx, details) => {
            player.edgeError(index, `timeout for ${ctx.url.split("?")[0]}`);
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
        return player.firstLevel();
      }

      get nextAutoLevel() {
        if (!this.hls) return -1;
        if (this.forced !== -1) return this.forced;
        const { minAutoLevel, maxAutoLevel } = this.hls;
        return Math.min(Math.max(player.chooseLevel(), minAutoLevel), maxAutoLevel);
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
        const level = player.abandonLevel(frag);
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
    const duration = this.ladder.duration_s || 0;
    const resume = this.playback.resume_position_s || 0;
    const start = resume > 0 && (!duration || resume < duration - NEAR_END_S) ? resume : -1;
    this.state.resumedAt = Math.max(start, 0);
    return {
      loader: EdgeLoader,
      abrController: StreamplaneAbrController,
      startPosition: start,
      testBandwidth: false,
      capLevelToPlayerSize: false,
      maxBufferLength: this.maxBufferS,
      maxMaxBufferLength: this.maxBufferS,
      backBufferLength: this.loop ? 0 : 30,
      manifestLoadPolicy: policy(10000, 20000),
      playlistLoadPolicy: policy(10000, 20000),
      fragLoadPolicy: policy(10000, 120000),
    };
  }

  async start() {
    const Hls = this.Hls;
    if (!this.edges.length) throw new Error("the playback answer lists no edge");
    this.edges[0].status = "active";
    this.record("session", `session ${this.playback.session_id} on ${this.edge.edge_id}`);
    await this.loadLadder();
    const hls = new Hls(this.hlsConfig());
    this.hls = hls;
    if (this.state.resumedAt > 0) this.record("resume", `resuming at ${this.state.resumedAt.toFixed(1)} s`);
    hls.on(Hls.Events.MANIFEST_PARSED, () => {
      this.levels();
      this.video.play().catch((err) => this.record("warning", `play(): ${err.message}`));
    });
    hls.on(Hls.Events.FRAG_LOADING, (_e, { frag }) => {
      if (frag.type !== "main" || frag.sn === "initSegment" || !this.levels()) return;
      const rung = this.rungOfLevel.get(frag.level);
      if (rung === undefined) return;
      if (this.state.rung !== null && rung !== this.state.rung) {
        this.state.switches += 1;
        this.record("bitrate", `rung ${this.state.rung} → ${rung} (${this.abrRungs[rung].id})`);
      }
      this.state.rung = rung;
      this.state.rungId = this.abrRungs[rung].id;
      this.state.bitrateKbps = this.abrRungs[rung].bitrate_kbps;
    });
    hls.on(Hls.Events.FRAG_LOADED, (_e, { frag }) => {
      if (frag.type !== "main" || frag.sn === "initSegment") return;
      const s = frag.stats;
      const seconds = (s.loading.end - s.loading.start) / 1000;
      if (s.loaded > 0 && seconds > 0) {
        this.downloads.push({ bits: s.loaded * 8, seconds });
        if (this.downloads.length > HISTORY) this.downloads.shift();
      }
      const rung = this.levels() ? this.rungOfLevel.get(frag.level) : undefined;
      if (rung !== undefined) this.state.loadedRung = rung;
    });
    hls.on(Hls.Events.FRAG_CHANGED, (_e, { frag }) => {
      if (!this.levels()) return;
      const rung = this.rungOfLevel.get(frag.level);
      if (rung !== undefined) this.state.playingRung = rung;
    });
    hls.on(Hls.Events.ERROR, (_e, data) => this.onHlsError(data));
    this.listen();
    this.loadStartedAt = this.now();
    hls.loadSource(this.rewrite(this.edge.hls));
    hls.attachMedia(this.video);
    this.timer = setInterval(() => this.tick(), TICK_MS);
  }

  onHlsError(data) {
    if (!data.fatal) return;
    const Hls = this.Hls;
    const what = `${data.type}/${data.details}`;
    if (data.type === Hls.ErrorTypes.NETWORK_ERROR && this.fatalRecoveries < 2 * this.edges.length) {
      // hls.js gave up retrying: move on (if the loader has not already) and load again.
      this.fatalRecoveries += 1;
      const url = (data.context && data.context.url) || (data.frag && data.frag.url) || "";
      const index = this.edgeIndexOf(url);
      if (index === this.active || index < 0) this.failover(`fatal ${what}`);
      this.record("recover", `fatal ${what}: reloading from ${this.edge.edge_id}`);
      if (!this.hls.levels || !this.hls.levels.length) {
        this.hls.loadSource(this.rewrite(this.edge.hls));
      } else {
        this.hls.startLoad(this.video.currentTime);
      }
      return;
    }
    if (data.type === Hls.ErrorTypes.MEDIA_ERROR && this.mediaErrorRecoveries < 3) {
      this.mediaErrorRecoveries += 1;
      this.record("recover", `fatal ${what}: recovering the media element`);
      this.hls.recoverMediaError();
      return;
    }
    this.state.fatal = what;
    this.record("fatal", `fatal ${what}`);
  }

  // -- what the video element does --------------------------------------------------------

  listen() {
    const v = this.video;
    v.loop = this.loop;
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
    if (this.hls) {
      this.hls.destroy();
      this.hls = null;
    }
    await sent;
  }
}
