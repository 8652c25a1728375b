"""One H.264 level per rung: a capped shot whose VBV the frame size's level cannot carry would
otherwise declare a higher level (and other decoded-picture-buffer fields) than the rung's
plain shots, and the rung's one init segment could not hold both."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.media.codecs import h264_level, rate_args
from streamplane.media.errors import PackagingError
from streamplane.media.ffmpeg import run_ffmpeg
from streamplane.media.fmp4 import read_init, split_fragmented
from streamplane.media.matrix import EncodeJob
from streamplane.media.package import pack_shot
from streamplane.media.pipeline import _one_level_per_rung

CAP = (1307, 2614)  # a 320x180 rung's cap that bench-mix needed: above level 1.2's 480 kbit/s


def test_levels_follow_the_standards_table() -> None:
    assert h264_level(320, 180, 25) == "1.2"
    assert h264_level(320, 180, 25, CAP) == "2.1"  # 2's CPB (2,500 kbit in High) is too small
    assert h264_level(512, 288, 25) == "2.1"
    assert h264_level(640, 360, 25) == "3"  # 23,000 macroblocks a second: past 2.2
    assert h264_level(1280, 720, 25) == "3.1"
    assert h264_level(1920, 1080, 25) == "4"
    assert h264_level(1920, 1080, 60) == "4.2"
    assert h264_level(1920, 1080, 25, (30_000, 60_000)) == "4.1"
    with pytest.raises(ValueError, match=r"no H\.264 level"):
        h264_level(1920, 1080, 25, (2_000_000, 2_000_000))
    with pytest.raises(ValueError, match=r"H\.264 encode"):
        rate_args("hevc", "fast", (0,), crf=30, level="3.1")


@given(
    st.integers(16, 1920),
    st.integers(16, 1080),
    st.sampled_from([24.0, 25.0, 30.0, 50.0]),
    st.integers(1, 60_000),
    st.integers(1, 60_000),
)
def test_a_cap_never_lowers_the_level(w: int, h: int, fps: float, rate: int, more: int) -> None:
    plain = float(h264_level(w, h, fps))
    low = float(h264_level(w, h, fps, (rate, 2 * rate)))
    high = float(h264_level(w, h, fps, (rate + more, 2 * (rate + more))))
    assert plain <= low <= high


def _shot(source: Path, out: Path, cap: tuple[int, int] | None, level: str | None) -> Path:
    video = rate_args("h264", "fast", (0,), crf=18, cap_kbps=cap, level=level)
    run_ffmpeg(
        ["-i", str(source), "-t", "2", "-an", "-vf", "scale=320:180", "-pix_fmt", "yuv420p"]
        + [*video, str(out)],
        what=f"encoding {out.name}",
    )
    return out


def _level(encode: Path, work: Path) -> int:
    frag = work / f"{encode.stem}.frag.mp4"
    run_ffmpeg(
        [
            "-i",
            str(encode),
            "-c",
            "copy",
            "-movflags",
            "frag_keyframe+empty_moov+default_base_moof",
            str(frag),
        ],
        what="remuxing",
    )
    init, _ = split_fragmented(frag.read_bytes())
    return read_init(init).config[3]


def test_x264_picks_the_level_the_table_gives(tiny_source: Path, tmp_path: Path) -> None:
    plain = _shot(tiny_source, tmp_path / "plain.mp4", None, None)
    capped = _shot(tiny_source, tmp_path / "capped.mp4", CAP, None)
    assert _level(plain, tmp_path) == 12  # level_idc of 1.2
    assert _level(capped, tmp_path) == 21


def test_a_rung_of_plain_and_capped_shots_packs_once_its_level_is_pinned(
    tiny_source: Path, tmp_path: Path
) -> None:
    level = h264_level(320, 180, 25, CAP)
    plain = _shot(tiny_source, tmp_path / "plain.mp4", None, level)
    capped = _shot(tiny_source, tmp_path / "capped.mp4", CAP, level)
    rung = tmp_path / "v0"
    pack_shot(plain, rung, 0, 0, 12_800)
    pack_shot(capped, rung, 1, 2 * 12_800, 12_800)
    assert read_init((rung / "init.mp4").read_bytes()).config[3] == 21
    # what the encoder does unpinned: the rung cannot take both
    loose = tmp_path / "loose"
    pack_shot(_shot(tiny_source, tmp_path / "p.mp4", None, None), loose, 0, 0, 12_800)
    with pytest.raises(PackagingError, match="init segment differs"):
        pack_shot(_shot(tiny_source, tmp_path / "c.mp4", CAP, None), loose, 1, 25_600, 12_800)


def _job(shot: int, cap: tuple[int, int] | None = None) -> EncodeJob:
    return EncodeJob(
        shot=shot,
        reference="src.mp4",
        reference_frames=50,
        display_width=320,
        display_height=180,
        width=320,
        height=180,
        codec="h264",
        preset="fast",
        output=f"s{shot}.mp4",
        crf=18,
        maxrate_kbps=None if cap is None else cap[0],
        bufsize_kbps=None if cap is None else cap[1],
    )


def test_a_cap_that_raises_the_level_takes_the_rungs_plain_shots_with_it(tmp_path: Path) -> None:
    # rung 0: shot 1 capped past level 1.2; rung 1: shot 1 capped within it
    jobs = {(0, 0): _job(0), (0, 1): _job(1), (1, 0): _job(0), (1, 1): _job(1)}
    redo = {(0, 1): _job(1, CAP), (1, 1): _job(1, (300, 600))}
    pinned, raised = _one_level_per_rung(jobs, redo, 25.0, tmp_path)
    assert raised == {0}  # its packed shots (level 1.2) take new headers
    # rung 1's cap fits level 1.2, which x264 picks for its shots itself: nothing is pinned
    assert {k: j.level for k, j in pinned.items()} == {(0, 0): "2.1", (0, 1): "2.1"}
    assert pinned[(0, 0)].maxrate_kbps is None  # the plain shot stays plain, at the rung's level
    assert all(f"_L{j.level}_" in j.output for j in pinned.values())  # a result of its own
    # once pinned, a later round whose lower cap needs less keeps the rung's level
    jobs.update(pinned)
    later = {(0, 1): msgspec.structs.replace(pinned[(0, 1)], maxrate_kbps=300, bufsize_kbps=600)}
    again, raised = _one_level_per_rung(jobs, later, 25.0, tmp_path)
    assert {k: j.level for k, j in again.items()} == {}
    assert raised == set()
    assert later[(0, 1)].level == "2.1"
