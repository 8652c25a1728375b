"""The HTTP semantics of the edge, as pure functions over plain values.

The connection's state machine (``edge/protocol.py``) parses requests with httptools and the
shell (``edge/server.py``) moves bodies with sendfile; every decision about *what* to answer
lives here, so it is tested without a socket: which path a request names, which byte range it
wants, whether a conditional request is a 304, which content type and caching a file gets,
and the exact header block to send.
"""

from __future__ import annotations

import posixpath
import re
from email.utils import formatdate, parsedate_to_datetime
from functools import lru_cache
from typing import Final
from urllib.parse import unquote_to_bytes

import msgspec

__all__ = [
    "CONTENT_TYPES",
    "BadPath",
    "ByteRange",
    "ObjectAnswer",
    "Unsatisfiable",
    "answer_object",
    "cache_control",
    "content_type",
    "error_body",
    "etag_for",
    "growing_headers",
    "http_date",
    "is_not_modified",
    "object_headers",
    "parse_range",
    "request_path",
    "response_head",
]

CONTENT_TYPES: Final[dict[str, bytes]] = {
    ".m3u8": b"application/vnd.apple.mpegurl",
    ".mpd": b"application/dash+xml",
    ".mp4": b"video/mp4",
    ".m4s": b"video/iso.segment",
    ".m4a": b"audio/mp4",
    ".ts": b"video/mp2t",
    ".vtt": b"text/vtt",
    ".json": b"application/json",
    ".jpg": b"image/jpeg",
    ".png": b"image/png",
    ".html": b"text/html; charset=utf-8",
}
_DEFAULT_TYPE: Final = b"application/octet-stream"
# Manifests may be rewritten (live windows, re-packaging); segments never change once written.
_MANIFEST_SUFFIXES: Final = frozenset({".m3u8", ".mpd"})
MAX_PATH_BYTES: Final = 2048
_SAFE: Final = re.compile(rb"[A-Za-z0-9/._~!$&'()*+,;=:@-]*")  # no control byte, \\ or %
_CONTROL: Final = re.compile(rb"[\x00-\x1f\x7f]")
_DOTS: Final = re.compile(r"/\.\.?(?:/|$)")

STATUS_TEXT: Final[dict[int, bytes]] = {
    200: b"OK",
    202: b"Accepted",
    204: b"No Content",
    206: b"Partial Content",
    304: b"Not Modified",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    410: b"Gone",
    413: b"Content Too Large",
    414: b"URI Too Long",
    416: b"Range Not Satisfiable",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


class BadPath(ValueError):
    """The request target is not a path this edge will ever map to a file."""


class Unsatisfiable(Exception):
    """The Range header names no byte of the object (416)."""


class ByteRange(msgspec.Struct, frozen=True):
    """Bytes ``start`` to ``end`` inclusive, as in ``Content-Range``."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def request_path(target: bytes) -> tuple[str, str]:
    """Split a request target into its decoded, normalised path and its raw query string.

    Refuses (``BadPath``) anything that could name a file outside the tree it is joined to,
    however it is spelt: ``..`` or ``.`` segments, empty segments, backslashes, NUL and other
    control bytes, double encoding (a ``%`` left after decoding), non-UTF-8 bytes, an absolute
    form (``http://host/...``) or an over-long target. The result always starts with ``/``.
    """
    if len(target) > MAX_PATH_BYTES:
        raise BadPath(f"the request target is longer than {MAX_PATH_BYTES} bytes")
    raw, _, query = target.partition(b"?")
    raw = raw.partition(b"#")[0]
    if not raw.startswith(b"/"):
        raise BadPath("the request target is not an absolute path")
    decoded = unquote_to_bytes(raw) if b"%" in raw else raw
    if not _SAFE.fullmatch(decoded):
        if _CONTROL.search(decoded):
            raise BadPath("the path holds a control character")
        if b"\\" in decoded or b"%" in decoded:
            raise BadPath("the path holds a backslash or an encoded percent sign")
    try:
        path = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("the path is not UTF-8") from None
    # no empty, "." or ".." segment: then the path is normalised and stays below its root
    if path != "/" and ("//" in path or path.endswith("/") or _DOTS.search(path)):
        raise BadPath("the path holds an empty, '.' or '..' segment")
    return path, query.decode("latin-1")


def content_type(path: str) -> bytes:
    return CONTENT_TYPES.get(posixpath.splitext(path)[1].lower(), _DEFAULT_TYPE)


def cache_control(path: str) -> bytes:
    """Downstream caching: ``private`` because every response was granted to one token."""
    if posixpath.splitext(path)[1].lower() in _MANIFEST_SUFFIXES:
        return b"private, max-age=2"
    return b"private, max-age=86400, immutable"


def etag_for(mtime_ns: int, size: int) -> bytes:
    """A strong validator from the file's modification time and size, as nginx builds it.

    The cache sets a fetched file's mtime to the origin's Last-Modified, so every edge that
    holds the same object gives it the same ETag.
    """
    return b'"%x-%x"' % (mtime_ns // 1_000_000_000, size)


def object_headers(path: str, mtime_ns: int, size: int) -> list[tuple[bytes, bytes]]:
    """What every answer about an object carries, complete or still arriving, 200 or 304."""
    return _object_headers(path, mtime_ns, etag_for(mtime_ns, size))


def _object_headers(path: str, mtime_ns: int, etag: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"Content-Type", content_type(path)),
        (b"Last-Modified", http_date(mtime_ns / 1e9)),
        (b"ETag", etag),
        (b"Cache-Control", cache_control(path)),
        (b"Accept-Ranges", b"bytes"),
    ]


def growing_headers(path: str, mtime_ns: int) -> list[tuple[bytes, bytes]]:
    """The answer to a GET of an object still being written at the origin (a low-latency
    DASH segment), sent chunked as its bytes land: no length nor validator is known yet,
    and no range can be served from it."""
    return [
        (b"Content-Type", content_type(path)),
        (b"Last-Modified", http_date(mtime_ns / 1e9)),
        (b"Cache-Control", cache_control(path)),
        (b"Transfer-Encoding", b"chunked"),
    ]


class ObjectAnswer(msgspec.Struct, frozen=True):
    """What to answer a GET or HEAD of an object: the status, the headers and the bytes.

    ``headers`` are :func:`object_headers` (plus ``Content-Range`` for a 206), without
    ``Content-Length``, which the sender adds for the body it actually sends.
    """

    status: int  # 200, 206 or 304
    headers: list[tuple[bytes, bytes]]
    offset: int
    count: int


def answer_object(
    path: str,
    mtime_ns: int,
    size: int,
    *,
    range_header: bytes | None,
    if_none_match: bytes | None,
    if_modified_since: bytes | None,
    etag: bytes | None = None,
) -> ObjectAnswer:
    """The answer about an object of ``size`` bytes, complete or still arriving.

    A matching validator is a 304 (RFC 9110 section 13.2.2), then one byte range a 206, else
    the whole object a 200. Raises :class:`Unsatisfiable` for a range past the end (416).
    ``etag`` replaces the file's own validator for another representation of it (a manifest
    rewritten for a token).
    """
    if etag is None:
        etag = etag_for(mtime_ns, size)
    headers = _object_headers(path, mtime_ns, etag)
    if (if_none_match is not None or if_modified_since is not None) and is_not_modified(
        etag, mtime_ns / 1e9, if_none_match, if_modified_since
    ):
        return ObjectAnswer(304, headers, 0, 0)
    wanted = parse_range(range_header, size)
    if wanted is None:
        return ObjectAnswer(200, headers, 0, size)
    headers.append((b"Content-Range", b"bytes %d-%d/%d" % (wanted.start, wanted.end, size)))
    return ObjectAnswer(206, headers, wanted.start, wanted.length)


def http_date(epoch_seconds: float) -> bytes:
    return _http_date(int(epoch_seconds))


@lru_cache(maxsize=4096)
def _http_date(seconds: int) -> bytes:
    return formatdate(seconds, usegmt=True).encode("ascii")


def parse_http_date(text: str) -> float | None:
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def is_not_modified(
    etag: bytes, mtime: float, if_none_match: bytes | None, if_modified_since: bytes | None
) -> bool:
    """RFC 9110 section 13.2.2: If-None-Match decides when present, else If-Modified-Since."""
    if if_none_match is not None:
        if if_none_match.strip() == b"*":
            return True
        # weak comparison: a W/ prefix on either side still matches
        wanted = etag.removeprefix(b"W/")
        return any(tag.strip().removeprefix(b"W/") == wanted for tag in if_none_match.split(b","))
    if if_modified_since is not None:
        since = parse_http_date(if_modified_since.decode("latin-1"))
        return since is not None and int(mtime) <= since
    return False


def parse_range(header: bytes | None, size: int) -> ByteRange | None:
    """The one byte range a ``Range`` header asks of an object of ``size`` bytes.

    ``None`` means "send the whole object": no header, a unit other than bytes, a syntax
    error, or several ranges (which RFC 9110 lets a server ignore; players never ask for
    them). Raises ``Unsatisfiable`` when the range starts past the end of the object.
    """
    if header is None:
        return None
    unit, eq, spec = header.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    first, dash, last = spec.strip().partition(b"-")
    if not dash:
        return None
    try:
        if not first:  # suffix range: the last N bytes
            n = _digits(last)
            if n == 0:
                raise Unsatisfiable("a suffix range of zero bytes")
            if size == 0:
                raise Unsatisfiable("the object is empty")
            return ByteRange(max(0, size - n), size - 1)
        start = _digits(first)
        end = _digits(last) if last.strip() else size - 1
    except ValueError:
        return None
    if start >= size:
        raise Unsatisfiable(f"the range starts at {start}, the object has {size} bytes")
    if end < start:
        return None
    return ByteRange(start, min(end, size - 1))


def _digits(text: bytes) -> int:
    text = text.strip()
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def error_body(status: int, message: str) -> bytes:
    """The JSON body of every error the edge answers: what is wrong, in words, and the status."""
    return msgspec.json.encode({"error": message, "status": status}) + b"\n"


def header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """``Name: value`` lines, each ending in CRLF: what :func:`response_head` puts in."""
    return b"".join(name + b": " + value + b"\r\n" for name, value in headers)


_STATUS_LINES: Final = {
    code: b"HTTP/1.1 %d %s\r\nServer: streamplane-edge\r\nDate: " % (code, text)
    for code, text in STATUS_TEXT.items()
}
# Players on another origin read these through fetch/XHR; Timing-Allow-Origin lets them
# measure throughput with the Resource Timing API.
_CORS_TAIL: Final = (
    b"\r\nAccess-Control-Expose-Headers: Content-Length, Content-Range, ETag, Age"
    b"\r\nTiming-Allow-Origin: *\r\n"
)


def response_head(
    status: int,
    headers: list[tuple[bytes, bytes]] | bytes,
    *,
    date: bytes,
    keep_alive: bool,
    cors_origin: bytes | None = b"*",
) -> bytes:
    """The status line and header block, ending with the blank line.

    ``headers`` may be a ready :func:`header_block`, as the edge keeps one per hot object.
    """
    block = headers if isinstance(headers, bytes) else header_block(headers)
    return b"".join(
        (
            _STATUS_LINES.get(status)
            or b"HTTP/1.1 %d Unknown\r\nServer: streamplane-edge\r\nDate: " % status,
            date,
            b"\r\n",
            block,
            b""
            if cors_origin is None
            else b"Access-Control-Allow-Origin: " + cors_origin + _CORS_TAIL,
            b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n",
        )
    )
