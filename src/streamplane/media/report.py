"""The report a person reads after an encode: three figures, a markdown summary, an HTML page.

It shows whether the per-shot ladder earned its compute: the title's rate-quality curve against
the baselines (with BD-rates), each shot's encode matrix and hull with the points the rungs took,
and the ladder itself with the quantiser every rung chose for every shot.

Figures are drawn on `matplotlib.figure.Figure` with an explicit Agg canvas rather than through
pyplot: nothing global (the backend, pyplot's figure registry) changes, so writing a report
inside a notebook, a GUI process or a Dask worker neither switches its backend nor leaks
figures. The markdown and HTML are rendered from one list of sections so their tables agree.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamplane.media.bdrate import BdRate
from streamplane.media.fastpath import GridPoint, grid_point
from streamplane.media.hull import RatePoint
from streamplane.media.ladder import shot_hulls
from streamplane.media.title import Rung, ShotChoice, Title
from streamplane.reporting import PAGE_CSS, Table, figure, html_table, markdown_table

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TITLE_PNG = "rate_quality_title.png"
SHOTS_PNG = "rate_quality_shots.png"
LADDER_PNG = "ladder.png"
LADDER_MD = "ladder.md"
INDEX_HTML = "index.html"

NOT_MEASURED = "not measured"

_SHIPPED = "#d62728"
_FIXED = "#1f77b4"
_FIXED_QP = "#2ca02c"
_MIXED = "#9467bd"
_CONSTANT_QP = "#8c564b"
_HULL = "#222222"


@dataclass(frozen=True)
class FixedRung:
    width: int
    height: int
    target_kbps: int
    bitrate_bps: float  # measured
    vmaf: float


@dataclass(frozen=True)
class ReportData:
    title: Title
    matrix: tuple[ShotChoice, ...]  # every measured matrix point
    shot_seconds: tuple[float, ...]  # duration of each shot, for bitrate = bits / seconds
    mixed: tuple[tuple[float, float], ...]  # (bitrate_bps, vmaf) of a mixed-resolution ladder
    fixed_ladder: tuple[FixedRung, ...]  # the baseline: Apple's fixed ladder; may be empty
    fixed_qp: tuple[tuple[float, float], ...]  # (bitrate_bps, vmaf) whole-title fixed CRF
    bd_vs_fixed_ladder: BdRate | None
    bd_vs_fixed_qp: BdRate | None
    bd_mixed_vs_shipped: BdRate | None
    mode: str  # "fast" or "full"
    encodes_run: int
    cpu_seconds: dict[str, float]  # by stage, e.g. {"matrix": 120.5, "final": 60.2}
    # (bitrate_bps, vmaf) of whole-title constant-QP encodes (x264/x265 -qp), hull across sizes
    constant_qp: tuple[tuple[float, float], ...] = ()
    bd_vs_constant_qp: BdRate | None = None
    # the points of `matrix` whose bits and VMAF the fast path predicted rather than encoded
    predicted: frozenset[GridPoint] = frozenset()


@dataclass(frozen=True)
class GridMark:
    """One grid point as the per-shot figure draws it: filled if encoded, hollow if predicted."""

    shot: int
    width: int
    height: int
    quantiser: int
    kbps: float
    vmaf: float
    predicted: bool


def grid_marks(data: ReportData) -> list[GridMark]:
    """Every grid point of the matrix, each marked measured or predicted: what the per-shot
    figure draws, so a predicted point never passes for an encode."""
    unknown = data.predicted - {grid_point(p) for p in data.matrix}
    if unknown:
        raise ValueError(
            f"{len(unknown)} predicted points are not in the matrix, e.g. {min(unknown)}"
        )
    return [
        GridMark(
            p.shot,
            p.width,
            p.height,
            p.quantiser,
            p.bits / data.shot_seconds[p.shot] / 1000,
            p.vmaf,
            grid_point(p) in data.predicted,
        )
        for p in data.matrix
    ]


def write_report(data: ReportData, directory: Path) -> list[Path]:
    """Write the figures, `ladder.md` and `index.html` into `directory`; return their paths."""
    if len(data.shot_seconds) != len(data.title.shots):
        raise ValueError(
            f"{len(data.shot_seconds)} shot durations for {len(data.title.shots)} shots"
        )
    if any(s <= 0 for s in data.shot_seconds):
        raise ValueError("every shot needs a positive duration")
    if not all(0 <= p.shot < len(data.shot_seconds) for p in data.matrix):
        raise ValueError("a matrix point names a shot the title does not have")
    directory.mkdir(parents=True, exist_ok=True)
    sections = _sections(data)
    written = [
        _draw_title_curves(data, directory / TITLE_PNG),
        _draw_shot_curves(data, directory / SHOTS_PNG),
        _draw_ladder(data, directory / LADDER_PNG),
    ]
    md = directory / LADDER_MD
    md.write_text(_markdown(data, sections), encoding="utf-8")
    page = directory / INDEX_HTML
    page.write_text(_html(data, sections), encoding="utf-8")
    return [*written, md, page]


# ---------------------------------------------------------------------------------------------
# figures


def _text(s: str) -> str:
    # A pair of "$" in a title name would otherwise be typeset as mathtext.
    return s.replace("$", r"\$")


def _kbps(v: float, _pos: object = None) -> str:
    return f"{v:,.0f}" if v >= 10 else f"{v:g}"


def _log_kbps_axis(ax: Axes, values: Sequence[float], compact: bool = False) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return
    lo, hi = min(positive), max(positive)
    # At least a 2.6x span, so one of the 1-2-5 ticks always falls inside and is labelled.
    pad = max(1.15, math.sqrt(2.6 / (hi / lo)))
    ax.set_xlim(lo / pad, hi * pad)
    decades = math.log10(hi * pad / (lo / pad))
    subs: tuple[float, ...] = (1.0, 2.0, 5.0)
    if compact and decades > 1.6:
        subs = (1.0, 3.0) if decades <= 2.5 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(_kbps))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(float(s) for s in range(1, 10))))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _size_colours(sizes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], str]:
    import matplotlib
    from matplotlib.colors import to_hex

    palette = matplotlib.colormaps["tab10"]
    ordered = sorted(set(sizes), key=lambda s: (-s[1], -s[0]))
    return {s: to_hex(palette(i % 10)) for i, s in enumerate(ordered)}


def _bd_line(label: str, bd: BdRate | None) -> str:
    if bd is None:
        return f"{label}: {NOT_MEASURED}"
    return f"{label}: {_percent(bd.percent)} BD-rate (overlap {_share(bd.overlap)})"


def _bd_lines(data: ReportData) -> list[str]:
    return [
        _bd_line("per-shot ladder vs fixed ladder", data.bd_vs_fixed_ladder),
        _bd_line("per-shot ladder vs fixed CRF", data.bd_vs_fixed_qp),
        _bd_line("per-shot ladder vs constant QP", data.bd_vs_constant_qp),
        _bd_line("mixed resolution vs per-shot ladder", data.bd_mixed_vs_shipped),
    ]


def _draw_title_curves(data: ReportData, path: Path) -> Path:
    rungs = sorted(data.title.rungs, key=lambda r: r.average_bitrate_bps)
    fixed = sorted(data.fixed_ladder, key=lambda f: f.bitrate_bps)
    qp = sorted(data.fixed_qp)
    constant_qp = sorted(data.constant_qp)
    mixed = sorted(data.mixed)
    # (points as (bps, VMAF), line format, style): drawn in this order, the shipped ladder on top
    curves: list[tuple[list[tuple[float, float]], str, dict[str, Any]]] = [
        (qp, "-", dict(marker=".", ms=5, lw=1.4, color=_FIXED_QP,
                       label="fixed CRF, whole title (from the matrix)")),
        (constant_qp, "-^", dict(ms=5, lw=1.4, color=_CONSTANT_QP,
                       label="constant QP, whole-title encodes")),
        ([(f.bitrate_bps, f.vmaf) for f in fixed], "-s", dict(ms=6, lw=1.6, color=_FIXED,
                       label="fixed ladder (Apple), whole-title encodes")),
        (mixed, "--", dict(marker="d", ms=5, lw=1.6, color=_MIXED,
                       label="mixed resolution per shot (predicted)")),
        ([(r.average_bitrate_bps, r.vmaf) for r in rungs], "-o", dict(ms=7, lw=2.4,
                       color=_SHIPPED, zorder=5, label="per-shot ladder (shipped)")),
    ]  # fmt: skip
    with figure(path, 10, 6.6) as fig:
        ax = fig.add_subplot()
        xs: list[float] = []
        for points, fmt, style in curves:
            if points:
                x = [r / 1000 for r, _ in points]
                ax.plot(x, [q for _, q in points], fmt, **style)
                xs += x
        if not rungs:
            ax.text(0.5, 0.5, "no rungs", transform=ax.transAxes, ha="center", color="grey")
        _log_kbps_axis(ax, xs)
        ax.set_xlabel("average bitrate (kbps, log scale)")
        ax.set_ylabel("VMAF")
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", axis="x", alpha=0.12)
        if xs:
            ax.legend(loc="lower right", framealpha=0.9)
        fig.suptitle(f"{_text(data.title.title)}: rate vs quality", fontweight="bold")
        ax.set_title("\n".join(_bd_lines(data)), loc="left", fontsize=9.5, color="#333333")
        _label_rungs(fig, ax, rungs)
    return path


# Where a rung's resolution label goes, in order of preference. Up and to the left of a rising
# rate-quality curve is empty (no encode beats the hull there); the baselines run below it.
_LABEL_PLACES = (
    ((-7, 7), "right", "bottom"),
    ((7, -7), "left", "top"),
    ((0, 10), "center", "bottom"),
    ((0, -10), "center", "top"),
)


def _label_rungs(fig: Figure, ax: Axes, rungs: Sequence[Rung]) -> None:
    """Label each rung with its resolution where the label covers no other label.

    A rung whose label fits nowhere goes unlabelled: the tables name every rung anyway.
    """
    from matplotlib.transforms import Bbox

    fig.draw_without_rendering()  # settles the layout, so extents measured now hold
    taken: list[Bbox] = []
    for r in rungs:
        for offset, ha, va in _LABEL_PLACES:
            label = ax.annotate(
                f"{r.width}x{r.height}",
                (r.average_bitrate_bps / 1000, r.vmaf),
                xytext=offset,
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=8.5,
                color=_SHIPPED,
                zorder=6,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
            )
            label.set_in_layout(False)
            box = label.get_window_extent().expanded(1.05, 1.15)
            if not any(box.overlaps(t) for t in taken):
                taken.append(box)
                break
            label.remove()


def _draw_shot_curves(data: ReportData, path: Path) -> Path:
    from matplotlib.lines import Line2D

    n = len(data.title.shots)
    # Wider rows for long titles keep the picture from growing taller than a screen can scroll.
    ncols = max(1, min(n, 5 if n <= 30 else 8))
    nrows = max(1, math.ceil(n / ncols))
    sizes = sorted({(p.width, p.height) for p in data.matrix}, key=lambda s: (-s[1], -s[0]))
    colours = _size_colours(sizes)
    by_size = {s: shot_hulls(data.matrix, n, s) for s in sizes}
    overall = shot_hulls(data.matrix, n, None)
    marks: dict[int, list[GridMark]] = defaultdict(list)
    for m in grid_marks(data):
        marks[m.shot].append(m)
    chosen: dict[int, list[tuple[Rung, ShotChoice]]] = defaultdict(list)
    for rung in data.title.rungs:
        for c in rung.shots:
            chosen[c.shot].append((rung, c))

    # Past six rungs the labels pile onto each other in a small plot; the ends still orient.
    rungs = data.title.rungs
    labelled = {r.id for r in rungs} if len(rungs) <= 6 else {rungs[0].id, rungs[-1].id}
    width = max(7.0, 3.4 * ncols)
    with figure(path, width, 2.75 * nrows + 1.3) as fig:
        grid = fig.subplots(nrows, ncols, squeeze=False)
        for i in range(nrows * ncols):
            ax = grid[i // ncols][i % ncols]
            if i >= n:
                ax.set_axis_off()
                continue
            seconds = data.shot_seconds[i]

            def kbps(bits: float, seconds: float = seconds) -> float:
                return bits / seconds / 1000

            xs: list[float] = []
            for size in sizes:
                mine = [m for m in marks[i] if (m.width, m.height) == size]
                if not mine:
                    continue
                for predicted in (False, True):
                    drawn = [m for m in mine if m.predicted == predicted]
                    if drawn:
                        ax.scatter(
                            [m.kbps for m in drawn],
                            [m.vmaf for m in drawn],
                            s=18,
                            facecolors="none" if predicted else colours[size],
                            edgecolors=colours[size],
                            alpha=0.85,
                            linewidths=0.9 if predicted else 0,
                            zorder=3,
                        )
                xs += [m.kbps for m in mine]
                _hull_line(ax, by_size[size][i], kbps, color=colours[size], lw=1.0, alpha=0.45)
            _hull_line(ax, overall[i], kbps, color=_HULL, lw=2.0, alpha=0.9)
            for rung, c in chosen[i]:
                x0 = kbps(c.bits)
                xs.append(x0)
                ax.scatter(
                    [x0],
                    [c.vmaf],
                    s=70,
                    facecolors="none",
                    edgecolors="black",
                    linewidths=1.3,
                    zorder=5,
                )
                if rung.id in labelled:
                    ax.annotate(
                        _text(rung.id[:6]),
                        (x0, c.vmaf),
                        xytext=(-4, 4),
                        textcoords="offset points",
                        ha="right",
                        va="bottom",
                        fontsize=7,
                        zorder=6,
                    )
            if not xs:
                ax.text(0.5, 0.5, "no encodes", transform=ax.transAxes, ha="center", color="grey")
            _log_kbps_axis(ax, xs, compact=True)
            ax.grid(True, which="major", alpha=0.3)
            # Per-axes labels, not fig.supxlabel: that would collide with the legend below.
            if i + ncols >= n:
                ax.set_xlabel("bitrate of the shot (kbps, log)")
            if i % ncols == 0:
                ax.set_ylabel("VMAF")
            ax.set_title(f"shot {data.title.shots[i].index} · {seconds:.1f} s", fontsize=9.5)
        handles = [
            Line2D([], [], ls="", marker="o", ms=5, color=colours[s], label=f"{s[0]}x{s[1]}")
            for s in sizes
        ]
        if data.predicted:
            handles.append(
                Line2D([], [], ls="", marker="o", ms=5, mfc="none", mec="grey", label="predicted")
            )
        handles.append(Line2D([], [], color="grey", lw=1, alpha=0.6, label="hull, one resolution"))
        handles.append(Line2D([], [], color=_HULL, lw=2, label="hull, all resolutions"))
        handles.append(
            Line2D(
                [],
                [],
                ls="",
                marker="o",
                ms=8,
                mfc="none",
                mec="black",
                label="a rung's choice (final encode)",
            )
        )
        # Below the plots: at the top, constrained layout lets the legend overlap the suptitle.
        lines = math.ceil(len(handles) / max(1, int(width / 2.1)))
        ncol = math.ceil(len(handles) / lines)
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False)
        fig.suptitle(f"{_text(data.title.title)}: encodes per shot", fontweight="bold")
    return path


def _hull_line(
    ax: Axes,
    hull: Sequence[RatePoint[ShotChoice]],
    kbps: Callable[[float], float],
    *,
    color: str,
    lw: float,
    alpha: float,
) -> None:
    if len(hull) < 2:
        return
    ax.plot(
        [kbps(p.bits) for p in hull],
        [p.quality for p in hull],
        "-",
        color=color,
        lw=lw,
        alpha=alpha,
        zorder=4,
    )


def _draw_ladder(data: ReportData, path: Path) -> Path:
    import matplotlib
    import numpy as np
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    rungs = data.title.rungs
    n_rungs = max(1, len(rungs))
    n_shots = max(1, len(data.title.shots))
    bars_w = 6.8
    heat_w = min(16.0, max(3.2, 0.42 * n_shots + 1.6))
    height = max(3.2, 0.55 * n_rungs + 1.9)
    with figure(path, bars_w + heat_w, height) as fig:
        bars, heat = fig.subplots(1, 2, width_ratios=[bars_w, heat_w], sharey=True)
        ys = list(range(len(rungs)))
        peak = [r.peak_bitrate_bps / 1000 for r in rungs]
        avg = [r.average_bitrate_bps / 1000 for r in rungs]
        bars.barh(ys, peak, height=0.62, color=_SHIPPED, alpha=0.22, label="peak")
        bars.barh(ys, avg, height=0.62, color=_SHIPPED, alpha=0.85, label="average")
        top = max(peak + avg, default=1.0)
        for y, r, a, p in zip(ys, rungs, avg, peak, strict=True):
            bars.text(
                max(a, p) + top * 0.02,
                y,
                f"{a:,.0f} kbps (peak {p:,.0f}) · VMAF {r.vmaf:.1f}",
                va="center",
                fontsize=8.5,
            )
        # Room on the right for the longest label at the top rung.
        bars.set_xlim(0, top * 1.75)
        bars.set_yticks(ys, [_text(f"{r.id}  {r.width}x{r.height}") for r in rungs])
        bars.set_ylim(-0.6, max(len(rungs), 1) - 0.4)
        bars.xaxis.set_major_formatter(FuncFormatter(_kbps))
        bars.set_xlabel("bitrate (kbps)")
        bars.set_title("rungs: average and peak bitrate", loc="left")
        bars.grid(True, axis="x", alpha=0.3)
        if rungs:
            bars.legend(loc="lower right", framealpha=0.9)

        q = np.full((max(len(rungs), 1), n_shots), np.nan)
        for y, r in enumerate(rungs):
            for c in r.shots:
                if 0 <= c.shot < n_shots:
                    q[y, c.shot] = c.quantiser
        cmap = matplotlib.colormaps["viridis_r"]
        finite = q[np.isfinite(q)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if hi - lo < 1:
            lo, hi = lo - 1, hi + 1  # one quantiser everywhere still gets a colour scale
        image = heat.imshow(
            q, aspect="auto", origin="lower", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest"
        )
        if n_shots <= 40:
            small = 8 if n_shots <= 20 else 6.5
            for (y, x), v in np.ndenumerate(q):
                if np.isfinite(v):
                    shade = cmap((v - lo) / (hi - lo))
                    light = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] > 0.55
                    heat.text(
                        x,
                        y,
                        f"{v:.0f}",
                        ha="center",
                        va="center",
                        fontsize=small,
                        color="black" if light else "white",
                    )
        step = max(1, math.ceil(n_shots / 30))
        heat.set_xticks(
            range(0, n_shots, step),
            [str(s.index) for s in data.title.shots][::step] or ["0"],
        )
        heat.tick_params(axis="y", left=False)
        heat.set_xlabel("shot")
        heat.set_title("quantiser (CRF) each rung chose per shot", loc="left")
        for side in ("top", "right", "left", "bottom"):
            heat.spines[side].set_visible(False)
        bar = fig.colorbar(image, ax=heat, shrink=0.9, pad=0.02, fraction=0.08)
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
        bar.set_label("CRF (lower = more bits)")
        fig.suptitle(f"{_text(data.title.title)}: the ladder", fontweight="bold")
    return path


# ---------------------------------------------------------------------------------------------
# tables: one model, rendered to markdown and HTML


@dataclass(frozen=True)
class _Section:
    heading: str
    paragraphs: tuple[str, ...] = ()
    table: Table | None = None


def _percent(p: float) -> str:
    return f"{p:+.1f} %"


def _share(x: float) -> str:
    return f"{100 * x:.0f} %"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fps(rate: str) -> str:
    num, _, den = rate.partition("/")
    try:
        return f"{int(num) / int(den or 1):.3f}".rstrip("0").rstrip(".")
    except (ValueError, ZeroDivisionError):
        return rate


def _quantisers(rung: Rung, n_shots: int) -> str:
    by_shot = {c.shot: c.quantiser for c in rung.shots}
    return "/".join(str(by_shot[i]) if i in by_shot else "?" for i in range(n_shots))


def _predicted_note(data: ReportData) -> str:
    if not data.predicted:
        return ""
    return (
        f" {len(data.predicted)} of {len(data.matrix)} grid points were predicted from the "
        "probes, not encoded (hollow in the per-shot figure)."
    )


def _sections(data: ReportData) -> list[_Section]:
    t = data.title
    n_shots = len(t.shots)
    ladder = Table(
        (
            "rung",
            "resolution",
            "codec",
            "average kbps",
            "peak kbps",
            "VMAF mean",
            "VMAF harmonic",
            "PSNR-Y dB",
            "CRF per shot",
        ),
        tuple(
            (
                r.id,
                f"{r.width}x{r.height}",
                r.codec_string,
                f"{r.average_bitrate_bps / 1000:,.0f}",
                f"{r.peak_bitrate_bps / 1000:,.0f}",
                f"{r.vmaf:.2f}",
                f"{r.vmaf_harmonic:.2f}",
                f"{r.psnr_y:.2f}",
                _quantisers(r, n_shots),
            )
            for r in t.rungs
        ),
        right=frozenset({3, 4, 5, 6, 7}),
    )
    sections = [
        _Section(
            "Ladder",
            (
                f"{_count(len(t.rungs), 'rung')}, {_count(n_shots, 'shot')}, "
                f"{t.duration_s:.1f} s; source {t.width}x{t.height} at {_fps(t.frame_rate)} fps; "
                f"{data.mode} mode. "
                "Each rung keeps one resolution; per shot it takes the encode on that shot's "
                "convex hull at the rung's common slope, so CRF varies from shot to shot."
                + _predicted_note(data),
            ),
            ladder,
        )
    ]
    if data.fixed_ladder:
        fixed = Table(
            ("resolution", "target kbps", "measured kbps", "VMAF"),
            tuple(
                (
                    f"{f.width}x{f.height}",
                    f"{f.target_kbps:,}",
                    f"{f.bitrate_bps / 1000:,.0f}",
                    f"{f.vmaf:.2f}",
                )
                for f in data.fixed_ladder
            ),
            right=frozenset({1, 2, 3}),
        )
        sections.append(
            _Section(
                "Fixed ladder (baseline)",
                ("Apple's HLS ladder, each rung one whole-title encode, scored the same way.",),
                fixed,
            )
        )
    else:
        sections.append(
            _Section(
                "Fixed ladder (baseline)", (f"{NOT_MEASURED.capitalize()}: no baseline encodes.",)
            )
        )

    if data.constant_qp:
        sections.append(
            _Section(
                "Constant-QP anchor",
                (
                    "Whole-title encodes at the encoder's constant quantiser (-qp: one QP for "
                    "every frame, no adaptive quantisation), at each resolution the ladder ships, "
                    "the upper hull across them: the fixed-QP anchor of Netflix's dynamic "
                    "optimizer paper.",
                ),
                Table(
                    ("kbps", "VMAF"),
                    tuple((f"{b / 1000:,.0f}", f"{q:.2f}") for b, q in sorted(data.constant_qp)),
                    right=frozenset({0, 1}),
                ),
            )
        )

    def bd_row(name: str, bd: BdRate | None) -> tuple[str, ...]:
        if bd is None:
            return (name, NOT_MEASURED, "", "")
        if abs(bd.percent) < 0.05:
            meaning = "the same bits at equal VMAF"
        else:
            less = "fewer" if bd.percent < 0 else "more"
            meaning = f"{abs(bd.percent):.1f} % {less} bits at equal VMAF"
        return (name, _percent(bd.percent), _share(bd.overlap), meaning)

    sections.append(
        _Section(
            "BD-rate",
            (
                "BD-rate is the mean bitrate difference between two rate-quality curves at equal "
                "quality: log bitrate is interpolated over VMAF with PCHIP (piecewise cubic "
                "Hermite) on each curve's upper hull and integrated over the VMAF range both "
                "curves cover. Negative means the first curve needs fewer bits for the same "
                "quality. Overlap is the share of the narrower curve's VMAF range that both "
                "cover; a small overlap makes the figure an extrapolation.",
            ),
            Table(
                ("comparison", "BD-rate", "overlap", "meaning"),
                (
                    bd_row("per-shot ladder vs fixed ladder", data.bd_vs_fixed_ladder),
                    bd_row("per-shot ladder vs fixed CRF", data.bd_vs_fixed_qp),
                    bd_row("per-shot ladder vs constant QP", data.bd_vs_constant_qp),
                    bd_row(
                        "mixed resolution vs per-shot ladder (both predicted from the matrix)",
                        data.bd_mixed_vs_shipped,
                    ),
                ),
                right=frozenset({1, 2}),
            ),
        )
    )
    cpu = sorted(data.cpu_seconds.items(), key=lambda kv: -kv[1])
    total = sum(v for _, v in cpu)
    cpu_text = f"{total:,.1f} CPU seconds in all" if cpu else f"CPU time {NOT_MEASURED}"
    sections.append(
        _Section(
            "Compute",
            (f"{_count(data.encodes_run, 'encode')} run; {cpu_text}.",),
            Table(
                ("stage", "CPU seconds", "share"),
                tuple(
                    (stage, f"{sec:,.1f}", _share(sec / total) if total > 0 else "")
                    for stage, sec in cpu
                ),
                right=frozenset({1, 2}),
            )
            if cpu
            else None,
        )
    )
    return sections


def _markdown(data: ReportData, sections: Sequence[_Section]) -> str:
    out = [f"# {data.title.title}: encoding report", ""]
    out += [f"![rate vs quality]({TITLE_PNG})", ""]
    for s in sections:
        out += [f"## {s.heading}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        if s.table is not None:
            out += [*markdown_table(s.table), ""]
        if s.heading == "Ladder":
            out += [f"![the ladder]({LADDER_PNG})", ""]
    out += [f"![encode matrix per shot]({SHOTS_PNG})", ""]
    return "\n".join(out)


def _html(data: ReportData, sections: Sequence[_Section]) -> str:
    e = html.escape
    name = e(data.title.title)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{name}: encoding report</title>",
        f"<style>{PAGE_CSS}</style></head><body>",
        f"<h1>{name}: encoding report</h1>",
        f'<img src="{TITLE_PNG}" alt="rate vs quality of the whole title">',
    ]
    for s in sections:
        parts.append(f"<h2>{e(s.heading)}</h2>")
        parts += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        if s.table is not None:
            parts.append(html_table(s.table))
        if s.heading == "Ladder":
            parts.append(f'<img src="{LADDER_PNG}" alt="the ladder and its per-shot CRFs">')
    parts.append("<h2>Encode matrix per shot</h2>")
    parts.append(f'<img src="{SHOTS_PNG}" alt="every shot\'s encodes and convex hull">')
    parts.append("</body></html>\n")
    return "\n".join(parts)
