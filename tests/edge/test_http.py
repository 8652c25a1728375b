"""The edge's HTTP decisions, without a socket: paths, ranges, validators, content types."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.edge import http


@pytest.mark.parametrize(
    "target",
    [
        b"/../etc/passwd",
        b"/title/../../etc/passwd",
        b"/title/%2e%2e/%2e%2e/etc/passwd",
        b"/title/%2E%2E/secret",
        b"/title/%252e%252e/secret",  # double encoding
        b"/title/..%2fsecret",
        b"/title/..%5csecret",  # encoded backslash
        b"/title\\..\\secret",
        b"/title/seg%00.m4s",
        b"/title/./seg.m4s",
        b"/title//seg.m4s",
        b"http://evil.example/title/seg.m4s",
        b"title/seg.m4s",
        b"/title/\xff\xfe.m4s",
        b"/" + b"a" * 3000,
    ],
)
def test_hostile_targets_are_refused(target: bytes) -> None:
    with pytest.raises(http.BadPath):
        http.request_path(target)


def test_ordinary_targets_decode_and_keep_their_query() -> None:
    assert http.request_path(b"/demo-mix/v/1/seg_3.m4s?__token__=exp%3D1") == (
        "/demo-mix/v/1/seg_3.m4s",
        "__token__=exp%3D1",
    )
    assert http.request_path(b"/caf%C3%A9/master.m3u8") == ("/café/master.m3u8", "")
    assert http.request_path(b"/") == ("/", "")


@given(st.binary(max_size=64))
def test_any_accepted_path_stays_inside_the_root(raw: bytes) -> None:
    try:
        path, _ = http.request_path(b"/" + raw)
    except http.BadPath:
        return
    joined = posixpath.normpath(posixpath.join("/cache", path.lstrip("/")))
    assert joined == "/cache" or joined.startswith("/cache/")
    assert "\0" not in path and "\\" not in path


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (b"bytes=0-99", 1000, (0, 99)),
        (b"bytes=100-", 1000, (100, 999)),
        (b"bytes=-100", 1000, (900, 999)),
        (b"bytes=-5000", 1000, (0, 999)),
        (b"bytes=990-5000", 1000, (990, 999)),
        (b"bytes = 5-9", 1000, (5, 9)),
    ],
)
def test_single_ranges(header: bytes, size: int, expected: tuple[int, int]) -> None:
    r = http.parse_range(header, size)
    assert r is not None and (r.start, r.end) == expected


@pytest.mark.parametrize(
    "header", [None, b"bytes=0-1,5-6", b"items=0-5", b"bytes=9-3", b"bytes=a-b", b"bytes=5"]
)
def test_ranges_served_whole(header: bytes | None) -> None:
    assert http.parse_range(header, 1000) is None


@pytest.mark.parametrize("header", [b"bytes=1000-", b"bytes=5000-6000", b"bytes=-0"])
def test_unsatisfiable_ranges(header: bytes) -> None:
    with pytest.raises(http.Unsatisfiable):
        http.parse_range(header, 1000)


def test_conditionals_follow_rfc_9110_precedence() -> None:
    etag = http.etag_for(1_700_000_000 * 10**9, 1234)
    assert http.is_not_modified(etag, 1_700_000_000, etag, None)
    assert http.is_not_modified(etag, 1_700_000_000, b'"x", W/' + etag, None)
    assert http.is_not_modified(etag, 1_700_000_000, b"*", None)
    assert not http.is_not_modified(etag, 1_700_000_000, b'"other"', None)
    since = http.http_date(1_700_000_000)
    assert http.is_not_modified(etag, 1_700_000_000.5, None, since)
    assert not http.is_not_modified(etag, 1_700_000_001, None, since)
    # If-None-Match decides when both are present
    assert not http.is_not_modified(etag, 1_700_000_000, b'"other"', since)
    assert not http.is_not_modified(etag, 1_700_000_000, None, b"not a date")


def test_types_and_caching_players_rely_on() -> None:
    assert http.content_type("/t/master.m3u8") == b"application/vnd.apple.mpegurl"
    assert http.content_type("/t/manifest.mpd") == b"application/dash+xml"
    assert http.content_type("/t/v/1/init.mp4") == b"video/mp4"
    assert http.content_type("/t/v/1/seg_1.m4s") == b"video/iso.segment"
    assert http.content_type("/t/blob") == b"application/octet-stream"
    assert b"max-age=2" in http.cache_control("/t/master.m3u8")
    assert b"immutable" in http.cache_control("/t/v/1/seg_1.m4s")


def test_response_head_is_the_same_from_a_list_or_a_ready_block() -> None:
    headers = [(b"Content-Type", b"video/mp4"), (b"Content-Length", b"12")]
    as_list = http.response_head(200, headers, date=b"Tue", keep_alive=True)
    as_block = http.response_head(200, http.header_block(headers), date=b"Tue", keep_alive=True)
    assert as_list == as_block
    assert as_list.startswith(b"HTTP/1.1 200 OK\r\nServer: streamplane-edge\r\nDate: Tue\r\n")
    assert as_list.endswith(b"Connection: keep-alive\r\n\r\n")
    assert b"Content-Length: 12\r\n" in as_list and b"Access-Control-Allow-Origin: *" in as_list
    closing = http.response_head(599, [], date=b"x", keep_alive=False, cors_origin=None)
    assert closing.startswith(b"HTTP/1.1 599 Unknown") and b"Access-Control" not in closing


def test_answer_object_is_304_then_one_range_then_the_whole() -> None:
    mtime_ns = 1_700_000_000 * 10**9
    whole = http.answer_object(
        "/t/seg.m4s", mtime_ns, 1000, range_header=None, if_none_match=None, if_modified_since=None
    )
    assert (whole.status, whole.offset, whole.count) == (200, 0, 1000)
    assert whole.headers == http.object_headers("/t/seg.m4s", mtime_ns, 1000)
    etag = dict(whole.headers)[b"ETag"]
    ranged = http.answer_object(
        "/t/seg.m4s",
        mtime_ns,
        1000,
        range_header=b"bytes=-10",
        if_none_match=b'"other"',
        if_modified_since=None,
    )
    assert (ranged.status, ranged.offset, ranged.count) == (206, 990, 10)
    assert dict(ranged.headers)[b"Content-Range"] == b"bytes 990-999/1000"
    fresh = http.answer_object(
        "/t/seg.m4s",
        mtime_ns,
        1000,
        range_header=b"bytes=0-1",
        if_none_match=etag,
        if_modified_since=None,
    )
    assert fresh.status == 304 and fresh.count == 0
    assert not any(name == b"Content-Length" for name, _ in fresh.headers)
    with pytest.raises(http.Unsatisfiable):
        http.answer_object(
            "/t/seg.m4s",
            mtime_ns,
            1000,
            range_header=b"bytes=1000-",
            if_none_match=None,
            if_modified_since=None,
        )
