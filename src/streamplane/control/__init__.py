"""The control plane: accounts, catalog, playback with ranked signed edges, and the fleet.

``create_app(settings)`` is the FastAPI service; ``streamplane control`` runs it with uvicorn.
Names load on first use so that the CLI starts without importing FastAPI and SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamplane.control.app import create_app, server_config
    from streamplane.control.errors import ApiError
    from streamplane.control.fleet import EdgeView, FleetPolicy
    from streamplane.control.plane import ControlPlane
    from streamplane.control.store import Store, migrate

_LAZY = {
    "ApiError": "errors",
    "ControlPlane": "plane",
    "EdgeView": "fleet",
    "FleetPolicy": "fleet",
    "Store": "store",
    "create_app": "app",
    "server_config": "app",
    "migrate": "store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streamplane.control' has no attribute {name!r}")
    return getattr(importlib.import_module(f"streamplane.control.{module}"), name)


__all__ = [
    "ApiError",
    "ControlPlane",
    "EdgeView",
    "FleetPolicy",
    "Store",
    "create_app",
    "migrate",
    "server_config",
]
