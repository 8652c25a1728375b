"""Live objects at the edge: blocking playlist reloads as cache keys, and playlist lifetimes.

A low-latency HLS player asks for its playlist with ``_HLS_msn`` / ``_HLS_part``: "answer
once the playlist holds this part" (RFC 8216bis 6.2.5.2). Every viewer at the live edge asks
for the same part, so each such request is made an object of its own: the playlist *as of*
that part, keyed ``<playlist>~<msn>.<part>``. It never changes once fetched (any later copy
would do as well), so the cache's request collapsing applies as to any object: however many
viewers wait, in however many workers, the edge sends the origin one blocking request for it
and answers every waiter, as its bytes land, from that one fetch; the origin holds that request
until the part exists. A playlist asked for without the directives is a live object with a
short lifetime (``live_playlist_ttl_s``), fetched again once it is older.

Pure: names in, names out.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl

__all__ = ["BadReload", "is_live_playlist", "is_reload", "origin_target", "reload_key"]

_MARK: Final = "~"
_KEY: Final = re.compile(r"^(?P<playlist>.+\.m3u8)~(?P<msn>\d{1,12})(?:\.(?P<part>\d{1,6}))?$")
_NUMBER: Final = re.compile(r"^\d{1,12}$")


class BadReload(ValueError):
    """``_HLS_msn`` / ``_HLS_part`` that are not what the spec allows."""


def reload_key(key: str, query: str) -> str | None:
    """The cache key of a blocking reload of playlist ``key``, or None when ``query`` asks
    for none. Raises :class:`BadReload` for directives that are not whole numbers, or a part
    without its segment."""
    if not key.endswith(".m3u8") or "_HLS_" not in query:
        return None
    msn, part = _directives(query)
    if msn is None:
        if part is not None:
            raise BadReload("_HLS_part without _HLS_msn")
        return None
    if not _NUMBER.match(msn) or (part is not None and not _NUMBER.match(part)):
        raise BadReload("_HLS_msn and _HLS_part must be whole numbers")
    if part is not None and len(part) > 6:
        raise BadReload("_HLS_part is out of range")
    return f"{key}{_MARK}{int(msn)}" + (f".{int(part)}" if part is not None else "")


def _directives(query: str) -> tuple[str | None, str | None]:
    """``_HLS_msn`` and ``_HLS_part`` of ``query`` as ``parse_qsl`` reads them (the last of
    each). Every viewer at the live edge asks one such reload per part, so a query whose
    names and directives need no decoding (a token's value may) is split here, in a fraction
    of parse_qsl's time (``bench/live.py``)."""
    msn = part = None
    for field in query.split("&"):
        name, _, value = field.partition("=")
        if "%" in name or "+" in name:
            return _decoded_directives(query)
        if name == "_HLS_msn" or name == "_HLS_part":
            if "%" in value or "+" in value:
                return _decoded_directives(query)
            if name == "_HLS_msn":
                msn = value
            else:
                part = value
    return msn, part


def _decoded_directives(query: str) -> tuple[str | None, str | None]:
    pairs = dict(parse_qsl(query, keep_blank_values=True))
    return pairs.get("_HLS_msn"), pairs.get("_HLS_part")


def origin_target(key: str) -> tuple[str, str]:
    """The path and query to ask the origin for ``key``: a blocking reload's directives go
    back into the query; any other key is its own path."""
    found = _KEY.match(key)
    if found is None:
        return key, ""
    query = f"_HLS_msn={found['msn']}"
    if found["part"] is not None:
        query += f"&_HLS_part={found['part']}"
    return found["playlist"], query


def is_reload(key: str) -> bool:
    """Whether ``key`` is a blocking reload's object (``…m3u8~msn.part``): never stale."""
    return _MARK in key and _KEY.match(key) is not None


def is_live_playlist(key: str, ttl_s: float) -> bool:
    """Whether ``key`` is a playlist (or an MPD) that goes stale after ``ttl_s`` (0: none
    do, a VOD edge's playlists are as immutable as its segments). A blocking reload's object
    (``…m3u8~msn.part``) never goes stale: it is the playlist as of its part."""
    return ttl_s > 0 and key.endswith((".m3u8", ".mpd"))
