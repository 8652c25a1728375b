"""An edge signs every heartbeat with its own key, and will not heartbeat without one.

The signature is a pure function of the key, the edge id, a timestamp and the exact body
(``streamplane.edge.report``); the control plane checks it with the same code.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from streamplane.cli import app
from streamplane.edge import (
    HeartbeatSigner,
    body_digest,
    edge_key,
    heartbeat_authorization,
    heartbeat_signature,
    parse_edge_authorization,
)
from tests.edge.conftest import FLEET_KEY_HEX, start_edge

KEY = bytes.fromhex(FLEET_KEY_HEX)


def test_a_signature_round_trips() -> None:
    body = b'{"edge_id": "edge-7"}'
    header = heartbeat_authorization(KEY, "edge-7", 1_800_000_000_123, body)
    assert header.startswith("StreamplaneEdge id=edge-7, ts=1800000000123, sig=")
    claim = parse_edge_authorization(header)
    assert (claim.edge_id, claim.ts_ms) == ("edge-7", 1_800_000_000_123)
    assert claim.sig == heartbeat_signature(KEY, "edge-7", claim.ts_ms, body_digest(body))


@given(
    body=st.binary(max_size=64),
    edge_id=st.from_regex(r"[a-z0-9][a-z0-9.-]{0,15}", fullmatch=True),
    ts=st.integers(0, 10**15),
    flip=st.integers(0, 63),
)
def test_changing_anything_signed_changes_the_signature(
    body: bytes, edge_id: str, ts: int, flip: int
) -> None:
    sig = heartbeat_signature(KEY, edge_id, ts, body_digest(body))
    changed = (
        body[:flip] + bytes([body[flip] ^ 1]) + body[flip + 1 :]
        if flip < len(body)
        else body + b" "
    )
    assert heartbeat_signature(KEY, edge_id, ts, body_digest(changed)) != sig
    assert heartbeat_signature(KEY, edge_id, ts + 1, body_digest(body)) != sig
    assert heartbeat_signature(KEY, edge_id + "x", ts, body_digest(body)) != sig
    other = bytes([KEY[0] ^ 1]) + KEY[1:]
    assert heartbeat_signature(other, edge_id, ts, body_digest(body)) != sig


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("Bearer abc", "scheme is 'Bearer'"),
        ("StreamplaneEdge id=e1, ts=1", "has no sig"),
        ("StreamplaneEdge id=e1, ts=1, sig=" + "0" * 64 + ", extra=1", "is not StreamplaneEdge"),
        ("StreamplaneEdge id=e1, id=e2, ts=1, sig=" + "0" * 64, "is not StreamplaneEdge"),
        ("StreamplaneEdge id=e1, ts=-1, sig=" + "0" * 64, "ts must be epoch milliseconds"),
        ("StreamplaneEdge id=e1, ts=1" + "0" * 18 + ", sig=" + "0" * 64, "ts must be"),
        ("StreamplaneEdge id=e1, ts=1, sig=" + "G" * 64, "sig must be 64 lowercase hex"),
        ("StreamplaneEdge id=, ts=1, sig=" + "0" * 64, "id must be 1-64"),
        ("StreamplaneEdge id=" + "e" * 65 + ", ts=1, sig=" + "0" * 64, "id must be 1-64"),
    ],
)
def test_malformed_authorization_headers_say_what_is_wrong(header: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_edge_authorization(header)


def test_the_signer_never_repeats_a_timestamp() -> None:
    signer = HeartbeatSigner("e1", KEY)
    stamps = [
        parse_edge_authorization(signer.authorization(b"{}", now)).ts_ms
        for now in (100.0, 100.0, 99.5, 100.0005, 101.0)  # same ms twice, a clock stepped back
    ]
    assert stamps == [100_000, 100_001, 100_002, 100_003, 101_000]


def test_an_edge_key_must_be_hex_and_long_enough() -> None:
    assert edge_key("ab" * 16) == b"\xab" * 16
    with pytest.raises(ValueError, match="at least 16"):
        edge_key("ab" * 15)
    with pytest.raises(ValueError, match="hex"):
        edge_key("zz" * 16)


# -- the edge process ----------------------------------------------------------------------------


def _run_edge_cli(tmp_path: Path, *args: str, key: str | None = None) -> tuple[int, str]:
    origin = tmp_path / "origin"
    origin.mkdir(exist_ok=True)
    base = ["edge", "--origin", str(origin), "--cache", str(tmp_path / "cache"), "--id", "e7"]
    env = {} if key is None else {"STREAMPLANE_EDGE_FLEET_KEY": key}
    result = CliRunner().invoke(app, [*base, *args], env=env)
    return result.exit_code, result.output


def test_an_edge_that_heartbeats_will_not_start_without_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("STREAMPLANE_")]:
        monkeypatch.delenv(name)
    code, output = _run_edge_cli(tmp_path, "--control", "http://127.0.0.1:9")
    assert code == 2, output
    assert "edge.fleet_key is not set" in output and "[control.edges.e7]" in output
    assert "--dev" in output
    code, output = _run_edge_cli(tmp_path, "--control", "http://127.0.0.1:9", key="abcd")
    assert code == 2 and "edge.fleet_key: the key is 2 bytes" in output, output


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """A stand-in control plane that records each heartbeat's Authorization and body."""
    beats: list[tuple[str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            beats.append((self.headers.get("Authorization", ""), body))
            reply = b'{"interval_s": 0.5}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", beats
    server.shutdown()


def test_every_heartbeat_and_the_drain_notice_are_signed(
    tmp_path: Path, recorder: tuple[str, list[tuple[str, bytes]]]
) -> None:
    url, beats = recorder
    (tmp_path / "origin").mkdir()
    e = start_edge(
        tmp_path, tmp_path / "origin", workers=1, control_url=url, edge_id="e7", heartbeat_s=0.5
    )
    try:
        deadline = time.monotonic() + 20
        while len(beats) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert e.stop(signal.SIGTERM) == 0
    finally:
        if e.process.poll() is None:
            e.stop(signal.SIGKILL)
    stamps = []
    for header, body in beats:
        claim = parse_edge_authorization(header)
        assert claim.edge_id == "e7" and json.loads(body)["edge_id"] == "e7"
        assert claim.sig == heartbeat_signature(KEY, "e7", claim.ts_ms, body_digest(body))
        assert abs(claim.ts_ms / 1000 - time.time()) < 60
        stamps.append(claim.ts_ms)
    assert stamps == sorted(set(stamps)) and len(stamps) >= 3
    assert json.loads(beats[-1][1])["draining"] is True
