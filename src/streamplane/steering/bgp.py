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

The relation (embedded, private, public, transit) is not in BGP: it is what the site's link
to that neighbour is, configured per neighbour.

Supervision (the shell, :class:`BgpFeed`): the hold time is set per neighbour (90 s unless
told, 3 s at least), so a router that hangs loses its session, and its routes, when the
hold timer expires. An ExaBGP that exits is restarted after a delay that doubles with each
quick failure, with jitter (:func:`restart_delay`), and its routes are dropped meanwhile.
ExaBGP and its API process die with the process that started them (``_tether.py``), and
the working directories of feeds whose process was killed are removed when a feed starts
(:func:`clean_stale_workdirs`). :meth:`BgpFeed.sessions` tells each session's state, and
:func:`bgp_health` / :func:`bgp_metrics` turn those into ``/healthz`` and Prometheus text.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ipaddress
import logging
import os
import random
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, Protocol

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
    "DEFAULT_HOLD_TIME_S",
    "BgpFeed",
    "BgpNeighbor",
    "PeerSettings",
    "SessionState",
    "SessionStatus",
    "apply_changes",
    "bgp_health",
    "bgp_metrics",
    "clean_stale_workdirs",
    "exabgp_config",
    "find_exabgp",
    "parse_exabgp_message",
    "restart_delay",
]

log = logging.getLogger(__name__)

_FAMILIES = frozenset({"ipv4 unicast", "ipv6 unicast"})
_PLAIN_REPLIES = frozenset({"done", "error", "shutdown"})  # text ExaBGP may interleave
_RELAY = Path(__file__).with_name("_relay.py")
_TETHER = Path(__file__).with_name("_tether.py")
_MAX_LINE = 64 * 1024 * 1024  # a full-table update can be one long line
_WORKDIR_PREFIX: Final = "sp-bgp-"  # then the owner's pid and a dash: sp-bgp-4242-k3j2x9aa

# BGP's customary hold time (keepalives every 30 s). RFC 4271 allows 0 (no keepalives, a hung
# peer is never noticed) or 3 s and more; 0 is refused here for that reason.
DEFAULT_HOLD_TIME_S: Final = 90
MIN_HOLD_TIME_S: Final = 3
MAX_HOLD_TIME_S: Final = 65535

SessionState = Literal["idle", "connecting", "established", "down"]


class BgpNeighbor(msgspec.Struct, frozen=True, kw_only=True):
    """One BGP session of the site's speaker: the ISP router and how the site reaches it."""

    address: str  # the ISP router
    peer_as: int
    local_as: int
    local_address: str
    router_id: str | None = None  # defaults to local_address (IPv4) or 127.0.0.1
    relation: Relation = "public"
    passive: bool = False  # wait for the router to connect
    # seconds without a message from the router before its session, and its routes, go
    hold_time: int = DEFAULT_HOLD_TIME_S


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
    @property
    def relation(self) -> Relation: ...
    @property
    def hold_time_s(self) -> int: ...


class SessionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One BGP session as the feed sees it now (``GET /v1/fleet/bgp`` lists these).

    ``state``: ``idle`` (the feed is not started), ``connecting`` (ExaBGP runs, the session
    is not up), ``established``, or ``down`` (ExaBGP exited and waits to be restarted).
    ``since`` is when the session entered that state (epoch seconds); ``restarts`` how many
    times the feed restarted its ExaBGP; ``prefixes`` how many prefixes the router's paths
    cover in the routing table now; ``last_error`` why it is not established, if known.
    """

    site: str
    address: str
    peer_as: int
    local_address: str
    local_as: int
    relation: Relation
    hold_time_s: int
    state: SessionState
    since: float | None
    restarts: int
    prefixes: int
    last_error: str | None = None


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
        if state == "up":
            return [RouteChange(action="reset", site=site, peer=peer, session="up")]
        if state == "down":
            reason = neighbor.get("reason")
            return [
                RouteChange(
                    action="reset",
                    site=site,
                    peer=peer,
                    session="down",
                    reason=_explain_reason(reason) if isinstance(reason, str) and reason else None,
                )
            ]
        return []
    update = (neighbor.get("message") or {}).get("update")
    if not isinstance(update, dict):
        return []  # an End-of-RIB marker, or an update with nothing for us
    relation = (relations or {}).get(peer, default_relation)
    return _update_changes(update, site, peer, relation)


# BGP NOTIFICATION error codes (RFC 4271 4.5) and Cease subcodes (RFC 4486): ExaBGP says
# only "notification sent (4,0)" when a session ends on one.
_NOTIFICATIONS: Final[dict[int, str]] = {
    1: "message header error",
    2: "OPEN message error",
    3: "UPDATE message error",
    4: "hold timer expired",
    5: "finite state machine error",
    6: "cease",
}
_CEASES: Final[dict[int, str]] = {
    1: "maximum number of prefixes reached",
    2: "administrative shutdown",
    3: "peer de-configured",
    4: "administrative reset",
    5: "connection rejected",
    6: "other configuration change",
    7: "connection collision resolution",
    8: "out of resources",
}
_NOTIFICATION = re.compile(r"notification (?:sent|received) \((\d+),\s*(\d+)\)")


def _explain_reason(reason: str) -> str:
    """ExaBGP's reason for a session going down, with a NOTIFICATION's code named."""
    found = _NOTIFICATION.search(reason)
    if found is None:
        return reason
    code, subcode = int(found[1]), int(found[2])
    name = _NOTIFICATIONS.get(code)
    if name is None:
        return reason
    if code == 6 and subcode in _CEASES:
        name += f": {_CEASES[subcode]}"
    return f"{reason}: {name}"


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
    for n in neighbors:
        _check_hold_time(n)
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
            f"  hold-time {n.hold_time};\n"
            + ("  passive true;\n" if n.passive else "")
            + "  family { ipv4 unicast; ipv6 unicast; }\n"
            f"  api {{ processes [ {process} ]; neighbor-changes;\n"
            "        receive { parsed; update; } }\n"
            "}\n"
        )
    return "\n".join(blocks)


def _check_hold_time(n: BgpNeighbor) -> None:
    if (
        isinstance(n.hold_time, bool)
        or not isinstance(n.hold_time, int)
        or not MIN_HOLD_TIME_S <= n.hold_time <= MAX_HOLD_TIME_S
    ):
        raise BgpError(
            f"BGP neighbour {n.address}: hold time {n.hold_time!r} is not a whole number of "
            f"seconds from {MIN_HOLD_TIME_S} to {MAX_HOLD_TIME_S} (BGP's usual: 90 or 180)"
        )


def restart_delay(failures: int, jitter: float, *, base: float = 1.0, cap: float = 60.0) -> float:
    """Seconds to wait before restarting a speaker that failed ``failures`` times in a row
    (0: the first failure after a stable run), given ``jitter`` drawn from [0, 1).

    The delay doubles with each failure up to ``cap``, and is drawn from its upper half, so
    speakers that failed together (every feed of a machine that lost its network) do not
    restart together, and none restarts at once in a tight loop.
    """
    ceiling = cap if failures >= 64 else min(cap, base * 2.0**failures)
    return ceiling / 2 + min(max(jitter, 0.0), 1.0) * ceiling / 2


def bgp_health(sessions: Sequence[SessionStatus]) -> dict[str, Any]:
    """What ``/healthz`` says of the BGP sessions: ``ok`` when every one is established,
    else ``degraded``, with a sentence per session that is not."""
    problems = []
    for s in sessions:
        if s.state != "established":
            why = f": {s.last_error.splitlines()[0]}" if s.last_error else ""
            problems.append(f"site {s.site}, peer {s.address}: {s.state}{why}")
    out: dict[str, Any] = {
        "status": "degraded" if problems else "ok",
        "sessions": len(sessions),
        "established": sum(s.state == "established" for s in sessions),
        "prefixes": sum(s.prefixes for s in sessions),
    }
    if problems:
        out["problems"] = problems
    return out


_STATES: Final[tuple[SessionState, ...]] = ("idle", "connecting", "established", "down")


def bgp_metrics(sessions: Sequence[SessionStatus]) -> str:
    """The sessions as Prometheus text (exposition format 0.0.4)."""
    lines: list[str] = []

    def family(name: str, kind: str, text: str, rows: Iterable[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{{{labels}}} {value:g}" for labels, value in rows)

    labels = [
        (s, f'site="{_label(s.site)}",peer="{_label(s.address)}",peer_as="{s.peer_as}"')
        for s in sessions
    ]
    family(
        "streamplane_bgp_session_up",
        "gauge",
        "1 if the BGP session is established, else 0.",
        ((ls, float(s.state == "established")) for s, ls in labels),
    )
    family(
        "streamplane_bgp_session_state",
        "gauge",
        "1 for the state the BGP session is in.",
        (
            (f'{ls},state="{state}"', float(s.state == state))
            for s, ls in labels
            for state in _STATES
        ),
    )
    family(
        "streamplane_bgp_prefixes",
        "gauge",
        "Prefixes the router's paths cover in the routing table.",
        ((ls, float(s.prefixes)) for s, ls in labels),
    )
    family(
        "streamplane_bgp_speaker_restarts_total",
        "counter",
        "Times the session's ExaBGP was restarted after it exited.",
        ((ls, float(s.restarts)) for s, ls in labels),
    )
    family(
        "streamplane_bgp_hold_time_seconds",
        "gauge",
        "The hold time the session is configured with.",
        ((ls, float(s.hold_time_s)) for s, ls in labels),
    )
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def clean_stale_workdirs(directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove the working directories feeds left behind in ``directory`` (the temporary
    directory by default) when their process was killed before it could: those named for
    a pid that no longer runs, owned by this user. Returns the ones removed."""
    base = Path(directory if directory is not None else tempfile.gettempdir())
    removed = []
    for path in base.glob(f"{_WORKDIR_PREFIX}*-*"):
        owner = path.name[len(_WORKDIR_PREFIX) :].partition("-")[0]
        if not owner.isdigit() or int(owner) == os.getpid() or _alive(int(owner)):
            continue
        try:
            info = path.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log.info("removed %s, left by process %s, which is gone", path, owner)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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

    Once started, the feed supervises ExaBGP: if it exits, it is started again after
    :func:`restart_delay` (``restart_base_s`` doubling per quick failure up to
    ``restart_cap_s``; a run of ``stable_s`` or more resets the doubling), ``restarts``
    counts them, and :meth:`sessions` tells each session's state. Start and stop the feed
    from one thread that outlives it (the event loop's): ExaBGP is tied to that thread, and
    dies with it (see ``_tether.py``).
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
        restart_base_s: float = 1.0,
        restart_cap_s: float = 60.0,
        stable_s: float = 60.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
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
                    relation=peer.relation,
                    hold_time=peer.hold_time_s,
                ),
            )
        if not neighbors:
            raise BgpError(f"the BGP feed of site {site!r} needs at least one neighbour")
        for n in neighbors:
            _check_hold_time(n)
        self.table = table
        self.site = site
        self.neighbors = tuple(neighbors)
        self.port = 179 if port is None else port
        self.bind = (
            tuple(bind)
            if bind is not None
            else tuple(dict.fromkeys(n.local_address for n in self.neighbors))
        )
        self.restart_base_s = restart_base_s
        self.restart_cap_s = restart_cap_s
        self.stable_s = stable_s
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._exabgp = exabgp
        self._program: Path | None = None
        self._timeout = 15.0
        self._workdir = workdir
        self._own_workdir = False
        self._on_changes = on_changes
        self._peers = {_canonical(n.address): n for n in self.neighbors}
        self._relations = {peer: n.relation for peer, n in self._peers.items()}
        self._process: asyncio.subprocess.Process | None = None
        self._spawned_at = 0.0
        self._server: asyncio.Server | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._relay_connected = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._speaker: Literal["idle", "running", "down"] = "idle"
        self._stopping = False
        self._failures = 0  # quick failures in a row
        self._states: dict[str, tuple[SessionState, float | None]] = {
            peer: ("idle", None) for peer in self._peers
        }
        self._down_reasons: dict[str, str] = {}
        self.established: set[str] = set()  # peers whose session is up
        self.restarts = 0  # ExaBGP restarted after exiting on its own
        self.next_restart_at: float | None = None  # epoch seconds, while one is pending
        self.messages = 0
        self.errors = 0
        self.last_error: str | None = None

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "exabgp.log" if self._workdir is not None else None

    @property
    def workdir(self) -> Path | None:
        return self._workdir

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        """ExaBGP's process id while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    async def __aenter__(self) -> BgpFeed:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, *, timeout: float = 15.0) -> None:
        """Start ExaBGP and supervise it; returns once its API process is connected
        (sessions come later: see :meth:`wait_established`). Raises BgpError with ExaBGP's
        log if this first start fails: a configuration it refuses is not retried."""
        if self._server is not None:
            raise BgpError(f"the BGP feed of site {self.site!r} is already started")
        self._program = find_exabgp(self._exabgp)
        self._timeout = timeout
        if self._workdir is None:
            clean_stale_workdirs()
            # Short (a Unix socket path has to fit in 108 bytes), and named for this
            # process, so that a later start can tell it was left behind.
            self._workdir = Path(tempfile.mkdtemp(prefix=f"{_WORKDIR_PREFIX}{os.getpid()}-"))
            self._own_workdir = True
        self._workdir.mkdir(parents=True, exist_ok=True)
        sock = self._workdir / "feed.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        for path in (sys.executable, str(_RELAY), str(_TETHER), str(sock)):
            if any(c.isspace() for c in path):
                raise BgpError(f"ExaBGP cannot run a command from a path with spaces: {path!r}")
        config = self._workdir / "exabgp.conf"
        config.write_text(
            exabgp_config(
                self.neighbors,
                process="streamplane-feed",
                # Through the tether: the relay dies with ExaBGP, which does not kill it.
                command=f"{sys.executable} -I -S {_TETHER} - {sys.executable} {_RELAY} {sock}",
            )
        )
        self._server = await asyncio.start_unix_server(
            self._on_relay, path=str(sock), limit=_MAX_LINE
        )
        try:
            await self._spawn()
        except BaseException:
            await self.stop()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name=f"bgp-{self.site}")

    async def wait_established(self, timeout: float = 30.0, *, peers: int | None = None) -> None:
        """Wait until ``peers`` sessions (default: all neighbours) are up, through restarts."""
        want = len(self.neighbors) if peers is None else peers
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.established) < want:
            if self._server is None:
                raise BgpError(f"the BGP feed of site {self.site!r} is not started")
            left = deadline - loop.time()
            if left <= 0:
                detail = f"; last error: {self.last_error}" if self.last_error else ""
                raise BgpError(
                    f"BGP sessions of site {self.site!r}: {len(self.established)} of {want} up "
                    f"after {timeout:g} s{detail}; ExaBGP's log ends:\n{self._log_tail()}"
                )
            self._state_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state_changed.wait(), left)

    def sessions(self) -> list[SessionStatus]:
        """Every session of this feed: its state, since when, and what it taught."""
        out = []
        for peer, n in self._peers.items():
            state, since = self._states[peer]
            error = None
            if state == "down":
                error = self.last_error
            elif state == "connecting":
                error = self._down_reasons.get(peer)
            out.append(
                SessionStatus(
                    site=self.site,
                    address=peer,
                    peer_as=n.peer_as,
                    local_address=n.local_address,
                    local_as=n.local_as,
                    relation=n.relation,
                    hold_time_s=n.hold_time,
                    state=state,
                    since=since,
                    restarts=self.restarts,
                    prefixes=self.table.count_paths(site=self.site, source="bgp", peer=peer),
                    last_error=error,
                )
            )
        return out

    async def stop(self) -> None:
        """Stop supervising and ExaBGP, forget the paths it learned, close the socket."""
        self._stopping = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        process, self._process = self._process, None
        if process is not None:
            await _end(process)
        if self._server is not None:
            self._server.close()
            await self._drop_readers()
            await self._server.wait_closed()
            self._server = None
        self._forget()
        self._speaker = "idle"
        self._stopping = False
        self.next_restart_at = None
        self._settle_states()
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self._own_workdir = False

    # -- internals ----------------------------------------------------------------------

    async def _spawn(self) -> None:
        """Run ExaBGP once; returns when its API process has connected, or raises BgpError
        (ExaBGP stopped, with the end of its log)."""
        assert self._workdir is not None and self._program is not None
        self._relay_connected.clear()
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
        tether = [sys.executable, "-I", "-S", str(_TETHER), str(os.getpid())]
        log_file = (self._workdir / "exabgp.log").open("wb")
        try:
            process = await asyncio.create_subprocess_exec(
                *tether,
                str(self._program),
                str(self._workdir / "exabgp.conf"),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # so that stop() ends ExaBGP with its group
            )
        finally:
            log_file.close()
        self._process = process
        self._spawned_at = asyncio.get_running_loop().time()
        connected = asyncio.create_task(self._relay_connected.wait())
        exited = asyncio.create_task(process.wait())
        try:
            done, _ = await asyncio.wait(
                {connected, exited}, timeout=self._timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            connected.cancel()
            exited.cancel()
        if connected not in done:
            status = (
                f"exited with status {process.returncode}"
                if process.returncode is not None
                else f"did not start within {self._timeout:g} s"
            )
            await _end(process)  # its log is complete once it has ended
            self._process = None
            raise BgpError(
                f"ExaBGP for site {self.site!r} {status}; its log ends:\n{self._log_tail()}"
            )
        self._speaker = "running"
        self._settle_states()

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            process = self._process
            assert process is not None
            status = await process.wait()
            ran = loop.time() - self._spawned_at
            self._process = None
            # Lines the dead speaker's relay still had in flight must not add routes back.
            await self._drop_readers()
            self._fail(f"ExaBGP exited with status {status}; its log ends:\n{self._log_tail()}")
            self._forget()
            self._speaker = "down"
            self._settle_states()
            self._failures = 0 if ran >= self.stable_s else self._failures + 1
            while True:
                delay = restart_delay(
                    max(self._failures - 1, 0),
                    self._rng.random(),
                    base=self.restart_base_s,
                    cap=self.restart_cap_s,
                )
                self.next_restart_at = self._clock() + delay
                log.warning(
                    "BGP feed of site %s: restarting ExaBGP in %.1f s (restart %d)",
                    self.site,
                    delay,
                    self.restarts + 1,
                )
                await asyncio.sleep(delay)
                self.restarts += 1
                try:
                    await self._spawn()
                except (BgpError, OSError) as exc:
                    self._fail(f"restart {self.restarts} failed: {exc}")
                    self._failures += 1
                    continue
                break
            self.next_restart_at = None
            log.info("BGP feed of site %s: ExaBGP restarted (restart %d)", self.site, self.restarts)

    async def _drop_readers(self) -> None:
        for task in list(self._readers):
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

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
        settle = False
        for change in changes:
            if change.session == "up":
                self.established.add(change.peer)
                self._down_reasons.pop(change.peer, None)
                settle = True
            elif change.session == "down":
                was_up = change.peer in self.established
                self.established.discard(change.peer)
                if change.reason:
                    self._down_reasons[change.peer] = change.reason
                    # A session lost is news; another failed attempt to connect is not.
                    log.log(
                        logging.WARNING if was_up and not self._stopping else logging.DEBUG,
                        "BGP session of site %s with %s down: %s",
                        self.site,
                        change.peer,
                        change.reason,
                    )
                settle = True
        apply_changes(self.table, changes)
        if settle:
            self._settle_states()
        if changes and self._on_changes is not None:
            self._on_changes(changes)

    def _settle_states(self) -> None:
        """Give each session the state the speaker and its messages put it in, noting when
        it changed."""
        now: float | None = None
        for peer in self._peers:
            if self._speaker == "running":
                state: SessionState = "established" if peer in self.established else "connecting"
            else:
                state = "idle" if self._speaker == "idle" else "down"
            if self._states[peer][0] != state:
                now = self._clock() if now is None else now
                self._states[peer] = (state, now)
        self._state_changed.set()

    def _fail(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        log.warning("BGP feed of site %s: %s", self.site, message)

    def _forget(self) -> None:
        for peer in self._peers:
            self.table.clear(site=self.site, source="bgp", peer=peer)
        self.established.clear()

    def _log_tail(self, lines: int = 20) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"


async def _end(process: asyncio.subprocess.Process) -> None:
    """End ExaBGP (its process group) and wait for it: SIGTERM, then SIGKILL after 5 s."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
