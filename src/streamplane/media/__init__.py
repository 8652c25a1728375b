"""The media plane: a source video in, a per-shot optimised CMAF HLS + DASH ladder out.

The pipeline's names load on first use, so importing a pure core (hull, ladder, segments) does
not pull in matplotlib, Dask and PyAV.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamplane.media.errors import (
    DiskFullError,
    EncodeError,
    MediaError,
    PackagingError,
    SourceError,
)
from streamplane.media.manifest import package_files
from streamplane.media.samples import SAMPLES, build_sample
from streamplane.media.title import Title, load_title

if TYPE_CHECKING:
    from streamplane.media.pipeline import EncodeOutcome, EncodeSettings, Progress, encode

_LAZY = {"EncodeOutcome", "EncodeSettings", "Progress", "encode"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from streamplane.media import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'streamplane.media' has no attribute {name!r}")


__all__ = [
    "SAMPLES",
    "DiskFullError",
    "EncodeError",
    "EncodeOutcome",
    "EncodeSettings",
    "MediaError",
    "PackagingError",
    "Progress",
    "SourceError",
    "Title",
    "build_sample",
    "encode",
    "load_title",
    "package_files",
]
