"""The compiled ranking: ``rank.py`` built with mypyc, and only while it is current.

``make`` compiles ``rank.py`` (the hot path of every playback request) with mypyc into an
extension module beside it, which Python then imports in its place, and records the hash
of the source it was built from in ``rank.compiled``. ``rank.py`` stays the one source of
truth: an extension built from another ``rank.py`` (edited or checked out since) is set
aside with a warning and the source runs. Without a C compiler there is no extension and
the source runs, slower.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

__all__ = [
    "RANK_SOURCE",
    "RANK_STAMP",
    "compiled_rank",
    "is_current",
    "load_rank_source",
    "use_current_rank",
]

RANK_SOURCE = Path(__file__).with_name("rank.py")
RANK_STAMP = Path(__file__).with_name("rank.compiled")  # the sha256 of the source built


def compiled_rank(folder: Path = RANK_SOURCE.parent) -> Path | None:
    """The extension module of the ranking in ``folder``, if one was built."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"rank{suffix}"
        if path.exists():
            return path
    return None


def is_current(source: Path, stamp: Path) -> bool:
    """Whether ``stamp`` names the hash of ``source`` as it is now."""
    try:
        built = stamp.read_text().strip()
        return built == hashlib.sha256(source.read_bytes()).hexdigest()
    except OSError:
        return False


def load_rank_source(name: str) -> ModuleType:
    """``rank.py`` itself, interpreted, as the module ``name`` (registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, RANK_SOURCE)
    if spec is None or spec.loader is None:  # pragma: no cover - a file path always has one
        raise ImportError(f"cannot load {RANK_SOURCE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def use_current_rank(package: str) -> None:
    """Before ``package``.rank is first imported: if its extension was built from another
    ``rank.py``, import the source in its place."""
    name = f"{package}.rank"
    if name in sys.modules or compiled_rank() is None:
        return
    if is_current(RANK_SOURCE, RANK_STAMP):
        return
    warnings.warn(
        f"{name}: the compiled module was built from another rank.py; running the source "
        "(run `make install` to compile it again)",
        RuntimeWarning,
        stacklevel=2,
    )
    load_rank_source(name)


# Imported first by the package (see its __init__), so this runs before anything imports
# the ranking.
use_current_rank(__name__.rpartition(".")[0])
