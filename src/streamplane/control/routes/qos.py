"""``GET /v1/qos`` (admin): the quality-of-experience aggregates."""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, Query, Request

from streamplane.control.errors import ApiError
from streamplane.control.qos import row_out, total
from streamplane.control.routes.deps import admin, plane_of
from streamplane.telemetry import HOUR, RowKey, as_network, network_asn

__all__ = ["router"]

router = APIRouter()

_MAX_ROWS: Final = 10_000
_KINDS: Final = "per edge, per title, per network (a prefix, or an AS), and per edge for a network"
_FIELDS: Final = {
    "edge": ("edge",),
    "title": ("title",),
    "network": ("network",),
    "as": ("network",),
    "edge_network": ("edge", "network"),
    "edge_as": ("edge", "network"),
}


@router.get("/v1/qos", tags=["operations"], dependencies=[Depends(admin)])
async def qos(
    request: Request,
    edge: Annotated[str | None, Query(max_length=64)] = None,
    title: Annotated[str | None, Query(max_length=128)] = None,
    network: Annotated[str | None, Query(max_length=64, description="a prefix")] = None,
    asn: Annotated[int | None, Query(ge=1, le=2**32 - 1, description="an origin AS")] = None,
    by: Annotated[
        Literal["edge", "title", "network", "as", "edge_network", "edge_as"] | None,
        Query(description="every row of one kind; default: the kind the filters name"),
    ] = None,
    since: Annotated[float | None, Query(ge=0, description="epoch s; default: an hour ago")] = None,
    until: Annotated[float | None, Query(ge=0, description="epoch s; default: now")] = None,
    span: Literal["minute", "hour"] = "minute",
) -> dict[str, Any]:
    """Per-minute (or per-hour) quality of experience: viewers, startup p50/p95, rebuffer
    ratio, mean bitrate, switches, errors. Rows are kept per edge, per title, per client
    network (its prefix, with its origin AS), per client AS (all its prefixes: ``asn``, shown
    as the network ``AS<n>``) and per edge for a network or an AS: name one with ``edge``,
    ``title``, ``network`` or ``asn`` (or ``edge`` with one of the last two), or ask for
    every row of a kind with ``by``. ``total`` rolls the rows up (viewers: the peak)."""
    plane = plane_of(request)
    now = plane.clock()
    if network is not None and asn is not None:
        raise ApiError(422, "invalid_qos_query", "name a network or an asn, not both")
    if asn is not None:
        network = as_network(asn)
    kind = by or _kind(edge, title, network)
    filters: dict[str, str | None] = {"edge": "", "title": "", "network": ""}
    for field in _FIELDS[kind]:
        filters[field] = None
    given = {"edge": edge, "title": title, "network": network}
    for field, value in given.items():
        if value is None:
            continue
        if filters[field] == "":
            raise ApiError(
                422,
                "invalid_qos_query",
                f"{field if field != 'network' or asn is None else 'asn'} does not go with"
                f" by={kind}: aggregates are kept {_KINDS}",
            )
        filters[field] = value
    networks: Literal["prefix", "as"] | None = None
    if network is None and kind in ("network", "edge_network"):
        networks = "prefix"
    elif network is None and kind in ("as", "edge_as"):
        networks = "as"
    spans = {"minute": plane.qos.store.policy.bucket_s, "hour": HOUR}
    start = now - 3600.0 if since is None else since
    end = now + spans["minute"] if until is None else until
    rows = await plane.qos.store.rows(
        span=spans[span], since=start, until=end, networks=networks, limit=_MAX_ROWS + 1, **filters
    )
    truncated = len(rows) > _MAX_ROWS
    rows = rows[:_MAX_ROWS]
    whole = row_out(RowKey(int(start), spans[span], rows[0][0].key), total(rows)) if rows else None
    if whole is not None:
        whole["start"], whole["span_s"] = None, None
    return {
        "by": kind,
        "span_s": spans[span],
        "since": start,
        "until": end,
        "rows": [row_out(r, q) for r, q in rows],
        "total": whole,
        "truncated": truncated,
    }


def _kind(edge: str | None, title: str | None, network: str | None) -> str:
    if title is not None and (edge is not None or network is not None):
        raise ApiError(
            422,
            "invalid_qos_query",
            f"title goes alone: aggregates are kept {_KINDS}",
        )
    per_as = network is not None and network_asn(network) is not None
    if edge is not None and network is not None:
        return "edge_as" if per_as else "edge_network"
    for name, value in (("edge", edge), ("title", title), ("network", network)):
        if value is not None:
            return "as" if name == "network" and per_as else name
    raise ApiError(
        422,
        "invalid_qos_query",
        "name an edge, a title, a network or an asn, or ask"
        f" by=edge|title|network|as|edge_network|edge_as: "
        f"aggregates are kept {_KINDS}",
    )
