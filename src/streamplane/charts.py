"""The one way the planes draw a report picture: a matplotlib figure on its own Agg canvas.

No pyplot and no global backend switch, so drawing a report inside a notebook, a Dask worker
or a server leaves that process's matplotlib state alone and keeps no figure alive.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
