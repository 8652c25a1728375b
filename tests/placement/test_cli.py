"""`streamplane place` end to end, as a user runs it: files in, plan, fill plans, report out,
and a non-zero exit with a clear message on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from streamplane.placement import files
from tests.placement.clusters import catalog_for, cluster

EXAMPLE = Path(__file__).parents[2] / "examples" / "servers.toml"


def place(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamplane", "place", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def popularity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cat = catalog_for(cluster(1, 2), 1500, 0.5, seed=21)
    return files.write_popularity(cat, tmp_path_factory.mktemp("pop") / "pop.csv")


def test_place_writes_the_plan_fill_plans_and_report(popularity: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan"
    first = place("--servers", EXAMPLE, "--popularity", popularity, "--out", out)
    assert first.returncode == 0, first.stderr
    assert "D* =" in first.stdout and "holes: 0 titles" in first.stdout
    plan = json.loads((out / "placement.json").read_text())
    assert len(plan["titles"]) == 1500
    assert {p.name for p in (out / "fill").iterdir()} == {
        "storage-1.json",
        "flash-1.json",
        "flash-2.json",
    }
    fill = json.loads((out / "fill" / "flash-1.json").read_text())
    assert fill["server"] == "flash-1" and fill["add_bytes"] == fill["hold_bytes"] > 0
    report = out / "report"
    assert (report / "index.html").stat().st_size > 0
    assert (report / "utilisation-reference.png").stat().st_size > 10_000
    assert (report / "popularity-reference.png").stat().st_size > 10_000
    assert "D* =" in (report / "placement.md").read_text()

    again = place(
        "--servers",
        EXAMPLE,
        "--popularity",
        popularity,
        "--previous",
        out / "placement.json",
        "--out",
        out,
    )
    assert again.returncode == 0, again.stderr
    assert "churn against the previous plan: 0.00 %" in again.stdout


def test_a_catalog_larger_than_the_cluster_fails_with_its_size(tmp_path: Path) -> None:
    pop = tmp_path / "big.csv"
    pop.write_text("title,size_bytes,popularity\na,300000000000000,1\n", encoding="utf-8")
    r = place("--servers", EXAMPLE, "--popularity", pop, "--out", tmp_path / "o")
    assert r.returncode == 1
    assert "the catalog is 300.00 TB but the cluster stores 236.00 TB" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("servers", "rows", "message"),
    [
        ("storage_tb = 0\nthroughput_gbps = 10", "a,10,1", "has no storage"),
        ("storage_tb = 10\nthroughput_gbps = 10", "a,10,1\na,20,1", "already appeared on line 2"),
        ("storage_tb = 10\nthroughput_gbps = 10", "a,-10,1", "has size -10"),
    ],
)
def test_bad_input_exits_2_and_says_why(
    tmp_path: Path, servers: str, rows: str, message: str
) -> None:
    s = tmp_path / "s.toml"
    s.write_text(f'[[server]]\nid = "x"\n{servers}\n', encoding="utf-8")
    p = tmp_path / "p.csv"
    p.write_text(f"title,size_bytes,popularity\n{rows}\n", encoding="utf-8")
    r = place("--servers", s, "--popularity", p, "--out", tmp_path / "o")
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
