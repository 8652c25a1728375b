// The browser's realtime client: chat, presence, viewer counts and live state from the gateway.
//
// The rules are streamplane.realtime.client's (the Python client), and the protocol's:
// - every publication carries (epoch, offset); one is applied only if it is the next one of its
//   channel; a duplicate is dropped; a hole makes the client resubscribe from its last position;
// - on any disconnect, wait a full-jitter exponential backoff (at least what the server's code
//   asked for), reconnect, resubscribe to every channel in ONE batch with the last positions,
//   and apply exactly what was missed, or reload the channel when the server says it cannot;
// - a channel refused for now (4503: the broker is away) is asked for again on the same
//   connection, after the code's wait plus the same backoff, until it is answered;
// - a state value older than its max age is shown as stale, never as current;
// - a code that says give up (forged token, malformed frame) stops the client.
//
//   const rt = new RealtimeClient(info.url, () => fetchToken(), ["chat:final", "state:final"], {
//     onMessage: (channel, pub) => ..., onReload: (channel, view) => ..., onCount: ..., ...
//   });
//   rt.start();  rt.publish("chat:final", {text: "goal!"});

// protocol.Code: the codes a channel is refused with for now, and their after_ms.
const REFUSED_FOR_NOW = new Map([[4503, 1000]]);

export function fullJitter(attempt, base = 0.2, cap = 10, draw = Math.random()) {
  return draw * Math.min(cap, base * 2 ** Math.min(attempt, 32));
}

export function isStale(value, nowMs) {
  return nowMs - value.source_time_ms > value.max_age_ms;
}

// "apply", "duplicate" or "gap" for a publication at (epoch, offset) after position `at`.
export function judge(at, epoch, offset) {
  if (!at || at.epoch !== epoch) return "gap";
  if (offset <= at.offset) return "duplicate";
  return offset === at.offset + 1 ? "apply" : "gap";
}

export class RealtimeClient {
  constructor(url, token, channels, handlers = {}) {
    this.url = url; // ws://host:port/connect
    this.token = token; // a string, or a function returning a (promise of a) fresh token
    this.channels = [...channels];
    this.handlers = handlers;
    this.positions = new Map(); // channel -> {epoch, offset} last applied
    this.views = new Map(); // channel -> {messages, state, viewers, present, reloads}
    for (const c of this.channels) this.view(c);
    this.attempt = 0;
    this.refusals = 0; // subscribes refused for now in a row, on this connection
    this.nextId = 1;
    this.waiting = new Map();
    this.stopped = false;
    this.connects = 0;
    this.ws = null;
  }

  view(channel) {
    if (!this.views.has(channel)) {
      this.views.set(channel, { messages: [], state: new Map(), viewers: 0, present: new Map(), reloads: 0 });
    }
    return this.views.get(channel);
  }

  staleKeys(channel, nowMs = Date.now()) {
    return [...this.view(channel).state.values()].filter((v) => isStale(v, nowMs)).map((v) => v.key).sort();
  }

  async start() {
    this.stopped = false;
    const token = typeof this.token === "function" ? await this.token() : this.token;
    if (this.stopped) return;
    const ws = new WebSocket(`${this.url}?token=${encodeURIComponent(token)}`);
    this.ws = ws;
    let afterMs = 0;
    let giveUp = null;
    ws.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === "disconnect") {
        if (!frame.reconnect) giveUp = frame;
        afterMs = frame.after_ms;
        return;
      }
      this.onFrame(frame);
    };
    ws.onclose = () => {
      this.ws = null;
      clearInterval(this.pinger);
      for (const [, pending] of this.waiting) pending.reject(new Error("disconnected"));
      this.waiting.clear();
      if (this.stopped) return;
      if (giveUp) {
        this.handlers.onGiveUp?.(giveUp);
        return;
      }
      const wait = afterMs / 1000 + fullJitter(this.attempt++);
      setTimeout(() => this.start(), wait * 1000);
    };
  }

  stop() {
    this.stopped = true;
    this.ws?.close();
  }

  send(frame) {
    this.ws.send(JSON.stringify(frame));
  }

  resubscribe(channels = this.channels) {
    const items = channels.map((channel) => {
      const since = this.positions.get(channel);
      return since ? { channel, since } : { channel };
    });
    if (items.length) this.send({ type: "subscribe", id: this.nextId++, channels: items });
  }

  subscribeLater(channels, afterMs) {
    const ws = this.ws;
    const wait = afterMs / 1000 + fullJitter(this.refusals++);
    setTimeout(() => {
      // a new connection resubscribes to everything itself
      if (this.ws === ws && ws.readyState === WebSocket.OPEN) this.resubscribe(channels);
    }, wait * 1000);
  }

  onFrame(frame) {
    switch (frame.type) {
      case "connected":
        // The gateway drops connections it stops hearing from (a peer gone without closing).
        this.pinger = setInterval(() => this.send({ type: "ping", id: 0 }), frame.ping_s * 1000);
        this.attempt = 0;
        this.refusals = 0;
        this.connects += 1;
        this.resubscribe();
        this.handlers.onConnected?.(frame);
        break;
      case "pub": {
        const verdict = judge(this.positions.get(frame.channel), frame.epoch, frame.offset);
        if (verdict === "apply") this.take(frame);
        else if (verdict === "gap") {
          const since = this.positions.get(frame.channel);
          this.send({ type: "subscribe", id: this.nextId++, channels: [since ? { channel: frame.channel, since } : { channel: frame.channel }] });
        }
        break;
      }
      case "subscribed": {
        const again = [];
        let afterMs = 0;
        for (const answer of frame.channels) {
          if (answer.code) {
            if (REFUSED_FOR_NOW.has(answer.code) && this.channels.includes(answer.channel)) {
              again.push(answer.channel);
              afterMs = Math.max(afterMs, REFUSED_FOR_NOW.get(answer.code));
            }
            continue;
          }
          // the gateway follows this answer with who is here: presence starts afresh (leaves
          // while this client was away were never sent to it)
          this.view(answer.channel).present.clear();
          if (answer.recovered) {
            for (const pub of answer.publications) {
              if (judge(this.positions.get(pub.channel), pub.epoch, pub.offset) === "apply") this.take(pub);
            }
          } else this.reload(answer);
        }
        // Not subscribed yet, and nothing would ask again before the next reconnect.
        if (again.length) this.subscribeLater(again, afterMs);
        else {
          this.refusals = 0;
          this.handlers.onSynced?.();
        }
        this.resolve(frame);
        break;
      }
      case "reset":
        this.reload(frame);
        break;
      case "count":
        this.view(frame.channel).viewers = frame.viewers;
        this.handlers.onCount?.(frame.channel, frame.viewers);
        break;
      case "presence": {
        const view = this.view(frame.channel);
        for (const u of frame.joined) view.present.set(u.client, u.user);
        for (const c of frame.left) view.present.delete(c);
        this.handlers.onPresence?.(frame.channel, view.present);
        break;
      }
      default:
        this.resolve(frame);
    }
  }

  take(pub) {
    this.positions.set(pub.channel, { epoch: pub.epoch, offset: pub.offset });
    const view = this.view(pub.channel);
    view.messages.push(pub);
    if (pub.kind === "state") view.state.set(pub.data.key, pub.data);
    this.handlers.onMessage?.(pub.channel, pub);
  }

  reload(answer) {
    const view = this.view(answer.channel);
    view.reloads += 1;
    view.messages = [...answer.publications];
    view.state = new Map((answer.state || []).map((s) => [s.key, s]));
    this.positions.set(answer.channel, answer.position);
    this.handlers.onReload?.(answer.channel, view);
  }

  resolve(frame) {
    const pending = this.waiting.get(frame.id);
    if (!pending) return;
    this.waiting.delete(frame.id);
    if (frame.type === "error") pending.reject(Object.assign(new Error(frame.reason), { code: frame.code, afterMs: frame.after_ms }));
    else pending.resolve(frame);
  }

  request(frame) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== 1) return reject(new Error("not connected"));
      this.waiting.set(id, { resolve, reject });
      this.send({ ...frame, id });
    });
  }

  publish(channel, data) {
    return this.request({ type: "publish", channel, data });
  }
}
