"""The compiled ranking runs only while it was built from the rank.py beside it."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import streamplane
from streamplane.steering import rank
from streamplane.steering._build import RANK_SOURCE, RANK_STAMP, compiled_rank, is_current

_COMPILED = compiled_rank()
needs_build = pytest.mark.skipif(
    _COMPILED is None,
    reason="rank.py is not compiled here (make install compiles it with mypyc; it needs a C "
    "compiler): the source runs, and every ranking test runs on it",
)


@needs_build
def test_make_compiles_the_ranking_and_the_package_imports_it() -> None:
    assert is_current(RANK_SOURCE, RANK_STAMP)
    assert Path(rank.__file__) == _COMPILED


def _import_rank(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-W",
            "always",
            "-c",
            "import streamplane.steering.rank as r; print(r.__file__)",
        ],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@needs_build
def test_a_build_from_another_rank_py_is_set_aside(tmp_path: Path) -> None:
    # A copy of the package as built, then rank.py edited after the build.
    package = Path(streamplane.__file__).parent
    shutil.copytree(
        package,
        tmp_path / "streamplane",
        ignore=shutil.ignore_patterns("web", "__pycache__"),
    )
    steering = tmp_path / "streamplane" / "steering"
    assert _COMPILED is not None
    built = _import_rank(tmp_path)
    assert built.stdout.strip() == str(steering / _COMPILED.name)
    assert "RuntimeWarning" not in built.stderr

    source = steering / "rank.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    edited = _import_rank(tmp_path)
    assert edited.stdout.strip() == str(source)
    assert "built from another rank.py" in edited.stderr

    (steering / "rank.compiled").unlink()  # no record of what was built: not trusted
    assert _import_rank(tmp_path).stdout.strip() == str(source)


def test_is_current_compares_the_source_with_its_recorded_hash(tmp_path: Path) -> None:
    source, stamp = tmp_path / "rank.py", tmp_path / "rank.compiled"
    source.write_text("x = 1\n")
    assert not is_current(source, stamp)  # never built
    stamp.write_text(hashlib.sha256(b"x = 2\n").hexdigest() + "\n")  # built from another
    assert not is_current(source, stamp)
    stamp.write_text(hashlib.sha256(b"x = 1\n").hexdigest() + "\n")
    assert is_current(source, stamp)
