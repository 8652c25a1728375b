from __future__ import annotations

from pathlib import Path

import pytest

from streamplane.player import (
    TRACE_KINDS,
    TraceError,
    generate_trace,
    load_trace,
    load_trace_dir,
    parse_cooked_trace,
    parse_json_trace,
    trace_set,
)
from streamplane.player.traces import dump_cooked_trace, dump_json_trace


def test_json_periods() -> None:
    t = parse_json_trace(
        '[{"duration_ms": 1500, "bandwidth_kbps": 800, "latency_ms": 70},'
        ' {"duration_ms": 500, "bandwidth_kbps": 0}]'
    )
    assert [(p.duration_s, p.bandwidth_kbps, p.latency_ms) for p in t.periods] == [
        (1.5, 800.0, 70.0),
        (0.5, 0.0, 0.0),
    ]
    assert t.duration_s == 2.0
    assert t.mean_kbps == 600.0


def test_cooked_lines() -> None:
    t = parse_cooked_trace("# time Mbps\n0 1.5\n1.0 2\n\n3.0 0.5  # last\n", default_latency_ms=40)
    assert [(p.duration_s, p.bandwidth_kbps) for p in t.periods] == [
        (1.0, 1500.0),
        (2.0, 2000.0),
        (1.5, 500.0),  # the last point lasts the median step
    ]
    assert {p.latency_ms for p in t.periods} == {40.0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 1\n1 2\nabc 3\n", "line 3: not a number"),
        ("0 1\n1 2 3\n", "line 2: expected two numbers"),
        ("0 1\n2 1\n1 1\n", "line 3: time 1 s is not after"),
        ("0 1\n1 -2\n", "line 2: bandwidth must be >= 0"),
        ("0 1\n", "at least two"),
        ("0 0\n1 0\n", "zero throughout"),
    ],
)
def test_cooked_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_cooked_trace(text, "t.txt")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"duration_ms": 1000,\n "bandwidth_kbps": }]', "line 2, column"),
        ('{"duration_ms": 1}', "expected a JSON list"),
        ('[{"duration_ms": 1000}]', "period 1: missing bandwidth_kbps"),
        ('[{"duration_ms": 1000, "bandwidth_kbps": 1}, 5]', "period 2: expected an object"),
        ('[{"duration_ms": 0, "bandwidth_kbps": 1}]', "period 1: duration_ms must be > 0"),
        ('[{"duration_ms": 10, "bandwidth_kbps": "9"}]', "bandwidth_kbps must be a number"),
        ('[{"duration_ms": 10, "bandwidth_kbps": 9, "rtt": 3}]', "unknown field"),
        ("[]", "no periods"),
    ],
)
def test_json_errors_name_the_place(text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_json_trace(text, "t.json")


def test_files_and_folders(tmp_path: Path) -> None:
    g = generate_trace("lte", 1, 30)
    (tmp_path / "a.json").write_text(dump_json_trace(g))
    (tmp_path / "b.txt").write_text(dump_cooked_trace(g))
    (tmp_path / "notes.md").write_text("not a trace")
    a, b = load_trace_dir(tmp_path)
    assert [p.bandwidth_kbps for p in a.periods] == [p.bandwidth_kbps for p in g.periods]
    assert [p.latency_ms for p in a.periods] == [p.latency_ms for p in g.periods]
    assert [round(p.bandwidth_kbps, 3) for p in b.periods] == [p.bandwidth_kbps for p in g.periods]
    with pytest.raises(TraceError, match="no such trace"):
        load_trace(tmp_path / "missing.json")
    with pytest.raises(TraceError, match="not a folder"):
        load_trace_dir(tmp_path / "a.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match="no trace files"):
        load_trace_dir(tmp_path / "empty")


def test_generators_are_seeded_and_distinct() -> None:
    assert generate_trace("3g", 7) == generate_trace("3g", 7)
    assert generate_trace("3g", 7) != generate_trace("3g", 8)
    means = {k: [t.mean_kbps for t in trace_set(k, 6, seed=1)] for k in TRACE_KINDS}
    assert max(means["3g"]) < min(means["broadband"])
    assert sum(means["3g"]) < sum(means["lte"]) < sum(means["broadband"])
    lat = {k: generate_trace(k, 3).periods[0].latency_ms for k in TRACE_KINDS}
    assert lat["3g"] > lat["broadband"]
    with pytest.raises(TraceError):
        generate_trace("5g", 1)  # type: ignore[arg-type]


def test_broadband_has_drops_and_recoveries() -> None:
    t = generate_trace("broadband", 4, 1200)
    bw = [p.bandwidth_kbps for p in t.periods]
    median = sorted(bw)[len(bw) // 2]
    low = [i for i, b in enumerate(bw) if b < 0.1 * median]
    assert low, "no drop in 20 minutes"
    assert bw[-1] > 0.3 * median or any(b > 0.5 * median for b in bw[low[-1] :])
