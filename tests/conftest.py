from __future__ import annotations

from pathlib import Path

import pytest

from streamplane.media import EncodeSettings, encode
from streamplane.media.samples import build_sample


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The browser tests share one test worker (`make test` runs two, `--dist loadgroup`): two
    Chromiums, each with the stack it plays from, starved each other's pages on two cores."""
    for item in items:
        if item.path.parts[-2] == "e2e" or "chromium" in item.name:
            item.add_marker(pytest.mark.xdist_group("browser"))


# A small ladder that still exercises every stage: two resolutions, three quantisers.
SMALL = EncodeSettings(
    heights=(180, 90),
    quantisers=(22, 30, 38),
    rungs=3,
    preset="fast",
    probe_preset="ultrafast",
    probe_vmaf_subsample=2,
)


@pytest.fixture(scope="session")
def samples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("samples")


@pytest.fixture(scope="session")
def tiny_source(samples_dir: Path) -> Path:
    """12 s, 320x180, four shots of real footage and synthetic noise, with AAC audio."""
    return build_sample("tiny-mix", samples_dir)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory, tiny_source: Path) -> Path:
    """The tiny source encoded and packaged once per run: ``<catalog>/tiny``."""
    out = tmp_path_factory.mktemp("catalog") / "tiny"
    encode(tiny_source, out, SMALL)
    return out
