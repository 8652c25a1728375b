"""The shared vectors: the Python and the JavaScript implementations decide the same."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest

from streamplane.player import (
    AbrState,
    CadenceState,
    Progress,
    heartbeat_interval,
    next_heartbeat_s,
    plan_value,
    streamplane_abandon,
    streamplane_choose,
)
from streamplane.player.abr import RecentRate
from streamplane.player.vectors import VECTORS_PATH, build_vectors, load_vectors

ABR_JS = Path(__file__).parents[2] / "src/streamplane/web/static/abr.js"
RUNNER = Path(__file__).with_name("run_vectors.mjs")


def test_vector_file_is_what_the_generator_makes() -> None:
    """Regenerate with `python -m streamplane.player.vectors` after changing the algorithm."""
    assert load_vectors() == json.loads(json.dumps(build_vectors()))


def test_python_passes_every_vector() -> None:
    data = load_vectors()
    hand = 0
    plans = 0
    for v in data["abr"]:
        s = msgspec.convert(v["state"], AbrState)
        hand += v["source"] == "hand"
        if v["call"] == "plan_value":
            value = plan_value(s, v["plan"], v["kbps"])
            if v["source"] == "hand":  # worked on paper: equal up to rounding
                assert value == pytest.approx(v["expected"], abs=1e-9), v["why"]
            else:
                assert value == v["expected"], v
            plans += 1
            continue
        if v["call"] == "choose":
            got = streamplane_choose(s)
        else:
            got = streamplane_abandon(s, msgspec.convert(v["progress"], Progress))
        assert got == v["expected"], v.get("why", v["state"])
    for v in data["recent"]:
        tracker = RecentRate(v["window_s"])
        got_recent = [list(tracker.sample(k, t, b)) for k, t, b in v["calls"]]
        assert got_recent == v["expected"], v.get("why", v["calls"])
    assert sum(v["source"] == "hand" for v in data["recent"]) >= 1
    for v in data["cadence"]:
        c = msgspec.convert(v["state"], CadenceState)
        assert (heartbeat_interval(c), next_heartbeat_s(c)) == (v["interval"], v["next"]), v
    assert hand >= 15 and plans >= 50
    # the seeded set exercises every rung choice and abandonment, not just the easy answers
    seeded = {
        v["expected"] for v in data["abr"] if v["source"] == "seeded" and v["call"] != "plan_value"
    }
    assert {None, 0, 1, 2, 3} <= seeded


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: JS port unchecked")
def test_javascript_port_passes_every_vector() -> None:
    node = shutil.which("node")
    assert node is not None
    out = subprocess.run(
        [node, str(RUNNER), str(ABR_JS), str(VECTORS_PATH)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    assert summary["failed"] == 0
    data = load_vectors()
    assert summary["checked"] == len(data["abr"]) + len(data["recent"]) + len(data["cadence"])
