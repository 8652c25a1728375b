"""Token propagation: a playlist served under a query token hands the token on to its URIs.

A signed URL carries its token in the query string (``master.m3u8?__token__=…``), but a player
resolves the relative URIs inside a playlist against the playlist's URL *without* its query
(RFC 3986 5.2.2), so the variant playlists, init and media segments would be asked for without
the token and refused. Large CDNs solve this by rewriting the manifests they serve ("token
propagation"); this module is that rewrite, as pure functions over bytes.

- HLS (RFC 8216): every URI line, and every quoted ``URI`` or ``*-URI`` attribute of an
  ``#EXT`` tag (``EXT-X-MAP``, ``EXT-X-MEDIA``, ``EXT-X-I-FRAME-STREAM-INF``, ``EXT-X-KEY``,
  ``EXT-X-PART``, ``EXT-X-PRELOAD-HINT``, ``EXT-X-RENDITION-REPORT``, ``EXT-X-SESSION-DATA``,
  ``EXT-X-CONTENT-STEERING``'s ``SERVER-URI``, …). Nothing else on a line changes.
- DASH (ISO/IEC 23009-1): the URL attributes of ``SegmentTemplate`` (``media``,
  ``initialization``, ``index``, ``bitstreamSwitching``), ``SegmentURL`` (``media``,
  ``index``), ``Initialization``, ``RepresentationIndex`` and ``BitstreamSwitching``
  (``sourceURL``), and the text of ``BaseURL`` (unless it names a directory, whose children
  carry the token themselves) and ``Location``. The query goes on the templates rather than
  in a ``urn:mpeg:dash:urlparam:2014`` property: dash.js, Shaka and ffmpeg all keep a
  template's query when they expand it (``tests/e2e/test_any_player.py``), and nothing here
  relies on a player reading the URL-parameter properties.

Only URIs that lead back to this edge are rewritten: relative references, and absolute ones
naming the host the request was sent to. An absolute URI to any other host (a key server, an
ad server, a ``data:`` or ``skd:`` URI) is left as it is: the token must not leak there.
An existing query is kept and the token joins it; a token parameter already there is replaced,
so rewriting twice is rewriting once. The token is percent-encoded with a small safe set, so it
can neither end a quoted string, an XML attribute or a line, nor start a DASH template
identifier (``$``) or a fragment. A body that is not a playlist or an MPD comes back unchanged
(the same object).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Final
from urllib.parse import quote, unquote_plus

import msgspec

from streamplane.edge.tokens import token_from_request

__all__ = [
    "MANIFEST_SUFFIXES",
    "Carry",
    "carry",
    "carry_from_query",
    "etag",
    "propagate",
    "propagate_dash",
    "propagate_hls",
    "rewrites",
    "with_token",
]

MANIFEST_SUFFIXES: Final = (".m3u8", ".mpd")
# Unreserved characters are never encoded by quote(); these are the few more a token is left
# with. Not among them: ' " < > & (XML), , (HLS attribute lists), $ (DASH templates), # ? and %.
_VALUE_SAFE: Final = "/:@!()*=~"
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_DEFAULT_PORTS: Final = {"http": ":80", "https": ":443"}

# HLS: a URI line that is a relative path and nothing else (no scheme, query or fragment), to
# which the token is simply appended; and an attribute of an attribute list (RFC 8216 4.2),
# its value quoted or not.
_PLAIN_URI: Final = re.compile(rb"(?!//)[A-Za-z0-9_./~-]+")
_HLS_ATTRIBUTE: Final = re.compile(r'([A-Z0-9-]+)=("[^"\r\n]*"|[^",]*)')

# DASH: a start tag of an element whose attributes hold URLs, and the attributes themselves.
_XML_NAME_PREFIX: Final = rb"(?:[A-Za-z_][\w.-]*:)?"
_XML_ATTRIBUTES: Final = rb"(?:\s+[^\s=/>]+\s*=\s*(?:\"[^\"]*\"|'[^']*'))*"
_DASH_URL_ATTRIBUTES: Final[dict[bytes, frozenset[bytes]]] = {
    b"SegmentTemplate": frozenset({b"media", b"initialization", b"index", b"bitstreamSwitching"}),
    b"SegmentURL": frozenset({b"media", b"index"}),
    b"Initialization": frozenset({b"sourceURL"}),
    b"RepresentationIndex": frozenset({b"sourceURL"}),
    b"BitstreamSwitching": frozenset({b"sourceURL"}),
}
_DASH_START_TAG: Final = re.compile(
    rb"<" + _XML_NAME_PREFIX + rb"(" + b"|".join(_DASH_URL_ATTRIBUTES) + rb")"
    rb"(" + _XML_ATTRIBUTES + rb")(\s*/?>)"
)
_XML_ATTRIBUTE: Final = re.compile(rb"(\s+)([^\s=/>]+)(\s*=\s*)(\"[^\"]*\"|'[^']*')")
_DASH_URL_TEXT: Final = re.compile(
    rb"(<" + _XML_NAME_PREFIX + rb"(BaseURL|Location)" + _XML_ATTRIBUTES + rb"\s*>)"
    rb"([^<]*)(</)"
)
_XML_REFERENCE: Final = re.compile(r"&(#x[0-9A-Fa-f]+|#[0-9]+|amp|lt|gt|quot|apos);")
_XML_ENTITIES: Final = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}


class Carry(msgspec.Struct, frozen=True):
    """What a manifest passes on: ``name=value`` (both already escaped for a query string)
    and the host the request named (lower case, no default port), or ``None``."""

    name: str
    value: str
    host: str | None = None


def carry(name: str, token: str, host: str | None = None) -> Carry:
    """The token ``token`` (as decoded from the request) to pass on under ``name``.

    ``host`` is the request's ``Host`` header: absolute URIs to that host are rewritten too.
    """
    if not name or not token:
        raise ValueError("a token parameter needs a name and a value")
    return Carry(
        name=quote(name, safe=""),
        value=quote(token, safe=_VALUE_SAFE),
        host=_authority(host, None) if host else None,
    )


# Cached: a player asks for its playlists with the same target again and again (a live one every
# few seconds), and parsing and escaping its token costs more than serving the playlist from
# memory. The key is what the edge already holds: the raw query and Host header.
@lru_cache(maxsize=4096)
def carry_from_query(name: str, query: bytes, host: bytes | None) -> Carry | None:
    """The carry for a request whose query string is ``query`` (raw): its ``name`` token, if
    it has one (``tokens.token_from_request``; ``MalformedToken`` if it has two)."""
    token = token_from_request(query.decode("latin-1"), None, name)
    if token is None:
        return None
    return carry(name, token, host.decode("latin-1") if host else None)


def rewrites(path: str) -> bool:
    """Whether a request for ``path`` gets a manifest this module rewrites."""
    return path.endswith(MANIFEST_SUFFIXES)


def propagate(path: str, body: bytes, carried: Carry) -> bytes:
    """``body`` (served as ``path``) with ``carried`` added to its URIs, by the path's suffix."""
    if path.endswith(".m3u8"):
        return propagate_hls(body, carried)
    if path.endswith(".mpd"):
        return propagate_dash(body, carried)
    return body


def etag(base: bytes, carried: Carry) -> bytes:
    """The validator of a rewritten body: ``base`` (the file's) marked with the token.

    A rewritten manifest is another representation than the file, and than the same file
    rewritten for another token, so it never shares the file's strong ETag.
    """
    digest = hashlib.blake2s(
        f"{carried.name}={carried.value}@{carried.host or ''}".encode(), digest_size=6
    ).hexdigest()
    return base[:-1] + b"-t" + digest.encode() + b'"'


def with_token(uri: str, carried: Carry) -> str:
    """``uri`` with the token in its query, if it leads back to this edge; else ``uri``."""
    if not uri or uri.startswith("#") or not _same_edge(uri, carried.host):
        return uri
    head, hash_mark, fragment = uri.partition("#")
    path, _, query = head.partition("?")
    kept = [
        part
        for part in query.split("&")
        if part and unquote_plus(part.partition("=")[0]) != unquote_plus(carried.name)
    ]
    kept.append(f"{carried.name}={carried.value}")
    return f"{path}?{'&'.join(kept)}{hash_mark}{fragment}"


# -- rendering from a template -------------------------------------------------------------------

# Walking a manifest costs about as much per line as serving it (a 100-segment playlist took
# over 200 us), and a live playlist is polled by every viewer, each with a token of their own.
# So a manifest is walked once per version (and token name and host), with a mark where the
# token goes; each token is then one bytes.join. NUL never occurs in a manifest; one that holds
# it, or a large one (a long VOD playlist, asked for once per session), is walked directly.
_MARK: Final = "\0token\0"
_TEMPLATE_MAX: Final = 256 * 1024


def _render(walk: Callable[[bytes, Carry], bytes], body: bytes, carried: Carry) -> bytes:
    if len(body) > _TEMPLATE_MAX or b"\0" in body:
        return walk(body, carried)
    chunks = _template(walk, body, carried.name, carried.host)
    if chunks is None:
        return body
    return f"{carried.name}={carried.value}".encode().join(chunks)


@lru_cache(maxsize=64)
def _template(
    walk: Callable[[bytes, Carry], bytes], body: bytes, name: str, host: str | None
) -> tuple[bytes, ...] | None:
    marked = walk(body, Carry(name=name, value=_MARK, host=host))
    if marked == body:
        return None
    return tuple(marked.split(f"{name}={_MARK}".encode()))


# -- HLS ---------------------------------------------------------------------------------------


def propagate_hls(body: bytes, carried: Carry) -> bytes:
    """An HLS playlist with the token added to every URI that leads back to this edge."""
    return _render(_walk_hls, body, carried)


def _walk_hls(body: bytes, carried: Carry) -> bytes:
    text_body = body.removeprefix(b"\xef\xbb\xbf")  # a byte order mark stays where it is
    if not text_body.startswith(b"#EXTM3U"):
        return body
    out: list[bytes] = [body[: len(body) - len(text_body)]]
    changed = False
    param = b"?" + f"{carried.name}={carried.value}".encode()
    for line in text_body.splitlines(keepends=True):
        content = line.rstrip(b"\r\n")
        if _PLAIN_URI.fullmatch(content):  # most lines of a media playlist: seg_1.m4s
            changed = True
            out.append(content + param + line[len(content) :])
            continue
        stripped = content.strip()
        if not stripped or (stripped.startswith(b"#") and b'URI="' not in stripped):
            out.append(line)
            continue
        text = content.decode("utf-8", "surrogateescape")
        if stripped.startswith(b"#"):
            new = _hls_tag(text, carried) if stripped.startswith(b"#EXT") else text
        else:  # a URI line; blanks around it stay where they were
            start = len(text) - len(text.lstrip())
            end = len(text.rstrip())
            new = text[:start] + with_token(text[start:end], carried) + text[end:]
        if new == text:
            out.append(line)
        else:
            changed = True
            out.append(new.encode("utf-8", "surrogateescape") + line[len(content) :])
    return b"".join(out) if changed else body


def _hls_tag(line: str, carried: Carry) -> str:
    """A tag line with its ``URI`` / ``*-URI`` attributes rewritten; as it was if its value
    is not an attribute list."""
    name, colon, attributes = line.partition(":")
    if not colon:
        return line
    pieces: list[str] = []
    pos = 0
    while pos < len(attributes):
        match = _HLS_ATTRIBUTE.match(attributes, pos)
        if match is None:
            return line
        key, value = match.groups()
        if (key == "URI" or key.endswith("-URI")) and value.startswith('"'):
            value = '"' + with_token(value[1:-1], carried) + '"'
        pieces.append(f"{key}={value}")
        pos = match.end()
        if pos < len(attributes):
            if attributes[pos] != ",":
                return line
            pos += 1
            if pos == len(attributes):  # a trailing comma: keep it
                pieces.append("")
    return name + colon + ",".join(pieces)


# -- DASH --------------------------------------------------------------------------------------


def propagate_dash(body: bytes, carried: Carry) -> bytes:
    """A DASH MPD with the token added to its segment URLs, templates and file BaseURLs."""
    return _render(_walk_dash, body, carried)


def _walk_dash(body: bytes, carried: Carry) -> bytes:
    if b"<MPD" not in body and b":MPD" not in body:
        return body

    def start_tag(match: re.Match[bytes]) -> bytes:
        wanted = _DASH_URL_ATTRIBUTES[match[1]]

        def attribute(attr: re.Match[bytes]) -> bytes:
            space, name, equals, quoted = attr.groups()
            if name not in wanted:
                return attr[0]
            return space + name + equals + _xml_rewrite(quoted[1:-1], quoted[:1], carried)

        rewritten = _XML_ATTRIBUTE.sub(attribute, match[2])
        return match[0][: match.start(2) - match.start()] + rewritten + match[3]

    def text(match: re.Match[bytes]) -> bytes:
        value = match[3]
        stripped = value.strip()
        if not stripped or (match[2] == b"BaseURL" and stripped.endswith(b"/")):
            return match[0]
        start = value.index(stripped)
        rewritten = _xml_rewrite(stripped, b"", carried)
        return match[1] + value[:start] + rewritten + value[start + len(stripped) :] + match[4]

    return _DASH_URL_TEXT.sub(text, _DASH_START_TAG.sub(start_tag, body))


def _xml_rewrite(raw: bytes, quote_mark: bytes, carried: Carry) -> bytes:
    """An XML attribute value or text (``raw``, escaped) with the token added, re-escaped and
    quoted again with ``quote_mark`` (empty for text)."""
    uri = _XML_REFERENCE.sub(_xml_unescape, raw.decode("utf-8", "surrogateescape"))
    new = with_token(uri, carried)
    if new == uri:
        return quote_mark + raw + quote_mark
    escaped = new.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if quote_mark == b'"':
        escaped = escaped.replace('"', "&quot;")
    elif quote_mark == b"'":
        escaped = escaped.replace("'", "&apos;")
    return quote_mark + escaped.encode("utf-8", "surrogateescape") + quote_mark


def _xml_unescape(match: re.Match[str]) -> str:
    ref = match[1]
    if ref.startswith("#x"):
        return chr(int(ref[2:], 16)) if int(ref[2:], 16) <= 0x10FFFF else match[0]
    if ref.startswith("#"):
        return chr(int(ref[1:])) if int(ref[1:]) <= 0x10FFFF else match[0]
    return _XML_ENTITIES[ref]


# -- where a URI leads -------------------------------------------------------------------------


def _same_edge(uri: str, host: str | None) -> bool:
    """A relative reference, or an absolute http(s) / network-path one naming ``host``."""
    if uri.startswith("//"):
        return host is not None and _authority(uri[2:], None) == host
    scheme = _SCHEME.match(uri)
    if scheme is None:
        return True
    name = scheme[0][:-1].lower()
    rest = uri[scheme.end() :]
    if name not in _DEFAULT_PORTS or not rest.startswith("//") or host is None:
        return False
    return _authority(rest[2:], name) == host


def _authority(text: str, scheme: str | None) -> str:
    """The host[:port] at the start of ``text``, lower case, without userinfo or a default
    port (``:80`` or ``:443`` either way when the scheme is not known, as for ``Host``)."""
    end = len(text)
    for stop in "/?#":
        found = text.find(stop)
        if 0 <= found < end:
            end = found
    authority = text[:end].rpartition("@")[2].lower()
    suffixes = (_DEFAULT_PORTS[scheme],) if scheme else tuple(_DEFAULT_PORTS.values())
    for suffix in suffixes:
        if authority.endswith(suffix):
            return authority[: -len(suffix)]
    return authority
