"""Network traces: what the link delivers over time, read from files or generated from a seed.

Two published formats are read:

- JSON: a list of periods `{"duration_ms": 1000, "bandwidth_kbps": 2500, "latency_ms": 80}`
  (`latency_ms` may be left out: 0);
- "cooked" text, as in the Pensieve and Puffer trace sets: one `seconds Mbps` pair per line,
  times ascending; each line's bandwidth lasts until the next line's time, the last line as long
  as the median step. Blank lines and `#` comments are skipped. There is no latency column:
  `default_latency_ms` applies.

The generators make representative sets from a seed: `3g` (0.3-1.8 Mbps, 100-250 ms, deep
fades), `lte` (1.5-12 Mbps, 40-80 ms, fast swings and drops), `broadband` (8-40 Mbps, 10-30 ms,
steady with rare drops to under 1.5 Mbps and recoveries). Each is a regime process in
one-second periods: log-bandwidth follows an AR(1) around the trace's own mean, and drops
arrive as a Poisson process, last a few seconds to half a minute and recover over a ramp.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from streamplane.player.errors import TraceError

TraceKind = Literal["3g", "lte", "broadband"]
TRACE_KINDS: tuple[TraceKind, ...] = ("3g", "lte", "broadband")


class Period(msgspec.Struct, frozen=True):
    duration_s: float
    bandwidth_kbps: float
    latency_ms: float = 0.0


class Trace(msgspec.Struct, frozen=True):
    name: str
    periods: tuple[Period, ...]

    @property
    def duration_s(self) -> float:
        return sum(p.duration_s for p in self.periods)

    @property
    def mean_kbps(self) -> float:
        return sum(p.bandwidth_kbps * p.duration_s for p in self.periods) / self.duration_s


def _checked(name: str, periods: Sequence[Period]) -> Trace:
    if not periods:
        raise TraceError(f"{name}: the trace has no periods")
    if all(p.bandwidth_kbps <= 0 for p in periods):
        raise TraceError(f"{name}: bandwidth is zero throughout; nothing could ever download")
    return Trace(name, tuple(periods))


def parse_json_trace(text: str, name: str = "trace") -> Trace:
    """Periods from the JSON format; errors name the line (syntax) or the period and field."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(
            f"{name}: line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})"
        ) from None
    if not isinstance(data, list):
        found = "a JSON object" if isinstance(data, dict) else type(data).__name__
        raise TraceError(f"{name}: expected a JSON list of periods, found {found}")
    periods = []
    for n, item in enumerate(data, 1):
        where = f"{name}: period {n}"
        if not isinstance(item, dict):
            raise TraceError(f"{where}: expected an object, found {type(item).__name__}")
        unknown = set(item) - {"duration_ms", "bandwidth_kbps", "latency_ms"}
        if unknown:
            raise TraceError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        values = {}
        for key in ("duration_ms", "bandwidth_kbps", "latency_ms"):
            if key not in item:
                if key == "latency_ms":
                    values[key] = 0.0
                    continue
                raise TraceError(f"{where}: missing {key}")
            v = item[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise TraceError(f"{where}: {key} must be a number, found {v!r}")
            values[key] = float(v)
        if values["duration_ms"] <= 0:
            raise TraceError(f"{where}: duration_ms must be > 0, found {values['duration_ms']:g}")
        if values["bandwidth_kbps"] < 0:
            raise TraceError(f"{where}: bandwidth_kbps must be >= 0")
        if values["latency_ms"] < 0:
            raise TraceError(f"{where}: latency_ms must be >= 0")
        periods.append(
            Period(values["duration_ms"] / 1000.0, values["bandwidth_kbps"], values["latency_ms"])
        )
    return _checked(name, periods)


def _check_latency(name: str, latency_ms: float) -> None:
    if not (math.isfinite(latency_ms) and latency_ms >= 0):
        raise TraceError(f"{name}: latency must be a finite number of ms >= 0, found {latency_ms}")


def parse_cooked_trace(text: str, name: str = "trace", default_latency_ms: float = 0.0) -> Trace:
    """Periods from `seconds Mbps` lines; errors name the line."""
    _check_latency(name, default_latency_ms)
    points: list[tuple[int, float, float]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise TraceError(
                f"{name}: line {lineno}: expected two numbers `seconds Mbps`, found {raw.strip()!r}"
            )
        try:
            t, mbps = float(fields[0]), float(fields[1])
        except ValueError:
            raise TraceError(f"{name}: line {lineno}: not a number in {raw.strip()!r}") from None
        if not (math.isfinite(t) and math.isfinite(mbps)):
            raise TraceError(f"{name}: line {lineno}: numbers must be finite")
        if mbps < 0:
            raise TraceError(f"{name}: line {lineno}: bandwidth must be >= 0, found {mbps:g}")
        if points and t <= points[-1][1]:
            raise TraceError(
                f"{name}: line {lineno}: time {t:g} s is not after the previous line's "
                f"{points[-1][1]:g} s (times must ascend)"
            )
        points.append((lineno, t, mbps))
    if len(points) < 2:
        raise TraceError(f"{name}: a cooked trace needs at least two `seconds Mbps` lines")
    steps = [b[1] - a[1] for a, b in itertools.pairwise(points)]
    last = statistics.median(steps)
    periods = [
        Period(step, mbps * 1000.0, default_latency_ms)
        for (_, _, mbps), step in zip(points, [*steps, last], strict=True)
    ]
    return _checked(name, periods)


def load_trace(path: Path, default_latency_ms: float = 0.0) -> Trace:
    """A trace file in either format, named after the file: JSON when it is `*.json` or starts
    with `[` or `{`, else cooked lines (given `default_latency_ms`, which they cannot say)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"{path}: no such trace file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace ({exc})") from None
    _check_latency(str(path), default_latency_ms)
    head = text.lstrip()[:1]
    if not head:
        raise TraceError(f"{path}: the file is empty, not a trace")
    if path.suffix == ".json" or head in "[{":
        return parse_json_trace(text, str(path))
    return parse_cooked_trace(text, str(path), default_latency_ms)


def _is_trace_file(path: Path) -> bool:
    """Every visible file of a trace folder but its documentation: real cooked sets name their
    files freely (Puffer's have no extension, FCC's end in a host name, `...www.amazon.com`)."""
    name = path.name
    return (
        path.is_file()
        and not name.startswith(".")
        and not name.upper().startswith("README")
        and path.suffix.lower() not in {".md", ".rst", ".png", ".pdf"}
    )


def load_trace_dir(directory: Path, default_latency_ms: float = 0.0) -> list[Trace]:
    """Every trace file of a folder (`_is_trace_file`), sorted by name."""
    if not directory.is_dir():
        raise TraceError(f"{directory}: not a folder of traces")
    files = sorted(p for p in directory.iterdir() if _is_trace_file(p))
    if not files:
        raise TraceError(f"{directory}: no trace files (hidden files and README/*.md are skipped)")
    return [load_trace(p, default_latency_ms) for p in files]


def dump_json_trace(trace: Trace) -> str:
    return json.dumps(
        [
            {
                "duration_ms": round(p.duration_s * 1000, 3),
                "bandwidth_kbps": round(p.bandwidth_kbps, 3),
                "latency_ms": round(p.latency_ms, 3),
            }
            for p in trace.periods
        ],
        indent=0,
    )


def dump_cooked_trace(trace: Trace) -> str:
    """`seconds Mbps` lines (latency is not representable and is dropped)."""
    lines, t = [], 0.0
    for p in trace.periods:
        lines.append(f"{t:.3f} {p.bandwidth_kbps / 1000:.6f}")
        t += p.duration_s
    return "\n".join(lines) + "\n"


# --- generators --------------------------------------------------------------------------------


class _Profile(msgspec.Struct, frozen=True):
    mean_kbps: tuple[float, float]  # the trace's own mean is drawn log-uniform in this range
    sigma: float  # spread of log-bandwidth around the mean
    rho: float  # AR(1) coefficient per second
    latency_ms: tuple[float, float]
    drop_every_s: float  # mean time between drops
    drop_depth: tuple[float, float]  # bandwidth during a drop, as a fraction of the mean
    drop_s: tuple[float, float]
    recover_s: float
    floor_kbps: float


_PROFILES: dict[TraceKind, _Profile] = {
    "3g": _Profile((300, 1800), 0.45, 0.85, (100, 250), 60, (0.05, 0.3), (3, 15), 6, 20),
    "lte": _Profile((1500, 12000), 0.55, 0.75, (40, 80), 45, (0.03, 0.15), (2, 20), 4, 50),
    "broadband": _Profile((8000, 40000), 0.12, 0.9, (10, 30), 120, (0.02, 0.05), (5, 30), 8, 200),
}


def generate_trace(
    kind: TraceKind, seed: int, duration_s: float = 600.0, name: str | None = None
) -> Trace:
    """One seeded trace of one-second periods (see the module docstring for the model)."""
    if kind not in _PROFILES:
        raise TraceError(f"no trace kind {kind!r}; choose one of {', '.join(TRACE_KINDS)}")
    prof = _PROFILES[kind]
    rng = np.random.default_rng(seed)
    lo, hi = prof.mean_kbps
    mean = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    n = max(math.ceil(duration_s), 2)
    innovation = prof.sigma * math.sqrt(1 - prof.rho**2)
    x = 0.0
    periods = []
    drop_left = 0.0
    recover_left = 0.0
    depth = 1.0
    for _ in range(n):
        x = prof.rho * x + innovation * float(rng.standard_normal())
        factor = 1.0
        if drop_left > 0:
            factor = depth
            drop_left -= 1
            if drop_left <= 0:
                recover_left = prof.recover_s
        elif recover_left > 0:
            factor = depth + (1 - depth) * (1 - recover_left / prof.recover_s)
            recover_left -= 1
        elif rng.random() < 1.0 / prof.drop_every_s:
            depth = float(rng.uniform(*prof.drop_depth))
            drop_left = float(rng.uniform(*prof.drop_s))
            factor = depth
        bw = max(mean * math.exp(x - prof.sigma**2 / 2) * factor, prof.floor_kbps)
        lat = float(rng.uniform(*prof.latency_ms))
        periods.append(Period(1.0, round(bw, 1), round(lat, 1)))
    return Trace(name or f"{kind}-{seed}", tuple(periods))


def trace_set(kind: TraceKind, count: int, seed: int, duration_s: float = 600.0) -> list[Trace]:
    """`count` traces of one kind, trace k seeded from (seed, k)."""
    return [
        generate_trace(kind, seed * 1000 + k, duration_s, name=f"{kind}-{seed}-{k:02d}")
        for k in range(count)
    ]
