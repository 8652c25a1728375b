from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamplane import cli
from streamplane.cli import app


@pytest.fixture()
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(cli.out_console, "width", 250)  # the table's columns, unabridged
    manifest = {
        "segment_duration_ms": 4000,
        "bitrates_kbps": [300, 750, 1500],
        "segment_sizes_bits": [[1_200_000, 3_000_000, 6_000_000]] * 15,
    }
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    traces = tmp_path / "traces"
    traces.mkdir()
    (traces / "slow.txt").write_text("".join(f"{t} 0.6\n" for t in range(60)))
    periods = [{"duration_ms": 1000, "bandwidth_kbps": 5000, "latency_ms": 40}] * 60
    (traces / "fast.json").write_text(json.dumps(periods))
    return tmp_path


def test_single_trace_with_plot(files: Path) -> None:
    out = files / "p.png"
    r = CliRunner().invoke(
        app,
        [
            "abr-sim",
            "--manifest", str(files / "m.json"),
            "--trace", str(files / "traces/fast.json"),
            "--abr", "bba,streamplane",
            "--max-buffer", "20",
            "--plot", str(out),
        ],
        terminal_width=200,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "streamplane" in r.output and "bba" in r.output and "mean" not in r.output
    assert out.stat().st_size > 1000


def test_batch_prints_every_trace_and_the_mean(files: Path) -> None:
    r = CliRunner().invoke(
        app,
        ["abr-sim", "--manifest", str(files / "m.json"), "--traces", str(files / "traces"),
         "--abr", "all"],
        terminal_width=200,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    for word in ("fast.json", "slow.txt", "mean", "bola-e", "throughput"):
        assert word in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trace", "traces/missing.json"], "no such trace"),
        (["--trace", "traces/fast.json", "--abr", "nope"], "no ABR algorithm"),
        (["--traces", "traces", "--plot", "x.png"], "--plot works with a single --trace"),
        ([], "exactly one of"),
        (["--trace", "traces/fast.json", "--max-buffer", "2"], "shorter than a segment"),
        (["--trace", "bad.txt"], "line 2"),
        (["--trace", "empty.json"], "empty.json: the file is empty"),
        (["--trace", "object.json"], "expected a JSON list of periods, found a JSON object"),
        (["--trace", "traces/fast.json", "--max-buffer", "nan"], "max buffer must be a finite"),
        (["--trace", "traces/slow.txt", "--latency-ms", "-5"], "latency must be a finite"),
        # a minute at zero, then a millisecond at 100 kbps, looping: days per segment
        (["--trace", "dead.json"], "segment 0 (rung 0, 1200000 bits) did not arrive within 600 s"),
    ],
)
def test_bad_inputs_exit_non_zero(files: Path, args: list[str], message: str) -> None:
    (files / "bad.txt").write_text("0 1\n1 x\n")
    (files / "empty.json").write_text("")
    (files / "object.json").write_text('{"duration_ms": 1000, "bandwidth_kbps": 500}')
    dead = [{"duration_ms": 60_000, "bandwidth_kbps": 0}, {"duration_ms": 1, "bandwidth_kbps": 100}]
    (files / "dead.json").write_text(json.dumps(dead))
    full = ["abr-sim", "--manifest", str(files / "m.json")]
    full += [str(files / a) if a.endswith((".json", ".txt")) else a for a in args]
    r = CliRunner().invoke(app, full, terminal_width=200)
    assert r.exit_code == 2
    assert message in r.output


def test_cooked_folders_as_published(files: Path) -> None:
    """Real cooked sets name their files freely: Puffer's have no extension, FCC's end in a host
    name. Every visible file but the documentation is a trace."""
    real = files / "real"
    real.mkdir()
    lines = "".join(f"{t} 0.6\n" for t in range(60))
    (real / "trace-3wP8CQQtDM9WdfSn8DHu6SZS__1").write_text(lines)
    (real / "trace_10322_http---edition.cnn.com").write_text(lines)
    (real / "README.md").write_text("# not a trace")
    (real / ".hidden").write_text("not a trace either")
    r = CliRunner().invoke(
        app,
        ["abr-sim", "--manifest", str(files / "m.json"), "--traces", str(real), "--abr", "bba"],
        terminal_width=200,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "trace-3wP8CQQtDM9WdfSn8DHu6SZS__1" in r.output
    assert "edition.cnn.com" in r.output and "mean" in r.output
    assert "README" not in r.output and "hidden" not in r.output


@pytest.mark.parametrize(("latency", "startup"), [(None, "2.00"), ("80", "2.08"), ("500", "2.50")])
def test_latency_of_cooked_traces(files: Path, latency: str | None, startup: str) -> None:
    # the first segment, 1.2 Mb at the lowest rung over 0.6 Mbps: 2 s, plus the latency
    extra = [] if latency is None else ["--latency-ms", latency]
    args = [
        "abr-sim",
        "--manifest",
        str(files / "m.json"),
        "--trace",
        str(files / "traces/slow.txt"),
    ]
    r = CliRunner().invoke(app, [*args, "--abr", "throughput", *extra], terminal_width=200)
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "throughput" in line)
    assert row.split("│")[8].strip() == startup, row
