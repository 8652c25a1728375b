"""Token buckets: never more than the burst plus the rate over any stretch; a refusal says how
long to wait, and waiting that long is enough."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.telemetry.admission import Admission, Bucket, Limit, advised_interval, take

_LIMIT = Limit(rate=2.0, burst=5.0)


@given(st.lists(st.floats(min_value=0, max_value=2.0), min_size=1, max_size=200))
def test_a_bucket_never_admits_more_than_burst_plus_rate_times_time(gaps: list[float]) -> None:
    bucket: Bucket | None = None
    now = 0.0
    admitted = 0
    for gap in gaps:
        now += gap
        bucket, wait = take(bucket, _LIMIT, now)
        admitted += wait == 0
    assert admitted <= _LIMIT.burst + _LIMIT.rate * now + 1e-9


@given(st.floats(min_value=0, max_value=100), st.integers(min_value=0, max_value=20))
def test_waiting_as_told_is_enough(start: float, spent: int) -> None:
    bucket: Bucket | None = None
    for _ in range(spent):
        bucket, _ = take(bucket, _LIMIT, start)
    bucket, wait = take(bucket, _LIMIT, start)
    if wait > 0:
        _, again = take(bucket, _LIMIT, start + wait + 1e-9)
        assert again == 0


def test_a_clock_going_backwards_refills_nothing() -> None:
    bucket = Bucket(tokens=0.0, at=100.0)
    _, wait = take(bucket, _LIMIT, 50.0)
    assert wait == pytest.approx(0.5)


def test_a_device_over_its_limit_does_not_spend_the_global_bucket() -> None:
    admission = Admission(Limit(rate=1.0, burst=2.0), Limit(rate=1.0, burst=3.0))
    assert [admission.admit("tv", 0.0) == 0 for _ in range(4)] == [True, True, False, False]
    assert admission.admit("phone", 0.0) == 0  # the global bucket had one left
    assert admission.admit("laptop", 0.0) > 0  # now it is empty
    assert admission.fill(0.0) == 0.0 and admission.fill(3.0) == 1.0


def test_the_advised_interval_grows_as_the_global_bucket_empties() -> None:
    fills = [1.0, 0.5, 0.4, 0.2, 0.0]
    intervals = [advised_interval(30.0, f) for f in fills]
    assert intervals[:2] == [30.0, 30.0]
    assert intervals == sorted(intervals) and intervals[-1] == 120.0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (float("inf"), 1), (1, 0.5)])
def test_unusable_limits_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        Limit(rate=rate, burst=burst)
