"""The edge connection's state machine, driven with byte strings and a fake clock.

No socket, no file and no sleep: the tests play the shell's part, handing the core bytes,
notices and the time, and read the actions it answers with.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.config import EdgeSettings
from streamplane.edge import sign
from streamplane.edge.protocol import (
    LINGER_S,
    MAX_PIPELINED,
    Abort,
    Action,
    Close,
    CloseFile,
    EdgeProtocol,
    Fetch,
    Open,
    Operate,
    PauseReading,
    ReadText,
    ResumeReading,
    SendFile,
    Shutdown,
    State,
    WorkerState,
    Write,
)

KEY = bytes.fromhex("5f" * 32)
WALL = 1_800_000_000.0  # the wall clock when the fake monotonic clock reads 0
CLIENT = "198.51.100.7"
MTIME_NS = 1_700_000_000 * 10**9
SETTINGS = EdgeSettings(
    access_log=False,
    header_timeout_s=10.0,
    body_timeout_s=5.0,
    idle_timeout_s=30.0,
    send_timeout_s=20.0,
    stall_timeout_s=15.0,
    drain_timeout_s=60.0,
)
# Actions the core waits on: nothing may follow one in the same list.
NEEDS_NOTICE = (Open, SendFile, ReadText, Fetch, Operate)


def token(acl: str = "/t1/*", ttl: int = 600, start: int | None = None) -> str:
    return sign(key_id="k1", key=KEY, acl=[acl], expiry=int(WALL) + ttl, start=start)


TOKEN = token()


def get(
    path: str,
    *headers: str,
    method: str = "GET",
    tok: str | None = TOKEN,
    version: str = "HTTP/1.1",
) -> bytes:
    target = path if tok is None else f"{path}?__token__={tok}"
    host = [] if any(h.lower().startswith("host:") for h in headers) else ["Host: edge"]
    lines = [f"{method} {target} {version}", *host, *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def header(data: bytes, name: bytes) -> bytes | None:
    head = data.partition(b"\r\n\r\n")[0]
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b": ")
        if key.lower() == name.lower():
            return value
    return None


def body_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[2]


class Conn:
    """One core and a fake clock; every list of actions is checked against the contract."""

    def __init__(self, **settings: object) -> None:
        config = msgspec.structs.replace(SETTINGS, **settings)
        self.state = WorkerState(config, {"k1": KEY})
        self.state.set_clock(0.0, WALL)
        self.now = 0.0
        self.core = EdgeProtocol(self.state, CLIENT, self.now)

    def _checked(self, actions: list[Action]) -> list[Action]:
        for action in actions[:-1]:
            assert not isinstance(action, NEEDS_NOTICE), actions
        return actions

    def at(self, now: float) -> Conn:
        assert now >= self.now
        self.now = now
        return self

    def send(self, data: bytes) -> list[Action]:
        return self._checked(self.core.receive_data(data, self.now))

    def tick(self, now: float) -> list[Action]:
        self.at(now)
        return self._checked(self.core.tick(now))

    def __getattr__(self, notice: str):  # type: ignore[no-untyped-def]
        method = getattr(self.core, notice)

        def call(*args: object) -> list[Action]:
            actions = method(*args, self.now)
            return [] if actions is None else self._checked(actions)

        return call


def only_write(actions: list[Action]) -> bytes:
    assert len(actions) == 1 and isinstance(actions[0], Write), actions
    return actions[0].data


def writes(actions: list[Action]) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, Write)]


# -- answering ----------------------------------------------------------------------------


def test_a_segment_hit_is_opened_and_sent_by_file_then_the_file_given_back() -> None:
    c = Conn()
    assert c.send(get("/t1/v/1/seg_1.m4s")) == [Open("t1/v/1/seg_1.m4s")]
    assert c.core.state is State.RESPONDING
    [send] = c.opened(7, 2_000_000, MTIME_NS)
    assert isinstance(send, SendFile)
    assert (send.fd, send.offset, send.count) == (7, 0, 2_000_000)
    assert status_of(send.head) == 200
    assert header(send.head, b"content-length") == b"2000000"
    assert header(send.head, b"content-type") == b"video/iso.segment"
    assert header(send.head, b"etag") is not None
    assert header(send.head, b"connection") == b"keep-alive"
    assert c.at(0.5).sent() == [CloseFile(7)]
    assert c.core.state is State.IDLE
    assert c.core.deadline == 0.5 + SETTINGS.idle_timeout_s
    assert c.state.metrics.s.bytes_sent == 2_000_000
    assert c.state.metrics.s.hits == 1
    assert c.state.hits == {"t1/v/1/seg_1.m4s": 1}


def test_a_playlist_is_read_whole_answered_in_one_write_and_held_hot() -> None:
    c = Conn()
    body = b"#EXTM3U\n#EXT-X-VERSION:7\n"
    assert c.send(get("/t1/master.m3u8")) == [Open("t1/master.m3u8")]
    assert c.opened(5, len(body), MTIME_NS) == [ReadText(5, 0, len(body))]
    actions = c.text_read(body)
    assert actions[0] == CloseFile(5)
    reply = only_write(actions[1:])
    assert status_of(reply) == 200 and body_of(reply) == body
    assert header(reply, b"content-type") == b"application/vnd.apple.mpegurl"
    # polled again within half a second: answered from memory, no file opened
    again = only_write(c.at(0.2).send(get("/t1/master.m3u8")))
    assert body_of(again) == body and header(again, b"etag") == header(reply, b"etag")
    # later, the playlist may have changed: from the cache again
    assert c.at(0.6).send(get("/t1/master.m3u8")) == [Open("t1/master.m3u8")]


def test_a_blocking_reload_is_held_hot_while_its_viewers_ask_a_plain_playlist_is_not() -> None:
    """The playlist as of a part never changes: a viewer asking seconds after the others is
    answered from memory; a plain live playlist goes back to the cache after half a second."""
    c = Conn(live_playlist_ttl_s=1.0, require_token=False)
    body = b'#EXTM3U\n#EXT-X-PART:DURATION=0.5,URI="seg_5.2.m4s"\n'
    reload = get("/t1/v/index.m3u8?_HLS_msn=5&_HLS_part=2", tok=None)
    assert c.send(reload) == [Open("t1/v/index.m3u8~5.2")]
    c.opened(5, len(body), MTIME_NS)
    first = only_write(c.text_read(body)[1:])
    again = only_write(c.at(5.0).send(reload))  # a viewer five seconds behind the others
    assert body_of(again) == body_of(first) == body
    plain = get("/t1/v/index.m3u8", tok=None)
    assert c.send(plain) == [Open("t1/v/index.m3u8")]
    c.opened(6, len(body), MTIME_NS)
    c.text_read(body)
    assert c.at(5.6).send(plain) == [Open("t1/v/index.m3u8")]


def test_pipelined_requests_are_answered_one_at_a_time_in_order() -> None:
    c = Conn()
    stream = get("/t1/a.m4s") + get("/t1/b.m4s") + get("/t1/c.m4s", "Connection: close")
    assert c.send(stream) == [Open("t1/a.m4s")]
    [a] = c.opened(3, 10, MTIME_NS)
    assert c.sent() == [CloseFile(3), Open("t1/b.m4s")]
    [b] = c.opened(4, 20, MTIME_NS)
    assert c.sent() == [CloseFile(4), Open("t1/c.m4s")]
    [last] = c.opened(5, 30, MTIME_NS)
    assert isinstance(a, SendFile) and isinstance(b, SendFile) and isinstance(last, SendFile)
    assert [x.count for x in (a, b, last)] == [10, 20, 30]
    assert header(last.head, b"connection") == b"close"
    assert c.sent() == [CloseFile(5), Shutdown()]
    assert c.core.state is State.CLOSING


def test_a_request_split_anywhere_is_the_same_request() -> None:
    whole = get("/t1/v/1/seg_1.m4s", "Range: bytes=0-99")
    for cut in range(1, len(whole)):
        c = Conn()
        assert c.send(whole[:cut]) == []
        assert c.core.state is State.HEAD
        assert c.send(whole[cut:]) == [Open("t1/v/1/seg_1.m4s")]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=400), max_size=12))
def test_pipelined_bytes_cut_at_any_points_are_answered_the_same(cuts: list[int]) -> None:
    paths = [f"/t1/seg_{n}.m4s" for n in range(5)]
    stream = b"".join(get(p) for p in paths)
    c = Conn()
    opened: list[str] = []
    pos = 0
    for size in [*cuts, len(stream)]:
        chunk, pos = stream[pos : pos + size], pos + size
        for action in c.send(chunk) if chunk else []:
            assert isinstance(action, Open)
            opened.append(action.key)
            while True:  # answer each as the shell would, at once
                after = c.missing((404, "gone"))
                nxt = [a for a in after if isinstance(a, Open)]
                if not nxt:
                    break
                opened.append(nxt[0].key)
    assert opened == [p[1:] for p in paths]


def test_head_ranges_and_conditionals() -> None:
    c = Conn()
    c.send(get("/t1/s.m4s", method="HEAD"))
    actions = c.opened(3, 1000, MTIME_NS)
    assert actions[0] == CloseFile(3)
    head = only_write(actions[1:])
    assert status_of(head) == 200 and header(head, b"content-length") == b"1000"
    assert body_of(head) == b""

    c.send(get("/t1/s.m4s", "Range: bytes=100-199"))
    [ranged] = c.opened(4, 1000, MTIME_NS)
    assert isinstance(ranged, SendFile) and (ranged.offset, ranged.count) == (100, 100)
    assert status_of(ranged.head) == 206
    assert header(ranged.head, b"content-range") == b"bytes 100-199/1000"
    c.sent()

    c.send(get("/t1/s.m4s", "Range: bytes=5000-"))
    actions = c.opened(5, 1000, MTIME_NS)
    assert actions[0] == CloseFile(5)
    refused = only_write(actions[1:])
    assert status_of(refused) == 416 and header(refused, b"content-range") == b"bytes */1000"

    etag = header(ranged.head, b"etag")
    assert etag is not None
    c.send(get("/t1/s.m4s", f"If-None-Match: {etag.decode()}"))
    actions = c.opened(6, 1000, MTIME_NS)
    assert actions[0] == CloseFile(6) and status_of(only_write(actions[1:])) == 304
    assert c.core.state is State.IDLE


def test_a_small_text_head_is_made_from_the_body_as_sent() -> None:
    c = Conn()
    c.send(get("/t1/manifest.mpd", method="HEAD"))
    assert c.opened(3, 40, MTIME_NS) == [ReadText(3, 0, 40)]
    actions = c.text_read(b"x" * 40)
    head = only_write(actions[1:])
    assert header(head, b"content-length") == b"40" and body_of(head) == b""


def test_options_is_a_cors_preflight() -> None:
    c = Conn()
    reply = only_write(c.send(get("/t1/s.m4s", "Origin: https://player.example", method="OPTIONS")))
    assert status_of(reply) == 204
    assert header(reply, b"access-control-allow-origin") == b"https://player.example"


def test_methods_and_paths_refused_before_any_file_is_opened() -> None:
    c = Conn()
    assert status_of(only_write(c.send(get("/t1/s.m4s", method="DELETE")))) == 405
    assert status_of(only_write(c.send(get("/t1/../etc/passwd")))) == 400
    assert status_of(only_write(c.send(get("/t1/.inflight/x", tok=token("/*"))))) == 404


# -- tokens -------------------------------------------------------------------------------


def test_tokens_are_checked_first_and_a_remembered_grant_still_expires() -> None:
    c = Conn()
    assert status_of(only_write(c.send(get("/t1/s.m4s", tok=None)))) == 403
    assert status_of(only_write(c.send(get("/t2/s.m4s")))) == 403  # outside the acl
    assert c.state.metrics.s.token_rejections == 2
    short = token(ttl=10)
    assert c.send(get("/t1/s.m4s", tok=short)) == [Open("t1/s.m4s")]
    c.missing((404, "gone"))
    assert c.at(5).send(get("/t1/other.m4s", tok=short)) == [Open("t1/other.m4s")]  # cached
    c.missing((404, "gone"))
    # the same URL (remembered as granted) and another one, once the token expired: 410
    assert status_of(only_write(c.at(10).send(get("/t1/s.m4s", tok=short)))) == 410
    assert status_of(only_write(c.send(get("/t1/third.m4s", tok=short)))) == 410
    # not yet valid, through the cache as through verify
    later = token(start=int(WALL) + 100)
    assert status_of(only_write(c.send(get("/t1/s.m4s", tok=later)))) == 403


def test_a_cookie_token_is_honoured_but_its_target_not_remembered() -> None:
    c = Conn()
    cookie = f"Cookie: __token__={TOKEN}"
    assert c.send(get("/t1/s.m4s", cookie, tok=None)) == [Open("t1/s.m4s")]
    c.missing((404, "gone"))
    assert c.state.verified == {}


# -- misses -------------------------------------------------------------------------------


def test_a_miss_follows_the_fetch_and_streams_what_lands() -> None:
    c = Conn()
    c.send(get("/t1/s.m4s"))
    assert c.missing(None) == [Fetch("t1/s.m4s", 1)]
    assert c.core.following == 1
    assert c.core.deadline == SETTINGS.stall_timeout_s
    [head] = c.at(1).fetch_ready(1, 9, 300, 1_700_000_000.7)
    assert isinstance(head, Write) and status_of(head.data) == 200
    assert header(head.data, b"content-length") == b"300"
    assert c.at(2).fetch_progress(1, 100) == [SendFile(9, 0, 100)]
    assert c.fetch_progress(1, 250) == []  # a send is under way: more waits for it
    assert c.at(3).sent() == [SendFile(9, 100, 150)]
    assert c.sent() == []  # all that landed went: wait for the origin
    assert c.core.deadline == 3 + SETTINGS.stall_timeout_s
    assert c.at(4).fetch_progress(1, 300) == [SendFile(9, 250, 50)]
    assert c.sent() == [CloseFile(9)]
    assert c.core.following == 0 and c.core.state is State.IDLE
    assert c.state.metrics.s.misses == 1 and c.state.metrics.s.bytes_sent == 300
    # the validators are the committed object's, whose mtime is whole seconds
    done = Conn()
    done.send(get("/t1/s.m4s"))
    [send] = done.opened(3, 300, MTIME_NS)
    assert isinstance(send, SendFile)
    assert header(send.head, b"etag") == header(head.data, b"etag")


def test_a_growing_segment_goes_chunk_by_chunk_as_it_lands_and_ends_when_whole() -> None:
    c = Conn()
    c.send(get("/t1/s.m4s"))
    c.missing(None)
    [head] = c.at(1).fetch_ready(1, 9, -1, 1_700_000_000.7)  # the origin sends it as written
    assert isinstance(head, Write) and status_of(head.data) == 200
    assert header(head.data, b"transfer-encoding") == b"chunked"
    assert header(head.data, b"content-length") is None
    assert c.at(2).fetch_progress(1, 100) == [SendFile(9, 0, 100, b"64\r\n")]
    assert c.sent() == []  # all that landed went: wait for the next part
    assert c.at(3).fetch_progress(1, 150) == [SendFile(9, 100, 50, b"\r\n32\r\n")]
    assert c.fetch_whole(1, 12, 180) == [CloseFile(12)]  # complete while a send is under way
    assert c.sent() == [SendFile(9, 150, 30, b"\r\n1e\r\n")]
    assert c.sent() == [Write(b"\r\n0\r\n\r\n"), CloseFile(9)]
    assert c.core.following == 0 and c.core.state is State.IDLE
    assert c.state.metrics.s.bytes_sent == 180


def test_a_growing_segment_asked_for_in_a_way_chunks_cannot_answer_waits_for_it_whole() -> None:
    for request in (
        get("/t1/s.m4s", version="HTTP/1.0"),
        get("/t1/s.m4s", "Range: bytes=10-19"),
        get("/t1/s.m4s", method="HEAD"),
    ):
        c = Conn()
        c.send(request)
        c.missing(None)
        assert c.fetch_ready(1, 9, -1, 1_700_000_000.0) == [CloseFile(9)]  # nothing sent yet
        assert c.fetch_progress(1, 100) == []
        actions = c.fetch_whole(1, 12, 180)
        assert isinstance(actions[-1], SendFile | Write), actions
        first = actions[-1].head if isinstance(actions[-1], SendFile) else actions[-1].data
        assert header(first, b"transfer-encoding") is None
        assert header(first, b"content-length") in (b"180", b"10")


def test_a_small_text_miss_waits_for_its_whole_body() -> None:
    c = Conn()
    c.send(get("/t1/master.m3u8"))
    c.missing(None)
    assert c.fetch_ready(1, 9, 30, 1_700_000_000.0) == []  # no head yet: made with the body
    assert c.fetch_progress(1, 10) == []
    assert c.fetch_progress(1, 30) == [ReadText(9, 0, 30)]
    actions = c.text_read(b"#EXTM3U\n" + b"#" * 22)
    assert actions[0] == CloseFile(9) and status_of(only_write(actions[1:])) == 200


def test_an_object_that_completes_while_waited_for_is_sent_from_the_cache() -> None:
    c = Conn()
    c.send(get("/t1/s.m4s"))
    c.missing(None)
    [send] = c.opened(4, 500, MTIME_NS)
    assert isinstance(send, SendFile) and send.count == 500
    assert c.core.following == 0
    assert c.state.metrics.s.hits == 0  # a miss that joined, not a hit


def test_notices_about_a_fetch_no_longer_followed_are_ignored_and_their_files_given_back() -> None:
    c = Conn()
    c.send(get("/t1/s.m4s"))
    c.missing(None)
    c.tick(SETTINGS.stall_timeout_s)  # 504: the response is over
    assert c.fetch_ready(1, 9, 300, 0.0) == [CloseFile(9)]
    assert c.fetch_progress(1, 300) == []
    assert c.fetch_failed(1, 502, "the origin failed") == []


def test_a_recent_origin_error_is_answered_at_once() -> None:
    c = Conn()
    c.send(get("/t1/s.m4s"))
    reply = only_write(c.missing((404, "the origin has no such object")))
    assert status_of(reply) == 404 and b"the origin has no such object" in body_of(reply)


# -- errors mid-stream ----------------------------------------------------------------------


def test_an_origin_failure_before_the_head_is_its_status_and_the_connection_serves_on() -> None:
    c = Conn()
    c.send(get("/t1/a.m4s") + get("/t1/b.m4s"))
    c.missing(None)
    actions = c.fetch_failed(1, 502, "the origin failed")
    assert status_of(writes(actions)[0]) == 502
    assert actions[-1] == Open("t1/b.m4s")


def test_an_origin_failure_mid_body_aborts_so_the_client_sees_a_short_body() -> None:
    c = Conn()
    c.send(get("/t1/a.m4s") + get("/t1/b.m4s"))
    c.missing(None)
    c.fetch_ready(1, 9, 300, 0.0)
    c.fetch_progress(1, 100)
    c.sent()
    assert c.fetch_failed(1, 502, "the origin failed") == [Abort(), CloseFile(9)]
    assert c.core.state is State.CLOSED and c.core.deadline == math.inf


def test_a_client_gone_mid_send_aborts_and_gives_the_file_back() -> None:
    c = Conn()
    c.send(get("/t1/a.m4s"))
    c.opened(3, 10_000_000, MTIME_NS)
    assert c.send_failed() == [Abort(), CloseFile(3)]
    assert c.connection_lost() == []


def test_an_unexpected_error_before_the_head_answers_500_and_serves_the_next_request() -> None:
    c = Conn()
    c.send(get("/t1/a.m4s") + get("/t1/b.m4s"))
    actions = c.failed()  # carrying out Open raised
    assert status_of(writes(actions)[0]) == 500
    assert actions[-1] == Open("t1/b.m4s")
    assert c.state.metrics.s.requests["500"] == 1


def test_an_unexpected_error_after_the_head_aborts() -> None:
    c = Conn()
    c.send(get("/t1/a.m4s"))
    c.opened(3, 10_000_000, MTIME_NS)
    assert c.failed() == [Abort(), CloseFile(3)]


def test_a_connection_lost_gives_back_every_file_it_held() -> None:
    c = Conn()
    c.send(get("/t1/a.m4s"))
    c.missing(None)
    c.fetch_ready(1, 9, 300, 0.0)
    assert c.connection_lost() == [CloseFile(9)]
    assert c.core.state is State.CLOSED and c.core.following == 0


# -- every state's deadline -----------------------------------------------------------------


def test_idle_keep_alive_closes_quietly_then_lingers() -> None:
    c = Conn()
    assert c.core.state is State.IDLE and c.core.deadline == SETTINGS.idle_timeout_s
    assert c.tick(SETTINGS.idle_timeout_s - 0.01) == []
    assert c.tick(SETTINGS.idle_timeout_s) == [Shutdown()]
    assert c.core.state is State.CLOSING
    assert c.core.deadline == SETTINGS.idle_timeout_s + LINGER_S
    assert c.tick(SETTINGS.idle_timeout_s + LINGER_S) == [Abort()]
    assert c.core.state is State.CLOSED


def test_a_head_that_never_ends_gets_408_and_the_connection_closes() -> None:
    c = Conn()
    assert c.at(1).send(b"GET /t1/master.m3u8 HTTP/1.1\r\nHost: e\r\n") == []
    assert c.core.state is State.HEAD
    assert c.core.deadline == 1 + SETTINGS.header_timeout_s
    assert c.at(5).send(b"X-Slow: 1\r\n") == []  # trickling does not move it
    assert c.core.deadline == 1 + SETTINGS.header_timeout_s
    actions = c.tick(1 + SETTINGS.header_timeout_s)
    reply = writes(actions)[0]
    assert status_of(reply) == 408 and b"headers" in body_of(reply)
    assert header(reply, b"connection") == b"close"
    assert actions[-1] == Shutdown()


def test_an_announced_body_that_never_comes_gets_408() -> None:
    c = Conn()
    c.at(2).send(b"POST /fill HTTP/1.1\r\nHost: e\r\nContent-Length: 10\r\n\r\n")
    assert c.core.state is State.BODY
    assert c.core.deadline == 2 + SETTINGS.body_timeout_s
    assert c.at(3).send(b"12345") == []  # half of it
    actions = c.tick(2 + SETTINGS.body_timeout_s)
    assert status_of(writes(actions)[0]) == 408 and b"body" in body_of(writes(actions)[0])
    assert actions[-1] == Shutdown()


def test_a_body_over_the_limit_is_refused_413_from_the_head() -> None:
    c = Conn()
    actions = c.send(b"POST /fill HTTP/1.1\r\nHost: e\r\nContent-Length: 2000000000\r\n\r\n")
    assert status_of(writes(actions)[0]) == 413
    assert actions[-1] == Shutdown()
    overflow = Conn()
    huge = b"POST /fill HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"
    actions = overflow.send(huge)
    assert status_of(writes(actions)[0]) == 413


def test_a_whole_body_is_handed_to_the_operations_endpoint() -> None:
    c = Conn()
    [op] = c.send(b'POST /fill HTTP/1.1\r\nContent-Length: 14\r\n\r\n{"titles": []}')
    assert isinstance(op, Operate) and op.path == "/fill"
    assert bytes(op.request.body) == b'{"titles": []}'
    reply = only_write(c.reply(202, b"{}\n"))
    assert status_of(reply) == 202 and c.core.state is State.IDLE


def test_a_client_that_takes_nothing_is_aborted_at_the_send_deadline() -> None:
    c = Conn()
    c.send(get("/t1/s.m4s"))
    c.at(1).opened(3, 10_000_000, MTIME_NS)
    assert c.core.deadline == 1 + SETTINGS.send_timeout_s
    c.at(15).send_progress()  # some bytes went after a wait
    assert c.core.deadline == 15 + SETTINGS.send_timeout_s
    assert c.tick(15 + SETTINGS.send_timeout_s - 0.1) == []
    assert c.tick(15 + SETTINGS.send_timeout_s) == [Abort(), CloseFile(3)]


def test_an_origin_that_never_answers_is_504_and_keep_alive_goes_on() -> None:
    c = Conn()
    c.send(get("/t1/s.m4s"))
    c.at(1).missing(None)
    assert c.core.deadline == 1 + SETTINGS.stall_timeout_s
    reply = only_write(c.tick(1 + SETTINGS.stall_timeout_s))
    assert status_of(reply) == 504 and header(reply, b"connection") == b"keep-alive"
    assert c.core.state is State.IDLE and c.core.following == 0


def test_an_origin_stalled_mid_body_is_an_abort() -> None:
    c = Conn()
    c.send(get("/t1/s.m4s"))
    c.missing(None)
    c.at(1).fetch_ready(1, 9, 300, 0.0)
    c.fetch_progress(1, 100)
    c.at(2).sent()
    assert c.core.deadline == 2 + SETTINGS.stall_timeout_s
    assert c.tick(2 + SETTINGS.stall_timeout_s) == [Abort(), CloseFile(9)]


def test_a_full_send_buffer_holds_further_answers_until_the_send_deadline() -> None:
    c = Conn()
    c.send(get("/t1/a.m4s", tok=None))
    c.at(1).writing_paused()
    assert c.send(get("/t1/b.m4s", tok=None)) == []  # queued behind the full buffer
    assert c.core.deadline == 1 + SETTINGS.send_timeout_s
    assert [status_of(w) for w in writes(c.at(2).writing_resumed())] == [403]
    c.writing_paused()
    c.send(get("/t1/c.m4s", tok=None))
    assert c.tick(2 + SETTINGS.send_timeout_s) == [Abort()]


def test_after_a_refusal_what_the_client_still_sends_is_discarded_then_closed() -> None:
    c = Conn()
    actions = c.at(1).send(b"GARBAGE\r\n\r\n")
    assert status_of(writes(actions)[0]) == 400 and actions[-1] == Shutdown()
    assert c.send(get("/t1/s.m4s")) == []  # lingering: read and discarded
    assert c.core.deadline == 1 + LINGER_S
    assert c.tick(1 + LINGER_S) == [Abort()]


def test_a_client_that_closes_while_we_linger_is_closed_at_once() -> None:
    c = Conn()
    c.send(b"GARBAGE\r\n\r\n")
    assert c.eof() == [Close()]
    assert c.eof() == []


def test_the_client_closing_its_side_gets_what_it_asked_then_a_close() -> None:
    c = Conn()
    c.send(get("/t1/s.m4s"))
    assert c.eof() == []  # the answer is under way
    c.opened(3, 100, MTIME_NS)
    assert c.sent() == [CloseFile(3), Close()]
    idle = Conn()
    assert idle.eof() == [Close()]


def test_a_valid_request_before_a_malformed_one_is_answered_first() -> None:
    c = Conn()
    actions = c.send(get("/t1/s.m4s") + b"\x16\x03\x01garbage")
    assert actions == [Open("t1/s.m4s")]
    actions = c.missing((404, "gone"))
    assert [status_of(w) for w in writes(actions)] == [404, 400]
    assert actions[-1] == Shutdown()


def test_reading_pauses_while_too_many_requests_wait() -> None:
    c = Conn()
    actions = c.send(b"".join(get(f"/t1/{n}.m4s") for n in range(MAX_PIPELINED + 2)))
    assert actions == [PauseReading(), Open("t1/0.m4s")]
    resumed = False
    for _ in range(MAX_PIPELINED + 1):
        resumed = resumed or ResumeReading() in c.missing((404, "gone"))
    assert resumed


# -- draining -------------------------------------------------------------------------------


def test_draining_closes_idle_connections_and_lets_answers_finish_then_closes() -> None:
    idle = Conn()
    assert idle.drain() == [Shutdown()]

    busy = Conn()
    busy.send(get("/t1/s.m4s"))
    assert isinstance(busy.opened(3, 10_000_000, MTIME_NS)[0], SendFile)
    busy.state.draining = True
    assert busy.drain() == []
    assert busy.sent() == [CloseFile(3), Shutdown()]

    slow = Conn()
    slow.send(get("/t1/s.m4s"))
    slow.opened(3, 10_000_000, MTIME_NS)
    slow.state.draining = True
    slow.drain()
    for t in range(1, 60):
        slow.at(float(t)).send_progress()  # a client taking bytes, slowly
    assert slow.core.deadline == SETTINGS.drain_timeout_s
    assert slow.tick(SETTINGS.drain_timeout_s) == [Abort(), CloseFile(3)]


def test_while_draining_answers_close_their_connections_and_health_says_draining() -> None:
    c = Conn()
    c.state.draining = True
    actions = c.send(get("/healthz", tok=None))
    reply = writes(actions)[0]
    assert status_of(reply) == 503
    assert json.loads(body_of(reply)) == {"status": "draining"}
    assert header(reply, b"connection") == b"close" and actions[-1] == Shutdown()
    fine = Conn()
    assert json.loads(body_of(only_write(fine.send(get("/healthz", tok=None))))) == {"status": "ok"}


# -- the request line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"GET /t1/s.m4s HTTP/2.0", 505),
        (b"GET /t1/s.m4s HTTP/3.5", 505),
        (b"GET /t1/s.m4s", 400),  # no version at all (HTTP/0.9's form)
        (b"BREW /t1/s.m4s HTTP/1.1", 501),
    ],
)
def test_versions_not_served_are_refused_not_answered(line: bytes, status: int) -> None:
    c = Conn()
    actions = c.send(line + b"\r\nHost: e\r\n\r\n")
    assert [status_of(w) for w in writes(actions)] == [status]
    assert actions[-1] == Shutdown()


def test_http_1_0_is_served_and_closed_after() -> None:
    c = Conn()
    assert c.send(get("/t1/s.m4s", version="HTTP/1.0")) == [Open("t1/s.m4s")]
    [send] = c.opened(3, 10, MTIME_NS)
    assert isinstance(send, SendFile) and header(send.head, b"connection") == b"close"


def test_an_upgrade_request_is_answered_once_as_http_1_1_and_the_connection_goes_on() -> None:
    """RFC 9110 section 7.8: a server may ignore Upgrade. One answer, no unsolicited 400."""
    c = Conn()
    stream = get("/t1/a.m4s", "Connection: Upgrade", "Upgrade: websocket") + get("/t1/b.m4s")
    assert c.send(stream) == [Open("t1/a.m4s")]
    [a] = c.opened(3, 10, MTIME_NS)
    assert isinstance(a, SendFile) and status_of(a.head) == 200
    assert c.sent() == [CloseFile(3), Open("t1/b.m4s")]
    assert c.send(get("/t1/c.m4s")) == []  # parsed on as HTTP/1.1
    c.missing((404, "gone"))
    assert c.core.state is State.RESPONDING


def test_connect_is_refused_once_and_what_follows_is_not_read_as_http() -> None:
    c = Conn()
    actions = c.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: e\r\n\r\n\x16\x03\x01tunnel")
    assert [status_of(w) for w in writes(actions)] == [400]  # not a path: never a tunnel
    assert actions[-1] == Shutdown()
    assert c.send(b"more tunnel bytes") == []


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /t1/s.m4s HTTP/1.1\r\nX-Junk: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /t1/s.m4s HTTP/1.1\r\nRange: bytes=0-1\r\nRange: bytes=2-3\r\n\r\n", 400),
        (b"GET /t1/s.m4s HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    ],
)
def test_oversized_and_ambiguous_heads_are_refused(data: bytes, status: int) -> None:
    c = Conn()
    actions = c.send(data)
    assert [status_of(w) for w in writes(actions)] == [status]


# -- a whole conversation against a model shell: no file is ever lost or closed twice -------


@dataclass
class ModelShell:
    """Carries actions out the way server.py does, against an in-memory cache."""

    conn: Conn
    objects: dict[str, int]
    fetched: dict[str, int]  # what the origin holds and the cache not
    next_fd: int = 100
    handed: set[int] = field(default_factory=set)  # files given to the core
    closed: list[int] = field(default_factory=list)
    pending: list[Action] = field(default_factory=list)  # awaiting a notice we choose when
    wire: list[int] = field(default_factory=list)  # statuses, in the order written
    aborted: bool = False

    def carry_out(self, actions: list[Action]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, CloseFile):
                assert action.fd in self.handed and action.fd not in self.closed
                self.closed.append(action.fd)
            elif isinstance(action, Write):
                if action.data.startswith(b"HTTP/1.1 "):
                    self.wire.append(status_of(action.data))
            elif isinstance(action, Open):
                size = self.objects.get(action.key)
                if size is None:
                    failed = None if action.key in self.fetched else (404, "gone")
                    queue += self.conn.missing(failed)
                else:
                    queue += self.conn.opened(self.fd(), size, MTIME_NS)
            elif isinstance(action, ReadText):
                queue += self.conn.text_read(b"t" * action.count)
            elif isinstance(action, Fetch):  # the origin answers at once, all bytes landed
                size = self.fetched[action.key]
                queue += self.conn.fetch_ready(action.serial, self.fd(), size, 0.0)
                queue += self.conn.fetch_progress(action.serial, size)
            elif isinstance(action, SendFile):
                if action.head:
                    self.wire.append(status_of(action.head))
                self.pending.append(action)
            elif isinstance(action, Abort):
                self.aborted = True
                self.pending.clear()

    def fd(self) -> int:
        self.next_fd += 1
        self.handed.add(self.next_fd)
        return self.next_fd


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.just("request"),
                st.sampled_from(["a.m4s", "b.m3u8", "gone.m4s", "new.m4s", "new.mpd"]),
            ),
            st.tuples(st.just("sent"), st.just("")),
            st.tuples(st.just("send_failed"), st.just("")),
            st.tuples(st.just("failed"), st.just("")),
            st.tuples(st.just("tick"), st.sampled_from(["1", "10", "25"])),
            st.tuples(st.just("eof"), st.just("")),
            st.tuples(st.just("garbage"), st.just("")),
        ),
        max_size=25,
    )
)
def test_every_file_handed_to_the_core_is_closed_exactly_once(steps: list[tuple[str, str]]) -> None:
    c = Conn()
    shell = ModelShell(
        c, {"t1/a.m4s": 5_000_000, "t1/b.m3u8": 300}, {"t1/new.m4s": 900, "t1/new.mpd": 90}
    )
    for kind, arg in steps:
        if shell.aborted:
            break
        if kind == "request":
            shell.carry_out(c.send(get(f"/t1/{arg}")))
        elif kind == "garbage":
            shell.carry_out(c.send(b"\x00\x01garbage\r\n\r\n"))
        elif kind in ("sent", "send_failed") and shell.pending:
            shell.pending.pop(0)
            shell.carry_out(getattr(c, kind)())
        elif kind == "failed" and c.core.state is State.RESPONDING:
            shell.pending.clear()
            shell.carry_out(c.failed())
        elif kind == "tick":
            shell.carry_out(c.tick(c.now + float(arg)))
        elif kind == "eof":
            shell.carry_out(c.eof())
    shell.carry_out(c.connection_lost())
    assert sorted(shell.closed) == sorted(shell.handed)
    assert c.core.state is State.CLOSED and c.core.deadline == math.inf


# -- token propagation in the one text path -------------------------------------------------


PLAYLIST = b'#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-MAP:URI="init.mp4"\n#EXTINF:4,\nseg_1.m4s\n'


def test_a_manifest_asked_with_a_query_token_hands_it_on_with_its_own_length_and_etag() -> None:
    c = Conn()
    assert c.send(get("/t1/v/1/index.m3u8")) == [Open("t1/v/1/index.m3u8")]
    # read whole, whatever range is asked: the rewrite needs all of it
    assert c.opened(5, len(PLAYLIST), MTIME_NS) == [ReadText(5, 0, len(PLAYLIST))]
    actions = c.text_read(PLAYLIST)
    reply = only_write(actions[1:])
    body = body_of(reply)
    assert f"seg_1.m4s?__token__={TOKEN}".encode() in body
    assert f'URI="init.mp4?__token__={TOKEN}"'.encode() in body
    assert header(reply, b"content-length") == b"%d" % len(body)
    etag = header(reply, b"etag")
    assert etag is not None and b"-t" in etag
    # polled again with the same token: from memory; with another: rewritten again
    assert body_of(only_write(c.at(0.1).send(get("/t1/v/1/index.m3u8")))) == body
    other = token(ttl=700)
    assert c.send(get("/t1/v/1/index.m3u8", tok=other)) == [Open("t1/v/1/index.m3u8")]
    c.opened(6, len(PLAYLIST), MTIME_NS)
    assert other.encode() in body_of(only_write(c.text_read(PLAYLIST)[1:]))
    # its validator is decided before the file is read
    c.send(get("/t1/v/1/index.m3u8", f"If-None-Match: {etag.decode()}"))
    actions = c.opened(7, len(PLAYLIST), MTIME_NS)
    assert actions[0] == CloseFile(7) and status_of(only_write(actions[1:])) == 304
    # a range is a range of the rewritten body
    c.send(get("/t1/v/1/index.m3u8", "Range: bytes=-20"))
    c.opened(8, len(PLAYLIST), MTIME_NS)
    ranged = only_write(c.text_read(PLAYLIST)[1:])
    assert status_of(ranged) == 206 and body_of(ranged) == body[-20:]


def test_a_cookie_token_serves_the_manifest_as_the_file_is() -> None:
    c = Conn()
    c.send(get("/t1/v/1/index.m3u8", f"Cookie: __token__={TOKEN}", tok=None))
    c.opened(5, len(PLAYLIST), MTIME_NS)
    assert body_of(only_write(c.text_read(PLAYLIST)[1:])) == PLAYLIST


def test_a_manifest_miss_under_a_token_waits_for_the_whole_file_then_rewrites_it() -> None:
    c = Conn()
    c.send(get("/t1/v/1/index.m3u8"))
    assert c.missing(None) == [Fetch("t1/v/1/index.m3u8", 1)]
    assert c.fetch_ready(1, 9, len(PLAYLIST), 1_700_000_000.0) == []
    assert c.fetch_progress(1, 10) == []
    assert c.fetch_progress(1, len(PLAYLIST)) == [ReadText(9, 0, len(PLAYLIST))]
    assert TOKEN.encode() in body_of(only_write(c.text_read(PLAYLIST)[1:]))


# -- a fetch taken over mid-body ---------------------------------------------------------------


def test_a_taken_over_fetch_is_read_from_its_new_file_once_the_send_under_way_ends() -> None:
    c = Conn()
    c.send(get("/t1/s.m4s"))
    c.missing(None)
    c.fetch_ready(1, 9, 300, 0.0)
    assert c.fetch_progress(1, 100) == [SendFile(9, 0, 100)]
    assert c.fetch_moved(1, 10) == []  # 9 is being sent from: kept until that send ends
    assert c.fetch_progress(1, 200) == []
    assert c.sent() == [CloseFile(9), SendFile(10, 100, 100)]
    assert c.fetch_moved(1, 11) == []  # a send runs again
    assert c.sent() == [CloseFile(10)]  # and nothing more landed yet
    assert c.fetch_moved(1, 12) == [CloseFile(11)]  # waiting: switched at once
    assert c.fetch_progress(1, 300) == [SendFile(12, 200, 100)]
    assert c.sent() == [CloseFile(12)]
    assert c.core.state is State.IDLE


def test_a_granted_target_asked_under_another_host_hands_the_token_to_that_host() -> None:
    absolute = b"#EXTM3U\n#EXTINF:4,\nhttp://edge-b.example/t1/seg_1.m4s\n"
    c = Conn()
    c.send(get("/t1/index.m3u8", "Host: edge-a.example"))
    c.opened(5, len(absolute), MTIME_NS)
    assert body_of(only_write(c.text_read(absolute)[1:])) == absolute  # another host's URI
    c.send(get("/t1/index.m3u8", "Host: edge-b.example"))  # the same target, granted before
    c.opened(6, len(absolute), MTIME_NS)
    assert f"seg_1.m4s?__token__={TOKEN}".encode() in body_of(only_write(c.text_read(absolute)[1:]))


def test_trailers_after_a_chunked_body_are_not_believed() -> None:
    """What a client writes after its body (trailers) never passed the proxy's or the edge's
    look at the head: it must not add credentials or a forwarded-for address."""
    c = Conn()
    [op] = c.send(
        b"POST /fill HTTP/1.1\r\nX-Forwarded-For: 192.0.2.1\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n2\r\n{}\r\n0\r\n"
        b"Authorization: Bearer forged\r\nX-Forwarded-For: 198.51.100.6\r\n\r\n"
    )
    assert isinstance(op, Operate) and bytes(op.request.body) == b"{}"
    assert op.request.headers.get(b"authorization") is None
    assert op.request.headers[b"x-forwarded-for"] == b"192.0.2.1"
