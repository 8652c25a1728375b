"""`streamplane place`: read the inputs, place each site, write the plan, fill plans and report.

The only module of the plane that touches files; everything it calls is pure.

    OUT/placement.json        which servers hold which title (the control plane reads it)
    OUT/fill/<server>.json    each edge's fill plan, the body of its POST /fill
    OUT/report/index.html     per server utilisation, holes, churn, D* and why, pictures
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from streamplane.placement import files, fill, hca
from streamplane.placement.model import Catalog, Placement, Server, check_servers


@dataclass(frozen=True)
class SiteResult:
    site: str
    placement: Placement
    churn: fill.Churn | None  # None without a previous plan for the site
    plans: list[fill.FillPlan]


@dataclass(frozen=True)
class PlaceOutcome:
    sites: list[SiteResult]
    directory: Path
    placement_json: Path
    fill_plans: list[Path]
    report: Path
    pictures: list[Path]


def place_files(
    servers: Path,
    popularity: Path,
    previous: Path | None,
    out: Path,
    settings: hca.HcaSettings = hca.HcaSettings(),
    partial: bool = False,
) -> PlaceOutcome:
    """Place the catalog in `popularity` on `servers`, against the `previous` plan if any."""
    cluster = files.read_servers(servers)
    check_servers(cluster)
    catalog = files.read_popularity(popularity)
    before = files.read_placement(previous) if previous is not None else None
    inputs = {"servers": files.sha256(servers), "popularity": files.sha256(popularity)}
    if previous is not None:
        inputs["previous"] = files.sha256(previous)
    return place_catalog(cluster, catalog, before, out, settings, partial, inputs)


def place_catalog(
    servers: Sequence[Server],
    catalog: Catalog,
    previous: files.PlacementDoc | None,
    out: Path,
    settings: hca.HcaSettings = hca.HcaSettings(),
    partial: bool = False,
    inputs: dict[str, str] | None = None,
) -> PlaceOutcome:
    check_servers(servers)
    by_site: dict[str, list[Server]] = {}
    for s in servers:
        by_site.setdefault(s.site, []).append(s)
    old_sizes = files.previous_sizes(previous) if previous is not None else {}
    results = []
    for site, members in by_site.items():
        prior = files.prior_for(previous, site) if previous is not None else None
        placement = hca.place(members, catalog, prior, settings, partial=partial)
        held = prior.holders if prior is not None else None
        results.append(
            SiteResult(
                site=site,
                placement=placement,
                churn=fill.churn(placement, held, old_sizes) if held is not None else None,
                plans=fill.fill_plans(placement, held, old_sizes),
            )
        )
    return _write(results, out, inputs or {})


def _write(results: list[SiteResult], out: Path, inputs: dict[str, str]) -> PlaceOutcome:
    from streamplane.placement import report

    doc = files.placement_document(
        {r.site: r.placement for r in results},
        {r.site: None if r.churn is None else r.churn.ratio for r in results},
        inputs,
    )
    placement_json = files.write_json(doc, out / "placement.json")
    fill_dir = out / "fill"
    written = []
    for r in results:
        for plan in r.plans:
            written.append(files.write_json(plan, fill_dir / f"{plan.server}.json"))
    for stale in fill_dir.glob("*.json"):
        if stale not in written:  # a server no longer in the cluster: no plan, not an old one
            stale.unlink()
    paths = report.write_report(results, out / "report")
    return PlaceOutcome(
        sites=results,
        directory=out,
        placement_json=placement_json,
        fill_plans=written,
        report=out / "report" / report.INDEX_HTML,
        pictures=[p for p in paths if p.suffix == ".png"],
    )
