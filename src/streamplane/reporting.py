"""What every plane's report is made of: pictures, and tables as markdown and HTML.

Pictures are matplotlib figures on their own Agg canvas: no pyplot and no global backend
switch, so drawing a report inside a notebook, a Dask worker or a server leaves that process's
matplotlib state alone and keeps no figure alive.
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Sequence, Set
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 110


@contextmanager
def figure(path: Path, width: float, height: float) -> Iterator[Figure]:
    """Yield a figure of `width` x `height` inches; save it to `path` as PNG on exit."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A literal, so mypy checks the keys against matplotlib's rcParams names.
    with matplotlib.rc_context(
        {
            "font.size": 10,
            "axes.titlesize": 10.5,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "xtick.labelsize": 8.5,
            "ytick.labelsize": 8.5,
            "figure.titlesize": 13,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    ):
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        yield fig
        fig.savefig(path, dpi=DPI, facecolor="white")
    fig.clear()  # drops artists now rather than when the caller's frame lets go


@dataclass(frozen=True)
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    right: Set[int] = frozenset()  # numeric columns, right-aligned


def _md_cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(t: Table) -> list[str]:
    """The table as GitHub-flavoured markdown lines (cells escaped)."""
    rule = "|" + "|".join("---:" if i in t.right else "---" for i in range(len(t.headers))) + "|"
    return [
        "| " + " | ".join(_md_cell(h) for h in t.headers) + " |",
        rule,
        *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows),
    ]


def html_table(t: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in t.headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{e(c)}</td>' if i in t.right else f"<td>{e(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>\n"
        for row in t.rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


PAGE_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.5em 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f4f4f4; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
"""
