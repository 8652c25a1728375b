"""The pages a person opens, served by the control plane.

``static/`` holds the browser player: ``watch.html`` (served at ``/watch``), its ES modules,
``live.html`` (a live channel with hls.js low-latency mode or dash.js, and its latency),
``abr.js`` (streamplane's ABR and heartbeat cadence, the JavaScript port of
``streamplane.player``) and ``vendor/`` (hls.js and dash.js from npm, copied there by
``make install``; Shaka Player's compiled build beside them, which the tests play signed titles
with as a player that knows nothing of streamplane).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

__all__ = ["PLAYER_PAGE", "STATIC_DIR", "VENDOR_DIR", "vendor_missing"]

STATIC_DIR: Final = Path(__file__).parent / "static"
VENDOR_DIR: Final = STATIC_DIR / "vendor"
PLAYER_PAGE: Final = STATIC_DIR / "watch.html"
_VENDOR_FILES: Final = ("hls.min.mjs", "dash.all.min.js")


def vendor_missing() -> list[str]:
    """The vendored browser files that are not there (``make install`` copies them)."""
    return [name for name in _VENDOR_FILES if not (VENDOR_DIR / name).is_file()]
