"""A streamplane child dies with the process that started it, however that one dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

_PARENT = """
import os, subprocess, sys, time
from streamplane.lifetime import child_env
child = subprocess.Popen(
    [sys.executable, "-c", "from streamplane.lifetime import arm_from_env; arm_from_env(); "
     "import time; time.sleep(120)"],
    env=child_env(dict(os.environ)),
)
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_child_started_with_child_env_dies_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        time.sleep(0.5)  # the child has armed the signal (its interpreter started)
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its killed parent"
    finally:
        parent.kill()
        if _alive(child):
            os.kill(child, signal.SIGKILL)
