"""The placement plane: which title lives on which edge server (HCA, fill plans).

Names load on first use, so importing the plane (the CLI does) pulls in neither numpy nor
matplotlib until a placement runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from streamplane.placement.errors import CatalogTooLargeError, InputError, PlacementError

if TYPE_CHECKING:
    from streamplane.placement.files import (
        read_placement,
        read_popularity,
        read_servers,
        write_popularity,
    )
    from streamplane.placement.fill import Churn, FillPlan, churn, fill_plans
    from streamplane.placement.hca import HcaSettings, place, solve_shares
    from streamplane.placement.model import (
        GBPS,
        TB,
        Balance,
        Catalog,
        Placement,
        Prior,
        Server,
        balance,
        reference_cluster,
    )
    from streamplane.placement.popularity import (
        CatalogDay,
        CatalogShape,
        Drift,
        next_day,
        sample_catalog,
        zipf_catalog,
    )
    from streamplane.placement.ring import WeightedRing
    from streamplane.placement.shell import PlaceOutcome, SiteResult, place_catalog, place_files

_LAZY = {
    "Churn": "fill",
    "FillPlan": "fill",
    "churn": "fill",
    "fill_plans": "fill",
    "read_placement": "files",
    "read_popularity": "files",
    "read_servers": "files",
    "write_popularity": "files",
    "HcaSettings": "hca",
    "place": "hca",
    "solve_shares": "hca",
    "GBPS": "model",
    "TB": "model",
    "Balance": "model",
    "Catalog": "model",
    "Placement": "model",
    "Prior": "model",
    "Server": "model",
    "balance": "model",
    "reference_cluster": "model",
    "CatalogDay": "popularity",
    "CatalogShape": "popularity",
    "Drift": "popularity",
    "next_day": "popularity",
    "sample_catalog": "popularity",
    "zipf_catalog": "popularity",
    "WeightedRing": "ring",
    "PlaceOutcome": "shell",
    "SiteResult": "shell",
    "place_catalog": "shell",
    "place_files": "shell",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streamplane.placement' has no attribute {name!r}")
    return getattr(importlib.import_module(f"streamplane.placement.{module}"), name)


__all__ = [
    "GBPS",
    "TB",
    "Balance",
    "Catalog",
    "CatalogDay",
    "CatalogShape",
    "CatalogTooLargeError",
    "Churn",
    "Drift",
    "FillPlan",
    "HcaSettings",
    "InputError",
    "PlaceOutcome",
    "Placement",
    "PlacementError",
    "Prior",
    "Server",
    "SiteResult",
    "WeightedRing",
    "balance",
    "churn",
    "fill_plans",
    "next_day",
    "place",
    "place_catalog",
    "place_files",
    "read_placement",
    "read_popularity",
    "read_servers",
    "reference_cluster",
    "sample_catalog",
    "solve_shares",
    "write_popularity",
    "zipf_catalog",
]
