"""The edge appliance's main process: starts the workers and keeps the cache.

The supervisor serves no client itself. It

- starts ``workers`` processes that each bind the port with ``SO_REUSEPORT`` and restarts one
  that dies;
- keeps the cache within its capacity and within its disk: workers send it hits, completed
  objects and "the disk is full" over a socketpair only they hold, its eviction policy picks
  victims, it deletes them;
- executes fill plans: pulls the titles it is told to hold, at a bounded rate, only while
  serving is below a share of capacity, and pins them against eviction;
- heartbeats to the control plane and, on SIGTERM, drains: reports ``draining`` first so
  steering moves viewers away, then lets the workers finish their responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Annotated, Final

import httpx
import msgspec

from streamplane.config import EdgeSettings
from streamplane.edge import metrics
from streamplane.edge.cache import MAX_OBJECT_BYTES, DiskCache, FetchError, valid_key
from streamplane.edge.eviction import EvictionPolicy, make_policy
from streamplane.edge.fetch import Fetches
from streamplane.edge.operations import FillRequest, FillStatus
from streamplane.edge.origin import Origin, make_origin
from streamplane.edge.report import (
    FLEET_HEARTBEAT_PATH,
    EdgeHeartbeat,
    HeartbeatReply,
    HeartbeatSigner,
    edge_key,
)
from streamplane.edge.server import check_port, run_worker
from streamplane.edge.throttle import LogThrottle

__all__ = ["kernel_tls_status", "run_edge"]


def kernel_tls_status() -> tuple[bool, str]:
    """Whether TLS bodies can stay zero-copy here, and a sentence saying why (not)."""
    try:
        ulps = Path("/proc/sys/net/ipv4/tcp_available_ulp").read_text().split()
    except OSError:
        ulps = []
    if "tls" not in ulps:
        listed = ", ".join(ulps) or "nothing"
        return False, (
            f"kernel TLS is not available (tcp_available_ulp lists {listed}): TLS bodies are "
            "encrypted in user space and copied, not sent with sendfile"
        )
    # The ssl module can hand a socket to kernel TLS only from Python 3.12 (OP_ENABLE_KTLS).
    import ssl

    if not hasattr(ssl, "OP_ENABLE_KTLS"):
        return False, (
            "the kernel offers TLS but this Python's ssl module cannot enable it "
            "(OP_ENABLE_KTLS needs Python 3.12): TLS bodies are copied through user space"
        )
    return True, "kernel TLS is available: TLS bodies go by sendfile too"


class Advice(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a worker tells the supervisor, one datagram each; anything else is ignored."""

    # [[key, requests], ...], in the order of each key's last request
    hits: list[tuple[str, Annotated[int, msgspec.Meta(ge=1, le=1 << 31)]]] = []
    admit: str | None = None  # a completed object (its size is read from the disk)
    size: Annotated[int, msgspec.Meta(ge=0, le=MAX_OBJECT_BYTES)] = 0
    room: Annotated[int, msgspec.Meta(ge=0, le=MAX_OBJECT_BYTES)] = 0  # bytes a fetch needs
    fill: bool = False  # a new fill plan was written


_ADVICE = msgspec.json.Decoder(Advice)
# Free space kept on the cache's filesystem once it proved smaller than capacity_bytes: for
# metas, error records and the run files, and so that a fetch rarely waits for room.
_RESERVE_MIN: Final = 256 << 10
_RESERVE_MAX: Final = 64 << 20
_SHRINK_EVERY_S: Final = 1.0  # evicted objects still being sent free their space later


class Supervisor:
    def __init__(
        self, config: EdgeSettings, keyring: dict[str, str], log: Callable[[str], None]
    ) -> None:
        self.config = config
        self.keyring = keyring
        self.log = log
        self.warn = LogThrottle(log)
        self.cache = DiskCache(Path(config.cache_dir))
        self.cache.ask_room = self.make_room
        self.cache.warn = self.warn
        self.origin: Origin = make_origin(config.origin)
        self.fetches = Fetches(
            self.cache,
            self.origin,
            stall_s=config.stall_timeout_s,
            stored=self._admit,
            warn=self.warn,
        )
        self.policy: EvictionPolicy = make_policy(config.eviction, config.capacity_bytes)
        # What the cache's filesystem proved able to hold, when less than capacity_bytes.
        self.disk_limit: int | None = None
        self._last_shrink = -math.inf
        self.pinned: dict[str, int] = {}  # objects of titles the fill plan holds -> size
        self.plan_titles: set[str] = set()
        self.held_titles: set[str] = set()
        self.processes: dict[int, BaseProcess] = {}
        self.draining = False
        self.stop = asyncio.Event()
        self.fill_wake = asyncio.Event()
        self.fill_status = FillStatus()
        self.run_dir = self.cache.root / ".run"
        self.last_bytes = 0
        self.last_time = time.monotonic()
        self.throughput_bps = 0.0
        self.heartbeat_interval = config.heartbeat_s
        self._heartbeat_failing = False
        self.signer = (
            HeartbeatSigner(config.edge_id, edge_key(config.fleet_key))
            if config.fleet_key
            else None
        )

    # -- cache index ---------------------------------------------------------------------

    def rebuild_index(self) -> tuple[int, int]:
        """After a restart: drop partial objects, re-admit every complete one, oldest first."""
        dropped = self.cache.clear_inflight()
        found = sorted(self.cache.scan(), key=lambda item: item[2])
        plan = self._read_plan()
        self.plan_titles = set(plan.titles) if plan else set()
        for key, size, _ in found:
            self._admit(key, size)
        self._resize_policy()
        return len(found), dropped

    def _admit(self, key: str, size: int) -> None:
        if key.split("/", 1)[0] in self.plan_titles:
            # Rebuilding the policy costs a pass over its residents: done once per title
            # filled (see _fill), not once per file, so the cache overshoots by a title at most.
            self.pinned[key] = size
            return
        for victim in self.policy.admit(key, size):
            self.cache.remove(victim)
            self.held_titles.discard(victim.split("/", 1)[0])

    def _resize_policy(self) -> None:
        """Pinned bytes come out of what the policy may use."""
        limit = self.config.capacity_bytes
        if self.disk_limit is not None:
            limit = min(limit, self.disk_limit)
        budget = max(1, limit - sum(self.pinned.values()))
        if budget != self.policy.capacity_bytes:
            residents = self.policy.keys()
            survivors = [(k, self._size_of(k)) for k in residents]
            self.policy = make_policy(self.config.eviction, budget)
            for key, size in survivors:
                if size is not None:
                    for victim in self.policy.admit(key, size):
                        self.cache.remove(victim)

    def _size_of(self, key: str) -> int | None:
        try:
            return os.stat(self.cache.object_path(key)).st_size
        except OSError:
            return None

    def on_message(self, data: bytes) -> None:
        """One datagram from a worker. Keys are checked as request paths are, and an
        admitted object's size is read from the disk: nothing said here can reach a file
        outside the cache or make the policy miscount."""
        try:
            advice = _ADVICE.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.warn("advice", f"ignored a malformed control message: {exc}")
            return
        keys = [key for key, _ in advice.hits]
        if advice.admit is not None:
            keys.append(advice.admit)
        if not all(valid_key(key) for key in keys):
            self.warn("advice", "ignored a control message naming something not in the cache")
            return
        for key, count in advice.hits:
            self.policy.hit(key, count)
        if advice.admit is not None:
            size = self._size_of(advice.admit)
            if size is not None:
                self._admit(advice.admit, size)
        if advice.room:
            self.make_room(advice.room)
        if advice.fill:
            self.fill_wake.set()

    # -- a filesystem smaller than the capacity ------------------------------------------

    def _disk(self) -> tuple[int, int, int]:
        """The cache filesystem's free bytes, the free space it should keep, and its size."""
        st = os.statvfs(self.cache.root)
        size = st.f_blocks * st.f_frsize
        reserve = min(_RESERVE_MAX, max(_RESERVE_MIN, size // 50))
        return st.f_bavail * st.f_frsize, reserve, size

    def make_room(self, need: int) -> None:
        """A fetch found the disk full before the cache reached its capacity (the disk is
        smaller, or something else fills it): learn what the disk holds and evict down to
        it, so that ``need`` bytes and the reserve are free.

        Never below half the filesystem: the rest may be objects in flight, which free their
        space as they land and are evicted, not a reason to cache nothing. At most once a
        second: evicted objects that clients are still being sent keep their space until
        they are closed, and evicting again for them would empty the cache.
        """
        now = time.monotonic()
        if now - self._last_shrink < _SHRINK_EVERY_S:
            return
        free, reserve, size = self._disk()
        deficit = need + reserve - free
        if deficit <= 0:
            return
        held = self.policy.used_bytes + sum(self.pinned.values())
        limit = max(held - deficit, (size - reserve) // 2)
        current = self.config.capacity_bytes
        if self.disk_limit is not None:
            current = min(current, self.disk_limit)
        if limit >= current:
            return
        self._last_shrink = now
        self.disk_limit = limit
        self.warn(
            "disk-full",
            f"the cache disk is full at {held / 1e6:,.1f} MB cached, below the capacity of "
            f"{self.config.capacity_bytes / 1e6:,.1f} MB: keeping the cache within "
            f"{limit / 1e6:,.1f} MB (set capacity_bytes to what the disk holds)",
        )
        self._resize_policy()

    def regrow(self) -> None:
        """Raise a learned disk limit again when the disk has room for a quarter more."""
        if self.disk_limit is None:
            return
        free, reserve, _ = self._disk()
        held = self.policy.used_bytes + sum(self.pinned.values())
        room = held + free - reserve
        if room >= self.config.capacity_bytes:
            self.disk_limit = None
        elif room > self.disk_limit * 1.25 + reserve:
            self.disk_limit = room
        else:
            return
        self._resize_policy()

    # -- workers ------------------------------------------------------------------------

    def start_worker(self, index: int, channel: socket.socket) -> None:
        ctx = multiprocessing.get_context("spawn")
        # A socket among a spawned process's arguments is inherited as a descriptor
        # (multiprocessing passes it to the child with the process), not sent over a socket.
        process = ctx.Process(
            target=run_worker,
            args=(self.config, self.keyring, index, os.getpid(), channel),
            name=f"edge-worker-{index}",
        )
        process.start()
        self.processes[index] = process

    async def watch_workers(self, channel: socket.socket) -> None:
        n = 0
        while not self.stop.is_set():
            for index, process in list(self.processes.items()):
                if not process.is_alive() and not self.draining:
                    self.log(f"worker {index} exited ({process.exitcode}); restarting it")
                    self.start_worker(index, channel)
            if n % 10 == 0:
                try:
                    self.regrow()
                except OSError as exc:
                    self.warn("regrow", f"cannot read the cache disk's free space: {exc}")
            n += 1
            await asyncio.sleep(0.5)

    # -- heartbeats ---------------------------------------------------------------------

    def snapshot(self) -> metrics.MetricsSnapshot:
        total = metrics.sum_up(metrics.read_all(self.run_dir / "metrics"))
        now = time.monotonic()
        if now > self.last_time:
            sent = total.bytes_sent
            self.throughput_bps = max(0, sent - self.last_bytes) * 8 / (now - self.last_time)
            self.last_bytes, self.last_time = sent, now
        return total

    def heartbeat(self) -> EdgeHeartbeat:
        total = self.snapshot()
        st = os.statvfs(self.cache.root)
        used = sum(self.pinned.values()) + self.policy.used_bytes
        return EdgeHeartbeat(
            edge_id=self.config.edge_id,
            base_url=self.config.url(),
            site=self.config.site,
            lat=self.config.lat,
            lon=self.config.lon,
            throughput_bps=self.throughput_bps,
            capacity_bps=self.config.capacity_bps,
            connections=total.connections,
            disk_used_bytes=used,
            disk_total_bytes=min(self.config.capacity_bytes, st.f_blocks * st.f_frsize),
            titles=tuple(sorted(self.held_titles)),
            healthy=all(p.is_alive() for p in self.processes.values()),
            draining=self.draining,
            sent_at=time.time(),
        )

    async def send_heartbeat(self, client: httpx.AsyncClient) -> None:
        beat = self.heartbeat()
        if not self.config.control_url:
            return
        body = msgspec.json.encode(beat)
        headers = {"Content-Type": "application/json"}
        if self.signer is not None:
            headers["Authorization"] = self.signer.authorization(body, time.time())
        url = self.config.control_url.rstrip("/") + FLEET_HEARTBEAT_PATH
        try:
            response = await client.post(url, content=body, headers=headers)
            if response.is_error:  # say why: a refused key or URL is the operator's to fix
                if not self._heartbeat_failing:
                    self.log(
                        f"heartbeat to {url} refused: {response.status_code} "
                        f"{response.text[:300]}; still serving, will retry"
                    )
                self._heartbeat_failing = True
                return
            reply = msgspec.json.decode(response.content, type=HeartbeatReply)
            self.heartbeat_interval = max(0.5, min(60.0, reply.interval_s))
            if self._heartbeat_failing:
                self.log("heartbeats accepted again")
            self._heartbeat_failing = False
        except (httpx.HTTPError, msgspec.DecodeError) as exc:
            if not self._heartbeat_failing:  # say it once, not every few seconds
                self.log(f"heartbeat to {url} failed: {exc!r}; still serving, will retry")
            self._heartbeat_failing = True

    async def heartbeats(self) -> None:
        async with httpx.AsyncClient(timeout=2.0) as client:
            while not self.stop.is_set():
                await self.send_heartbeat(client)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), self.heartbeat_interval)

    # -- fill --------------------------------------------------------------------------

    def _read_plan(self) -> FillRequest | None:
        path = self.run_dir / "fill-plan.json"
        try:
            return msgspec.json.decode(path.read_bytes(), type=FillRequest)
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def _write_status(self) -> None:
        tmp = self.run_dir / "fill-status.tmp"
        try:
            tmp.write_bytes(msgspec.json.encode(self.fill_status))
            os.replace(tmp, self.run_dir / "fill-status.json")
        except OSError as exc:  # a full disk: the fill goes on, its status is late
            self.warn("fill-status", f"cannot write the fill status: {exc}")

    async def fill_loop(self) -> None:
        self.fill_wake.set()  # a plan left from before a restart resumes
        while not self.stop.is_set():
            await self.fill_wake.wait()
            self.fill_wake.clear()
            try:
                await self._run_plan()
            except Exception as exc:  # a fault nobody foresaw: say so, and take later plans
                self.warn("fill", f"the fill failed: {exc!r}")
                self.fill_status.state = "failed"
                self.fill_status.errors = (*self.fill_status.errors, f"the fill failed: {exc!r}")
                self._write_status()

    async def _run_plan(self) -> None:
        plan = self._read_plan()
        if plan is None or self.draining:
            return
        # Unpin titles the new plan no longer holds: they become ordinary cache objects.
        self.plan_titles = set(plan.titles)
        unpinned = [k for k in self.pinned if k.split("/", 1)[0] not in self.plan_titles]
        sizes = [self.pinned.pop(k) for k in unpinned]
        self._resize_policy()
        for key, size in zip(unpinned, sizes, strict=True):
            self._admit(key, size)
        residents = self.policy.keys()
        for key in [k for k in residents if k.split("/", 1)[0] in self.plan_titles]:
            self.policy.remove(key)
            held = self._size_of(key)
            if held is not None:
                self.pinned[key] = held
        self._resize_policy()
        await self._fill(plan)

    async def _fill(self, plan: FillRequest) -> None:
        from streamplane.media import Title, package_files

        rate = plan.rate_bps or self.config.fill_rate_bps
        status = self.fill_status = FillStatus(state="filling", titles_total=len(plan.titles))
        errors: list[str] = []
        done: list[str] = []
        for title in plan.titles:
            if self.fill_wake.is_set() or self.stop.is_set():
                return  # a newer plan replaces this one
            status.current = title
            self._write_status()
            try:
                await self._pull(f"{title}/title.json", rate, status)
                raw = Path(self.cache.object_path(f"{title}/title.json")).read_bytes()
                files = package_files(msgspec.json.decode(raw, type=Title))
                for name in files:
                    if self.fill_wake.is_set() or self.stop.is_set():
                        return
                    await self._pull(f"{title}/{name}", rate, status)
            except (FetchError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                errors.append(f"{title}: {exc}")
                status.errors = tuple(errors)
                self._write_status()
                continue
            except Exception as exc:  # this title fails, the plan goes on
                self.warn("fill-title", f"filling {title} failed: {exc!r}")
                errors.append(f"{title}: {exc!r}")
                status.errors = tuple(errors)
                self._write_status()
                continue
            self._resize_policy()
            done.append(title)
            self.held_titles.add(title)
            status.titles_done = tuple(done)
            self._write_status()
        status.current = ""
        status.state = "done" if not errors else "failed"
        self._write_status()

    async def _pull(self, key: str, rate_bps: float, status: FillStatus) -> None:
        """Fetch one object into the cache unless held, retrying with backoff; rate-limited.

        Through the same fetches as clients' misses: a client fetching the object, in any
        worker, is joined, not raced.
        """
        delay = 0.5
        for attempt in range(5):
            if self.cache.open_complete_size(key) is not None:
                status.files_done += 1
                return
            await self._wait_off_peak(status)
            started = time.monotonic()
            try:
                size = await self.fetches.complete(key)
            except FetchError as exc:
                if exc.status in (400, 404) or attempt == 4:
                    raise
                await asyncio.sleep(delay)
                delay *= 2
                continue
            status.files_done += 1
            status.bytes_done += size
            self._count_fill(size)
            # Bounded rate: sleep off what this object took beyond its share of the budget.
            budget = size * 8 / rate_bps
            spent = time.monotonic() - started
            if budget > spent:
                await asyncio.sleep(budget - spent)
            return

    def _count_fill(self, size: int) -> None:
        path = self.run_dir / "metrics" / "fill.json"
        snap = metrics.MetricsSnapshot()
        with contextlib.suppress(FileNotFoundError, msgspec.DecodeError):
            snap = msgspec.json.decode(path.read_bytes(), type=metrics.MetricsSnapshot)
        snap.fill_bytes += size
        snap.fill_titles_done = len(self.held_titles)
        tmp = path.with_suffix(".tmp")
        with contextlib.suppress(OSError):  # a full disk: the counter is late, not the fill
            tmp.write_bytes(msgspec.json.encode(snap))
            os.replace(tmp, path)

    async def _wait_off_peak(self, status: FillStatus) -> None:
        """Fill only while serving uses less than ``fill_offpeak_load`` of capacity."""
        limit = self.config.fill_offpeak_load * self.config.capacity_bps
        while not self.stop.is_set():
            self.snapshot()
            if self.throughput_bps <= limit:
                if status.state == "waiting":
                    status.state = "filling"
                    self._write_status()
                return
            if status.state != "waiting":
                status.state = "waiting"
                self._write_status()
            await asyncio.sleep(1.0)

    def check_held_titles(self) -> None:
        """At start: which planned titles are already complete in the cache."""
        from streamplane.media import Title, package_files

        for title in self.plan_titles:
            try:
                raw = Path(self.cache.object_path(f"{title}/title.json")).read_bytes()
                files = package_files(msgspec.json.decode(raw, type=Title))
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                continue
            if all(os.path.isfile(self.cache.object_path(f"{title}/{f}")) for f in files):
                self.held_titles.add(title)


async def _main(config: EdgeSettings, keyring: dict[str, str], log: Callable[[str], None]) -> int:
    if config.require_token and not keyring:
        log("tokens are required but no keys are set ([tokens.keys] or STREAMPLANE_TOKENS_KEYS)")
        return 2
    sup = Supervisor(config, keyring, log)
    loop = asyncio.get_running_loop()
    objects, dropped = sup.rebuild_index()
    sup.check_held_titles()
    used = sup.policy.used_bytes + sum(sup.pinned.values())
    log(
        f"cache {sup.cache.root}: {objects} objects ({used / 1e6:,.1f} MB of "
        f"{config.capacity_bytes / 1e9:,.1f} GB) kept from before, {dropped} partial dropped; "
        f"eviction {config.eviction}"
    )
    # Bind once here so a busy port fails now, with a message, not in every worker.
    try:
        check_port(config.host, config.port)
    except OSError as exc:
        log(f"cannot listen on {config.host}:{config.port}: {exc.strerror}")
        return 2
    # The control channel: a socketpair whose other end only the workers inherit. Nothing
    # else on the machine can send to it (no name to find, unlike an abstract socket).
    keeper, channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    keeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    keeper.setblocking(False)

    def on_readable() -> None:
        while True:
            try:
                data = keeper.recv(1 << 20)
            except BlockingIOError:
                return
            sup.on_message(data)

    loop.add_reader(keeper.fileno(), on_readable)
    # Workers take SIGUSR1 as the drain notice; ignored until a worker is ready for it (an
    # ignored signal stays ignored across exec), so a notice cannot kill one still starting.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    for index in range(config.workers):
        sup.start_worker(index, channel)
    if config.tls_cert:
        log(kernel_tls_status()[1])
    log(
        f"edge {config.edge_id} (site {config.site}) serving {sup.origin.describe()} at "
        f"{config.url()} with {config.workers} workers; segment bodies by sendfile; "
        f"tokens {'required' if config.require_token else 'NOT required'}; "
        f"heartbeats {'to ' + config.control_url if config.control_url else 'off'}"
    )
    terminate = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, terminate.set)
    loop.add_signal_handler(signal.SIGINT, terminate.set)
    tasks = [
        loop.create_task(sup.watch_workers(channel)),
        loop.create_task(sup.heartbeats()),
        loop.create_task(sup.fill_loop()),
    ]
    await terminate.wait()
    # Drain: first tell the control plane, so steering moves viewers away, then stop.
    sup.draining = True
    log("draining: reporting it to the control plane, then finishing in-flight responses")
    for process in sup.processes.values():  # /healthz answers 503 from now on
        if process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGUSR1)
    async with httpx.AsyncClient(timeout=2.0) as client:
        await sup.send_heartbeat(client)
    await asyncio.sleep(config.drain_notice_s)
    for process in sup.processes.values():
        if process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + config.drain_timeout_s + 5
    while any(p.is_alive() for p in sup.processes.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for process in sup.processes.values():
        if process.is_alive():
            process.kill()
    sup.stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await sup.origin.aclose()
    loop.remove_reader(keeper.fileno())
    keeper.close()
    channel.close()
    log("drained; bye")
    return 0


def run_edge(
    config: EdgeSettings, keyring: dict[str, str], log: Callable[[str], None] | None = None
) -> int:
    """Run the edge until SIGTERM or SIGINT; returns the exit status."""

    def _print(text: str) -> None:
        print(f"streamplane edge: {text}", file=sys.stderr, flush=True)

    return asyncio.run(_main(config, keyring, log or _print))
