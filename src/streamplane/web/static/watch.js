// The /watch page: sign in, pick a title and a format, start a playback, play it with
// StreamplanePlayer (HLS with hls.js, DASH with dash.js), and show what the player does.
// window.streamplanePlayer is the running player (its .state is what the panel shows; the
// browser tests read it too).
import { FORMATS, loadLibrary, PlayerSetupError, StreamplanePlayer } from "./player.js";
import { isStale, RealtimeClient } from "./realtime.js";

const $ = (id) => document.getElementById(id);
const AUTH_KEY = "streamplane.auth";
const DEVICE_KEY = "streamplane.device";
const CHART_S = 60;

const libraries = {}; // format -> its library, once loaded
let player = null;
let titles = [];
let live = null; // the realtime client of the title's event
window.streamplanePlayer = null;
window.streamplaneRealtime = null;

// -- the control plane's API ------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.detail) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, { method = "GET", body, auth = false } = {}) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  const session = loadAuth();
  if (auth && session) headers.authorization = `Bearer ${session.access_token}`;
  const r = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  const data = text ? JSON.parse(text) : null;
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

/** An authorised call; on 401, spend the refresh token once and try again. */
async function authed(path, options = {}) {
  try {
    return await api(path, { ...options, auth: true });
  } catch (err) {
    const session = loadAuth();
    if (!(err instanceof ApiError) || err.status !== 401 || !session) throw err;
    try {
      const tokens = await api("/v1/auth/refresh", {
        method: "POST",
        body: { refresh_token: session.refresh_token },
      });
      saveAuth({ ...session, ...tokens });
    } catch {
      saveAuth(null);
      showSignedIn();
      throw new Error("your sign-in expired: sign in again");
    }
    return api(path, { ...options, auth: true });
  }
}

function loadAuth() {
  try {
    return JSON.parse(sessionStorage.getItem(AUTH_KEY));
  } catch {
    return null;
  }
}

function saveAuth(value) {
  if (value) sessionStorage.setItem(AUTH_KEY, JSON.stringify(value));
  else sessionStorage.removeItem(AUTH_KEY);
}

function device() {
  let id = localStorage.getItem(DEVICE_KEY);
  if (!id) {
    id = `browser-${crypto.randomUUID().slice(0, 8)}`;
    localStorage.setItem(DEVICE_KEY, id);
  }
  return id;
}

function say(text, { error = false } = {}) {
  const m = $("message");
  m.hidden = !text;
  m.textContent = text || "";
  m.classList.toggle("error", error);
}

// -- signing in -------------------------------------------------------------------------------

async function signIn(email, password) {
  const tokens = await api("/v1/auth/login", { method: "POST", body: { email, password } });
  saveAuth({ email, ...tokens });
  await showSignedIn();
}

async function signUp(email, password) {
  await api("/v1/accounts", { method: "POST", body: { email, password } });
  await signIn(email, password);
}

async function showSignedIn() {
  const session = loadAuth();
  $("signin").hidden = !!session;
  $("pick").hidden = !session;
  $("who").hidden = !session;
  $("who-email").textContent = session ? session.email : "";
  if (session) await loadTitles();
}

async function loadTitles() {
  const data = await api("/v1/titles?limit=500");
  titles = data.titles;
  const select = $("title");
  const wanted = new URLSearchParams(location.search).get("title") || select.value;
  select.replaceChildren(
    ...titles.map((t) => {
      const o = document.createElement("option");
      o.value = t.id;
      o.textContent = `${t.name} · ${t.duration_s.toFixed(0)} s · ${t.rungs.length} rungs`;
      return o;
    }),
  );
  if (titles.some((t) => t.id === wanted)) select.value = wanted;
  if (!titles.length) say("The catalog is empty: package a title into the catalog directory.");
  describeTitle();
}

function describeTitle() {
  const t = titles.find((x) => x.id === $("title").value);
  $("title-info").textContent = t
    ? "rungs: " +
      [...t.rungs]
        .sort((a, b) => a.average_bitrate_bps - b.average_bitrate_bps)
        .map((r) => `${r.id} ${r.width}x${r.height} ${(r.average_bitrate_bps / 1000).toFixed(0)} kbps VMAF ${r.vmaf.toFixed(0)}`)
        .join(" · ")
    : "";
}

// -- playing ----------------------------------------------------------------------------------

/** The library of `format`, loaded once; null (and the page says why) when it cannot be. */
async function prepare(format) {
  if (!libraries[format]) {
    try {
      libraries[format] = await loadLibrary(format);
    } catch (err) {
      const vendorMissing = err instanceof PlayerSetupError && err.vendorMissing;
      $("play").disabled = err instanceof PlayerSetupError;
      $("setup-library").textContent = format === "dash" ? "dash.js" : "hls.js";
      $("setup").hidden = !vendorMissing;
      if (!vendorMissing) say(err.message, { error: true });
      return null;
    }
  }
  $("play").disabled = false;
  $("setup").hidden = true;
  return libraries[format];
}

async function play() {
  say("");
  const format = $("format").value;
  const library = await prepare(format);
  if (!library) return;
  await stop();
  const title = $("title").value;
  let playback;
  try {
    playback = await authed("/v1/playback", { method: "POST", body: { title, device: device() } });
  } catch (err) {
    say(`Playback refused: ${err.message}`, { error: true });
    return;
  }
  $("watch").hidden = false;
  $("log").replaceChildren();
  player = new StreamplanePlayer({
    format,
    Hls: format === "hls" ? library : null,
    dashjs: format === "dash" ? library : null,
    video: $("video"),
    playback,
    catalogTitle: titles.find((t) => t.id === title) || null,
    maxBufferS: Math.max(4, Number($("buffer").value) || 20),
    loop: $("loop").checked,
    onEvent: logEvent,
  });
  window.streamplanePlayer = player;
  startLive(playback.realtime, title);
  $("stop").disabled = false;
  try {
    await player.start();
  } catch (err) {
    player.state.fatal = err.message;
    say(`Cannot play: ${err.message}`, { error: true });
  }
}

async function stop() {
  live?.stop();
  live = null;
  if (!player) return;
  const p = player;
  player = null;
  $("stop").disabled = true;
  await p.stop();
}

function logEvent({ at_s, kind, message }) {
  const li = document.createElement("li");
  li.className = kind;
  const when = document.createElement("span");
  when.textContent = `${at_s.toFixed(1).padStart(6)} s  ${kind}`;
  li.append(when, message);
  const log = $("log");
  log.append(li);
  while (log.children.length > 200) log.firstChild.remove();
  log.scrollTop = log.scrollHeight;
}

// -- the panel --------------------------------------------------------------------------------

const fmt = (x, digits = 1, unit = "") => (x === null || x === undefined ? "–" : `${x.toFixed(digits)}${unit}`);

function kbps(x) {
  if (x === null || x === undefined) return "–";
  return x >= 1000 ? `${(x / 1000).toFixed(2)} Mbps` : `${x.toFixed(0)} kbps`;
}

function render() {
  const p = window.streamplanePlayer;
  if (!p) return;
  const s = p.state;
  const rung = s.rung === null ? null : p.abrRungs && p.abrRungs[s.rung];
  $("s-format").textContent = `${s.format.toUpperCase()} · ${s.library}`;
  $("s-phase").textContent = s.fatal ? `failed: ${s.fatal}` : s.phase;
  $("s-position").textContent = `${fmt(s.position)} s (played ${fmt(s.playedS, 0)} s)`;
  $("s-buffer").textContent = `${fmt(s.bufferS)} s (fills to ${p.maxBufferS} s)`;
  $("s-rung").textContent = rung
    ? `${s.rung + 1}/${s.rungs} · ${rung.id} ${rung.width}x${rung.height} · ${kbps(rung.bitrate_kbps)} · ${s.switches} switches`
    : "–";
  $("s-throughput").textContent = kbps(s.throughputKbps);
  $("s-startup").textContent = s.startupS === null ? "–" : `${fmt(s.startupS, 2)} s`;
  $("s-rebuffers").textContent = `${s.rebuffers} (${fmt(s.rebufferS)} s)`;
  $("s-edge").textContent = s.edge || "–";
  $("s-errors").textContent = `${s.errors} · ${s.failovers}`;
  $("s-heartbeats").textContent =
    `${s.heartbeats} sent, every ${fmt(s.heartbeatInterval, 0)} s` +
    (s.heartbeatErrors ? ` (${s.heartbeatErrors} failed)` : "") +
    (s.sessionEnded ? " · session ended" : "");
  renderEdges(p);
  drawChart(p);
}

function renderEdges(p) {
  const rows = p.edges.map((e, i) => {
    const tr = document.createElement("tr");
    if (i === p.active) tr.className = "active";
    const state = i === p.active ? "active" : e.status;
    for (const [text, cls] of [
      [String(e.rank), ""],
      [`${e.edge_id}${e.last_resort ? " (last resort)" : ""}\n${e.base_url}`, ""],
      [state, `state-${state}`],
      [String(e.errors), ""],
      [e.reason, "dim"],
    ]) {
      const td = document.createElement("td");
      td.textContent = text;
      td.style.whiteSpace = "pre-line";
      if (cls) td.className = cls;
      tr.append(td);
    }
    return tr;
  });
  $("edges").replaceChildren(...rows);
}

function drawChart(p) {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width;
  const h = canvas.height;
  const css = getComputedStyle(document.documentElement);
  ctx.clearRect(0, 0, w, h);
  const samples = p.state.samples;
  if (!samples.length) return;
  const t1 = samples[samples.length - 1].t;
  const t0 = Math.max(samples[0].t, t1 - CHART_S);
  const span = Math.max(t1 - t0, 10);
  const x = (t) => ((t - t0) / span) * (w - 8) + 4;
  const kbpsMax = Math.max(1, ...samples.map((s) => s.kbps || 0)) * 1.1;
  const rungs = Math.max(1, p.state.rungs - 1);
  const bufferMax = Math.max(p.maxBufferS, ...samples.map((s) => s.buffer)) * 1.05;
  ctx.strokeStyle = css.getPropertyValue("--line");
  ctx.lineWidth = 1;
  for (let k = 1; k < 4; k++) {
    ctx.beginPath();
    ctx.moveTo(0, (h * k) / 4);
    ctx.lineTo(w, (h * k) / 4);
    ctx.stroke();
  }
  const line = (color, value, step = false) => {
    ctx.strokeStyle = css.getPropertyValue(color);
    ctx.lineWidth = 2;
    ctx.beginPath();
    let first = true;
    let lastY = null;
    for (const s of samples) {
      const v = value(s);
      if (v === null || v === undefined || s.t < t0) continue;
      const y = h - 6 - v * (h - 12);
      if (first) ctx.moveTo(x(s.t), y);
      else {
        if (step && lastY !== null) ctx.lineTo(x(s.t), lastY);
        ctx.lineTo(x(s.t), y);
      }
      first = false;
      lastY = y;
    }
    ctx.stroke();
  };
  line("--accent", (s) => (s.kbps === null ? null : s.kbps / kbpsMax));
  line("--good", (s) => s.buffer / bufferMax);
  line("--warn", (s) => (s.rung === null ? null : s.rung / rungs), true);
  ctx.fillStyle = css.getPropertyValue("--dim");
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(`${kbps(kbpsMax)} · ${bufferMax.toFixed(0)} s · rung ${p.state.rungs}`, 8, 14);
  ctx.fillText(`${span.toFixed(0)} s`, w - 30, h - 8);
}

// -- wiring -----------------------------------------------------------------------------------

async function guarded(fn) {
  try {
    await fn();
  } catch (err) {
    say(err.message, { error: true });
  }
}

function randomPassword() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function main() {
  const params = new URLSearchParams(location.search);
  if (params.has("loop")) $("loop").checked = params.get("loop") !== "0";
  if (params.has("buffer")) $("buffer").value = params.get("buffer");
  if (FORMATS.includes(params.get("format"))) $("format").value = params.get("format");

  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    guarded(() => signIn($("email").value, $("password").value));
  });
  $("sign-up").addEventListener("click", () => {
    if (!$("signin-form").reportValidity()) return;
    guarded(() => signUp($("email").value, $("password").value));
  });
  $("demo").addEventListener("click", () =>
    guarded(async () => {
      const email = `demo-${crypto.randomUUID().slice(0, 8)}@streamplane.test`;
      const password = randomPassword();
      $("email").value = email;
      $("password").value = password;
      await signUp(email, password);
      say(`Signed up as ${email} (password ${password}).`);
    }),
  );
  $("sign-out").addEventListener("click", () =>
    guarded(async () => {
      await stop();
      const session = loadAuth();
      saveAuth(null);
      if (session) {
        await api("/v1/auth/logout", { method: "POST", body: { refresh_token: session.refresh_token } }).catch(() => {});
      }
      $("watch").hidden = true;
      await showSignedIn();
    }),
  );
  $("pick-form").addEventListener("submit", (e) => {
    e.preventDefault();
    guarded(play);
  });
  $("stop").addEventListener("click", () => guarded(stop));
  $("title").addEventListener("change", describeTitle);
  $("format").addEventListener("change", () => guarded(() => prepare($("format").value)));
  window.addEventListener("pagehide", () => {
    if (player) player.stop();
  });
  setInterval(render, 500);

  await prepare($("format").value);
  await guarded(showSignedIn);
}

main();

// -- live: the event's chat, viewer count and live state (the realtime gateway) ----------------

function startLive(info, event) {
  $("live").hidden = !info;
  if (!info) return;
  const chat = `chat:${event}`;
  const text = (pub) => {
    const li = document.createElement("li");
    li.dataset.offset = pub.offset;
    li.textContent = `${pub.user}: ${pub.data.text ?? JSON.stringify(pub.data)}`;
    return li;
  };
  const renderChat = () => {
    const view = live.view(chat);
    const deleted = new Set(view.messages.filter((m) => m.kind === "delete").map((m) => m.data.offset));
    $("live-chat").replaceChildren(
      ...view.messages.filter((m) => m.kind === "message" && !deleted.has(m.offset)).slice(-50).map(text),
    );
  };
  live = new RealtimeClient(info.url, info.token, Object.keys(info.channels), {
    onConnected: () => ($("live-status").textContent = "live"),
    onMessage: (channel) => channel === chat && renderChat(),
    onReload: (channel) => channel === chat && renderChat(),
    onCount: (channel, viewers) => channel === `event:${event}` && ($("live-viewers").textContent = viewers),
    onGiveUp: (frame) => ($("live-status").textContent = `closed: ${frame.reason}`),
  });
  window.streamplaneRealtime = live;
  live.start();
}

// A state value past its max age is shown as stale, never as current: re-checked every second.
setInterval(() => {
  if (!live) return;
  const items = [];
  for (const [channel, view] of live.views) {
    if (!channel.startsWith("state:")) continue;
    for (const value of view.state.values()) {
      const li = document.createElement("li");
      const stale = isStale(value, Date.now());
      li.className = stale ? "stale" : "current";
      li.textContent = `${value.key}: ${JSON.stringify(value.value)}${stale ? " (stale)" : ""}`;
      items.push(li);
    }
  }
  $("live-state").replaceChildren(...items);
}, 1000);

$("live-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("live-text");
  const channel = [...(live?.channels || [])].find((c) => c.startsWith("chat:"));
  if (!live || !channel || !input.value.trim()) return;
  try {
    await live.publish(channel, { text: input.value.trim() });
    input.value = "";
  } catch (err) {
    say(`Not sent: ${err.message}`, { error: true });
  }
});
