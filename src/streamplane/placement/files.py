"""The placement plane's files: servers (TOML), popularity (CSV), the placement (JSON).

servers.toml, one table per server; `site` groups servers into clusters placed separately:

    [[server]]
    id = "flash-1"          # letters, digits, '.', '_', '-': it names the fill plan file
    site = "ams-1"          # optional, "default"
    storage_tb = 18         # usable storage, decimal terabytes
    throughput_gbps = 100   # what the server serves at its limit

popularity.csv, with a header; extra columns are ignored:

    title,size_bytes,popularity
    title-0000001,7340032000,1523.5

`popularity` is anything proportional to the bytes a title will serve (bytes served
yesterday, or a forecast of it; segment requests, whose sizes are alike, serve too). It is
normalised to shares. View counts are not: a view of a large title costs more bytes, so
multiply views by size first.

placement.json is what the control plane reads (`titles`: each title's servers, primary
first) and what tomorrow's placement reads back as the previous plan.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

import msgspec
import numpy as np

from streamplane.placement.errors import InputError
from streamplane.placement.model import GBPS, TB, Catalog, Placement, Prior, Server, balance

PLACEMENT_FORMAT = "streamplane.placement/1"
_SERVER_KEYS = {"id", "site", "storage_tb", "throughput_gbps"}


def read_servers(path: Path) -> list[Server]:
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such servers file") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    extra = set(doc) - {"server"}
    if extra:
        raise InputError(f"{path}: unknown top-level keys {sorted(extra)}; expected [[server]]")
    tables = doc.get("server")
    if not isinstance(tables, list) or not tables:
        raise InputError(f"{path}: no [[server]] tables; each server needs one")
    servers = []
    for k, t in enumerate(tables, start=1):
        where = f"{path}: server {k}"
        if not isinstance(t, dict):
            raise InputError(f"{where}: expected a [[server]] table")
        unknown = set(t) - _SERVER_KEYS
        if unknown:
            raise InputError(
                f"{where}: unknown keys {sorted(unknown)}; a server has {sorted(_SERVER_KEYS)}"
            )
        for key in ("id", "storage_tb", "throughput_gbps"):
            if key not in t:
                raise InputError(f"{where}: missing {key!r}")
        sid, site = t["id"], t.get("site", "default")
        if not isinstance(sid, str) or not isinstance(site, str):
            raise InputError(f"{where}: id and site must be strings")
        storage = _number(t["storage_tb"], f"{where} ({sid}): storage_tb")
        tput = _number(t["throughput_gbps"], f"{where} ({sid}): throughput_gbps")
        servers.append(Server(sid, round(storage * TB), tput * GBPS, site))
    return servers


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{what} must be a number, not {value!r}")
    return float(value)


def read_popularity(path: Path) -> Catalog:
    try:
        f = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such popularity file") from None
    ids: list[str] = []
    sizes: list[int] = []
    pops: list[float] = []
    first_line: dict[str, int] = {}
    with f:
        reader = csv.DictReader(f)
        missing = {"title", "size_bytes", "popularity"} - set(reader.fieldnames or ())
        if missing:
            raise InputError(
                f"{path}: the header needs title,size_bytes,popularity; missing "
                f"{', '.join(sorted(missing))}"
            )
        for row in reader:
            line = reader.line_num
            title = (row["title"] or "").strip()
            where = f"{path} line {line}"
            if title in first_line:
                raise InputError(
                    f"{where}: title {title!r} already appeared on line {first_line[title]}"
                )
            first_line[title] = line
            size = _whole(row["size_bytes"], f"{where}: size_bytes")
            if size <= 0:
                raise InputError(f"{where}: title {title!r} has size {size}; it must be positive")
            try:
                p = float(row["popularity"] or "")
            except ValueError:
                raise InputError(
                    f"{where}: popularity {row['popularity']!r} is not a number"
                ) from None
            if not math.isfinite(p) or p < 0:
                raise InputError(f"{where}: title {title!r} has popularity {p}; it must be >= 0")
            ids.append(title)
            sizes.append(size)
            pops.append(p)
    if not ids:
        raise InputError(f"{path}: no titles below the header")
    try:
        return Catalog.from_columns(ids, sizes, pops)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def _whole(text: str | None, what: str) -> int:
    try:
        value = float(text or "")
    except ValueError:
        raise InputError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value) or value != int(value):
        raise InputError(f"{what} {text!r} is not a whole number of bytes")
    return int(value)


def write_popularity(catalog: Catalog, path: Path) -> Path:
    """The catalog as popularity.csv (popularity as shares of traffic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["title", "size_bytes", "popularity"])
        for t, s, p in zip(
            catalog.ids, catalog.size_bytes.tolist(), catalog.traffic.tolist(), strict=True
        ):
            w.writerow([t, s, f"{p:.9g}"])
    return path


# ---------------------------------------------------------------------------------------------
# placement.json


class ServerDoc(msgspec.Struct):
    id: str
    site: str
    storage_bytes: int
    throughput_bps: float
    bytes: int
    titles: int
    storage_utilisation: float
    traffic_share: float  # of the site's served traffic
    traffic_ratio: float  # traffic share / throughput share
    head_share: float | None = None
    tail_share: float | None = None
    head_weight: float | None = None
    tail_weight: float | None = None


class CutoffDoc(msgspec.Struct):
    log_density: float | None  # None: no head
    head_titles: int
    hot_titles: int
    head_bytes_share: float
    head_traffic_share: float
    hysteresis: float
    wobble: float
    expected_churn: float
    reason: str


class SiteDoc(msgspec.Struct):
    algorithm: str
    servers: list[ServerDoc]
    cutoff: CutoffDoc | None
    head: list[str]
    hot: list[str]
    holes: list[str]
    notes: list[str]
    churn: float | None  # bytes refilled / bytes stored, against the previous plan


class PlacementDoc(msgspec.Struct):
    format: str
    inputs: dict[str, str]  # sha256 of each input file
    sites: dict[str, SiteDoc]
    titles: dict[str, list[str]]  # title -> servers holding it, primary first, all sites
    catalog: dict[str, tuple[int, float]]  # title -> (size_bytes, share of traffic)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def placement_document(
    placements: Mapping[str, Placement],
    churn: Mapping[str, float | None],
    inputs: Mapping[str, str],
) -> PlacementDoc:
    sites: dict[str, SiteDoc] = {}
    titles: dict[str, list[str]] = {}
    catalog: dict[str, tuple[int, float]] = {}
    for site, p in placements.items():
        b = balance(p)
        c = p.cutoff
        served = b.served_traffic or 1.0
        counts = np.bincount(p.holders[p.holders >= 0], minlength=len(p.servers))
        servers = []
        for i, s in enumerate(p.servers):
            servers.append(
                ServerDoc(
                    id=s.id,
                    site=s.site,
                    storage_bytes=s.storage_bytes,
                    throughput_bps=s.throughput_bps,
                    bytes=int(p.server_bytes[i]),
                    titles=int(counts[i]),
                    storage_utilisation=b.storage_utilisation[i],
                    traffic_share=float(p.server_traffic[i]) / served,
                    traffic_ratio=b.traffic_ratio[i],
                    head_share=None if c is None else c.head_shares[i],
                    tail_share=None if c is None else c.tail_shares[i],
                    head_weight=None if c is None else c.head_weights[i],
                    tail_weight=None if c is None else c.tail_weights[i],
                )
            )
        cut = None
        if c is not None:
            cut = CutoffDoc(
                log_density=c.log_density if math.isfinite(c.log_density) else None,
                head_titles=c.head_titles,
                hot_titles=c.hot_titles,
                head_bytes_share=c.head_bytes_share,
                head_traffic_share=c.head_traffic_share,
                hysteresis=c.hysteresis,
                wobble=c.wobble,
                expected_churn=c.expected_churn,
                reason=c.reason,
            )
        ids = p.catalog.ids
        sites[site] = SiteDoc(
            algorithm=p.algorithm,
            servers=servers,
            cutoff=cut,
            head=[ids[j] for j in p.head.nonzero()[0].tolist()],
            hot=[ids[j] for j in p.hot.nonzero()[0].tolist()],
            holes=[ids[j] for j in p.holes.nonzero()[0].tolist()],
            notes=list(p.notes),
            churn=churn.get(site),
        )
        for t, holders in p.holder_map().items():
            titles.setdefault(t, []).extend(holders)
        for t, size, share in zip(
            ids, p.catalog.size_bytes.tolist(), p.catalog.traffic.tolist(), strict=True
        ):
            catalog[t] = (size, share)
    return PlacementDoc(PLACEMENT_FORMAT, dict(inputs), sites, titles, catalog)


def write_json(doc: msgspec.Struct, path: Path) -> Path:
    """Write `doc` whole or not at all: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(doc), indent=1))
    os.replace(tmp, path)
    return path


def read_placement(path: Path) -> PlacementDoc:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such previous plan") from None
    try:
        doc = msgspec.json.decode(raw, type=PlacementDoc)
    except msgspec.DecodeError as exc:
        raise InputError(f"{path}: not a streamplane placement ({exc})") from None
    if doc.format != PLACEMENT_FORMAT:
        raise InputError(f"{path}: format {doc.format!r}, expected {PLACEMENT_FORMAT!r}")
    return doc


def prior_for(doc: PlacementDoc, site: str) -> Prior | None:
    """Yesterday's plan for one site, restricted to the servers the site had then."""
    s = doc.sites.get(site)
    if s is None:
        return None
    then = {x.id for x in s.servers}
    holders = {
        t: tuple(x for x in servers if x in then)
        for t, servers in doc.titles.items()
        if any(x in then for x in servers)
    }
    log_density = {
        t: math.log(share / size) if share > 0 else -math.inf
        for t, (size, share) in doc.catalog.items()
    }
    c = s.cutoff
    threshold = None if c is None else (math.inf if c.log_density is None else c.log_density)
    return Prior(
        holders=holders,
        head=frozenset(s.head),
        hot=frozenset(s.hot),
        log_density=log_density,
        threshold=threshold,
        head_weights={x.id: x.head_weight for x in s.servers if x.head_weight is not None},
        tail_weights={x.id: x.tail_weight for x in s.servers if x.tail_weight is not None},
    )


def previous_sizes(doc: PlacementDoc) -> dict[str, int]:
    return {t: size for t, (size, _) in doc.catalog.items()}
