"""The report a person reads after a placement: per site, two figures, tables, and D*'s reason.

* `utilisation-<site>.png`: each server's storage used, and its traffic against its share of
  the site's throughput (1.0 is exactly its share; the band is the 5 % goal).
* `popularity-<site>.png`: traffic share by rank with head, hot and tail coloured and the
  cutoff marked; below it, the expected daily churn of every cutoff HCA weighed, feasible ones
  solid, with D* marked.

Figures are drawn on `matplotlib.figure.Figure` with an explicit Agg canvas (nothing global
changes: no pyplot, no backend switch). Markdown and HTML come from one list of sections, so
their tables agree.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from streamplane.placement.model import TB, balance
from streamplane.reporting import PAGE_CSS, Table, figure, html_table, markdown_table

if TYPE_CHECKING:
    from streamplane.placement.shell import SiteResult

INDEX_HTML = "index.html"
REPORT_MD = "placement.md"
GOAL = 0.05

_STORAGE = "#1f77b4"
_TRAFFIC = "#d62728"
_HEAD = "#ff7f0e"
_HOT = "#d62728"
_TAIL = "#7f7f7f"


@dataclass
class _Section:
    heading: str
    paragraphs: list[str] = field(default_factory=list)
    table: Table | None = None
    pictures: list[tuple[str, str]] = field(default_factory=list)  # (file, alt)


def write_report(results: Sequence[SiteResult], directory: Path) -> list[Path]:
    """Write figures, `placement.md` and `index.html` into `directory`; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sections: list[_Section] = []
    for r in results:
        util = directory / f"utilisation-{r.site}.png"
        curve = directory / f"popularity-{r.site}.png"
        written += [_draw_utilisation(r, util), _draw_popularity(r, curve)]
        sections += _site_sections(r, util.name, curve.name)
    md = directory / REPORT_MD
    md.write_text(_markdown(sections), encoding="utf-8")
    page = directory / INDEX_HTML
    page.write_text(_html(sections), encoding="utf-8")
    return [*written, md, page]


# ---------------------------------------------------------------------------------------------
# tables


def _tb(x: float) -> str:
    return f"{x / TB:,.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _site_sections(r: SiteResult, util_png: str, curve_png: str) -> list[_Section]:
    p = r.placement
    b = balance(p)
    c = p.cutoff
    stored = int(p.server_bytes.sum())
    capacity = sum(s.storage_bytes for s in p.servers)
    churn = (
        "no previous plan"
        if r.churn is None
        else f"{_tb(r.churn.added_bytes)} TB refilled ({_pct(r.churn.ratio)} of stored), "
        f"{_tb(r.churn.dropped_bytes)} TB dropped"
    )
    summary_rows: list[list[str]] = [
        ["algorithm", p.algorithm],
        ["titles placed", f"{len(p.catalog) - b.hole_titles:,} of {len(p.catalog):,}"],
        ["bytes stored (copies counted)", f"{_tb(stored)} TB of {_tb(capacity)} TB"],
        ["titles with more than one copy", f"{int((p.replicas > 1).sum()):,}"],
        [
            "holes",
            f"{b.hole_titles:,} titles, {_tb(b.hole_bytes)} TB, {_pct(b.hole_traffic)} of requests",
        ],
        ["worst server traffic / its throughput share", f"{b.max_ratio:.3f}"],
        ["worst deviation from its share", _pct(b.worst_deviation)],
        ["churn against the previous plan", churn],
    ]
    if c is not None:
        summary_rows.append(["D* (head titles)", f"{c.head_titles:,} ({c.hot_titles:,} hot)"])
    summary = Table(["figure", "value"], summary_rows)
    top = _Section(f"Site {r.site}", table=summary)
    if c is not None:
        top.paragraphs.append(c.reason)
    top.paragraphs += list(p.notes)
    top.pictures.append((util_png, f"storage and traffic utilisation per server, site {r.site}"))

    heads = [
        "server",
        "storage TB",
        "Gbps",
        "held TB",
        "storage used",
        "traffic share",
        "throughput share",
        "traffic / share",
        "titles",
        "head share",
        "tail share",
        "fill TB",
        "drop TB",
    ]
    tput = np.array([s.throughput_bps for s in p.servers])
    counts = np.bincount(p.holders[p.holders >= 0], minlength=len(p.servers))
    served = b.served_traffic or 1.0
    rows = []
    for i, s in enumerate(p.servers):
        plan = r.plans[i]
        rows.append(
            [
                s.id,
                f"{s.storage_tb:,.1f}",
                f"{s.throughput_gbps:,.0f}",
                _tb(float(p.server_bytes[i])),
                _pct(b.storage_utilisation[i]),
                _pct(float(p.server_traffic[i]) / served),
                _pct(float(tput[i] / tput.sum())),
                f"{b.traffic_ratio[i]:.3f}",
                f"{int(counts[i]):,}",
                "-" if c is None else f"{c.head_shares[i]:.3f}",
                "-" if c is None else f"{c.tail_shares[i]:.3f}",
                _tb(plan.add_bytes),
                _tb(plan.drop_bytes),
            ]
        )
    per_server = _Section(
        f"Site {r.site}: servers", table=Table(heads, rows, right=set(range(1, len(heads))))
    )
    per_server.pictures.append((curve_png, f"popularity by rank and the cutoff, site {r.site}"))
    return [top, per_server]


def _markdown(sections: Sequence[_Section]) -> str:
    out = ["# Placement report", ""]
    for s in sections:
        out += [f"## {s.heading}", ""]
        for para in s.paragraphs:
            out += [para, ""]
        if s.table is not None:
            out += [*markdown_table(s.table), ""]
        for png, alt in s.pictures:
            out += [f"![{alt}]({png})", ""]
    return "\n".join(out)


def _html(sections: Sequence[_Section]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Placement report</title>",
        f"<style>{PAGE_CSS}</style></head><body>",
        "<h1>Placement report</h1>",
    ]
    for s in sections:
        parts.append(f"<h2>{e(s.heading)}</h2>")
        parts += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        if s.table is not None:
            parts.append(html_table(s.table))
        parts += [f'<img src="{e(png)}" alt="{e(alt)}">' for png, alt in s.pictures]
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# figures


def _draw_utilisation(r: SiteResult, path: Path) -> Path:
    p = r.placement
    b = balance(p)
    names = [s.id for s in p.servers]
    y = np.arange(len(names))
    height = max(3.2, 0.32 * len(names) + 1.6)
    with figure(path, 11, height) as fig:
        left, right = fig.subplots(1, 2, sharey=True)
        left.barh(y, [100 * u for u in b.storage_utilisation], color=_STORAGE)
        left.axvline(100, color="black", lw=1)
        left.set_xlim(0, max(105.0, 100 * max(b.storage_utilisation) + 5))
        left.set_xlabel("storage used (% of the server's storage)")
        left.set_yticks(y, names)
        left.invert_yaxis()
        left.set_title("storage")
        right.axvspan(1 - GOAL, 1 + GOAL, color=_TRAFFIC, alpha=0.1, lw=0)
        right.barh(y, b.traffic_ratio, color=_TRAFFIC)
        right.axvline(1.0, color="black", lw=1)
        right.set_xlim(0, max(1.25, max(b.traffic_ratio) * 1.05))
        right.set_xlabel("expected traffic / the server's share of throughput (1 = its share)")
        right.set_title(f"traffic (band: +-{GOAL:.0%})")
        fig.suptitle(f"site {r.site}: {p.algorithm}, {len(p.catalog):,} titles", weight="bold")
    return path


def _draw_popularity(r: SiteResult, path: Path) -> Path:
    p = r.placement
    cat = p.catalog
    order = cat.ranking()
    share = cat.traffic[order]
    rank = np.arange(1, len(order) + 1)
    head = p.head[order]
    c = p.cutoff
    with figure(path, 11, 7.5 if c is not None else 4.5) as fig:
        axes = fig.subplots(2 if c is not None else 1, 1, squeeze=False)[:, 0]
        ax = axes[0]
        positive = share > 0
        hot = np.zeros(len(order), dtype=bool)
        if c is not None and c.hot_titles:
            # hot titles are the head's largest by traffic
            lump = np.sort(share[head])[::-1][c.hot_titles - 1] if head.any() else math.inf
            hot = head & (share >= lump)
        for mask, colour, label in (
            (~head & positive, _TAIL, "tail"),
            (head & ~hot & positive, _HEAD, "head"),
            (hot & positive, _HOT, "hot (head, placed with bounded loads)"),
        ):
            if mask.any():
                ax.scatter(rank[mask], share[mask], s=4, color=colour, label=label, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rank by density (traffic per stored byte)")
        ax.set_ylabel("share of traffic")
        if c is not None and c.head_titles:
            ax.axvline(c.head_titles + 0.5, color="black", lw=1, ls="--")
            ax.annotate(
                f"D* = {c.head_titles:,}",
                (c.head_titles + 0.5, 0.98),
                xycoords=("data", "axes fraction"),
                xytext=(4, 0),
                textcoords="offset points",
                va="top",
            )
        ax.legend(loc="lower left", markerscale=3)
        ax.set_title("popularity: head, hot and tail")
        if c is not None:
            ax2 = axes[1]
            cand = c.candidates
            ok = cand.feasible
            x = np.maximum(cand.head_titles, 1)
            ax2.scatter(
                x[~ok],
                100 * cand.expected_churn[~ok],
                s=8,
                color="#bbbbbb",
                label="infeasible (storage or balance)",
            )
            ax2.scatter(
                x[ok], 100 * cand.expected_churn[ok], s=10, color=_STORAGE, label="feasible"
            )
            if c.head_titles:
                ax2.axvline(c.head_titles, color="black", lw=1, ls="--", label="D*")
            ax2.set_xscale("log")
            ax2.set_xlabel("head titles at the cutoff")
            ax2.set_ylabel("expected churn (% of stored a day)")
            ax2.set_title("every cutoff weighed: D* is the feasible one with the least churn")
            ax2.legend(loc="upper left")
        fig.suptitle(f"site {r.site}: popularity and the cutoff", weight="bold")
    return path
