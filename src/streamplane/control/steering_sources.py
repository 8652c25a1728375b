"""What feeds the control plane's routing table: the czmap file and the BGP speakers.

:class:`SteeringSources` loads the czmap file (``control.czmap``), keeps it loaded (checked
every ``control.czmap_poll_s`` and on SIGHUP, the last good table kept when a new file is
bad) and runs one supervised ExaBGP per ``[[control.bgp]]`` entry. ``/healthz``,
``GET /v1/fleet/bgp`` and ``/metrics`` read what it knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from pydantic import BaseModel

from streamplane.config import ControlSettings
from streamplane.steering import (
    BgpFeed,
    CoverageZones,
    Route,
    RoutingTable,
    SessionStatus,
    SiteInfo,
    bgp_health,
    bgp_metrics,
)

__all__ = ["BgpOut", "BgpSessionOut", "SteeringSources"]

log = logging.getLogger(__name__)


class BgpSessionOut(BaseModel):
    site: str
    address: str  # the ISP router
    peer_as: int
    local_address: str
    local_as: int
    relation: str  # embedded, private, public, transit
    hold_time_s: int
    state: str  # idle, connecting, established, down (ExaBGP exited, to be restarted)
    since: float | None  # epoch seconds the session has been in that state
    restarts: int  # times its ExaBGP was restarted after exiting
    prefixes: int  # prefixes the router's paths cover in the routing table now
    last_error: str | None  # why it is not established, if known


class BgpOut(BaseModel):
    sessions: list[BgpSessionOut]
    established: int
    prefixes: int


class SteeringSources:
    """The czmap file and the BGP speakers of one control plane, writing into ``table``.

    ``sites`` holds the czmap's cache groups; ``on_sites`` is called with the new ones when
    a reload brings them. Raises CzmapError if the file cannot be loaded at all.
    """

    def __init__(
        self,
        settings: ControlSettings,
        table: RoutingTable,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.table = table
        self.sites: dict[str, SiteInfo] = {}
        self.on_sites: Callable[[dict[str, SiteInfo]], None] | None = None
        self.zones: CoverageZones | None = None
        if settings.czmap:
            self.zones = CoverageZones(Path(settings.czmap), on_load=self._loaded, clock=clock)
            table.replace(self.zones.routes, source="czmap")
            self.sites = self.zones.sites
        self.feeds = [BgpFeed(table, peer, clock=clock) for peer in settings.bgp]
        self._poll_s = settings.czmap_poll_s
        self._watcher: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Task[bool]] = set()
        self._reading = asyncio.Lock()
        self._on_sighup = False

    async def start(self) -> None:
        """Start every BGP speaker and the czmap watch; on failure, stop what started."""
        try:
            for feed in self.feeds:
                await feed.start()
        except BaseException:
            await self.stop()
            raise
        if self.zones is None:
            return
        if self._poll_s > 0:
            self._watcher = asyncio.create_task(self._watch(), name="czmap-watch")
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._sighup)
            self._on_sighup = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            log.info("czmap: not reloaded on SIGHUP (the service runs outside the main thread)")

    async def stop(self) -> None:
        if self._on_sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._on_sighup = False
        for task in (self._watcher, *self._reloads):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = None
        for feed in self.feeds:
            await feed.stop()

    async def reload_czmap(self, *, force: bool = True) -> bool:
        """Read the czmap file (``force=False``: only if it changed); True if a new table is
        in use. Read on a worker thread: a large file takes a while to parse and load."""
        zones = self.zones
        if zones is None:
            return False
        async with self._reading:
            return await asyncio.to_thread(zones.reload if force else zones.check)

    def sessions(self) -> list[SessionStatus]:
        return [session for feed in self.feeds for session in feed.sessions()]

    def bgp(self) -> BgpOut:
        sessions = self.sessions()
        return BgpOut(
            sessions=[BgpSessionOut(**msgspec.structs.asdict(s)) for s in sessions],
            established=sum(s.state == "established" for s in sessions),
            prefixes=sum(s.prefixes for s in sessions),
        )

    def health(self) -> dict[str, dict[str, Any]]:
        """The components ``/healthz`` shows: ``bgp`` and ``czmap``, when configured."""
        out: dict[str, dict[str, Any]] = {}
        if self.feeds:
            out["bgp"] = bgp_health(self.sessions())
        if self.zones is not None:
            out["czmap"] = self.zones.health()
        return out

    def metrics(self) -> str:
        """Prometheus text: the BGP sessions, and the czmap file's reloads."""
        text = bgp_metrics(self.sessions()) if self.feeds else ""
        if self.zones is not None:
            text += (
                "# HELP streamplane_czmap_routes Routes loaded from the czmap file.\n"
                "# TYPE streamplane_czmap_routes gauge\n"
                f"streamplane_czmap_routes {len(self.zones.routes)}\n"
                "# HELP streamplane_czmap_reload_failures_total czmap files refused.\n"
                "# TYPE streamplane_czmap_reload_failures_total counter\n"
                f"streamplane_czmap_reload_failures_total {self.zones.failures}\n"
            )
        return text

    # -- internals ----------------------------------------------------------------------

    def _loaded(self, routes: list[Route], sites: dict[str, SiteInfo]) -> None:
        # On the reading thread: the table takes writers from any thread, and the sites
        # are swapped in whole (readers see the old mapping or the new one).
        self.table.replace(routes, source="czmap")
        self.sites = sites
        if self.on_sites is not None:
            self.on_sites(sites)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            await self._reload_logged(force=False)

    async def _reload_logged(self, *, force: bool) -> bool:
        try:
            return await self.reload_czmap(force=force)
        except Exception:  # a bad file is handled; anything else must not end the watch
            log.exception("czmap: reading %s failed", self.zones and self.zones.path)
            return False

    def _sighup(self) -> None:
        log.info("czmap: SIGHUP, reloading")
        task = asyncio.create_task(self._reload_logged(force=True))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)
