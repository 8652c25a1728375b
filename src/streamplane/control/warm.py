"""Warming a scheduled event's planned edges before its first viewer (``live/warm.py`` says
what is fetched and why).

Every ``control.live_warm_every_s`` while an event is warming, each of its planned edges that is
up is asked, over HTTP with a token the control plane signs as for a playback, for the channel's
master playlist, its media playlists, their initialisation segments and the parts a viewer
would join at: the edge takes them from the origin into its cache as it would for a viewer (no
edge-side protocol is needed). The outcome of each edge's last round is its warmth, reported
per edge on ``GET /v1/live/plan``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urljoin

import httpx

from streamplane.edge import sign, signed_url
from streamplane.live import EventReadiness
from streamplane.live.warm import EdgeWarmth, master_targets, media_targets
from streamplane.player import ManifestError

__all__ = ["EdgeWarmer"]

log = logging.getLogger(__name__)

_TOKEN_TTL_S = 300


class EdgeWarmer:
    """Warms the planned edges of every warming event; ``warmth`` holds each one's last round,
    by (channel, edge)."""

    def __init__(
        self,
        readiness: Callable[[], Sequence[EventReadiness]],
        edge_url: Callable[[str], str | None],
        signing_key: tuple[str, bytes],
        clock: Callable[[], float],
        every_s: float,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._refresh = refresh  # the fleet as the store has it, before each round
        self._readiness = readiness
        self._edge_url = edge_url
        self._kid, self._key = signing_key
        self._clock = clock
        self._every_s = every_s
        self.warmth: dict[tuple[str, str], EdgeWarmth] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # its end, cancelled

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                try:
                    await self.warm_round(http)
                except Exception:
                    log.exception("warming the planned edges failed")
                await asyncio.sleep(self._every_s)

    async def warm_round(self, http: httpx.AsyncClient) -> None:
        """One round: every up edge of every warming event, the edges side by side."""
        if self._refresh is not None:
            await self._refresh()
        jobs = []
        for r in self._readiness():
            if r.phase != "warming":
                continue
            for edge in r.edges_up:
                base = self._edge_url(edge)
                if base is not None:
                    jobs.append(self._warm(http, r.plan.event.channel, edge, base))
        for channel, warmth in await asyncio.gather(*jobs):
            self.warmth[channel, warmth.edge] = warmth

    async def _warm(
        self, http: httpx.AsyncClient, channel: str, edge: str, base: str
    ) -> tuple[str, EdgeWarmth]:
        now = self._clock()
        token = sign(
            key_id=self._kid, key=self._key, acl=[f"/{channel}/*"], expiry=int(now) + _TOKEN_TTL_S
        )
        fetched = 0
        failed: list[str] = []

        async def get(url: str) -> str | None:
            nonlocal fetched
            try:
                r = await http.get(url)
            except httpx.HTTPError as exc:
                failed.append(f"{_path(url)}: {exc or type(exc).__name__}")
                return None
            if r.status_code != 200:
                failed.append(f"{_path(url)}: {r.status_code}")
                return None
            fetched += 1
            return r.text if _path(url).endswith(".m3u8") else ""

        master_url = signed_url(base, f"/{channel}/master.m3u8", token)
        master = await get(master_url)
        if master is not None:
            try:
                media_urls = [urljoin(master_url, uri) for uri in master_targets(master)]
            except ManifestError as exc:
                media_urls = []
                failed.append(f"master.m3u8: {exc}")
            for media_url in media_urls:
                media = await get(media_url)
                if media is None:
                    continue
                try:
                    targets = media_targets(media)
                except ManifestError as exc:
                    failed.append(f"{_path(media_url)}: {exc}")
                    continue
                for uri in targets:
                    await get(urljoin(media_url, uri))
        warmth = EdgeWarmth(edge=edge, at=now, objects=fetched, failed=tuple(failed))
        if not warmth.warm:
            log.warning("warming %s on %s: %s", channel, edge, warmth.why)
        return channel, warmth


def _path(url: str) -> str:
    return httpx.URL(url).path
