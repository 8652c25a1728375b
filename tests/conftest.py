from __future__ import annotations

from pathlib import Path

import pytest

from streamplane.media.samples import build_sample


@pytest.fixture(scope="session")
def samples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("samples")


@pytest.fixture(scope="session")
def tiny_source(samples_dir: Path) -> Path:
    """12 s, 320x180, four shots of real footage and synthetic noise, with AAC audio."""
    return build_sample("tiny-mix", samples_dir)
