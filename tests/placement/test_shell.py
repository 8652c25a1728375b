"""Several sites in one servers file: each is placed on its own, one plan holds them all."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from streamplane.placement.shell import place_catalog
from tests.placement.clusters import catalog_for, cluster


def test_each_site_holds_the_catalog_and_the_plan_lists_every_holder(tmp_path: Path) -> None:
    ams = [replace(s, site="ams", id=f"ams-{s.id}") for s in cluster(1, 2)]
    lon = [replace(s, site="lon", id=f"lon-{s.id}") for s in cluster(2, 3)]
    cat = catalog_for(ams, 800, 0.5, seed=31)
    outcome = place_catalog(ams + lon, cat, None, tmp_path)
    assert [r.site for r in outcome.sites] == ["ams", "lon"]
    plan = json.loads(outcome.placement_json.read_text())
    for title in cat.ids:
        holders = plan["titles"][title]
        assert any(h.startswith("ams-") for h in holders)
        assert any(h.startswith("lon-") for h in holders)
    assert len(outcome.fill_plans) == 8
    assert {p.name for p in outcome.pictures} == {
        "utilisation-ams.png",
        "popularity-ams.png",
        "utilisation-lon.png",
        "popularity-lon.png",
    }
    # Placing again with fewer servers removes the plans of servers that left.
    place_catalog(ams, cat, None, tmp_path)
    assert len(list((tmp_path / "fill").glob("*.json"))) == 3
