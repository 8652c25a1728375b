"""The files: servers.toml, popularity.csv and placement.json, with errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamplane.placement import files, hca
from streamplane.placement.errors import InputError
from streamplane.placement.model import TB, Prior
from tests.placement.clusters import catalog_for, cluster

SERVERS = """
[[server]]
id = "storage-1"
site = "ams"
storage_tb = 200
throughput_gbps = 40

[[server]]
id = "flash-1"
site = "ams"
storage_tb = 18.5
throughput_gbps = 100
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_servers_are_read_in_units_of_tb_and_gbps(tmp_path: Path) -> None:
    servers = files.read_servers(write(tmp_path, "s.toml", SERVERS))
    assert [(s.id, s.site, s.storage_bytes, s.throughput_bps) for s in servers] == [
        ("storage-1", "ams", 200 * TB, 40e9),
        ("flash-1", "ams", 18_500_000_000_000, 100e9),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[server]]\nid='a'\nstorage_tb=1\n", "missing 'throughput_gbps'"),
        ("[[server]]\nid='a'\nstorage_gb=1\nthroughput_gbps=1\n", r"unknown keys \['storage_gb'\]"),
        ("[[server]]\nid='a'\nstorage_tb='big'\nthroughput_gbps=1\n", "must be a number"),
        ("[[servers]]\nid='a'\n", "unknown top-level keys"),
        ("server = 3\n", "no \\[\\[server\\]\\] tables"),
        ("[[server]\n", "not valid TOML"),
    ],
)
def test_bad_servers_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        files.read_servers(write(tmp_path, "s.toml", text))


def test_popularity_is_normalised(tmp_path: Path) -> None:
    cat = files.read_popularity(
        write(tmp_path, "p.csv", "title,size_bytes,popularity,note\na,1000,30,x\nb,2e3,10,y\n")
    )
    assert cat.ids == ("a", "b")
    assert cat.size_bytes.tolist() == [1000, 2000]
    assert cat.traffic.tolist() == [0.75, 0.25]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("title,size\na,1\n", "missing popularity, size_bytes"),
        (
            "title,size_bytes,popularity\na,1,1\na,2,1\n",
            "line 3: title 'a' already appeared on line 2",
        ),
        ("title,size_bytes,popularity\na,-5,1\n", "line 2: title 'a' has size -5"),
        ("title,size_bytes,popularity\na,1.5,1\n", "not a whole number"),
        ("title,size_bytes,popularity\na,10,-1\n", "has popularity -1.0"),
        ("title,size_bytes,popularity\na,10,lots\n", "is not a number"),
        ("title,size_bytes,popularity\n", "no titles"),
        ("title,size_bytes,popularity\na,10,0\n", "zero popularity"),
    ],
)
def test_bad_popularity_files_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        files.read_popularity(write(tmp_path, "p.csv", text))


def test_missing_files_are_named(tmp_path: Path) -> None:
    for read in (files.read_servers, files.read_popularity, files.read_placement):
        with pytest.raises(InputError, match="no such"):
            read(tmp_path / "nope")  # type: ignore[operator]


def test_a_popularity_file_round_trips(tmp_path: Path) -> None:
    cat = catalog_for(cluster(1, 2), 300, 0.5, seed=1)
    again = files.read_popularity(files.write_popularity(cat, tmp_path / "p.csv"))
    assert again.ids == cat.ids
    assert (again.size_bytes == cat.size_bytes).all()
    assert abs(again.traffic - cat.traffic).max() < 1e-9


def test_the_plan_gives_tomorrow_what_it_needs(tmp_path: Path) -> None:
    servers = cluster(1, 2)
    cat = catalog_for(servers, 500, 0.5, seed=2)
    p = hca.place(servers, cat)
    doc = files.placement_document({"default": p}, {"default": None}, {"servers": "x"})
    path = files.write_json(doc, tmp_path / "placement.json")
    raw = json.loads(path.read_text())
    assert raw["titles"][cat.ids[0]] == list(p.holder_map()[cat.ids[0]])  # the control plane
    prior = files.prior_for(files.read_placement(path), "default")
    direct = Prior.from_placement(p)
    assert prior is not None
    assert prior.holders == direct.holders and prior.head == direct.head
    assert prior.hot == direct.hot and prior.threshold == pytest.approx(direct.threshold)
    assert prior.head_weights == pytest.approx(direct.head_weights)
    assert files.prior_for(files.read_placement(path), "elsewhere") is None


def test_a_file_that_is_not_a_plan_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a streamplane placement"):
        files.read_placement(write(tmp_path, "p.json", '{"titles": 3}'))
