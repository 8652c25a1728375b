"""The edge's operations endpoints: ``/healthz``, ``/metrics`` and ``/fill``.

Answered by whichever worker the connection landed on. ``/fill`` only records the plan and
wakes the supervisor, which pulls the titles in the background (see ``supervisor``).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from typing import TYPE_CHECKING

import msgspec

from streamplane.edge import http, metrics

if TYPE_CHECKING:
    from streamplane.edge.protocol import Request
    from streamplane.edge.server import Worker

__all__ = ["FillRequest", "FillStatus", "Reply", "answer", "parse_fill"]

_JSON = b"application/json"


class FillRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What the edge is told to hold, hottest first.

    Either the placement plane's fill plan (``streamplane.fill/1``: ``add`` entries with a
    ``title``) or just ``{"titles": [...]}``.
    """

    titles: tuple[str, ...]
    rate_bps: float | None = None  # overrides the configured fill rate for this plan


class FillStatus(msgspec.Struct, kw_only=True):
    state: str = "idle"  # idle | waiting (serving is busy) | filling | done | failed
    titles_total: int = 0
    titles_done: tuple[str, ...] = ()
    current: str = ""
    files_done: int = 0
    bytes_done: int = 0
    errors: tuple[str, ...] = ()


def parse_fill(body: bytes) -> FillRequest:
    """The titles of a fill request body; ``ValueError`` naming what is wrong."""
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("the body must be a JSON object")
    if raw.get("format", "").startswith("streamplane.fill/"):
        if raw["format"] != "streamplane.fill/1":
            raise ValueError(f"unsupported fill plan format {raw['format']!r}")
        add = raw.get("add")
        if not isinstance(add, list) or not all(isinstance(a, dict) for a in add):
            raise ValueError("a fill plan needs an 'add' list of {title, ...}")
        titles: object = [a.get("title") for a in add]
    else:
        titles = raw.get("titles")
    if not isinstance(titles, list) or not all(isinstance(t, str) for t in titles):
        raise ValueError("give 'titles': a list of title names (or a streamplane.fill/1 plan)")
    for t in titles:
        if not t or "/" in t or t.startswith(".") or len(t) > 200 or "\0" in t:
            raise ValueError(f"{t!r} is not a title name")
    rate = raw.get("rate_bps")
    if rate is not None and (not isinstance(rate, int | float) or rate <= 0):
        raise ValueError("rate_bps must be a positive number")
    return FillRequest(titles=tuple(dict.fromkeys(titles)), rate_bps=rate)


class Reply(msgspec.Struct, frozen=True):
    """An operations endpoint's answer, which the connection's core sends."""

    status: int
    body: bytes
    content_type: bytes = _JSON
    extra: tuple[tuple[bytes, bytes], ...] = ()


def _error(status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
    return Reply(status, http.error_body(status, message), extra=extra)


def answer(worker: Worker, req: Request, path: str, client_ip: str) -> Reply:
    """``/metrics`` and ``/fill`` (``/healthz`` is the connection core's: it reads no file)."""
    w = worker
    if path == "/metrics":
        total = metrics.sum_up(metrics.read_all(w.run_dir / "metrics"))
        st = os.statvfs(w.cache.root)
        extra = {
            "disk_used_bytes": float((st.f_blocks - st.f_bfree) * st.f_frsize),
            "disk_total_bytes": float(st.f_blocks * st.f_frsize),
            "draining": float(w.state.draining),
        }
        return Reply(200, metrics.render(total, extra), b"text/plain; version=0.0.4")
    if path == "/fill":
        if not _is_admin(w.config.admin_token, req, client_ip):
            return _error(403, "fill needs the admin token (or a loopback client)")
        status_path = w.run_dir / "fill-status.json"
        if req.method == b"GET":
            body = status_path.read_bytes() if status_path.exists() else b'{"state": "idle"}'
            return Reply(200, body)
        if req.method != b"POST":
            return _error(405, "GET or POST", extra=((b"Allow", b"GET, POST"),))
        try:
            plan = parse_fill(bytes(req.body))
        except ValueError as exc:
            return _error(400, str(exc))
        tmp = w.run_dir / f"fill-plan.{os.getpid()}.tmp"
        try:
            tmp.write_bytes(msgspec.json.encode(plan))
            os.replace(tmp, w.run_dir / "fill-plan.json")
        except OSError as exc:
            return _error(503, f"the edge cannot record the plan: {exc.strerror}")
        w.tell_keeper({"fill": True})
        body = msgspec.json.encode({"accepted": len(plan.titles), "status": "/fill"})
        return Reply(202, body + b"\n")
    return _error(404, "no such endpoint")


def _is_admin(secret: str, req: Request, client_ip: str) -> bool:
    given = req.headers.get(b"authorization", b"")
    if secret:
        return hmac.compare_digest(given, b"Bearer " + secret.encode())
    try:
        return ipaddress.ip_address(client_ip).is_loopback
    except ValueError:
        return False
