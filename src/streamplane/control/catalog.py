"""The catalog: titles registered from the media plane's title.json, listed and searched.

Titles come from scanning the catalog directory at startup (``<catalog>/<title>/title.json``,
the directory name being the title's id, which is also its path on every edge) and from
``POST /v1/titles``. Reads are served from an in-process copy that is reloaded from the store
when older than a few seconds, so a title registered on another instance shows up shortly.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from streamplane.control.errors import ApiError
from streamplane.control.store import Store, TitleRow, upsert
from streamplane.media import Title

__all__ = ["Catalog", "TitleInfo", "check_title_id", "summarise"]

log = logging.getLogger(__name__)

# A title id is a path segment on the edges and sits inside token ACLs (/<title>/*): keep it
# to characters that need no escaping anywhere.
_TITLE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_PIXELS: Final = 2**31 - 1


class TitleInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    duration_s: float
    width: int
    height: int
    hls: str
    dash: str
    artwork: tuple[str, ...]
    rungs: tuple[dict[str, Any], ...]
    plans: tuple[str, ...]  # plans entitled to it; empty: every plan

    def entitles(self, plan: str) -> bool:
        return not self.plans or plan in self.plans

    def public(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


def channel_info(channel: str) -> TitleInfo:
    """A live channel as playback treats a title: its LL-HLS master playlist, no end."""
    return TitleInfo(
        id=channel,
        name=channel,
        duration_s=0.0,
        width=0,
        height=0,
        hls="master.m3u8",
        dash="manifest.mpd",
        artwork=(),
        rungs=(),
        plans=(),
    )


def check_title_id(title_id: str) -> str:
    if not _TITLE_ID_RE.fullmatch(title_id) or ".." in title_id:
        raise ApiError(
            422,
            "invalid_title_id",
            f"title id {title_id!r} must be 1-128 of [A-Za-z0-9._-], starting with a letter or"
            " digit",
        )
    return title_id


def _relative(path: str, what: str) -> str:
    parts = path.split("/")
    if (
        not path
        or len(path) > 256
        or path.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or not all(_TITLE_ID_RE.fullmatch(p) for p in parts)
    ):
        raise ApiError(422, "invalid_title", f"{what} {path!r} is not a plain relative path")
    return path


def summarise(title_id: str, title: Title, plans: Sequence[str] = ()) -> TitleInfo:
    """What the catalog keeps of a title.json: enough to list, search and start it."""
    check_title_id(title_id)
    if not (title.duration_s >= 0 and title.duration_s < 1e7):
        raise ApiError(422, "invalid_title", f"duration_s {title.duration_s} is out of range")
    if not title.rungs:
        raise ApiError(422, "invalid_title", "the title has no rungs")
    for name, size in (("width", title.width), ("height", title.height)):
        if not 0 <= size <= _MAX_PIXELS:  # the store keeps them as 32-bit integers
            raise ApiError(422, "invalid_title", f"{name} {size} is out of range")
    return TitleInfo(
        id=title_id,
        name=title.title[:256] or title_id,
        duration_s=title.duration_s,
        width=title.width,
        height=title.height,
        hls=_relative(title.hls, "hls"),
        dash=_relative(title.dash, "dash"),
        artwork=tuple(_relative(a, "artwork") for a in title.artwork),
        rungs=tuple(
            {
                "id": r.id,
                "codec": r.codec,
                "codec_string": r.codec_string,
                "width": r.width,
                "height": r.height,
                "average_bitrate_bps": r.average_bitrate_bps,
                "peak_bitrate_bps": r.peak_bitrate_bps,
                "vmaf": r.vmaf,
            }
            for r in title.rungs
        ),
        plans=tuple(plans),
    )


def _row_values(info: TitleInfo, now: float) -> dict[str, Any]:
    return {
        "id": info.id,
        "name": info.name,
        "duration_s": info.duration_s,
        "width": info.width,
        "height": info.height,
        "hls": info.hls,
        "dash": info.dash,
        "artwork": list(info.artwork),
        "rungs": list(info.rungs),
        "plans": list(info.plans),
        "registered_at": now,
    }


class Catalog:
    """Registered titles, with an in-process copy for the hot paths."""

    def __init__(self, store: Store, refresh_s: float = 2.0) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._titles: dict[str, TitleInfo] = {}
        self._sorted: list[TitleInfo] = []
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    async def register(self, info: TitleInfo, now: float, *, keep_plans: bool = False) -> None:
        """Insert or replace a title; ``keep_plans`` leaves an existing entitlement alone."""
        values = _row_values(info, now)
        skip = ("id", "plans") if keep_plans else ("id",)
        try:
            async with self._store.write() as conn:
                await conn.execute(
                    upsert(
                        self._store,
                        TitleRow,
                        values,
                        key=("id",),
                        update_columns=[k for k in values if k not in skip],
                    )
                )
        except IntegrityError as err:  # pragma: no cover - a primary key upsert cannot clash
            raise ApiError(409, "conflict", str(err.orig)) from None
        self._loaded_at = float("-inf")

    async def set_plans(self, title_id: str, plans: Sequence[str]) -> None:
        async with self._store.write() as conn:
            await conn.execute(
                update(TitleRow).where(TitleRow.id == title_id).values(plans=list(plans))
            )
        self._loaded_at = float("-inf")

    async def scan(self, directory: Path, now: float) -> list[str]:
        """Register every ``<directory>/<id>/title.json``; return the ids registered."""
        found: list[str] = []
        if not directory.is_dir():
            return found
        for path in sorted(directory.glob("*/title.json")):
            title_id = path.parent.name
            try:
                title = msgspec.json.decode(path.read_bytes(), type=Title)
                info = summarise(title_id, title)
            except (OSError, msgspec.DecodeError, ApiError) as err:
                log.warning("skipping %s: %s", path, err)
                continue
            await self.register(info, now, keep_plans=True)
            found.append(title_id)
        return found

    async def _reload(self, monotonic: float) -> None:
        async with self._lock:
            if monotonic - self._loaded_at < self._refresh_s:
                return
            async with self._store.read() as conn:
                rows = (await conn.execute(select(*TitleRow.__table__.columns))).all()
            titles = {
                r.id: TitleInfo(
                    id=r.id,
                    name=r.name,
                    duration_s=r.duration_s,
                    width=r.width,
                    height=r.height,
                    hls=r.hls,
                    dash=r.dash,
                    artwork=tuple(r.artwork),
                    rungs=tuple(r.rungs),
                    plans=tuple(r.plans),
                )
                for r in rows
            }
            self._titles = titles
            self._sorted = sorted(titles.values(), key=lambda t: (t.name.lower(), t.id))
            self._loaded_at = monotonic

    async def get(self, title_id: str, monotonic: float) -> TitleInfo | None:
        if monotonic - self._loaded_at >= self._refresh_s:
            await self._reload(monotonic)
        return self._titles.get(title_id)

    async def search(
        self, query: str | None, limit: int, offset: int, monotonic: float
    ) -> tuple[int, list[TitleInfo]]:
        """Titles whose name or id contains ``query`` (any case), by name; and how many."""
        if monotonic - self._loaded_at >= self._refresh_s:
            await self._reload(monotonic)
        if query:
            needle = query.casefold()
            hits = [
                t for t in self._sorted if needle in t.name.casefold() or needle in t.id.casefold()
            ]
        else:
            hits = self._sorted
        return len(hits), hits[offset : offset + limit]
