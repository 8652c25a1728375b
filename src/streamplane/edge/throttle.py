"""Rate-limited logging: a fault that repeats on every request is said once in a while.

A full disk, a hostile sender or a failing origin can repeat thousands of times a second;
logging each one grew an edge's log to hundreds of megabytes. Each kind of trouble is said at
most once per ``every_s`` seconds, followed by how many more there were meanwhile.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["LogThrottle"]


class LogThrottle:
    def __init__(
        self,
        write: Callable[[str], None],
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self._every_s = every_s
        self._clock = clock
        self._kinds: dict[str, tuple[float, int]] = {}  # kind -> (last said, held back since)

    def __call__(self, kind: str, text: str) -> None:
        now = self._clock()
        last, held = self._kinds.get(kind, (-math.inf, 0))
        if now - last < self._every_s:
            self._kinds[kind] = (last, held + 1)
            return
        self._kinds[kind] = (now, 0)
        self._write(f"{text} ({held} more like it since the last report)" if held else text)
