// The live page: a channel's signed master playlist (?src=, as POST /v1/playback answers it
// on a live channel) played with hls.js in low-latency mode: blocking playlist reloads, parts,
// a target latency held with small playback-rate changes. It shows the latency to the live edge
// and, from the playlist's program dates, how far behind the encoder's clock the picture is.
// An MPD (?src=…manifest.mpd…) plays with dash.js in low-latency mode (chunked segments).
// window.live holds the same figures for tests.
//
// With ?realtime= (the `realtime` object of the playback answer, as JSON: the gateway's url,
// a token and the channels it grants), the page shows the channel's viewer count, which the
// realtime gateway sends on the event channel whenever it changes.

import { RealtimeClient } from "./realtime.js";

const $ = (id) => document.getElementById(id);
const live = (window.live = {
  playing: false, latency: null, target: null, glass: null, rate: 1, level: -1, errors: [],
  stalls: 0, behind: false, currentTime: 0, lowLatency: false, viewers: null,
});

function say(text) {
  const el = $("message");
  el.textContent = text;
  el.hidden = !text;
}

// The viewer count: only the event channel is subscribed (chat and state are the watch page's).
// What keeps it from showing is said in its place (the message line is playback's).
function countViewers(param) {
  const unavailable = (why) => ($("viewers").textContent = `– (${why})`);
  let info;
  try {
    info = JSON.parse(param);
  } catch (err) {
    unavailable(`?realtime= is not JSON: ${err.message}`);
    return;
  }
  const channel = Object.keys(info.channels || {}).find((c) => c.startsWith("event:"));
  if (!info.url || !info.token || !channel) {
    unavailable("?realtime= needs the gateway's url, a token and an event: channel");
    return;
  }
  const client = new RealtimeClient(info.url, info.token, [channel], {
    onCount: (c, viewers) => {
      if (c !== channel) return;
      live.viewers = viewers;
      $("viewers").textContent = String(viewers);
    },
    onGiveUp: (frame) => unavailable(frame.reason),
  });
  client.start();
}

async function main() {
  const params = new URLSearchParams(location.search);
  if (params.get("realtime")) countViewers(params.get("realtime"));
  const src = params.get("src");
  if (!src) {
    say("Give the channel's signed playlist URL: /static/live.html?src=…");
    return;
  }
  if (new URL(src, location.href).pathname.endsWith(".mpd")) {
    await playDash(src);
    return;
  }
  let Hls;
  try {
    Hls = (await import("/static/vendor/hls.min.mjs")).default;
  } catch (err) {
    say("hls.js is missing: run make install");
    return;
  }
  const video = $("video");
  const hls = new Hls({
    // the target latency is the playlist's PART-HOLD-BACK (three parts); hls.js holds it by
    // playing at most 10% faster or slower
    lowLatencyMode: true,
    maxLiveSyncPlaybackRate: 1.1,
    backBufferLength: 30,
  });
  hls.on(Hls.Events.ERROR, (_e, d) => {
    live.errors.push(`${d.type} ${d.details}${d.fatal ? " (fatal)" : ""}`);
    if (d.fatal) say(`playback failed: ${d.details}`);
  });
  hls.on(Hls.Events.LEVEL_SWITCHED, (_e, d) => { live.level = d.level; });
  video.addEventListener("playing", () => { live.playing = true; });
  video.addEventListener("waiting", () => { if (live.playing) live.stalls += 1; });
  hls.loadSource(src);
  hls.attachMedia(video);
  hls.on(Hls.Events.MANIFEST_PARSED, () => video.play().catch((err) => say(err.message)));
  setInterval(() => {
    live.latency = Number.isFinite(hls.latency) ? hls.latency : null;
    live.target = Number.isFinite(hls.targetLatency) ? hls.targetLatency : null;
    const date = hls.playingDate;
    live.glass = date ? (Date.now() - date.getTime()) / 1000 : null;
    live.rate = video.playbackRate;
    live.currentTime = video.currentTime;
    show();
    const level = hls.levels[hls.currentLevel];
    $("rung").textContent = level ? `${level.height}p` : "–";
  }, 250);
}

function show() {
  const fmt = (x) => (x === null ? "–" : `${x.toFixed(2)} s`);
  $("latency").textContent = fmt(live.latency);
  $("target").textContent = fmt(live.target);
  $("glass").textContent = fmt(live.glass);
  $("rate").textContent = `${live.rate.toFixed(2)}×`;
}

async function playDash(src) {
  let dashjs;
  try {
    dashjs = (await import("/static/vendor/dash.all.min.js")).default;
  } catch (err) {
    say("dash.js is missing: run make install");
    return;
  }
  const video = $("video");
  const player = dashjs.MediaPlayer().create();
  // Low-latency DASH: the MPD says availabilityTimeComplete="false", so dash.js asks for the
  // segment being written and reads it chunk by chunk as it arrives (its fetch loader); the
  // latency it holds, and the playback rates it may use to hold it, come from the MPD's
  // ServiceDescription.
  player.updateSettings({
    streaming: {
      liveCatchup: { enabled: true, mode: "liveCatchupModeDefault" },
    },
  });
  player.on(dashjs.MediaPlayer.events.ERROR, (e) => {
    live.errors.push(`dash.js ${e.error ? `${e.error.code} ${e.error.message}` : ""}`);
  });
  video.addEventListener("playing", () => { live.playing = true; });
  video.addEventListener("waiting", () => { if (live.playing) live.stalls += 1; });
  // A viewer who seeks back into the DVR window watches from there. dash.js's catch-up takes
  // the ServiceDescription's maximum latency as the drift past which it seeks back to live, so
  // it is off while the viewer is behind on purpose, and on again once they return near live.
  video.addEventListener("seeking", () => {
    let latency;
    let target;
    try {
      latency = player.getCurrentLiveLatency();
      target = player.getTargetLiveDelay();
    } catch (err) {
      return;
    }
    if (!Number.isFinite(latency) || !Number.isFinite(target)) return;
    live.behind = latency > target + 2;
    player.updateSettings({ streaming: { liveCatchup: { enabled: !live.behind } } });
  });
  player.initialize(video, src, true);
  setInterval(() => {
    try { // these throw until playback is initialised
      const latency = player.getCurrentLiveLatency();
      live.latency = Number.isFinite(latency) ? latency : null;
      const target = player.getTargetLiveDelay();
      live.target = Number.isFinite(target) && target > 0 ? target : null;
      live.lowLatency = player.getLowLatencyModeEnabled();
    } catch (err) {
      return;
    }
    live.rate = video.playbackRate;
    live.currentTime = video.currentTime;
    show();
  }, 250);
}

main();
