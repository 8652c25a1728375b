"""bench/abr.py's real-trace mode, end to end on a tiny folder (the figures are the bench's)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench" / "abr.py"


def _bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_abr", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_held_out_split_depends_on_the_file_name_alone() -> None:
    held_out = _bench_module().held_out
    names = [f"trace_{k}_http---www.example.com" for k in range(600)]
    share = sum(held_out(n) for n in names) / len(names)
    assert 0.28 < share < 0.39  # about a third
    assert all(held_out(n) == held_out(f"/some/folder/{n}") for n in names[:50])


def test_real_trace_folders_print_a_table_per_part(tmp_path: Path) -> None:
    manifest = {
        "segment_duration_ms": 4000,
        "bitrates_kbps": [300, 750, 1500],
        "segment_sizes_bits": [[1_200_000, 3_000_000, 6_000_000]] * 10,
    }
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    folder = tmp_path / "cooked"
    folder.mkdir()
    for k in range(6):  # Puffer-style names, no extension
        rate = 0.5 + k
        (folder / f"trace-{k}__{k}").write_text("".join(f"{t} {rate}\n" for t in range(0, 40, 2)))
    args = ["--title", str(tmp_path / "m.json"), "--duration", "40", "--jobs", "1"]
    run = subprocess.run(
        [sys.executable, str(BENCH), "--traces", str(folder), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "### cooked, all: 6 traces" in out
    assert "### cooked, tuning:" in out and "### cooked, held-out:" in out
    assert "| streamplane |" in out and "| bola-e |" in out and "switches/min" in out
    assert "goal met on every folder" in out or "goal NOT met" in out
    bad = subprocess.run(
        [sys.executable, str(BENCH), "--traces", str(tmp_path / "nowhere"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "nowhere is neither" in bad.stderr
