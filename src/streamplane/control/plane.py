"""The control plane's services, built from the settings: what every route works on.

``create_app`` builds one :class:`ControlPlane` and keeps it as ``app.state.plane``; the
routers reach it through the ``Plane`` dependency (``streamplane.control.routes.deps``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from streamplane.config import Settings, SettingsError
from streamplane.control.accounts import Accounts
from streamplane.control.catalog import Catalog
from streamplane.control.fleet import Fleet, FleetPolicy, settings_credentials
from streamplane.control.heartbeats import Heartbeats, open_stream
from streamplane.control.playback import Playback
from streamplane.control.qos import qos_service
from streamplane.control.realtime import RealtimeIssuer, admission_plan
from streamplane.control.steering_sources import SteeringSources
from streamplane.control.store import Store, StoreUnavailable, migrate
from streamplane.control.warm import EdgeWarmer
from streamplane.edge import parse_networks
from streamplane.live import Event, EventPlan, EventReadiness, plan_event, read_events, readiness
from streamplane.placement import Server
from streamplane.realtime import AdmissionPlan
from streamplane.steering import GeoLocator, RoutingTable, SiteInfo, Steering
from streamplane.telemetry import Stream

__all__ = ["Clock", "ControlPlane"]

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# /healthz asks the store at most this often, and waits for its answer at most this long: a
# load balancer polling many times a second costs the store one SELECT a second.
_STORE_CHECK_EVERY_S: Final = 1.0
_STORE_CHECK_TIMEOUT_S: Final = 1.0


class ControlPlane:
    """Everything a request needs, built from the settings; started by the app's lifespan."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        steering: Steering | None = None,
    ) -> None:
        c = settings.control
        self.settings = settings
        self.clock = clock
        self.monotonic = monotonic
        try:
            self.trusted_proxies = parse_networks(c.trusted_proxies)
        except ValueError as err:
            raise SettingsError(f"control.trusted_proxies: {err}") from None
        self.store = Store(
            c.database_url,
            schema=c.database_schema,
            connect_timeout_s=c.database_connect_timeout_s,
            pool_timeout_s=c.database_pool_timeout_s,
            statement_timeout_s=c.database_statement_timeout_s,
        )
        jwt_key = bytes.fromhex(c.jwt_secret) if c.jwt_secret else secrets.token_bytes(32)
        self.accounts = Accounts(self.store, c, jwt_key)
        self.catalog = Catalog(self.store)
        self.fleet = Fleet(
            self.store,
            FleetPolicy.from_settings(c),
            Path(c.placement) if c.placement else None,
            credentials=settings_credentials(c),
        )
        # -- steering's inputs: the czmap file and the BGP speakers (steering_sources.py)
        table = steering.table if steering is not None else RoutingTable()
        self.sources = SteeringSources(c, table, clock=clock)
        sites: dict[str, SiteInfo] = self.sources.sites
        self.table = table
        self.steering = (
            steering if steering is not None else Steering(table, GeoLocator(), sites=sites)
        )
        self.playback = Playback(
            self.store,
            c,
            self.fleet,
            self.steering,
            sites,
            settings.tokens.signing_key(),
            settings.tokens.ttl_s,
            self.accounts.session_token,
        )
        self._events_file = Path(c.live_events) if c.live_events else None
        self._events_stamp = self._events_file.stat().st_mtime_ns if self._events_file else 0
        self._live_events = _read_live_events(c.live_events)
        self.playback.live_plans = self.live_plans
        self.realtime = RealtimeIssuer(settings.realtime)
        if self.gateway_processes < 1:
            raise SettingsError("realtime.processes (or total_processes) must be at least 1")
        self.warmer = EdgeWarmer(
            self.live_readiness,
            self._edge_url,
            settings.tokens.signing_key(),
            clock,
            c.live_warm_every_s,
            refresh=lambda: self.fleet.refresh(self.monotonic()),
        )
        self.heartbeats = Heartbeats(
            settings, self.store, self.accounts.claims, clock=clock, monotonic=monotonic
        )
        self.playback.heartbeat_url = self.heartbeats.url() or self.playback.heartbeat_url
        t = settings.telemetry
        if t.ingest_process:  # `streamplane ingest` takes them: nothing of it runs here
            if not t.ingest_port or not c.jwt_secret:
                raise SettingsError(
                    "telemetry.ingest_process needs telemetry.ingest_port (where players send"
                    " heartbeats) and control.jwt_secret (shared, so the ingest process can"
                    " verify the control plane's tokens)"
                )
        else:
            self.playback.heartbeats = self.heartbeats
        self.sources.on_sites = self._sites_reloaded
        # -- quality of experience: aggregates from the heartbeats, fed back into steering
        self.qos = qos_service(settings.telemetry, self.store, self.steering, clock)
        self._qos_stream: Stream | None = None  # its own, when ingest runs elsewhere
        self.qos.known_edge = lambda edge: edge == "origin" or self.fleet.knows(edge)
        self._store_problem: str | None = None
        self._store_checked_at = float("-inf")
        self._store_check = asyncio.Lock()

    @property
    def live_events(self) -> list[Event]:
        """The scheduled events, read again when control.live_events changes: an operator
        schedules an event without restarting the control plane. A changed file that cannot
        be read keeps the events read last (and says why in the log)."""
        path = self._events_file
        if path is None:
            return self._live_events
        try:
            stamp = path.stat().st_mtime_ns
        except OSError as exc:
            log.warning("control.live_events: %s: %s (keeping the events read last)", path, exc)
            return self._live_events
        if stamp != self._events_stamp:
            self._events_stamp = stamp
            try:
                self._live_events = _read_live_events(str(path))
            except SettingsError as exc:
                log.warning("%s (keeping the events read last)", exc)
        return self._live_events

    @property
    def gateway_processes(self) -> int:
        """The gateway processes an event's audience is split among."""
        r = self.settings.realtime
        return r.total_processes or r.processes

    def admission_plan(self) -> AdmissionPlan:
        """The gateways' raised limits for the scheduled events (GET /v1/live/admission)."""
        return admission_plan(self.live_events, self.gateway_processes)

    def live_plans(self) -> list[EventPlan]:
        """Every scheduled event planned on the edges heartbeating now (their rated
        throughput and site): the edges each needs, by site, and the gateway's limits."""
        servers = [
            Server(e.edge_id, e.disk_total_bytes, e.capacity_bps, e.site)
            for e in self.fleet.edges()
        ]
        if not servers:
            return []
        return [plan_event(event, servers) for event in self.live_events]

    def live_readiness(self) -> list[EventReadiness]:
        """Each event's plan, phase and readiness: are its planned edges up (offered now)?"""
        from streamplane.control.fleet import exclusion

        now = self.clock()
        up = {e.edge_id for e in self.fleet.edges() if exclusion(e, now, self.fleet.policy) is None}
        warmth = self.warmer.warmth
        return [
            readiness(
                plan,
                up,
                now,
                warm={e for (ch, e), w in warmth.items() if ch == plan.event.channel and w.warm},
            )
            for plan in self.live_plans()
        ]

    def _edge_url(self, edge_id: str) -> str | None:
        edge = next((e for e in self.fleet.edges() if e.edge_id == edge_id), None)
        return edge.base_url if edge is not None else None

    def _sites_reloaded(self, sites: dict[str, SiteInfo]) -> None:
        self.steering.sites = sites
        self.playback.sites = sites

    async def store_problem(self) -> str | None:
        """What is wrong with the store (None: it answered), checked at most once a second."""
        if self.monotonic() - self._store_checked_at < _STORE_CHECK_EVERY_S:
            return self._store_problem
        async with self._store_check:  # concurrent callers share one check
            if self.monotonic() - self._store_checked_at < _STORE_CHECK_EVERY_S:
                return self._store_problem
            try:
                await asyncio.wait_for(self.store.ping(), _STORE_CHECK_TIMEOUT_S)
                problem = None
            except StoreUnavailable as err:
                problem = str(err)
            except TimeoutError:
                problem = f"no answer within {_STORE_CHECK_TIMEOUT_S:g} s"
            self._store_problem = problem
            self._store_checked_at = self.monotonic()
        return problem

    async def start(self) -> None:
        c = self.settings.control
        await migrate(self.store)
        titles = await self.catalog.scan(Path(c.catalog_dir), self.clock())
        if titles:
            log.info("catalog: %d titles from %s", len(titles), c.catalog_dir)
        await self.fleet.start(self.monotonic())
        await self.sources.start()
        if not self.settings.telemetry.ingest_process:
            await self.heartbeats.start()
        await self.qos.start()
        await self._consume_qos()
        if self._events_file is not None:
            await self.warmer.start()

    async def _consume_qos(self) -> None:
        """The QoS consumer, here: it needs steering's routing table for client networks."""
        t = self.settings.telemetry
        stream = self.heartbeats.stream
        if stream is None and t.ingest_process:
            if t.engine != "nats":
                log.warning(
                    "qos: no aggregates: the embedded stream serves the ingest process alone;"
                    ' with telemetry.ingest_process, set telemetry.engine = "nats"'
                )
                return
            stream = self._qos_stream = await open_stream(self.settings)
        if stream is not None:
            await self.qos.consume(
                stream,
                max_batches=t.qos_consumer_batches,
                ack_wait_s=t.ack_wait_s,
                linger_s=t.consumer_linger_s,
                share=t.qos_share,
            )

    async def stop(self) -> None:
        await self.warmer.stop()
        await self.qos.stop()
        if self._qos_stream is not None:
            await self._qos_stream.close()
        await self.heartbeats.stop()
        await self.sources.stop()
        await self.store.dispose()


def _read_live_events(path: str) -> list[Event]:
    """control.live_events: the scheduled events, or none; SettingsError says what is wrong."""
    if not path:
        return []
    try:
        return read_events(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"control.live_events: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SettingsError(f"control.live_events: {path}: {exc}") from None
