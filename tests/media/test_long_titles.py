"""What feature-length titles need: scratch space bounded by the work in flight, not by the
title; every rung's declared peak within twice its average (capped CRF); the constant-QP anchor;
and progress that says how far along the title is.

Runs real ffmpeg on a 12 s title whose raw frames are several times the work directory it is
given: a 6 MiB tmpfs mounted for the test.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import m3u8
import msgspec
import pytest

from streamplane.media import build_sample, encode, load_title
from streamplane.media.ffmpeg import input_args, run_ffmpeg
from streamplane.media.matrix import EncodeJob, cut_bytes, make_cut
from streamplane.media.pipeline import scratch_bound
from streamplane.media.probe import probe
from tests.conftest import SMALL

SCRATCH_BYTES = 6 * 1024 * 1024


def _framemd5(args: list[str], out: Path) -> list[str]:
    run_ffmpeg([*args, "-map", "0:v:0", "-f", "framemd5", str(out)], "hashing frames")
    # the hash is the last field; timestamps differ between a seek and a whole decode
    lines = out.read_text().splitlines()
    return [line.rsplit(",", 1)[1].strip() for line in lines if not line.startswith("#")]


def test_a_span_decoded_on_the_fly_is_exactly_those_frames(
    tmp_path: Path, tiny_source: Path
) -> None:
    """Each job seeks into the source for its shot; a frame off at either end would score the
    encode against the wrong picture."""
    info = probe(tiny_source)
    fps = Fraction(info.fps_num, info.fps_den)
    whole = _framemd5(["-i", str(tiny_source)], tmp_path / "all.md5")
    assert len(whole) == info.n_frames
    for first, count in ((0, 75), (75, 50), (137, 1), (info.n_frames - 63, 63)):
        part = _framemd5(input_args(tiny_source, (first, count, fps)), tmp_path / f"{first}.md5")
        assert part == whole[first : first + count], (first, count)
    # a shot's cut, which its jobs read instead of seeking, holds the same frames
    job = EncodeJob(
        shot=2, reference=str(tiny_source), reference_frames=50, reference_start=75,
        display_width=info.width, display_height=info.height, width=160, height=90,
        codec="h264", preset="ultrafast", output="", crf=30, cuts=str(tmp_path / "cuts"),
    )  # fmt: skip
    assert make_cut(job) > 0 and make_cut(job) == 0  # made once, then shared
    assert job.cut is not None and job.cut.stat().st_size <= cut_bytes(info.width, info.height, 50)
    assert _framemd5(job.reference_input(), tmp_path / "cut.md5") == whole[75:125]


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB filesystem for the work directory (root can mount one; elsewhere: skipped)."""
    mount = tmp_path / "scratch"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SCRATCH_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


class Recorder:
    def __init__(self) -> None:
        self.statuses: list[str] = []
        self.notes: list[str] = []

    def stage(self, name: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        self.notes.append(text)

    def status(self, text: str) -> None:
        self.statuses.append(text)


class PeakUse:
    """The most a filesystem held while it was watched."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            st = os.statvfs(self.path)
            self.peak = max(self.peak, (st.f_blocks - st.f_bfree) * st.f_frsize)

    def __enter__(self) -> PeakUse:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_title_larger_than_its_scratch_space_encodes_with_honest_peaks(
    tmp_path: Path, samples_dir: Path, scratch: Path
) -> None:
    source = build_sample("noisy-mix", samples_dir)
    info = probe(source)
    raw = info.n_frames * info.width * info.height * 3 // 2
    assert raw > 4 * SCRATCH_BYTES  # the old whole-source mezzanine could not even start here
    work = scratch / "work"
    out = tmp_path / "catalog" / "noisy"
    progress = Recorder()
    # 2 s shots, one worker: a shot's raw cut (4.3 MB) fits the scratch space, the title's
    # frames (26 MB) do not
    settings = msgspec.structs.replace(
        SMALL, qp_anchor=True, baseline=False, keep_work=True, workers=1, max_shot_s=2.0
    )
    with PeakUse(scratch) as use:
        outcome = encode(source, out, settings, progress, work)
    assert 0 < use.peak < SCRATCH_BYTES
    # what the work directory held at its peak stayed within the bound docs/media.md states:
    # the work in flight, plus the plan and the result files
    kept = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
    assert not list(work.rglob("*.mp4")) and not list(work.rglob("*.nut"))
    assert use.peak <= scratch_bound(info, outcome.title.shots, 1) + kept
    assert raw > 2.5 * scratch_bound(info, outcome.title.shots, 1)

    title = load_title(out)
    master = m3u8.load(str(out / "master.m3u8"))
    audio_peak = max(a.peak_bitrate_bps for a in title.audio)
    for rung, variant in zip(title.rungs, master.playlists, strict=True):
        assert rung.peak_bitrate_bps <= 2 * rung.average_bitrate_bps, rung.id
        assert variant.stream_info.bandwidth <= 2 * rung.average_bitrate_bps + audio_peak
    assert any(c.bits for r in title.rungs for c in r.shots)

    # the constant-QP anchor: whole-title -qp encodes, drawn and compared in the report
    assert len(outcome.constant_qp) >= 2
    assert outcome.bd_vs_constant_qp is not None
    report = (out / "report" / "ladder.md").read_text()
    assert "Constant-QP anchor" in report and "per-shot ladder vs constant QP" in report
    assert "qp anchor" in outcome.cpu_seconds

    # progress named shots, encodes, CPU spent and CPU left
    matrix_lines = [s for s in progress.statuses if "shots" in s]
    assert any("CPU s left" in s for s in matrix_lines)
    n, m = len(title.shots), len(title.shots) * len(SMALL.heights) * len(SMALL.quantisers)
    assert any(s.startswith(f"{n}/{n} shots, {m}/{m} encodes") for s in matrix_lines)
    assert any(s.startswith(f"0/{n} shots, 0/{m} encodes") for s in matrix_lines)

    # The same title at plain CRF (the matrix is reused from the work directory; its final
    # encodes went into the first title's package, so they are encoded again): its top rung's
    # peak runs past twice its average, so the cap is what held it.
    uncapped = msgspec.structs.replace(settings, vbv_maxrate=0.0, qp_anchor=False)
    plain = encode(source, tmp_path / "catalog" / "plain", uncapped, work=work)
    assert plain.resumed > 0
    top = plain.title.rungs[-1]
    assert top.peak_bitrate_bps > 2 * top.average_bitrate_bps


def test_full_mode_ships_capped_matrix_encodes_and_drops_the_rest(
    tmp_path: Path, samples_dir: Path
) -> None:
    """Full mode keeps its matrix encodes until the ladder is chosen (they are what it ships),
    then packs the shipped ones and drops them all; capped re-encodes replace those that would
    break the peak."""
    source = build_sample("noisy-mix", samples_dir)
    work = tmp_path / "work"
    settings = msgspec.structs.replace(
        SMALL, mode="full", heights=(180,), quantisers=(22, 30, 38), rungs=2, baseline=False,
        keep_work=True, preset="veryfast",
    )  # fmt: skip
    progress = Recorder()
    outcome = encode(source, tmp_path / "catalog" / "noisy", settings, progress, work=work)
    top = outcome.title.rungs[-1]
    assert top.peak_bitrate_bps <= 2 * top.average_bitrate_bps
    # At 26 kbps the noise shot cannot go under its cap (x264 at its highest quantiser still
    # spends 53 kbps on it): the operator is told which rung overshoots rather than misled.
    bottom = outcome.title.rungs[0]
    if bottom.peak_bitrate_bps > 2 * bottom.average_bitrate_bps:
        assert any("rung v0's peak stays at" in n for n in progress.notes)
    assert not list(work.rglob("*.mp4"))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"vbv_maxrate": 0.5}, "vbv_maxrate"),
        ({"vbv_buffer_s": 0.0}, "vbv_buffer_s"),
        ({"qp_anchor": True, "codec": "vp9"}, "constant-QP anchor needs one of h264, hevc"),
    ],
)
def test_settings_a_cap_or_anchor_cannot_honour_are_refused(
    change: dict[str, object], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        msgspec.structs.replace(SMALL, **change).check()  # type: ignore[arg-type]
