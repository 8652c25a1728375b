"""`streamplane control` and `streamplane control migrate`, as an operator runs them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from typer.testing import CliRunner

from streamplane.cli import app

from .conftest import EDGE_KEYS, KEY_HEX, write_title


def _config(tmp_path: Path, port: int) -> Path:
    write_title(tmp_path / "catalog", "demo")
    path = tmp_path / "streamplane.toml"
    path.write_text(
        f"""
[tokens]
keys = {{ k1 = "{KEY_HEX}" }}

[control]
database_url = "sqlite+aiosqlite:///{tmp_path / "control.db"}"
catalog_dir = "{tmp_path / "catalog"}"
port = {port}

[control.edges.e1]
key = "{EDGE_KEYS["e1"]}"
base_url = "http://e1.example:8081"
"""
    )
    return path


def test_migrate(tmp_path: Path) -> None:
    config = _config(tmp_path, 0)
    result = CliRunner().invoke(app, ["control", "--config", str(config), "migrate"])
    assert result.exit_code == 0, result.output
    assert "schema up to date" in result.output
    assert (tmp_path / "control.db").exists()


def test_bad_settings_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[control]\nprot = 1\n")
    result = CliRunner().invoke(app, ["control", "--config", str(bad), "migrate"])
    assert result.exit_code == 2 and "prot" in result.output


def test_serve(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = _config(tmp_path, 1)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamplane",
            "control",
            "--config",
            str(config),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/titles", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "the control plane did not come up"
                time.sleep(0.1)
        assert [t["id"] for t in r.json()["titles"]] == ["demo"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_no_start_without_edge_credentials(tmp_path: Path) -> None:
    config = _config(tmp_path, 1)
    text = config.read_text()
    config.write_text(text[: text.index("[control.edges.e1]")])
    result = CliRunner().invoke(app, ["control", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "no edge can prove who it is" in result.output
    assert "[control.edges.<edge id>]" in result.output and "--dev" in result.output
