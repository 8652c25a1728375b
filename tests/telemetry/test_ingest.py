"""Ingest on the embedded stream: a session's heartbeats answered from memory, the store read
once per session at most (made-up ids included), and nothing answered before it is durable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamplane.telemetry.admission import Admission, Limit
from streamplane.telemetry.ingest import Ingest, NoSession, SessionGone, SessionView
from streamplane.telemetry.stream_embedded import EmbeddedStream

NOW = 1_800_000_000.0


class _Store:
    """The session lookup's other side: what the control plane's store would answer."""

    def __init__(self) -> None:
        self.sessions = {
            "s1": SessionView(account="a", title="t", device="tv", ended=False, last_seen=NOW)
        }
        self.reads = 0

    async def __call__(self, session_id: str) -> SessionView | None:
        self.reads += 1
        return self.sessions.get(session_id)


def _body(session: str, *positions: float) -> bytes:
    events = [{"at": NOW + i, "position_s": p} for i, p in enumerate(positions)]
    return json.dumps({"session_id": session, "events": events}).encode()


async def test_the_store_is_read_once_per_session_made_up_ones_included(tmp_path: Path) -> None:
    stream = EmbeddedStream(tmp_path, partitions=2)
    store = _Store()
    ingest = Ingest(
        stream,
        Admission(Limit(100, 100), Limit(1000, 1000)),
        store,
        heartbeat_s=30,
        screen_timeout_s=90,
    )
    group = await stream.group("check")
    for k in range(3):
        answer = await ingest.heartbeat("a", _body("s1", 5.0 + k), NOW + k, float(k), None)
        assert answer.resume_position_s == 5.0 + k
    for _ in range(3):
        with pytest.raises(NoSession):
            await ingest.heartbeat("a", _body("made-up", 1.0), NOW, 5.0, None)
    with pytest.raises(NoSession):  # another account's session is no session of yours
        await ingest.heartbeat("b", _body("s1", 1.0), NOW, 6.0, None)
    assert store.reads == 2
    # every answered heartbeat is in the stream (the refused ones are not)
    assert await group.backlog() == 3
    # heartbeats stop for longer than the timeout: the next one is recorded, then 410
    with pytest.raises(SessionGone) as gone:
        await ingest.heartbeat("a", _body("s1", 9.0), NOW + 200, 7.0, None)
    assert gone.value.extra["resume_position_s"] == 9.0 and await group.backlog() == 4
    await stream.close()
