"""The load tool's pure parts."""

from __future__ import annotations

from streamplane.realtime.load import processes_for, retry_after_s


def test_retry_after_is_read_as_seconds_and_anything_else_falls_back() -> None:
    assert retry_after_s("5") == 5.0
    assert retry_after_s(" 2 ") == 2.0
    assert retry_after_s(None) == 1.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", default=3.0) == 3.0
    assert retry_after_s("-4") == 0.0


def test_processes_keep_each_under_the_open_file_limit() -> None:
    assert processes_for(1) == 1
    assert processes_for(15_000) == 1
    assert processes_for(15_001) == 2
    assert processes_for(100_000) == 7
