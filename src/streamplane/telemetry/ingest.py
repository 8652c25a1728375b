"""Ingest: a player's heartbeat request into the stream, answered once it is durable there.

``Ingest.heartbeat`` does, in order: find the session (a cache; the store only on a miss),
admit the request against its device's bucket and the global one (else :class:`Throttled`,
429), validate the batch (bad events refused with their reasons, the rest kept), append the
batch to the stream and wait until it is durable (else :class:`IngestUnavailable`, 503), then
answer from memory: the resume position is the latest by event time this process has seen
(the store's, on a cold cache), and a session that ended or whose heartbeats stopped for
``screen_timeout_s`` is :class:`SessionGone` (410; its events are still recorded).

Nothing here writes the store: the write-behind consumer does (``consumers.py``). A stop is
the exception the control plane makes through ``on_stop`` (one write per session, so the screen
is free at once); the stream carries the stop as well, so it is written even if that fails.

Within one process the caches are exact. With several ingest processes a session's heartbeats
may reach any of them: each reads the store on its first heartbeat of a session, and the
stored ``last_seen`` lags by at most the consumer's ``touch_s``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import msgspec

from streamplane.telemetry.admission import Admission, advised_interval
from streamplane.telemetry.consumers import Position
from streamplane.telemetry.events import (
    Refusal,
    SessionIdentity,
    parse_batch,
    to_events,
)
from streamplane.telemetry.stream import Stream, StreamUnavailable

__all__ = [
    "HeartbeatAnswer",
    "Ingest",
    "IngestRefused",
    "IngestUnavailable",
    "NoSession",
    "SessionGone",
    "SessionLookup",
    "SessionView",
    "Throttled",
    "WrongSession",
]

_SESSIONS_KEPT: Final = 200_000
_RESUMES_KEPT: Final = 200_000
RETRY_AFTER_S: Final = 2.0  # after the stream refused


class SessionView(msgspec.Struct, kw_only=True):
    """What ingest knows of a session."""

    account: str
    title: str
    device: str
    ended: bool
    last_seen: float  # server clock
    resume: Position | None = None  # the account's position in the title, from the store


class SessionLookup(Protocol):
    async def __call__(self, session_id: str) -> SessionView | None: ...


class HeartbeatAnswer(msgspec.Struct, kw_only=True):
    interval_s: float  # the cadence the control plane suggests
    resume_position_s: float | None
    active: bool
    accepted: int = 0  # events taken
    refused: list[Refusal] = []  # events refused, with why
    min_interval_s: float = 0.0  # do not heartbeat more often than this (0: no floor)


class IngestRefused(Exception):
    """A heartbeat refused: HTTP ``status``, a stable ``code``, a sentence, and facts."""

    status = 400

    def __init__(self, code: str, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.extra = extra


class WrongSession(IngestRefused):
    status = 403


class NoSession(IngestRefused):
    status = 404


class SessionGone(IngestRefused):
    status = 410


class Throttled(IngestRefused):
    status = 429


class IngestUnavailable(IngestRefused):
    status = 503


class Ingest:
    def __init__(
        self,
        stream: Stream,
        admission: Admission,
        lookup: SessionLookup,
        *,
        heartbeat_s: float,
        screen_timeout_s: float,
        on_stop: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self.stream = stream
        self.admission = admission
        self._lookup = lookup
        self._heartbeat_s = heartbeat_s
        self._timeout_s = screen_timeout_s
        self._on_stop = on_stop
        self._sessions: OrderedDict[str, SessionView] = OrderedDict()
        self._devices: dict[tuple[str, str], str] = {}  # (account, device) -> its session
        self._resume: OrderedDict[tuple[str, str], Position] = OrderedDict()
        self._missing: OrderedDict[str, None] = OrderedDict()  # ids the store does not know
        self.appended = 0  # batches
        self.throttled = 0

    # -- what the control plane tells it -------------------------------------------------

    def started(self, session_id: str, account: str, title: str, device: str, now: float) -> None:
        """A playback session started (the same device's earlier one ended with it)."""
        earlier = self._devices.get((account, device))
        if earlier is not None and earlier in self._sessions:
            self._sessions[earlier].ended = True
        self._devices[(account, device)] = session_id
        self._remember(
            session_id,
            SessionView(account=account, title=title, device=device, ended=False, last_seen=now),
        )

    def ended(self, session_id: str) -> None:
        view = self._sessions.get(session_id)
        if view is not None:
            view.ended = True

    def resume(self, account: str, title: str) -> Position | None:
        """The latest position of ``account`` in ``title`` ingested here, if any."""
        return self._resume.get((account, title))

    # -- a heartbeat -------------------------------------------------------------------------

    async def heartbeat(
        self,
        account: str,
        body: bytes,
        now: float,
        monotonic: float,
        session_id: str | None,
        *,
        client: str | None = None,
    ) -> HeartbeatAnswer:
        """``body`` from ``account`` at ``now``; ``session_id`` the one its token is for
        (None: an access token, good for any of the account's sessions); ``client`` the
        player's address, carried with its events."""
        parsed = parse_batch(body, now)
        if session_id is not None and session_id != parsed.session_id:
            raise WrongSession("forbidden", "this heartbeat token belongs to another session")
        view = await self._session(parsed.session_id)
        if view is None or view.account != account:
            raise NoSession("no_session", f"no playback session {parsed.session_id!r}")
        wait = self.admission.admit(view.device, monotonic)
        fill = self.admission.fill(monotonic)
        interval = advised_interval(self._heartbeat_s, fill)
        if wait > 0:
            self.throttled += 1
            raise Throttled(
                "slow_down",
                f"too many heartbeats; send the next in {wait:.1f} s at the earliest",
                retry_after_s=wait,
                interval_s=interval,
            )
        who = SessionIdentity(
            account=account, session=parsed.session_id, device=view.device, title=view.title
        )
        batch = to_events(who, parsed.events, now, parsed.skew_s, client=client)
        try:
            await self.stream.append(batch)
        except StreamUnavailable as err:
            raise IngestUnavailable(
                "telemetry_unavailable",
                f"the telemetry stream cannot take heartbeats now ({err}); try again in"
                f" {RETRY_AFTER_S:g} s",
                retry_after_s=RETRY_AFTER_S,
            ) from None
        self.appended += 1
        key = (account, view.title)
        latest = self._resume.get(key) or view.resume
        for e in parsed.events:
            here = Position(e.at, e.position_s)
            if latest is None or here > latest:
                latest = here
        if latest is not None:
            self._resume[key] = latest
            self._resume.move_to_end(key)
            if len(self._resume) > _RESUMES_KEPT:
                self._resume.popitem(last=False)
        position = None if latest is None else latest.position_s
        alive = not view.ended and view.last_seen >= now - self._timeout_s
        if not alive:
            view.ended = True
            raise SessionGone(
                "session_ended",
                "this playback session has ended or timed out (its position was recorded);"
                " start playback again",
                resume_position_s=position,
            )
        view.last_seen = max(view.last_seen, now)
        stop = any(e.kind == "stop" for e in parsed.events)
        if stop:
            view.ended = True
            if self._on_stop is not None:
                await self._on_stop(account, parsed.session_id)
        return HeartbeatAnswer(
            interval_s=interval,
            resume_position_s=position,
            active=not stop,
            accepted=len(parsed.events),
            refused=parsed.refused,
            min_interval_s=0.0 if interval == self._heartbeat_s else interval,
        )

    async def _session(self, session_id: str) -> SessionView | None:
        view = self._sessions.get(session_id)
        if view is not None:
            self._sessions.move_to_end(session_id)
            return view
        if session_id in self._missing:
            return None
        view = await self._lookup(session_id)
        if view is not None:
            self._remember(session_id, view)
        else:
            # An id the store does not know never will (ids are made by the start, which
            # commits before it answers): remember it, so that a flood of made-up ids costs
            # the store one read each at most.
            self._missing[session_id] = None
            if len(self._missing) > _SESSIONS_KEPT:
                self._missing.popitem(last=False)
        return view

    def _remember(self, session_id: str, view: SessionView) -> None:
        self._sessions[session_id] = view
        self._sessions.move_to_end(session_id)
        if len(self._sessions) > _SESSIONS_KEPT:
            old, gone = self._sessions.popitem(last=False)
            if self._devices.get((gone.account, gone.device)) == old:
                del self._devices[(gone.account, gone.device)]
