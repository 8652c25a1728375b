"""The packaged tiny title, as the media tests read it."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamplane.media import load_title
from streamplane.media.title import Title


@pytest.fixture(scope="module")
def package(tiny_package: Path) -> Path:
    return tiny_package


@pytest.fixture(scope="module")
def title(package: Path) -> Title:
    return load_title(package)
