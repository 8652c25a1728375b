"""How often a player sends a heartbeat: a pure function of what is happening to it.

Telemetry is worth most right around the moments that change the viewer's experience, and
little during long stretches where nothing changes. The rule, with `CadenceRule`'s defaults:

- starting, seeking or rebuffering (phase is not "steady"): every `urgent_s` = 1 s;
- within `settle_s` = 10 s of the last event (a switch, a failover, an error, the end of a
  stall, a seek or startup): every `event_s` = 2 s;
- afterwards the interval grows with the quiet time: `growth` x (time since the event) = half
  of it, never under `event_s` nor over `max_s` = 60 s. After a minute of calm a heartbeat
  every 30 s, after two minutes every 60 s.

The player keeps `last_event_s` (it decides what an event is) and `last_heartbeat_s`, and
sends when `now_s >= next_heartbeat_s(state)`. An event after a long quiet stretch therefore
makes the next heartbeat due at once (the previous one is older than the new short interval),
and a burst of events sends at most one heartbeat per `urgent_s` or `event_s`.

The control plane can slow a player down: a heartbeat answered 429 carries Retry-After (the
player sets `not_before_s` that far ahead: nothing is sent before it), and any answer may
carry `min_interval_s` (a floor under every interval, urgent ones included) while the
telemetry ingest is under pressure. Both are obeyed until the next answer changes them.

`web/static/abr.js` has the same rule (`heartbeatInterval`, `nextHeartbeatAt`), checked
against the same vectors.
"""

from __future__ import annotations

import msgspec

from streamplane.player.abr import Phase


class CadenceRule(msgspec.Struct, frozen=True):
    urgent_s: float = 1.0
    event_s: float = 2.0
    settle_s: float = 10.0
    growth: float = 0.5
    max_s: float = 60.0


class CadenceState(msgspec.Struct, frozen=True):
    now_s: float  # session clock
    phase: Phase
    last_event_s: float | None = None  # None: no event yet (the session start counts as one)
    last_heartbeat_s: float | None = None  # None: none sent yet
    min_interval_s: float = 0.0  # the control plane's floor under the interval (0: none)
    not_before_s: float | None = None  # the control plane said: not before then (429)


DEFAULT_RULE = CadenceRule()


def heartbeat_interval(state: CadenceState, rule: CadenceRule = DEFAULT_RULE) -> float:
    """Seconds between heartbeats in this state."""
    return max(_interval(state, rule), state.min_interval_s)


def _interval(state: CadenceState, rule: CadenceRule) -> float:
    if state.phase != "steady":
        return rule.urgent_s
    since = state.now_s - (0.0 if state.last_event_s is None else state.last_event_s)
    if since < rule.settle_s:
        return rule.event_s
    return min(max(rule.growth * since, rule.event_s), rule.max_s)


def next_heartbeat_s(state: CadenceState, rule: CadenceRule = DEFAULT_RULE) -> float:
    """When the next heartbeat is due (session clock); `now_s` if none was sent yet; never
    before `not_before_s`."""
    if state.last_heartbeat_s is None:
        due = state.now_s
    else:
        due = state.last_heartbeat_s + heartbeat_interval(state, rule)
    return due if state.not_before_s is None else max(due, state.not_before_s)


def heartbeat_due(state: CadenceState, rule: CadenceRule = DEFAULT_RULE) -> bool:
    return state.now_s >= next_heartbeat_s(state, rule)
