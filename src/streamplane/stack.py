"""The whole delivery path on one machine: a control plane, N edges and a realtime gateway as
real processes.

This is the embedded default of the fleet ("N edge processes on localhost ports"): the same
``streamplane control`` and ``streamplane edge`` a deployment runs, wired together with one
settings file. ``make demo``, the end-to-end tests, the browser tests and the viewer swarm all
start it the same way::

    with LocalStack(catalog=Path("catalog"), work=Path("build/stack"), edges=2) as stack:
        stack.fill(["demo-mix"])
        answer = stack.playback("demo-mix")

Steering on loopback: every edge gets a site of its own, and a coverage-zone file gives the
sites nested prefixes of 127.0.0.0/8, so a client on 127.0.0.1 is steered by longest-prefix
match like any other client, and each ranked edge comes with its reason.

Every edge gets a key of its own, as in production: the control plane's settings register
each edge id with its key, base URL and site (``[control.edges.edge-N]``), and each edge reads
only its own key from a settings file of its own (``edge-N.toml``), so every heartbeat is
signed and no edge can speak for another.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from streamplane.lifetime import child_env

__all__ = ["EdgePlace", "LocalStack", "StackError", "StackProcess"]

# Sites on loopback, each with its own prefix of 127.0.0.0/8 and a city to be in.
_SITES = (
    ("lon-1", "127.0.0.0/16", 51.51, -0.13),
    ("ams-1", "127.0.0.0/12", 52.37, 4.90),
    ("fra-1", "127.0.0.0/8", 50.11, 8.68),
    ("par-1", "127.0.0.0/8", 48.86, 2.35),
)


class StackError(RuntimeError):
    """A process of the stack did not start or answer; the message holds its log's tail."""


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on every address, chosen below the kernel's ephemeral range.

    A port the kernel hands out (bind to 0) is one it also hands out as the source port of
    outgoing connections, and a stack's many clients (database, Redis, browsers, viewers) took
    such a port between this check and the server's bind often enough to fail a test in ten.
    """
    top = min(_ephemeral_start(), 65536) - 1
    for _ in range(200):
        port = random.randint(min(10_000, top - 1000), top)
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, kind) as s:  # a crowded range: take the kernel's
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class EdgePlace:
    """An edge run off loopback: inside network namespace ``netns`` (``ip netns exec``),
    listening on ``address`` there, and reaching the control plane at ``control_host`` (the
    host's end of the link into the namespace). Its link can then be shaped with ``tc``
    without touching the host's loopback. The control plane listens on every address."""

    netns: str
    address: str
    control_host: str


@dataclass
class StackProcess:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    args: list[str] = field(default_factory=list)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int | None:
        """Signal the process; SIGKILL goes to its whole group (an edge and its workers)."""
        if self.alive():
            if sig == signal.SIGKILL:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(5)


class LocalStack:
    """Start a control plane and ``edges`` edges; stop them all on exit."""

    def __init__(
        self,
        catalog: Path,
        work: Path,
        *,
        edges: int = 2,
        edge_workers: int = 1,
        control_port: int | None = None,
        edge_ports: Sequence[int] | None = None,
        slow_start_s: float = 0.0,
        control_settings: Mapping[str, Any] | None = None,
        gateway_port: int | None = None,
        telemetry_settings: Mapping[str, Any] | None = None,
        edge_places: Mapping[int, EdgePlace] | None = None,
        edge_settings: Mapping[str, Any] | None = None,
        realtime_settings: Mapping[str, Any] | None = None,
    ) -> None:
        if not 1 <= edges <= len(_SITES):
            raise StackError(f"a local stack runs 1 to {len(_SITES)} edges, not {edges}")
        self.catalog = catalog.resolve()
        self.work = work.resolve()
        self.edge_count = edges
        self.edge_workers = edge_workers
        self.control_port = control_port or free_port()
        self.edge_ports = list(edge_ports or [free_port() for _ in range(edges)])
        self.slow_start_s = slow_start_s
        self.edge_places = dict(edge_places or {})  # edges off loopback, by index
        self.control_settings = dict(control_settings or {})  # [control] keys to override
        # [edge] keys to override: a live channel's origin URL and live_playlist_ttl_s
        self.edge_settings = dict(edge_settings or {})
        # [telemetry]: the embedded stream in the work directory unless told otherwise
        self.telemetry_settings = {
            "engine": "embedded",
            "stream_dir": str(self.work / "telemetry"),
            **(telemetry_settings or {}),
        }
        # [realtime] keys to override; the gateway polls this control plane's admission plan
        self.realtime_settings = dict(realtime_settings or {})
        self.key_hex = secrets.token_hex(32)
        self.gateway_port = gateway_port or free_port()
        self.realtime_key_hex = secrets.token_hex(32)  # shared by the control plane and gateway
        self.admin_token = secrets.token_hex(16)
        # each edge's own heartbeat key, by edge id
        self.edge_keys = {self.edge_id(i): secrets.token_hex(32) for i in range(edges)}
        self.control: StackProcess | None = None
        self.gateway: StackProcess | None = None
        self.edges: list[StackProcess] = []
        self.others: list[StackProcess] = []  # started with spawn: stopped first
        self._account: dict[str, str] | None = None

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    @property
    def gateway_url(self) -> str:
        """The realtime gateway (in-memory broker): WebSocket clients connect here."""
        return f"ws://127.0.0.1:{self.gateway_port}"

    @staticmethod
    def edge_id(index: int) -> str:
        return f"edge-{index + 1}"

    def edge_url(self, index: int) -> str:
        place = self.edge_places.get(index)
        return f"http://{place.address if place else '127.0.0.1'}:{self.edge_ports[index]}"

    # -- start and stop -----------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        settings = self._write_settings()
        self.control = self._spawn(
            "control", self.control_url, ["control", "--config", str(settings)]
        )
        self.gateway = self._spawn(
            "gateway",
            f"http://127.0.0.1:{self.gateway_port}",
            ["gateway", "--config", str(settings)],
        )
        self._wait_http(self.control, "/healthz")
        self._wait_http(self.gateway, "/health")
        for index in range(self.edge_count):
            self.start_edge(index)
        self.wait_fleet(len(self.edges))

    def start_edge(self, index: int) -> StackProcess:
        site = _SITES[index][0]
        port = self.edge_ports[index]
        edge_id = self.edge_id(index)
        args = [
            "edge",
            "--config",
            str(self._write_edge_settings(index)),
            "--id",
            edge_id,
            "--site",
            site,
            "--port",
            str(port),
            "--cache",
            str(self.work / edge_id),
            "--workers",
            str(self.edge_workers),
            "--control",
            self.control_url,
            "--no-access-log",
        ]
        place = self.edge_places.get(index)
        prefix: list[str] = []
        if place is not None:
            prefix = ["ip", "netns", "exec", place.netns]
            args[args.index("--control") + 1] = f"http://{place.control_host}:{self.control_port}"
            args += ["--host", place.address]
        process = self._spawn(edge_id, self.edge_url(index), args, prefix)
        if index < len(self.edges):
            self.edges[index] = process
        else:
            self.edges.append(process)
        self._wait_http(process, "/healthz")
        return process

    def stop(self) -> None:
        planes = [p for p in (self.control, self.gateway) if p is not None]
        for process in [*self.others, *self.edges, *planes]:
            process.stop()

    def spawn(self, name: str, url: str, args: list[str]) -> StackProcess:
        """Run ``streamplane ARGS`` beside the stack (logged to ``<work>/<name>.log``),
        stopped with it."""
        process = self._spawn(name, url, args)
        self.others.append(process)
        return process

    def _write_settings(self) -> Path:
        czmap = self.work / "czmap.json"
        zones = {
            name: {"coordinates": {"latitude": lat, "longitude": lon}, "network": [prefix]}
            for name, prefix, lat, lon in _SITES[: self.edge_count]
        }
        czmap.write_text(json.dumps({"coverageZones": zones}, indent=1))
        control = {
            "database_url": f"sqlite+aiosqlite:///{self.work / 'control.db'}",
            # edges in network namespaces reach it over their links, not loopback
            "host": "0.0.0.0" if self.edge_places else "127.0.0.1",
            "port": self.control_port,
            "catalog_dir": str(self.catalog),
            "czmap": str(czmap),
            "admin_token": self.admin_token,
            "edge_heartbeat_s": 1.0,
            "edge_timeout_s": 4.0,
            "slow_start_s": self.slow_start_s,
        }
        placement = self.catalog / "placement" / "placement.json"
        if placement.is_file():
            control["placement"] = str(placement)
        control.update(self.control_settings)
        lines = [*self._tokens_lines(), "", "[control]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in control.items()]
        for index in range(self.edge_count):
            edge_id = self.edge_id(index)
            lines += ["", f"[control.edges.{edge_id}]", f'key = "{self.edge_keys[edge_id]}"']
            lines += [f'base_url = "{self.edge_url(index)}"', f'site = "{_SITES[index][0]}"']
        lines += ["", "[realtime]"]
        realtime = {
            "token_key": self.realtime_key_hex,
            "port": self.gateway_port,
            "control_url": self.control_url,
        }
        realtime.update(self.realtime_settings)
        lines += [f"{k} = {json.dumps(v)}" for k, v in realtime.items()]
        lines += ["", "[telemetry]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.telemetry_settings.items()]
        path = self.work / "settings.toml"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)  # every edge's key
        return path

    def _tokens_lines(self) -> list[str]:
        return ["[tokens]", f'keys = {{ k1 = "{self.key_hex}" }}']

    def _write_edge_settings(self, index: int) -> Path:
        """The settings of one edge: the token keyring, and its own heartbeat key only."""
        edge_id = self.edge_id(index)
        lines = [*self._tokens_lines(), "", "[edge]"]
        settings = {
            "origin": str(self.catalog),
            "heartbeat_s": 1.0,
            "capacity_bps": 2e9,
            "drain_notice_s": 1.5,
            **self.edge_settings,
        }
        lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        lines += [f'fleet_key = "{self.edge_keys[edge_id]}"']
        if index in self.edge_places:  # /fill from the host is no loopback client there
            lines += [f'base_url = "{self.edge_url(index)}"', f'admin_token = "{self.admin_token}"']
        path = self.work / f"{edge_id}.toml"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        return path

    def _spawn(
        self, name: str, url: str, args: list[str], prefix: Sequence[str] = ()
    ) -> StackProcess:
        log = self.work / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPLANE_")}
        process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "streamplane", *args],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=child_env(env),  # it dies with this process (SIGTERM), however this one dies
            start_new_session=True,  # a Ctrl-C in the terminal reaches us; we stop them
        )
        return StackProcess(name, url, process, log, args)

    def _wait_http(self, process: StackProcess, path: str, deadline_s: float = 60) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if not process.alive():
                raise StackError(f"{process.name} exited:\n{process.tail()}")
            try:
                if httpx.get(process.url + path, timeout=1).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise StackError(f"{process.name} did not answer on {process.url}:\n{process.tail()}")

    # -- the fleet ------------------------------------------------------------------------

    def fleet(self) -> list[dict[str, Any]]:
        r = httpx.get(
            self.control_url + "/v1/fleet",
            headers={"authorization": f"Bearer {self.admin_token}"},
            timeout=5,
        )
        r.raise_for_status()
        edges = r.json()
        return list(edges["edges"] if isinstance(edges, dict) else edges)

    def wait_fleet(
        self, count: int, title: str | None = None, deadline_s: float = 60
    ) -> list[dict[str, Any]]:
        """Until ``count`` edges are offered (holding ``title``, if given)."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if title is None:
                ready = [e for e in self.fleet() if e.get("offered")]
            else:
                r = httpx.get(f"{self.control_url}/v1/titles/{title}/availability", timeout=5)
                ready = [e for e in r.json().get("edges", []) if e.get("offered")]
            if len(ready) >= count:
                return ready
            time.sleep(0.2)
        raise StackError(f"fewer than {count} edges offered after {deadline_s:.0f} s")

    def fill(self, titles: Sequence[str], deadline_s: float = 300) -> None:
        """Have every edge pull ``titles`` now (a fill plan), and wait until they hold them."""
        admin = {"authorization": f"Bearer {self.admin_token}"}  # read by edges off loopback
        for edge in self.edges:
            r = httpx.post(
                edge.url + "/fill", json={"titles": list(titles)}, headers=admin, timeout=10
            )
            r.raise_for_status()
        deadline = time.monotonic() + deadline_s
        for edge in self.edges:
            while True:
                status = httpx.get(edge.url + "/fill", headers=admin, timeout=5).json()
                if status.get("state") in ("done", "failed") and status.get("titles_total"):
                    if status["state"] == "failed":
                        raise StackError(f"{edge.name} fill failed: {status.get('errors')}")
                    break
                if time.monotonic() > deadline:
                    raise StackError(f"{edge.name} fill did not finish: {status}")
                time.sleep(0.2)
        for title in titles:
            self.wait_fleet(len(self.edges), title)

    # -- a viewer -------------------------------------------------------------------------

    def account(self) -> dict[str, str]:
        """A signed-in account (created on first use): the Authorization header to send."""
        if self._account is None:
            email = f"viewer-{secrets.token_hex(4)}@streamplane.test"
            password = secrets.token_urlsafe(16)
            body = {"email": email, "password": password, "plan": "premium"}
            httpx.post(self.control_url + "/v1/accounts", json=body, timeout=30).raise_for_status()
            r = httpx.post(
                self.control_url + "/v1/auth/login",
                json={"email": email, "password": password},
                timeout=30,
            )
            r.raise_for_status()
            self._account = {"authorization": f"Bearer {r.json()['access_token']}"}
        return self._account

    def playback(self, title: str, device: str = "demo") -> dict[str, Any]:
        r = httpx.post(
            self.control_url + "/v1/playback",
            json={"title": title, "device": device},
            headers=self.account(),
            timeout=30,
        )
        if r.status_code != 200:
            raise StackError(f"playback answered {r.status_code}: {r.text}")
        answer: dict[str, Any] = r.json()
        return answer
