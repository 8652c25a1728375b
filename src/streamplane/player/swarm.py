"""The swarm: N headless viewers against a control plane and its edges, and what they saw.

`run_swarm(config)` checks the control plane knows the title and the plan, then starts the
viewers over `ramp_s` wall seconds, all in one asyncio loop, sharing one HTTP connection pool
(one per source address). Each viewer is a `player.viewer.Viewer`: its own playback session,
its own ABR object, optionally its own network trace.

Accounts. The control plane's screens limit is real: an account of `plan` may play on as many
devices at once as the plan allows (4 for premium). The swarm creates ceil(N / screens)
accounts, lazily (an account is made when its first viewer starts, so creation follows the
ramp), and gives each of its viewers a device of its own.

Source addresses. Steering ranks edges by the client's address (longest prefix first). On one
machine every viewer comes from 127.0.0.1, so every viewer gets the same first edge; with
`sources` the viewers connect from those local addresses in turn (on Linux any 127.x.y.z is
this machine), so a local stack's coverage zones send them to different edges, as clients of
different networks would be.

Quality of experience is reported twice as well: from the viewers' own ledgers, and from the
control plane's QoS aggregates (``GET /v1/qos``, which needs the admin token: ``admin_token``),
per edge and for the title over the minutes of the run. The aggregates are built from the
heartbeats the control plane took, so they show what it (and steering) saw; they count every
viewer of the title in those minutes, not only the swarm's.

Edge load is counted twice: by the viewers (body bytes and requests per edge) and by each
edge's own `/metrics` (`streamplane_edge_bytes_sent_total`, `streamplane_edge_requests_total`),
as the difference between a scrape when the swarm first meets the edge and one after the run.
Edges write their counters once a second, so the last scrape waits `metrics_wait_s`; other
traffic to the edges during the run is counted too.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import msgspec

from streamplane.player.abr import ALGORITHMS
from streamplane.player.errors import PlayerError
from streamplane.player.headless import (
    EdgeLoad,
    Ledger,
    Playout,
    SwarmSummary,
    ViewerResult,
    parse_edge_metrics,
    percentile,
    summarise,
    viewer_result,
)
from streamplane.player.traces import TRACE_KINDS, Trace, load_trace, load_trace_dir, trace_set
from streamplane.player.viewer import Viewer, ViewerConfig, ViewerError, sign_in

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = [
    "QosFigures",
    "SwarmConfig",
    "SwarmError",
    "SwarmReport",
    "SwarmStatus",
    "encode_report",
    "load_traces",
    "report_tables",
    "run_swarm",
    "run_swarm_live",
]


LAG_WARNING_S = 0.05  # the swarm's loop running later than this (p99) makes its QoE suspect


class SwarmError(PlayerError):
    """The swarm cannot run: bad settings, the control plane is down, the title is unknown."""


class SwarmConfig(msgspec.Struct, frozen=True):
    control_url: str
    title: str
    viewers: int
    abr: str = "streamplane"
    ramp_s: float = 0.0  # wall seconds over which the viewers start, evenly
    speed: float = 1.0  # session seconds per wall second (media plays this much faster)
    traces: str | None = None  # 3g | lte | broadband | mixed | a trace file | a folder of them
    duration_s: float | None = None  # media seconds each viewer watches; None: the title once
    max_buffer_s: float = 30.0
    audio: bool = True
    sources: tuple[str, ...] = ()  # local addresses to connect from, in turn
    plan: str = "premium"
    seed: int = 0
    request_timeout_s: float = 5.0
    max_connections: int = 4096  # per pool
    viewers_per_pool: int = 25  # viewers sharing one connection pool (see _pools)
    account_concurrency: int = 4  # sign-ups in flight (argon2 is the control plane's cost)
    metrics_wait_s: float = 1.5


class SwarmStatus(msgspec.Struct, frozen=True):
    viewers: int
    waiting: int
    starting: int
    playing: int
    rebuffering: int
    done: int
    failed: int
    bytes: int
    failovers: int
    elapsed_s: float


class QosFigures(msgspec.Struct, frozen=True):
    """The control plane's aggregates over the run, for one edge or the title."""

    of: str  # "edge <id>" or "title <id>"
    viewers: int  # the peak of any one period
    startups: int
    startup_p50_s: float | None
    startup_p95_s: float | None
    rebuffer_ratio: float | None
    mean_bitrate_kbps: float | None
    switches: int
    errors: int


class SwarmReport(msgspec.Struct, frozen=True):
    config: SwarmConfig
    accounts: int
    started_at: float  # epoch seconds
    wall_s: float
    loop_lag_p99_s: float  # how late the swarm's own event loop woke: its saturation
    loop_lag_max_s: float
    summary: SwarmSummary
    edges: list[EdgeLoad]
    viewers: list[ViewerResult]
    qos: list[QosFigures] = []  # from the control plane's aggregates
    qos_note: str | None = None  # why there are none


# --- settings ----------------------------------------------------------------------------------


def load_traces(spec: str, count: int, seed: int) -> list[Trace]:
    """`count` traces (one per viewer, reused in turn if fewer): generated from `seed` for a
    kind (3g, lte, broadband, or mixed: the three in turn), or read from a file or folder."""
    kinds = TRACE_KINDS if spec == "mixed" else tuple(k for k in TRACE_KINDS if k == spec)
    if kinds:
        traces: list[Trace] = []
        sets = {k: trace_set(k, math.ceil(count / len(kinds)), seed) for k in kinds}
        for i in range(count):
            traces.append(sets[kinds[i % len(kinds)]][i // len(kinds)])
        return traces
    path = Path(spec)
    if path.is_dir():
        found = load_trace_dir(path)
        if not found:
            raise SwarmError(f"{path}: no traces in this folder")
        return found
    if path.is_file():
        return [load_trace(path)]
    raise SwarmError(
        f"--traces {spec!r} is neither a kind ({', '.join(TRACE_KINDS)}, mixed) nor a trace"
        " file or folder"
    )


def _check(c: SwarmConfig) -> None:
    problems = []
    if c.viewers < 1:
        problems.append(f"viewers must be at least 1, not {c.viewers}")
    if c.abr not in ALGORITHMS:
        problems.append(f"no ABR algorithm {c.abr!r}; choose one of {', '.join(ALGORITHMS)}")
    if not (c.speed > 0 and math.isfinite(c.speed)):
        problems.append(f"speed must be a positive number, not {c.speed}")
    if not (c.ramp_s >= 0 and math.isfinite(c.ramp_s)):
        problems.append(f"ramp must be 0 s or more, not {c.ramp_s}")
    if c.duration_s is not None and not (c.duration_s > 0 and math.isfinite(c.duration_s)):
        problems.append(f"duration must be a positive number of seconds, not {c.duration_s}")
    if not c.max_buffer_s > 0:
        problems.append(f"max buffer must be positive, not {c.max_buffer_s}")
    if not c.control_url.startswith(("http://", "https://")):
        problems.append(f"the control plane URL must be http(s)://…, not {c.control_url!r}")
    if problems:
        raise SwarmError("; ".join(problems))


# --- the run -----------------------------------------------------------------------------------


class _Accounts:
    """ceil(N / screens) accounts of the plan, each created when its first viewer needs it."""

    def __init__(
        self, client: httpx.AsyncClient, control_url: str, plan: str, concurrency: int
    ) -> None:
        self.client = client
        self.control_url = control_url.rstrip("/")
        self.plan = plan
        self.run = secrets.token_hex(4)
        self.limit = asyncio.Semaphore(max(concurrency, 1))
        self.made: dict[int, asyncio.Task[dict[str, str]]] = {}

    def get(self, index: int) -> asyncio.Task[dict[str, str]]:
        if index not in self.made:
            self.made[index] = asyncio.create_task(self._create(index))
        return self.made[index]

    async def _create(self, index: int) -> dict[str, str]:
        email = f"swarm-{self.run}-{index}@streamplane.test"
        password = secrets.token_urlsafe(18)
        async with self.limit:
            try:
                r = await self.client.post(
                    self.control_url + "/v1/accounts",
                    json={"email": email, "password": password, "plan": self.plan},
                    timeout=120,
                )
            except httpx.HTTPError as exc:
                raise ViewerError(f"cannot create an account: {type(exc).__name__}") from None
            if r.status_code not in (200, 201):
                raise ViewerError(f"account {email} refused: {r.status_code} {r.text[:200]}")
            return await sign_in(self.client, self.control_url, email, password, timeout=120)


class _Edges:
    """The edges the viewers were offered, and their /metrics at first sight."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.base_urls: dict[str, str] = {}
        self.baseline: dict[str, asyncio.Task[tuple[int, int] | str]] = {}

    async def scrape(self, base_url: str) -> tuple[int, int] | str:
        try:
            r = await self.client.get(base_url.rstrip("/") + "/metrics", timeout=3)
        except httpx.HTTPError as exc:
            return f"/metrics unreachable ({type(exc).__name__})"
        if r.status_code != 200:
            return f"/metrics answered {r.status_code}"
        return parse_edge_metrics(r.text)

    async def seen(self, edges: Sequence[Mapping[str, Any]]) -> None:
        waits = []
        for e in edges:
            edge_id, base = str(e["edge_id"]), str(e["base_url"])
            if edge_id not in self.baseline:
                self.base_urls[edge_id] = base
                self.baseline[edge_id] = asyncio.create_task(self.scrape(base))
            waits.append(self.baseline[edge_id])
        await asyncio.gather(*waits)


def _failed(index: int, error: str, source: str | None) -> ViewerResult:
    return viewer_result(
        index, Playout(1.0, 1.0), Ledger(), session_id=None, error=error, source=source
    )


async def _preflight(client: httpx.AsyncClient, c: SwarmConfig) -> int:
    """The title exists and the plan's screens; or a SwarmError saying what is wrong."""
    base = c.control_url.rstrip("/")
    try:
        title = await client.get(f"{base}/v1/titles/{c.title}", timeout=10)
        plans = await client.get(f"{base}/v1/plans", timeout=10)
    except httpx.HTTPError as exc:
        raise SwarmError(
            f"cannot reach the control plane at {c.control_url}: {type(exc).__name__} {exc}"
        ) from None
    if title.status_code == 404:
        raise SwarmError(f"the control plane at {c.control_url} has no title {c.title!r}")
    if title.status_code != 200 or plans.status_code != 200:
        bad = title if title.status_code != 200 else plans
        raise SwarmError(
            f"the control plane at {c.control_url} answered {bad.status_code} to {bad.url}"
        )
    try:
        screens = int(plans.json()[c.plan]["screens"])
    except (KeyError, TypeError, ValueError):
        raise SwarmError(
            f"the control plane at {c.control_url} has no plan {c.plan!r}"
            f" (it has {', '.join(plans.json())})"
        ) from None
    if screens < 1:
        raise SwarmError(f"plan {c.plan!r} allows no screens")
    return screens


def _pools(c: SwarmConfig, sources: Sequence[str | None]) -> list[list[httpx.AsyncClient]]:
    """Connection pools per source address, each shared by `viewers_per_pool` viewers.

    Viewers share pools as a browser's tabs share one, but not all of them one pool: httpcore
    scans every connection of a pool on each request, so one pool of a thousand connections
    spends the load generator's CPU on bookkeeping instead of requests."""
    per_source = math.ceil(c.viewers / len(sources))
    count = max(math.ceil(per_source / max(c.viewers_per_pool, 1)), 1)
    limits = httpx.Limits(max_connections=c.max_connections, max_keepalive_connections=1024)
    return [
        [
            httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(limits=limits, local_address=src),
                trust_env=False,  # straight to the stack: no proxy from the environment
            )
            for _ in range(count)
        ]
        for src in sources
    ]


async def run_swarm(
    config: SwarmConfig,
    on_status: Callable[[SwarmStatus], None] | None = None,
    status_every_s: float = 0.25,
    *,
    admin_token: str | None = None,
) -> SwarmReport:
    """Run the swarm to the end (every viewer finished or failed) and report; with the
    control plane's ``admin_token``, its QoS aggregates over the run too."""
    _check(config)
    c = config
    traces = load_traces(c.traces, c.viewers, c.seed) if c.traces else []
    sources: Sequence[str | None] = c.sources or (None,)
    clients = _pools(c, sources)
    started_at, t0 = time.time(), time.monotonic()
    try:
        first = clients[0][0]
        screens = await _preflight(first, c)
        accounts = _Accounts(first, c.control_url, c.plan, c.account_concurrency)
        edges = _Edges(first)
        viewers: list[Viewer | None] = [None] * c.viewers
        results: list[ViewerResult | None] = [None] * c.viewers

        async def one(k: int) -> None:
            source = sources[k % len(sources)]
            if c.ramp_s > 0:
                await asyncio.sleep(k * c.ramp_s / c.viewers)
            try:
                auth = await accounts.get(k // screens)
                vc = ViewerConfig(
                    control_url=c.control_url,
                    title=c.title,
                    abr=c.abr,
                    device=f"swarm-{accounts.run}-{k}",
                    speed=c.speed,
                    max_buffer_s=c.max_buffer_s,
                    duration_s=c.duration_s,
                    audio=c.audio,
                    trace=traces[k % len(traces)] if traces else None,
                    request_timeout_s=c.request_timeout_s,
                )
                viewer = Viewer(
                    clients[k % len(sources)][k // len(sources) // c.viewers_per_pool],
                    vc,
                    auth,
                    index=k,
                    source=source,
                    on_edges=edges.seen,
                )
            except ViewerError as exc:
                results[k] = _failed(k, str(exc), source)
                return
            viewers[k] = viewer
            results[k] = await viewer.run()

        def status() -> SwarmStatus:
            counts = {
                s: 0 for s in ("waiting", "starting", "playing", "rebuffering", "done", "failed")
            }
            moved = failovers = 0
            for k, v in enumerate(viewers):
                if v is None:
                    counts["failed" if results[k] is not None else "waiting"] += 1
                    continue
                counts[v.status] += 1
                moved += v.ledger.bytes
                failovers += v.ledger.failovers
            return SwarmStatus(
                viewers=c.viewers,
                bytes=moved,
                failovers=failovers,
                elapsed_s=time.monotonic() - t0,
                **counts,
            )

        async def report_status() -> None:
            while on_status is not None:
                on_status(status())
                await asyncio.sleep(status_every_s)

        lags: list[float] = []

        async def measure_lag() -> None:
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.05)
                lags.append(time.monotonic() - before - 0.05)

        reporter = asyncio.create_task(report_status())
        lagger = asyncio.create_task(measure_lag())
        try:
            await asyncio.gather(*(one(k) for k in range(c.viewers)))
        finally:
            reporter.cancel()
            lagger.cancel()
        if on_status is not None:
            on_status(status())
        wall = time.monotonic() - t0
        await asyncio.sleep(c.metrics_wait_s)
        finals = {e: await edges.scrape(url) for e, url in edges.base_urls.items()}
        done = [r for r in results if r is not None]
        loads = _edge_loads(done, edges.base_urls, viewers, edges.baseline, finals)
        qos, qos_note = await _aggregates(
            first, c, admin_token, sorted(edges.base_urls), started_at, time.time()
        )
        return SwarmReport(
            qos=qos,
            qos_note=qos_note,
            config=c,
            accounts=len(accounts.made),
            started_at=started_at,
            wall_s=wall,
            loop_lag_p99_s=percentile(lags, 99) or 0.0,
            loop_lag_max_s=max(lags, default=0.0),
            summary=summarise(done),
            edges=loads,
            viewers=done,
        )
    finally:
        for pools in clients:
            for client in pools:
                await client.aclose()


async def _aggregates(
    client: httpx.AsyncClient,
    c: SwarmConfig,
    admin_token: str | None,
    edge_ids: Sequence[str],
    since: float,
    until: float,
) -> tuple[list[QosFigures], str | None]:
    """The control plane's QoS over [since, until] for the title and each edge seen."""
    if not admin_token:
        return [], "not read: give the control plane's admin token (--admin-token)"
    out: list[QosFigures] = []
    url = c.control_url.rstrip("/") + "/v1/qos"
    for of, params in [
        (f"title {c.title}", {"title": c.title}),
        *((f"edge {e}", {"edge": e}) for e in edge_ids),
    ]:
        try:
            r = await client.get(
                url,
                params={**params, "since": since, "until": until + 1},
                headers={"authorization": f"Bearer {admin_token}"},
            )
        except httpx.HTTPError as exc:
            return out, f"GET /v1/qos failed: {_why_http(exc)}"
        if r.status_code != 200:
            return out, f"GET /v1/qos answered {r.status_code}: {r.text[:200]}"
        total = r.json().get("total")
        if total:
            out.append(
                QosFigures(
                    of=of,
                    **{f: total.get(f) for f in QosFigures.__struct_fields__ if f != "of"},
                )
            )
    return out, None if out else "the control plane has no aggregates for the run yet"


def _why_http(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _edge_loads(
    results: Sequence[ViewerResult],
    base_urls: Mapping[str, str],
    viewers: Sequence[Viewer | None],
    baseline: Mapping[str, asyncio.Task[tuple[int, int] | str]],
    finals: Mapping[str, tuple[int, int] | str],
) -> list[EdgeLoad]:
    loads = []
    for edge_id, base in sorted(base_urls.items()):
        before = baseline[edge_id].result() if baseline[edge_id].done() else "not scraped"
        after = finals.get(edge_id, "not scraped")
        m_bytes = m_requests = None
        note = None
        if isinstance(before, tuple) and isinstance(after, tuple):
            m_bytes, m_requests = after[0] - before[0], after[1] - before[1]
        else:
            note = after if isinstance(after, str) else str(before)
        loads.append(
            EdgeLoad(
                edge_id=edge_id,
                base_url=base,
                first_choice=sum(v is not None and v.first_edge == edge_id for v in viewers),
                finished_on=sum(r.ok and r.edge == edge_id for r in results),
                bytes=sum(r.edge_bytes.get(edge_id, 0) for r in results),
                requests=sum(r.edge_requests.get(edge_id, 0) for r in results),
                errors=sum(r.edge_errors.get(edge_id, 0) for r in results),
                metrics_bytes=m_bytes,
                metrics_requests=m_requests,
                metrics_note=note,
            )
        )
    return loads


# --- showing it --------------------------------------------------------------------------------


def encode_report(report: SwarmReport) -> bytes:
    return msgspec.json.format(msgspec.json.encode(report), indent=2)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def run_swarm_live(
    config: SwarmConfig, console: Console, admin_token: str | None = None
) -> SwarmReport:
    """`run_swarm` with a live progress line on `console`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]swarm[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("", total=config.viewers)

        def show(s: SwarmStatus) -> None:
            bar.update(
                task,
                completed=s.done + s.failed,
                description=(
                    f"waiting {s.waiting} · starting {s.starting} · playing {s.playing}"
                    f" · rebuffering {s.rebuffering} · failed {s.failed}"
                    f" · {_mb(s.bytes)} · failovers {s.failovers}"
                ),
            )

        return asyncio.run(run_swarm(config, show, admin_token=admin_token))


def report_tables(report: SwarmReport) -> list[RenderableType]:
    """The QoE percentiles, the session counts and the edge load, as rich tables."""
    from rich.table import Table
    from rich.text import Text

    c, s = report.config, report.summary
    out: list[RenderableType] = []

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    qoe = Table(
        title=(
            f"{c.title}: {s.viewers} viewers, {c.abr}, speed {c.speed:g}x"
            + (f", traces {c.traces}" if c.traces else "")
            + f" ({s.finished} finished)"
        )
    )
    for col in ("", "mean", "p10", "p50", "p90", "p99"):
        qoe.add_column(col, justify="left" if not col else "right")
    rows = [
        ("startup s", s.startup_s, ".2f", 1.0),
        ("rebuffer %", s.rebuffer_ratio, ".2f", 100.0),
        ("avg bitrate kbps", s.avg_bitrate_kbps, ",.0f", 1.0),
        ("avg VMAF", s.avg_vmaf, ".1f", 1.0),
    ]
    if s.latency_p50_s.count:  # a live channel: each viewer's latency to the live edge
        rows += [
            ("latency to live s, median", s.latency_p50_s, ".2f", 1.0),
            ("latency to live s, p95", s.latency_p95_s, ".2f", 1.0),
        ]
    for label, d, fmt, scale in rows:
        qoe.add_row(
            label,
            *(
                num(None if x is None else x * scale, fmt)
                for x in (d.mean, d.p10, d.p50, d.p90, d.p99)
            ),
        )
    out.append(qoe)

    counts = Table(title="sessions", show_header=False)
    counts.add_column("what")
    counts.add_column("value", justify="right")
    for what, value in (
        ("finished / failed", f"{s.finished} / {s.failed}"),
        ("stalls (viewers who stalled)", f"{s.rebuffer_events} ({s.viewers_rebuffered})"),
        ("switches", str(s.switches)),
        ("failovers", str(s.failovers)),
        ("abandoned requests", str(s.abandoned)),
        ("errors", str(s.errors)),
        ("requests / received", f"{s.requests:,} / {_mb(s.bytes)}"),
        ("heartbeats ok / sent", f"{s.heartbeats_ok} / {s.heartbeats_sent}"),
        ("accounts", str(report.accounts)),
        ("wall time", f"{report.wall_s:.1f} s"),
        (
            "swarm loop lag p99 / max",
            f"{1000 * report.loop_lag_p99_s:.0f} / {1000 * report.loop_lag_max_s:.0f} ms",
        ),
    ):
        counts.add_row(what, value)
    out.append(counts)

    load = Table(title="edge load: the viewers' accounting, and the edge's /metrics in the run")
    for col in (
        "edge",
        "ranked 1st",
        "ended on",
        "received",
        "requests",
        "errors",
        "sent",
        "responses",
    ):
        load.add_column(col, justify="left" if col == "edge" else "right", no_wrap=col == "edge")
    for e in report.edges:
        load.add_row(
            e.edge_id,
            str(e.first_choice),
            str(e.finished_on),
            _mb(e.bytes),
            f"{e.requests:,}",
            str(e.errors),
            _mb(e.metrics_bytes) if e.metrics_bytes is not None else (e.metrics_note or "-"),
            f"{e.metrics_requests:,}" if e.metrics_requests is not None else "-",
        )
    out.append(load)
    qos = Table(
        title="quality of experience as the control plane aggregated it (every viewer in"
        " the run's minutes)"
    )
    for col in ("of", "peak viewers", "startups", "startup p50 / p95 s", "rebuffer %"):
        qos.add_column(col, justify="left" if col == "of" else "right", no_wrap=col == "of")
    for col in ("avg bitrate kbps", "switches", "errors"):
        qos.add_column(col, justify="right")
    for q in report.qos:
        qos.add_row(
            q.of,
            str(q.viewers),
            str(q.startups),
            f"{num(q.startup_p50_s, '.2f')} / {num(q.startup_p95_s, '.2f')}",
            num(None if q.rebuffer_ratio is None else 100 * q.rebuffer_ratio, ".2f"),
            num(q.mean_bitrate_kbps, ",.0f"),
            str(q.switches),
            str(q.errors),
        )
    if report.qos:
        out.append(qos)
    if report.qos_note:
        out.append(Text(f"control plane QoS aggregates: {report.qos_note}", style="yellow"))
    if report.loop_lag_p99_s > LAG_WARNING_S:
        out.append(
            Text(
                f"warning: the swarm's own event loop ran {1000 * report.loop_lag_p99_s:.0f} ms"
                " late (p99): it was short of CPU, so its QoE figures are pessimistic; run"
                " fewer viewers, a lower --speed, or several swarms",
                style="yellow",
            )
        )
    for message, n in sorted(s.failures.items(), key=lambda kv: -kv[1]):
        out.append(Text(f"{n} viewer(s) failed: {message}", style="red"))
    return out
