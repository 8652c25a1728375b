"""The report writer, on a hand-built title: no encoding, only what a person will read."""

from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path

import matplotlib.image
import pytest

from streamplane.media.bdrate import BdRate
from streamplane.media.report import FixedRung, ReportData, grid_marks, write_report
from streamplane.media.title import (
    Rung,
    SegmentTiming,
    Shot,
    ShotChoice,
    Title,
)

FPS = 24
CRFS = (22, 26, 30, 34, 38)
FILES = (
    "rate_quality_title.png",
    "rate_quality_shots.png",
    "ladder.png",
    "ladder.md",
    "index.html",
)


def _kbps(width: int, height: int, crf: int, complexity: float) -> float:
    area = math.pow(width * height / (1280 * 720), 0.75)
    return complexity * 3200 * area * math.pow(2, -(crf - 22) / 6)


def _vmaf(height: int, top: int, crf: int, complexity: float) -> float:
    v = 100 - (crf - 16) * 1.5 * math.sqrt(complexity) - 30 * math.pow(1 - height / top, 1.4)
    return round(min(99.0, max(5.0, v)), 3)


def make_data(
    name: str = "Fake title",
    n_shots: int = 3,
    sizes: tuple[tuple[int, int], ...] = ((640, 360), (1280, 720)),
    n_rungs: int = 3,
    baseline: bool = True,
) -> ReportData:
    """A plausible title: bitrate falls with CRF and rises with resolution, as VMAF does."""
    top = max(h for _, h in sizes)
    seconds = tuple(2.0 + (i * 1.7) % 5 for i in range(n_shots))
    complexity = tuple(0.6 + (i * 0.37) % 1.0 for i in range(n_shots))
    shots, timings, start = [], [], 0
    for i, s in enumerate(seconds):
        frames = round(s * FPS)
        shots.append(Shot(i, start, start + frames))
        timings.append(SegmentTiming(i, i, start * 1000, frames * 1000, start / FPS, frames / FPS))
        start += frames
    seconds = tuple(s.n_frames / FPS for s in shots)
    matrix = tuple(
        ShotChoice(
            i,
            w,
            h,
            crf,
            round(_kbps(w, h, crf, complexity[i]) * 1000 * seconds[i]),
            _vmaf(h, top, crf, complexity[i]),
        )
        for i in range(n_shots)
        for w, h in sizes
        for crf in CRFS
    )
    by_key = {(p.shot, p.width, p.height, p.quantiser): p for p in matrix}
    ordered = sorted(sizes, key=lambda s: s[1])
    total = sum(seconds)
    picks = []
    for k in range(n_rungs):
        g = min(len(ordered) - 1, k * len(ordered) // n_rungs)
        group = [
            j for j in range(n_rungs) if min(len(ordered) - 1, j * len(ordered) // n_rungs) == g
        ]
        m, j = len(group), group.index(k)
        # Within a resolution, higher rungs take lower CRFs; odd shots one step coarser.
        base = 1 + round((m - 1 - j) * (min(m, 3) - 1) / max(1, m - 1))
        w, h = ordered[g]
        choices = tuple(
            by_key[(i, w, h, CRFS[min(len(CRFS) - 1, base + i % 2)])] for i in range(n_shots)
        )
        picks.append((sum(c.bits for c in choices), w, h, choices))
    picks.sort(key=lambda t: t[0])
    rungs = []
    for k, (bits, w, h, choices) in enumerate(picks):
        vmaf = sum(c.vmaf * s for c, s in zip(choices, seconds, strict=True)) / total
        rungs.append(
            Rung(
                id=f"v{k}",
                codec="h264",
                codec_string="avc1.64001f",
                width=w,
                height=h,
                frame_rate=f"{FPS}/1",
                average_bitrate_bps=round(bits / total),
                peak_bitrate_bps=round(
                    max(c.bits / s for c, s in zip(choices, seconds, strict=True)) * 1.2
                ),
                vmaf=round(vmaf, 3),
                vmaf_harmonic=round(vmaf - 1.3, 3),
                psnr_y=round(30 + vmaf / 10, 3),
                init=f"v/v{k}/init.mp4",
                playlist=f"v/v{k}/playlist.m3u8",
                segment_bytes=tuple(c.bits // 8 for c in choices),
                shots=choices,
            )
        )
    title = Title(
        schema=1,
        title=name,
        duration_s=total,
        frame_rate=f"{FPS}/1",
        width=sizes[-1][0],
        height=top,
        video_timescale=FPS * 1000,
        shots=tuple(shots),
        segments=tuple(timings),
        rungs=tuple(rungs),
        audio=(),
    )
    shipped = [(r.average_bitrate_bps, r.vmaf) for r in rungs]
    return ReportData(
        title=title,
        matrix=matrix,
        shot_seconds=seconds,
        mixed=tuple((b * 0.93, min(99.0, q + 0.4)) for b, q in shipped) if baseline else (),
        fixed_ladder=(
            FixedRung(416, 234, 145, 151_000.0, 41.2),
            FixedRung(640, 360, 365, 372_500.0, 58.9),
            FixedRung(960, 540, 2000, 2_034_000.0, 84.1),
            FixedRung(1280, 720, 4500, 4_480_000.0, 92.6),
        )
        if baseline
        else (),
        fixed_qp=tuple((b * 1.15, q - 0.8) for b, q in shipped) if baseline else (),
        bd_vs_fixed_ladder=BdRate(-23.44, 0.87) if baseline else None,
        bd_vs_fixed_qp=BdRate(-8.06, 0.95) if baseline else None,
        bd_mixed_vs_shipped=BdRate(-2.5, 0.6) if baseline else None,
        mode="fast",
        encodes_run=len(matrix) + 4,
        cpu_seconds=(
            {"matrix": 120.5, "final": 60.2, "baseline": 80.0, "package": 3.1} if baseline else {}
        ),
    )


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReportData, Path, list[Path]]:
    data = make_data(name="Big <&> Buck | $x$")
    out = tmp_path_factory.mktemp("report") / "report"
    return data, out, write_report(data, out)


def test_every_file_is_written(report: tuple[ReportData, Path, list[Path]]) -> None:
    _, out, written = report
    assert [p.name for p in written] == list(FILES)
    for p in written:
        assert p.parent == out
        assert p.stat().st_size > 0


@pytest.mark.parametrize("name", [f for f in FILES if f.endswith(".png")])
def test_pngs_are_valid_and_sensibly_sized(
    report: tuple[ReportData, Path, list[Path]], name: str
) -> None:
    _, out, _ = report
    width, height = _png_size(out / name)
    assert 500 <= width <= 4000
    assert 300 <= height <= 4000
    pixels = matplotlib.image.imread(out / name)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01  # something was drawn


def test_markdown_lists_rungs_and_bd_rates(report: tuple[ReportData, Path, list[Path]]) -> None:
    data, out, _ = report
    md = (out / "ladder.md").read_text()
    for r in data.title.rungs:
        row = next(line for line in md.splitlines() if line.startswith(f"| {r.id} |"))
        assert f"{r.width}x{r.height}" in row
        assert "avc1.64001f" in row
        quantisers = "/".join(str(c.quantiser) for c in r.shots)
        assert quantisers in row
    assert "-23.4 %" in md
    assert "-8.1 %" in md
    assert "87 %" in md
    assert "PCHIP" in md
    assert "640x360" in md and "4,500" in md  # the fixed ladder table
    assert "matrix" in md and "120.5" in md
    assert "| Big <&> Buck \\| $x$" not in md  # the pipe in the name cannot split a table


def test_html_references_pngs_and_escapes(report: tuple[ReportData, Path, list[Path]]) -> None:
    _, out, _ = report
    page = (out / "index.html").read_text()
    for name in FILES[:3]:
        assert f'src="{name}"' in page
    assert "Big &lt;&amp;&gt; Buck" in page
    assert "<&>" not in page
    assert "http" not in page  # nothing fetched from elsewhere
    assert page.count("<table>") == 4
    assert "-23.4 %" in page


def test_degenerate_title_still_writes_everything(tmp_path: Path) -> None:
    data = make_data(n_shots=1, sizes=((640, 360),), n_rungs=1, baseline=False)
    written = write_report(data, tmp_path / "r")
    assert [p.name for p in written] == list(FILES)
    for p in written:
        if p.suffix == ".png":
            assert min(_png_size(p)) >= 300
    md = (tmp_path / "r" / "ladder.md").read_text()
    assert "Not measured: no baseline encodes." in md
    assert md.count("| not measured |") == 4  # every BD-rate
    assert "CPU time not measured" in md
    assert "| v0 | 640x360 |" in md
    assert "not measured" in (tmp_path / "r" / "index.html").read_text()


def test_many_shots_and_rungs(tmp_path: Path) -> None:
    sizes = ((480, 270), (640, 360), (960, 540), (1280, 720), (1920, 1080))
    data = make_data(n_shots=30, sizes=sizes, n_rungs=10)
    written = write_report(data, tmp_path)
    for p in written:
        if p.suffix == ".png":
            assert max(_png_size(p)) <= 4000


def test_shot_durations_must_match_shots(tmp_path: Path) -> None:
    data = make_data()
    bad = ReportData(**{**data.__dict__, "shot_seconds": data.shot_seconds[:-1]})
    with pytest.raises(ValueError, match="shot durations"):
        write_report(bad, tmp_path)


def test_predicted_grid_points_are_drawn_apart_from_encoded_ones(tmp_path: Path) -> None:
    data = make_data()
    # as the fast path leaves it: CRFs 26 and 34 predicted from probes at the others
    predicted = frozenset(
        (p.shot, p.width, p.height, p.quantiser) for p in data.matrix if p.quantiser in (26, 34)
    )
    data = dataclasses.replace(data, predicted=predicted)
    marks = grid_marks(data)
    assert len(marks) == len(data.matrix)
    assert {(m.shot, m.width, m.height, m.quantiser) for m in marks if m.predicted} == predicted
    assert all(m.quantiser not in (26, 34) for m in marks if not m.predicted)
    for m, p in zip(marks, data.matrix, strict=True):
        assert m.kbps == pytest.approx(p.bits / data.shot_seconds[p.shot] / 1000)
        assert m.vmaf == p.vmaf
    write_report(data, tmp_path)
    note = f"{len(predicted)} of {len(data.matrix)} grid points were predicted"
    assert note in (tmp_path / "ladder.md").read_text()


def test_a_fully_encoded_matrix_has_no_predicted_marks(tmp_path: Path) -> None:
    data = make_data()
    assert not any(m.predicted for m in grid_marks(data))
    write_report(data, tmp_path)
    assert "predicted from the probes" not in (tmp_path / "ladder.md").read_text()


def test_a_predicted_point_outside_the_matrix_is_refused(tmp_path: Path) -> None:
    data = dataclasses.replace(make_data(), predicted=frozenset({(0, 4096, 2160, 26)}))
    with pytest.raises(ValueError, match="not in the matrix"):
        write_report(data, tmp_path)
