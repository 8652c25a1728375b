// Runs the shared ABR, recent-rate and cadence vectors through the JavaScript port.
// usage: node run_vectors.mjs ABR_JS VECTORS_JSON   (prints a JSON summary; exit 1 on a mismatch)
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [abrPath, vectorsPath] = process.argv.slice(2);
const abr = await import(pathToFileURL(abrPath).href);
const vectors = JSON.parse(readFileSync(vectorsPath, "utf8"));

const failures = [];
let checked = 0;
vectors.abr.forEach((v, i) => {
  const want = v.expected;
  checked += 1;
  if (v.call === "plan_value") {
    // Seeded values are Python's, and the same operations in the same order give the same
    // double; hand-worked values may be an ulp away from either.
    const got = abr.planValue(v.state, v.plan, v.kbps);
    const ok = v.source === "seeded" ? got === want : Math.abs(got - want) <= 1e-9;
    if (!ok) failures.push({ kind: "plan_value", index: i, why: v.why, got, want });
    return;
  }
  const got =
    v.call === "choose"
      ? abr.chooseRung(v.state)
      : abr.shouldAbandon(v.state, v.progress);
  if (got !== want) failures.push({ kind: "abr", index: i, call: v.call, why: v.why, got, want });
});
vectors.recent.forEach((v, i) => {
  // the player's recent-rate measurement: every answer of the sequence, to the bit
  const tracker = new abr.RecentRate(v.window_s);
  const got = v.calls.map(([key, t, bits]) => {
    const r = tracker.sample(key, t, bits);
    return [r.recent_bits, r.recent_s];
  });
  checked += 1;
  if (JSON.stringify(got) !== JSON.stringify(v.expected)) {
    failures.push({ kind: "recent", index: i, why: v.why, got, want: v.expected });
  }
});
vectors.cadence.forEach((v, i) => {
  const interval = abr.heartbeatInterval(v.state);
  const next = abr.nextHeartbeatAt(v.state);
  checked += 1;
  if (interval !== v.interval || next !== v.next) {
    failures.push({ kind: "cadence", index: i, why: v.why, got: [interval, next], want: [v.interval, v.next] });
  }
});
// The class interface gives the same answers as the functions.
const obj = new abr.StreamplaneAbr();
const first = vectors.abr.find((v) => v.call === "choose");
if (obj.choose(first.state) !== first.expected) failures.push({ kind: "class", why: "StreamplaneAbr.choose" });

console.log(JSON.stringify({ checked, failures: failures.slice(0, 20), failed: failures.length }));
process.exit(failures.length ? 1 : 0);
