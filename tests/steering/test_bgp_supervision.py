"""Supervising ExaBGP, the parts that need no BGP session: hold times and relations from
the settings, the restart back-off, what /healthz and /metrics say of sessions, leftover
working directories, and the tether that ends a speaker with its parent."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.config import SettingsError, load_settings
from streamplane.steering import (
    BgpError,
    BgpFeed,
    BgpNeighbor,
    RoutingTable,
    SessionStatus,
    bgp_health,
    bgp_metrics,
    clean_stale_workdirs,
    exabgp_config,
    parse_exabgp_message,
    restart_delay,
)
from streamplane.steering.bgp import _TETHER


def _neighbor(**kw: object) -> BgpNeighbor:
    base: dict[str, object] = {
        "address": "192.0.2.1",
        "peer_as": 64500,
        "local_as": 64512,
        "local_address": "192.0.2.2",
    }
    return BgpNeighbor(**{**base, **kw})  # type: ignore[arg-type]


# -- hold time and relation -----------------------------------------------------------------


def test_the_hold_time_reaches_exabgp() -> None:
    assert "  hold-time 90;\n" in exabgp_config([_neighbor()], process="p", command="c")
    assert "  hold-time 3;\n" in exabgp_config([_neighbor(hold_time=3)], process="p", command="c")


@pytest.mark.parametrize("hold", [0, 2, 65536, -1, True, 9.5])
def test_a_hold_time_bgp_cannot_use_is_refused(hold: object) -> None:
    with pytest.raises(BgpError, match=r"neighbour 192\.0\.2\.1: hold time .* from 3 to 65535"):
        exabgp_config([_neighbor(hold_time=hold)], process="p", command="c")
    with pytest.raises(BgpError, match="hold time"):
        BgpFeed(RoutingTable(), "ams", [_neighbor(hold_time=hold)])


def _settings(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(
        "[[control.bgp]]\nsite = 'ams'\nlocal_address = '192.0.2.2'\n"
        "peer_address = '192.0.2.1'\nlocal_as = 64512\npeer_as = 64500\n" + extra
    )
    return path


def test_relation_and_hold_time_are_settings_of_each_peer(tmp_path: Path) -> None:
    settings = load_settings(_settings(tmp_path, "relation = 'transit'\nhold_time_s = 9\n"))
    feed = BgpFeed(RoutingTable(), settings.control.bgp[0])
    assert (feed.neighbors[0].relation, feed.neighbors[0].hold_time) == ("transit", 9)
    # Defaults: public peering, BGP's usual 90 s.
    plain = load_settings(_settings(tmp_path, "")).control.bgp[0]
    assert (plain.relation, plain.hold_time_s) == ("public", 90)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("hold_time_s = 0\n", r"Expected `int` >= 3 - at `\$.control.bgp\[0\].hold_time_s`"),
        ("hold_time_s = 70000\n", r"<= 65535 - at `\$.control.bgp\[0\].hold_time_s`"),
        ("relation = 'peering'\n", r"Invalid enum value 'peering' - at `\$.control.bgp\[0\]"),
        ("holdtime = 5\n", r"Object contains unknown field `holdtime`"),
    ],
)
def test_bad_peer_settings_are_named(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(_settings(tmp_path, extra))


def test_a_session_down_on_a_notification_says_which() -> None:
    line = (
        '{"type": "state", "neighbor": {"address": {"local": "127.0.0.3", "peer": "127.0.0.2"},'
        ' "state": "down", "reason": "notification sent (4,0)"}}'
    )
    [change] = parse_exabgp_message(line, "ams")
    assert (change.session, change.reason) == (
        "down",
        "notification sent (4,0): hold timer expired",
    )
    ceased = line.replace("sent (4,0)", "received (6,2)")
    [change] = parse_exabgp_message(ceased, "ams")
    assert change.reason == "notification received (6,2): cease: administrative shutdown"
    plain = line.replace("notification sent (4,0)", "peer reset, message [closed]")
    assert parse_exabgp_message(plain, "ams")[0].reason == "peer reset, message [closed]"


# -- back-off -------------------------------------------------------------------------------


@given(
    failures=st.integers(0, 200),
    jitter=st.floats(0, 1, exclude_max=True),
    base=st.floats(0.01, 10),
    cap=st.floats(0.01, 600),
)
def test_restart_delay_doubles_up_to_the_cap_with_jitter(
    failures: int, jitter: float, base: float, cap: float
) -> None:
    delay = restart_delay(failures, jitter, base=base, cap=cap)
    ceiling = min(cap, base * 2.0 ** min(failures, 64))
    assert ceiling / 2 <= delay <= ceiling  # never at once, never past the cap
    # One more failure never waits less for the same draw.
    assert restart_delay(failures + 1, jitter, base=base, cap=cap) >= delay


def test_restart_delays_spread() -> None:
    assert restart_delay(0, 0.0) == 0.5 and restart_delay(0, 0.999) < 1.0
    assert restart_delay(3, 0.0) == 4.0
    assert restart_delay(10, 0.0) == 30.0 and restart_delay(10, 0.999) < 60.0


# -- what /healthz and /metrics say ---------------------------------------------------------


def _status(**kw: object) -> SessionStatus:
    base: dict[str, object] = {
        "site": "ams",
        "address": "192.0.2.1",
        "peer_as": 64500,
        "local_address": "192.0.2.2",
        "local_as": 64512,
        "relation": "private",
        "hold_time_s": 90,
        "state": "established",
        "since": 1000.0,
        "restarts": 0,
        "prefixes": 12,
    }
    return SessionStatus(**{**base, **kw})  # type: ignore[arg-type]


def test_health_is_degraded_by_a_session_that_is_not_established() -> None:
    assert bgp_health([_status()]) == {
        "status": "ok",
        "sessions": 1,
        "established": 1,
        "prefixes": 12,
    }
    down = _status(
        site="fra",
        state="down",
        prefixes=0,
        last_error="ExaBGP exited with status -9; its log ends:\n...",
    )
    health = bgp_health([_status(), down])
    assert health["status"] == "degraded" and health["established"] == 1
    assert health["problems"] == [
        "site fra, peer 192.0.2.1: down: ExaBGP exited with status -9; its log ends:"
    ]
    assert bgp_health([]) == {"status": "ok", "sessions": 0, "established": 0, "prefixes": 0}


def test_metrics_in_prometheus_text() -> None:
    text = bgp_metrics([_status(), _status(site='f"ra', state="connecting", restarts=2)])
    lines = text.splitlines()
    assert "# TYPE streamplane_bgp_session_up gauge" in lines
    assert 'streamplane_bgp_session_up{site="ams",peer="192.0.2.1",peer_as="64500"} 1' in lines
    assert 'streamplane_bgp_session_up{site="f\\"ra",peer="192.0.2.1",peer_as="64500"} 0' in lines
    assert (
        'streamplane_bgp_session_state{site="ams",peer="192.0.2.1",peer_as="64500",'
        'state="established"} 1'
    ) in lines
    assert 'streamplane_bgp_prefixes{site="ams",peer="192.0.2.1",peer_as="64500"} 12' in lines
    assert "# TYPE streamplane_bgp_speaker_restarts_total counter" in lines
    assert (
        'streamplane_bgp_speaker_restarts_total{site="f\\"ra",peer="192.0.2.1",peer_as="64500"} 2'
    ) in lines
    assert text.endswith("\n")


# -- leftovers and the tether ---------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_the_work_directories_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / f"sp-bgp-{_dead_pid()}-abcd1234"
    mine = tmp_path / f"sp-bgp-{os.getpid()}-abcd1234"
    living = tmp_path / f"sp-bgp-{os.getppid()}-abcd1234"
    unnamed = tmp_path / "sp-bgp-k3j2x9aa"  # not named for a process: not ours to judge
    other = tmp_path / "unrelated"
    for d in (dead, mine, living, unnamed, other):
        d.mkdir()
    (dead / "exabgp.conf").write_text("neighbor ...")
    assert clean_stale_workdirs(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (mine, living, unnamed, other)
    )


def test_the_tether_ends_the_program_with_its_parent() -> None:
    """A parent killed with SIGKILL takes the program started through the tether along."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            f"child = subprocess.Popen([sys.executable, {str(_TETHER)!r}, str(os.getpid()),"
            " '/bin/sh', '-c', 'echo ready; exec sleep 60'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        # The parent's line (the pid) and the program's (it runs: the tether is done).
        lines = {parent.stdout.readline().strip() for _ in range(2)}
        assert "ready" in lines
        child = int(next(line for line in lines if line != "ready"))
        ended = os.pidfd_open(child)
        try:
            parent.kill()
            parent.wait()
            readable, _, _ = select.select([ended], [], [], 5.0)
            assert readable, "the program outlived its parent"
        finally:
            os.close(ended)
    finally:
        parent.kill()
        parent.wait()


def test_the_tether_refuses_a_parent_that_is_not_its_parent() -> None:
    done = subprocess.run(
        [sys.executable, str(_TETHER), str(_dead_pid()), "/bin/echo", "ran"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout) == (1, "")
