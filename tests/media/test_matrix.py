"""The encode matrix runner against real ffmpeg: retries, resume, and a real Dask cluster."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from streamplane.media.errors import EncodeError
from streamplane.media.ffmpeg import ffmpeg_exe, run_ffmpeg
from streamplane.media.matrix import EncodeJob, run_matrix


@pytest.fixture(scope="module")
def shot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two seconds of lossless 160x90 frames, as the mezzanine holds them."""
    path = tmp_path_factory.mktemp("mezz") / "shot_000.y4m"
    run_ffmpeg(
        ["-f", "lavfi", "-i", "testsrc2=s=160x90:r=25", "-frames:v", "50"]
        + ["-f", "yuv4mpegpipe", str(path)],
        "making a shot",
    )
    return path


def jobs_for(shot: Path, out: Path, crfs: tuple[int, ...] = (24, 36)) -> list[EncodeJob]:
    return [
        EncodeJob(
            shot=0,
            reference=str(shot),
            reference_frames=50,
            display_width=160,
            display_height=90,
            width=160,
            height=90,
            codec="h264",
            preset="veryfast",
            output=str(out / f"crf{q}.mp4"),
            crf=q,
            keyframes=(0, 25),
        )
        for q in crfs
    ]


@pytest.fixture
def flaky_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An ffmpeg that crashes on its first `failures` x264 encodes, then behaves.

    The workers are forked from this process, so they see the patched environment."""
    log = tmp_path / "calls.log"
    script = tmp_path / "ffmpeg"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$*" in *libx264*)\n'
        f"  n=$(grep -c libx264 {log})\n"
        '  if [ "$n" -le "$FAILURES" ]; then echo "simulated encoder crash" >&2; exit 139; fi;;\n'
        "esac\n"
        f'exec {ffmpeg_exe()} "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("STREAMPLANE_FFMPEG", str(script))
    ffmpeg_exe.cache_clear()
    yield log
    ffmpeg_exe.cache_clear()


def test_a_crashed_encode_is_retried(
    tmp_path: Path, shot: Path, flaky_ffmpeg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAILURES", "1")
    # one worker: the wrapper's crash counter is not safe against concurrent calls
    outcome = run_matrix(jobs_for(shot, tmp_path / "enc"), tmp_path / "results", workers=1)
    assert not outcome.failures
    assert len(outcome.results) == 2
    assert "simulated" not in str(outcome.results)
    encodes = [line for line in flaky_ffmpeg.read_text().splitlines() if "libx264" in line]
    assert len(encodes) == 3  # one crash, then both encodes


def test_an_encode_that_keeps_crashing_is_reported_not_hidden(
    tmp_path: Path, shot: Path, flaky_ffmpeg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAILURES", "1000")
    jobs = jobs_for(shot, tmp_path / "enc", crfs=(30,))
    outcome = run_matrix(jobs, tmp_path / "results", workers=1, retries=2)
    assert list(outcome.failures) == [jobs[0].key]
    assert "simulated encoder crash" in outcome.failures[jobs[0].key]
    encodes = [line for line in flaky_ffmpeg.read_text().splitlines() if "libx264" in line]
    assert len(encodes) == 3  # first try and two retries
    assert not list((tmp_path / "enc").glob("*.mp4"))  # no partial encode left behind


def test_a_worker_killed_mid_encode_is_replaced(tmp_path: Path, shot: Path) -> None:
    """The encode's worker process itself dies (as under the OOM killer): the pool is rebuilt
    and the job retried."""
    marker = tmp_path / "killed"
    script = tmp_path / "ffmpeg"
    script.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *libx264*) if mkdir {marker} 2>/dev/null; then\n'
        "  kill -9 $PPID; exit 1\n"
        "fi;; esac\n"
        f'exec {ffmpeg_exe()} "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    os.environ["STREAMPLANE_FFMPEG"] = str(script)
    ffmpeg_exe.cache_clear()
    try:
        outcome = run_matrix(jobs_for(shot, tmp_path / "enc"), tmp_path / "results", workers=2)
    finally:
        del os.environ["STREAMPLANE_FFMPEG"]
        ffmpeg_exe.cache_clear()
    assert marker.exists()
    assert not outcome.failures and len(outcome.results) == 2


def test_a_rerun_resumes_from_saved_results(tmp_path: Path, shot: Path) -> None:
    jobs = jobs_for(shot, tmp_path / "enc", crfs=(22, 30, 38))
    first = run_matrix(jobs, tmp_path / "results", workers=2)
    assert first.resumed == 0 and len(first.results) == 3
    # one result lost, one torn by a crash mid-write
    (tmp_path / "results" / f"{jobs[0].key}.json").unlink()
    (tmp_path / "results" / f"{jobs[1].key}.json").write_bytes(b'{"job": {"sh')
    seen: list[str] = []
    second = run_matrix(
        jobs, tmp_path / "results", workers=2, on_result=lambda j, r: seen.append(j.key)
    )
    assert second.resumed == 1
    assert sorted(seen) == sorted(j.key for j in jobs)
    for j in jobs:
        assert second.results[j.key].vmaf == pytest.approx(first.results[j.key].vmaf)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_same_jobs_run_on_a_dask_cluster(tmp_path: Path, shot: Path) -> None:
    """A real scheduler and worker as separate processes, reached over TCP on loopback."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    scheduler = subprocess.Popen(
        [
            str(bindir / "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-dashboard",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    worker = subprocess.Popen(
        [
            str(bindir / "dask"),
            "worker",
            address,
            "--nworkers",
            "1",
            "--nthreads",
            "1",
            "--no-dashboard",
            "--host",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        from distributed import Client

        deadline = time.monotonic() + 60
        with Client(address, timeout="30s") as client:
            while not client.scheduler_info()["workers"]:
                assert time.monotonic() < deadline, "the Dask worker never joined"
                time.sleep(0.2)
        jobs = jobs_for(shot, tmp_path / "enc")
        remote = run_matrix(jobs, tmp_path / "remote", cluster=address)
        local = run_matrix(jobs_for(shot, tmp_path / "enc-local"), tmp_path / "local", workers=1)
        assert not remote.failures and len(remote.results) == 2
        for j in jobs:
            r, ref = remote.results[j.key], local.results[j.key]
            assert r.bytes == ref.bytes  # single-threaded x264 is deterministic
            assert r.vmaf == pytest.approx(ref.vmaf)
    finally:
        worker.terminate()
        scheduler.terminate()
        worker.wait(30)
        scheduler.wait(30)


def test_an_unreachable_cluster_is_a_clear_error(tmp_path: Path, shot: Path) -> None:
    with pytest.raises(EncodeError, match="cannot reach the Dask scheduler"):
        run_matrix(
            jobs_for(shot, tmp_path / "enc"),
            tmp_path / "r",
            cluster=f"tcp://127.0.0.1:{_free_port()}",
        )


def test_a_shared_cut_is_charged_once_apart_from_the_encodes(shot: Path, tmp_path: Path) -> None:
    """The fast path's cost is replayed scheme by scheme (bench/probes.py): the shot's decode
    into its cut must be its own figure, counted once however many jobs read the cut."""
    jobs = [
        msgspec.structs.replace(j, cuts=str(tmp_path / "cuts"))
        for j in jobs_for(shot, tmp_path / "out", crfs=(24, 30, 36))
    ]
    outcome = run_matrix(jobs, tmp_path / "results", workers=2)
    results = list(outcome.results.values())
    assert len(results) == 3
    assert sum(r.cut_cpu_seconds > 0 for r in results) == 1
    for r in results:
        assert r.encode_cpu_seconds > 0 and r.vmaf_cpu_seconds > 0
        assert r.cpu_seconds == pytest.approx(
            r.cut_cpu_seconds + r.encode_cpu_seconds + r.vmaf_cpu_seconds
        )
    assert not (tmp_path / "cuts" / "s000.nut").exists()


def test_a_probe_of_part_of_a_shot_encodes_and_scores_its_middle_frames(
    shot: Path, tmp_path: Path
) -> None:
    whole, part = (
        msgspec.structs.replace(j, cuts=str(tmp_path / "cuts"), probe_frames=n, vmaf_subsample=1)
        for j, n in zip(jobs_for(shot, tmp_path / "out", crfs=(30, 30)), (0, 24), strict=True)
    )
    part = msgspec.structs.replace(part, output=str(tmp_path / "out" / "part.mp4"))
    assert part.key != whole.key and part.span == (13, 37) and part.encoded_keyframes == (0, 12)
    outcome = run_matrix([whole, part], tmp_path / "results", workers=2)
    w, p = outcome.results[whole.key], outcome.results[part.key]
    assert len(w.frame_vmaf) == 50 and len(p.frame_vmaf) == 24
    # the part is scored against the same frames of the shot (its first frame is an IDR, so
    # frame by frame the two encodes differ a little)
    assert p.vmaf == pytest.approx(sum(w.frame_vmaf[13:37]) / 24, abs=3)
    assert w.shot_bits == w.bits
    assert p.shot_bits == round(p.bits * 50 / 24)
    assert p.shot_bits == pytest.approx(w.bits, rel=0.35)
    assert len(p.segment_bytes) == 2  # its keyframes: the shot's one inside the part, and 0


def test_a_probe_below_the_display_size_is_scored_at_its_own_size(
    shot: Path, tmp_path: Path
) -> None:
    """A probe standing for a larger rung is scored against the reference scaled down to it:
    the upscale to the display size is not part of its score (bench/probes.py)."""
    shown = msgspec.structs.replace(
        jobs_for(shot, tmp_path / "out", crfs=(24,))[0], width=80, height=46, vmaf_subsample=1
    )
    own = msgspec.structs.replace(
        shown, vmaf_at_encode_size=True, output=str(tmp_path / "out" / "own.mp4")
    )
    assert own.key != shown.key
    outcome = run_matrix([shown, own], tmp_path / "results", workers=2)
    s, o = outcome.results[shown.key], outcome.results[own.key]
    assert len(o.frame_vmaf) == 50
    assert o.bits == s.bits  # the same encode, scored two ways
    assert o.vmaf > s.vmaf + 5  # half the lines, upscaled, lose what the own-size score keeps
