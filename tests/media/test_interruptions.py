"""An interrupted, killed or starved encode never leaves a title that looks complete, and the
next run resumes from the work already done."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamplane.media import load_title

QUICK = ["--heights", "90", "--quantisers", "26,34", "--rungs", "2", "--no-baseline"]
QUICK += ["--preset", "veryfast", "--probe-preset", "ultrafast", "--workers", "1"]


def cli(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamplane", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


def wait_for_results(results: Path, count: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while not (results.exists() and len(list(results.glob("*.json"))) >= count):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_killed_run_publishes_nothing_and_the_rerun_resumes(
    tmp_path: Path, tiny_source: Path
) -> None:
    out = tmp_path / "catalog" / "tiny"
    work = tmp_path / "catalog" / ".tiny.work"
    proc = cli("encode", str(tiny_source), "--out", str(out), *QUICK, start_new_session=True)
    wait_for_results(work / "results", 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its pool workers and their ffmpegs
    proc.wait()
    assert not out.exists()
    done_before = len(list((work / "results").glob("*.json")))

    rerun = cli("encode", str(tiny_source), "--out", str(out), *QUICK)
    _stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "resuming" in stderr
    title = load_title(out)
    assert len(title.rungs) == 2
    assert not work.exists()
    assert done_before >= 3


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return []


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def _processes(field: int, value: int) -> list[int]:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if (f := _stat(pid)) and int(f[field]) == value and _alive(pid)]


def _encoding_ffmpeg(session: int) -> tuple[int, int] | None:
    """(a pool worker, the x264 encode it runs) in the session, if any."""
    for pid in _processes(3, session):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        parent = int(_stat(pid)[1]) if _stat(pid) else 0
        if b"ffmpeg" in cmdline and b"libx264" in cmdline and parent != session:
            return parent, pid
    return None


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_killed_workers_and_driver_take_their_encoders_with_them(
    tmp_path: Path, tiny_source: Path
) -> None:
    """A pool worker or the driver stopped by SIGTERM leaves no ffmpeg running on (slow probes
    at `slow`, so an orphan would still be encoding when checked); the rerun resumes."""
    out = tmp_path / "catalog" / "tiny"
    args = ("encode", str(tiny_source), "--out", str(out), *QUICK, "--probe-preset", "slow")
    proc = cli(*args, start_new_session=True)
    session = proc.pid
    try:
        deadline = time.monotonic() + 120
        while (found := _encoding_ffmpeg(session)) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        worker, ffmpeg = found
        os.kill(worker, signal.SIGTERM)
        assert _gone_within([ffmpeg], 2), "the killed worker's ffmpeg kept running"

        # the driver replaces the worker and carries on, until it is stopped in turn
        while _encoding_ffmpeg(session) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 143, stderr
        assert "run the same command again" in stderr
        assert _gone_within(_processes(3, session), 2), "processes outlived the stopped encode"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session, signal.SIGKILL)
    assert not out.exists()

    rerun = cli(*args)
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert "resuming" in stderr
    assert len(load_title(out).rungs) == 2


def test_ctrl_c_says_how_to_resume(tmp_path: Path, tiny_source: Path) -> None:
    out = tmp_path / "catalog" / "tiny"
    # A shell that runs us in the background hands down SIGINT ignored, and Python then keeps
    # it ignored; a person at a terminal has it at its default, so restore that.
    proc = cli(
        "encode",
        str(tiny_source),
        "--out",
        str(out),
        *QUICK,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for_results(tmp_path / "catalog" / ".tiny.work" / "results", 1, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "run the same command again" in stderr
    assert not out.exists()
    assert not (tmp_path / "catalog" / ".tiny.partial").exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A 400 KiB filesystem: a small title needs twice that."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_named_and_leaves_no_half_title(
    tmp_path: Path, tiny_source: Path, small_disk: Path
) -> None:
    out = small_disk / "catalog" / "tiny"
    work = tmp_path / "work"  # the work fits elsewhere; the package does not
    args = ("encode", str(tiny_source), "--out", str(out), "--work", str(work), *QUICK)
    proc = cli(*args, "--heights", "180")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "disk is full" in stderr
    assert not out.exists()
    assert list((small_disk / "catalog").iterdir()) == []  # no partial directory either
    # with room again, the same work directory finishes the job without re-encoding
    roomy = tmp_path / "catalog" / "tiny"
    rerun = cli(
        "encode",
        str(tiny_source),
        "--out",
        str(roomy),
        "--work",
        str(work),
        *QUICK,
        "--heights",
        "180",
    )
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "resuming" in stderr
    assert load_title(roomy).rungs
