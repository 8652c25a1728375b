"""Routes learned over BGP: ExaBGP as an edge site's speaker, feeding a RoutingTable.

Each edge site peers with its ISP's routers. ExaBGP (from PyPI) holds the sessions; with
``encoder json`` and ``receive { parsed; update; }`` it writes one JSON object per BGP
event to its API process, which here is a relay (``_relay.py``) that forwards the lines to
a Unix socket the feed listens on. :func:`parse_exabgp_message` turns a line into
:class:`RouteChange` values (pure); :class:`BgpFeed` runs ExaBGP and applies them.

BGP semantics kept:

* An update's announcements replace the peer's previous path to each prefix; a withdrawal
  removes it. Paths from different peers of one site are kept apart, and the table uses
  the best (relation, AS path, MED), so one router withdrawing leaves the other's path.
* When a session goes down (or comes up afresh, before the peer re-sends its table), every
  path learned from that peer is dropped, as a router drops its Adj-RIB-In.
* AS path length counts each AS of an AS_SEQUENCE and an AS_SET as one (RFC 4271 9.1.2.2).
  ExaBGP's JSON labels confederation segments ``as-sequence`` too, so they count; they
  occur only inside a confederation. A missing MED is 0.
* Only IPv4 and IPv6 unicast matter; other families are ignored.

The relation (embedded, private, public) is not in BGP: it is what the site's link to that
neighbour is, configured per neighbour.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ipaddress
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec

from streamplane.steering.errors import (
    BgpError,
    BgpMessageError,
    ExabgpNotFound,
    PrefixError,
)
from streamplane.steering.model import Relation, Route, RouteChange, normalise_prefix
from streamplane.steering.rib import RoutingTable

__all__ = [
    "BgpFeed",
    "BgpNeighbor",
    "PeerSettings",
    "apply_changes",
    "exabgp_config",
    "find_exabgp",
    "parse_exabgp_message",
]

log = logging.getLogger(__name__)

_FAMILIES = frozenset({"ipv4 unicast", "ipv6 unicast"})
_PLAIN_REPLIES = frozenset({"done", "error", "shutdown"})  # text ExaBGP may interleave
_RELAY = Path(__file__).with_name("_relay.py")
_MAX_LINE = 64 * 1024 * 1024  # a full-table update can be one long line


class BgpNeighbor(msgspec.Struct, frozen=True, kw_only=True):
    """One BGP session of the site's speaker: the ISP router and how the site reaches it."""

    address: str  # the ISP router
    peer_as: int
    local_as: int
    local_address: str
    router_id: str | None = None  # defaults to local_address (IPv4) or 127.0.0.1
    relation: Relation = "public"
    passive: bool = False  # wait for the router to connect


class PeerSettings(Protocol):
    """One session as the control plane's settings hold it (``streamplane.config.BgpPeer``)."""

    @property
    def site(self) -> str: ...
    @property
    def local_address(self) -> str: ...
    @property
    def peer_address(self) -> str: ...
    @property
    def local_as(self) -> int: ...
    @property
    def peer_as(self) -> int: ...
    @property
    def port(self) -> int: ...


# -- the pure part ------------------------------------------------------------------------


def parse_exabgp_message(
    line: str | bytes,
    site: str,
    *,
    relations: Mapping[str, Relation] | None = None,
    default_relation: Relation = "public",
) -> list[RouteChange]:
    """The changes one line of ExaBGP's JSON API makes to ``site``'s routes.

    ``relations`` maps a neighbour address to the site's relation with it. Lines that are
    not about routes (keepalives, EOR, notifications, ExaBGP's own ``done``) give ``[]``.
    Raises BgpMessageError for a line that is not JSON or not in ExaBGP's layout.
    """
    text = line.strip()
    if not text or (text.decode() if isinstance(text, bytes) else text) in _PLAIN_REPLIES:
        return []
    try:
        message: Any = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise BgpMessageError(f"ExaBGP line is not JSON ({exc}): {_clip(text)}") from None
    if not isinstance(message, dict):
        raise BgpMessageError(f"ExaBGP line is not a JSON object: {_clip(text)}")
    kind = message.get("type")
    if kind not in ("state", "update"):
        return []
    neighbor = message.get("neighbor")
    if not isinstance(neighbor, dict):
        raise BgpMessageError(f"ExaBGP {kind} message without a neighbor: {_clip(text)}")
    address = neighbor.get("address")
    peer = address.get("peer") if isinstance(address, dict) else None
    if not isinstance(peer, str):
        raise BgpMessageError(f"ExaBGP {kind} message without neighbor.address.peer")
    if kind == "state":
        # A session that ends or starts afresh has no routes until the peer sends them.
        state = neighbor.get("state")
        if state == "up" or state == "down":
            return [RouteChange(action="reset", site=site, peer=peer, session=state)]
        return []
    update = (neighbor.get("message") or {}).get("update")
    if not isinstance(update, dict):
        return []  # an End-of-RIB marker, or an update with nothing for us
    relation = (relations or {}).get(peer, default_relation)
    return _update_changes(update, site, peer, relation)


def _update_changes(
    update: dict[str, Any], site: str, peer: str, relation: Relation
) -> list[RouteChange]:
    changes: list[RouteChange] = []
    withdraw = update.get("withdraw") or {}
    if not isinstance(withdraw, dict):
        raise BgpMessageError(f"update from {peer}: 'withdraw' is not an object")
    for family, nlris in withdraw.items():
        if family in _FAMILIES:
            for prefix in _prefixes(nlris, peer):
                changes.append(RouteChange(action="withdraw", site=site, peer=peer, prefix=prefix))
    announce = update.get("announce") or {}
    if not isinstance(announce, dict):
        raise BgpMessageError(f"update from {peer}: 'announce' is not an object")
    attributes = update.get("attribute") or {}
    as_path = _as_path(attributes.get("as-path"), peer)
    med = attributes.get("med", 0)
    if isinstance(med, bool) or not isinstance(med, int) or med < 0:
        raise BgpMessageError(f"update from {peer}: MED {med!r} is not a non-negative integer")
    for family, by_next_hop in announce.items():
        if family not in _FAMILIES:
            continue
        if not isinstance(by_next_hop, dict):
            raise BgpMessageError(f"update from {peer}: announce[{family!r}] is not an object")
        for next_hop, nlris in by_next_hop.items():
            for prefix in _prefixes(nlris, peer):
                route = Route(
                    prefix=prefix,
                    site=site,
                    as_path=as_path,
                    med=med,
                    relation=relation,
                    source="bgp",
                    peer=peer,
                    next_hop=next_hop,
                )
                changes.append(
                    RouteChange(action="announce", site=site, peer=peer, prefix=prefix, route=route)
                )
    return changes


def _prefixes(nlris: Any, peer: str) -> list[str]:
    if not isinstance(nlris, list):
        raise BgpMessageError(f"update from {peer}: expected a list of NLRI, got {nlris!r}")
    out = []
    for nlri in nlris:
        # {"nlri": "p"} by default, a bare "p" with exabgp.api.compact
        text = nlri.get("nlri") if isinstance(nlri, dict) else nlri
        if not isinstance(text, str):
            raise BgpMessageError(f"update from {peer}: NLRI {nlri!r} has no prefix")
        try:
            out.append(normalise_prefix(text))
        except PrefixError as exc:
            raise BgpMessageError(f"update from {peer}: {exc}") from None
    return out


def _as_path(value: Any, peer: str) -> tuple[int, ...]:
    """The AS path as a tuple whose length is the BGP path length: an AS_SET counts as one
    AS, so it is represented by its lowest member."""
    if value is None:
        return ()
    if isinstance(value, list):  # ExaBGP 4: a flat list of ASNs
        segments: Iterable[Any] = [{"element": "as-sequence", "value": value}]
    elif isinstance(value, dict):  # ExaBGP 5: {"0": {"element": ..., "value": [...]}, ...}
        segments = [value[k] for k in sorted(value, key=lambda k: int(k))]
    else:
        raise BgpMessageError(f"update from {peer}: as-path {value!r} is not understood")
    path: list[int] = []
    for segment in segments:
        asns = segment.get("value") if isinstance(segment, dict) else None
        if not isinstance(asns, list) or not all(
            isinstance(a, int) and not isinstance(a, bool) for a in asns
        ):
            raise BgpMessageError(f"update from {peer}: as-path segment {segment!r}")
        if segment.get("element") == "as-set":
            if asns:
                path.append(min(asns))
        else:
            path.extend(asns)
    return tuple(path)


def _canonical(address: str) -> str:
    # ExaBGP names a peer by the address's canonical text; match it.
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise BgpError(f"BGP neighbour address {address!r} is not an IP address") from None


def _clip(text: str | bytes, limit: int = 200) -> str:
    shown = text if isinstance(text, str) else text.decode("utf-8", "replace")
    return shown if len(shown) <= limit else shown[:limit] + "..."


def apply_changes(table: RoutingTable, changes: Iterable[RouteChange]) -> None:
    """Make ``changes`` in ``table``: BGP paths only, keyed by the peer they came from."""
    for change in changes:
        if change.action == "announce":
            assert change.route is not None
            table.announce(change.route)
        elif change.action == "withdraw":
            assert change.prefix is not None
            table.withdraw(change.site, change.prefix, source="bgp", peer=change.peer)
        else:
            table.clear(site=change.site, source="bgp", peer=change.peer)


def exabgp_config(neighbors: Sequence[BgpNeighbor], *, process: str, command: str) -> str:
    """ExaBGP's configuration: the sessions, and ``command`` as the JSON API process."""
    if not neighbors:
        raise BgpError("a BGP feed needs at least one neighbour")
    for word in (process, command):
        if any(c in word for c in ";{}\n"):
            raise BgpError(f"cannot put {word!r} in an ExaBGP configuration")
    blocks = [
        f"process {process} {{\n  run {command};\n  encoder json;\n}}\n",
    ]
    for n in neighbors:
        router_id = n.router_id or (n.local_address if ":" not in n.local_address else "127.0.0.1")
        blocks.append(
            f"neighbor {n.address} {{\n"
            f"  router-id {router_id};\n"
            f"  local-address {n.local_address};\n"
            f"  local-as {n.local_as};\n"
            f"  peer-as {n.peer_as};\n"
            + ("  passive true;\n" if n.passive else "")
            + "  family { ipv4 unicast; ipv6 unicast; }\n"
            f"  api {{ processes [ {process} ]; neighbor-changes;\n"
            "        receive { parsed; update; } }\n"
            "}\n"
        )
    return "\n".join(blocks)


def find_exabgp(exabgp: str | os.PathLike[str] | None = None) -> Path:
    """The exabgp program: ``exabgp`` if given, else next to this Python, else on PATH."""
    if exabgp is not None:
        candidate = Path(exabgp)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
        raise ExabgpNotFound(f"ExaBGP not found at {candidate} (pip install exabgp)")
    beside = Path(sys.executable).with_name("exabgp")
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("exabgp")
    if found is None:
        raise ExabgpNotFound(
            "ExaBGP is not installed: no 'exabgp' next to "
            f"{sys.executable} or on PATH (pip install 'exabgp>=4.2')"
        )
    return Path(found)


# -- the shell ----------------------------------------------------------------------------


class BgpFeed:
    """Runs ExaBGP as ``site``'s BGP speaker and keeps ``table`` in step with what it learns.

    Use under asyncio: ``await feed.start()`` ... ``await feed.stop()``, or ``async with``.
    ``port`` is the BGP port ExaBGP listens on and connects to (179 needs privileges);
    ``bind`` the addresses it listens on (default: the neighbours' local addresses).
    Paths this feed learned are dropped when it stops or ExaBGP exits: a speaker that is not
    running knows no routes. One feed per site: that clean-up is by site and source.
    """

    def __init__(
        self,
        table: RoutingTable,
        site: str | PeerSettings,
        neighbors: Sequence[BgpNeighbor] = (),
        *,
        port: int | None = None,
        bind: Sequence[str] | None = None,
        exabgp: str | os.PathLike[str] | None = None,
        workdir: Path | None = None,
        on_changes: Callable[[list[RouteChange]], None] | None = None,
    ) -> None:
        if not isinstance(site, str):
            # One session from the settings: BgpFeed(table, settings.control.bgp[0]).
            peer = site
            site = peer.site
            port = peer.port if port is None else port
            neighbors = (
                *neighbors,
                BgpNeighbor(
                    address=peer.peer_address,
                    peer_as=peer.peer_as,
                    local_as=peer.local_as,
                    local_address=peer.local_address,
                ),
            )
        if not neighbors:
            raise BgpError(f"the BGP feed of site {site!r} needs at least one neighbour")
        self.table = table
        self.site = site
        self.neighbors = tuple(neighbors)
        self.port = 179 if port is None else port
        self.bind = (
            tuple(bind)
            if bind is not None
            else tuple(dict.fromkeys(n.local_address for n in self.neighbors))
        )
        self._exabgp = exabgp
        self._workdir = workdir
        self._own_workdir = False
        self._on_changes = on_changes
        self._relations = {_canonical(n.address): n.relation for n in self.neighbors}
        self._process: asyncio.subprocess.Process | None = None
        self._server: asyncio.Server | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._relay_connected = asyncio.Event()
        self._state_changed = asyncio.Event()
        self.established: set[str] = set()  # peers whose session is up
        self.messages = 0
        self.errors = 0
        self.last_error: str | None = None

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "exabgp.log" if self._workdir is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def __aenter__(self) -> BgpFeed:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, *, timeout: float = 15.0) -> None:
        """Start ExaBGP; returns once its API process is connected (sessions come later:
        see :meth:`wait_established`). Raises BgpError with ExaBGP's log if it fails."""
        if self._process is not None:
            raise BgpError(f"the BGP feed of site {self.site!r} is already started")
        program = find_exabgp(self._exabgp)
        if self._workdir is None:
            # Short: a Unix socket path has to fit in 108 bytes.
            self._workdir = Path(tempfile.mkdtemp(prefix="sp-bgp-"))
            self._own_workdir = True
        self._workdir.mkdir(parents=True, exist_ok=True)
        sock = self._workdir / "feed.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        for path in (sys.executable, str(_RELAY), str(sock)):
            if any(c.isspace() for c in path):
                raise BgpError(f"ExaBGP cannot run a command from a path with spaces: {path!r}")
        config = self._workdir / "exabgp.conf"
        config.write_text(
            exabgp_config(
                self.neighbors,
                process="streamplane-feed",
                command=f"{sys.executable} {_RELAY} {sock}",
            )
        )
        self._server = await asyncio.start_unix_server(
            self._on_relay, path=str(sock), limit=_MAX_LINE
        )
        env = {
            **os.environ,
            "exabgp_tcp_port": str(self.port),
            "exabgp_tcp_bind": " ".join(self.bind),
            # ExaBGP drops to 'nobody' by default, and its API process then cannot reach us.
            "exabgp_daemon_user": getpass.getuser(),
            "exabgp_daemon_daemonize": "false",
            "exabgp_api_cli": "false",
            "exabgp_api_ack": "false",
            "exabgp_log_destination": "stdout",
        }
        log_file = (self._workdir / "exabgp.log").open("wb")
        try:
            self._process = await asyncio.create_subprocess_exec(
                str(program),
                str(config),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # so stop() can end ExaBGP and its API process
            )
        finally:
            log_file.close()
        self._watcher = asyncio.create_task(self._watch(self._process))
        connected = asyncio.create_task(self._relay_connected.wait())
        done, _ = await asyncio.wait(
            {connected, self._watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if connected not in done:
            connected.cancel()
            status = self._exit_status()
            await asyncio.sleep(0.2)  # let a dying ExaBGP finish its log
            detail = self._log_tail()
            await self.stop()
            raise BgpError(
                f"ExaBGP for site {self.site!r} did not start within {timeout:g} s"
                f" ({status}); its log ends:\n{detail}"
            )

    async def wait_established(self, timeout: float = 30.0, *, peers: int | None = None) -> None:
        """Wait until ``peers`` sessions (default: all neighbours) are up."""
        want = len(self.neighbors) if peers is None else peers
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.established) < want:
            if not self.running:
                raise BgpError(
                    f"ExaBGP for site {self.site!r} exited; its log ends:\n{self._log_tail()}"
                )
            left = deadline - loop.time()
            if left <= 0:
                raise BgpError(
                    f"BGP sessions of site {self.site!r}: {len(self.established)} of {want} up "
                    f"after {timeout:g} s; ExaBGP's log ends:\n{self._log_tail()}"
                )
            self._state_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state_changed.wait(), min(left, 0.5))

    async def stop(self) -> None:
        """Stop ExaBGP, forget the paths it learned, close the socket."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._server is not None:
            self._server.close()
            for task in list(self._readers):
                task.cancel()
            await asyncio.gather(*self._readers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        self._forget()
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self._own_workdir = False

    # -- internals ----------------------------------------------------------------------

    async def _on_relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._readers.add(task)
        self._relay_connected.set()
        try:
            while line := await reader.readline():
                self._handle(line)
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            self._fail(f"reading ExaBGP's API: {exc}")
        finally:
            self._readers.discard(task)
            writer.close()

    def _handle(self, line: bytes) -> None:
        self.messages += 1
        try:
            changes = parse_exabgp_message(line, self.site, relations=self._relations)
        except BgpMessageError as exc:
            self._fail(str(exc))
            return
        for change in changes:
            if change.session == "up":
                self.established.add(change.peer)
                self._state_changed.set()
            elif change.session == "down":
                self.established.discard(change.peer)
                self._state_changed.set()
        apply_changes(self.table, changes)
        if changes and self._on_changes is not None:
            self._on_changes(changes)

    def _fail(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        log.warning("BGP feed of site %s: %s", self.site, message)

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        status = await process.wait()
        if self._process is process:  # not a stop() we asked for
            self._fail(f"ExaBGP exited with status {status}; its log ends:\n{self._log_tail()}")
            self._forget()
        self._state_changed.set()

    def _forget(self) -> None:
        for peer in self._relations:
            self.table.clear(site=self.site, source="bgp", peer=peer)
        self.established.clear()

    def _exit_status(self) -> str:
        process = self._process
        if process is None or process.returncode is None:
            return "still running"
        return f"exited with status {process.returncode}"

    def _log_tail(self, lines: int = 20) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"
