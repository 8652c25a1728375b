"""A start's transaction as statements (``claim_screen``), driven with plain rows: what it
asks the store, in which order, and what it decides; no database. And its signed URLs."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.config import Plan
from streamplane.control.catalog import TitleInfo
from streamplane.control.playback import Claimed, claim_screen, new_session_id, signed_urls
from streamplane.control.store import Rows
from streamplane.edge import signed_url

PLANS = {"basic": Plan(screens=1), "standard": Plan(screens=2), "none": Plan(screens=0)}
PARAMS = {"b_account": "a1", "b_title": "demo", "b_device": "tv", "b_id": "s1", "b_now": 9.0}


def _title(*plans: str) -> TitleInfo:
    return TitleInfo(
        id="demo",
        name="Demo",
        duration_s=60.0,
        width=1280,
        height=720,
        hls="master.m3u8",
        dash="manifest.mpd",
        artwork=(),
        rungs=(),
        plans=plans,
    )


def _statements(postgres: bool) -> Any:
    return SimpleNamespace(
        lock_account="lock",
        end_device="end",
        count_screens="count",
        insert_screen="insert",
        claim_on_postgres="claim" if postgres else None,
    )


def _drive(
    answers: dict[str, Rows],
    *,
    postgres: bool = False,
    title: TitleInfo | None = None,
    servable: bool = True,
) -> tuple[list[tuple[str, dict[str, Any]]], Claimed]:
    """Run the script, answering each statement from ``answers``; what it asked, and its
    result."""
    script = claim_screen(_statements(postgres), dict(PARAMS), PLANS, title or _title(), servable)
    asked: list[tuple[str, dict[str, Any]]] = []
    rows: Rows | None = None
    while True:
        try:
            statement, params = script.send(rows)  # type: ignore[arg-type]
        except StopIteration as done:
            return asked, cast(Claimed, done.value)
        asked.append((cast(str, statement), dict(params)))
        rows = answers.get(cast(str, statement), [])


def test_a_free_screen_is_taken_after_the_device_gives_its_own_up() -> None:
    asked, claimed = _drive({"lock": [("standard", 42.0)], "count": [(1,)]})
    assert [name for name, _ in asked] == ["lock", "end", "count", "insert"]
    assert claimed == Claimed(None, PLANS["standard"], 2, 42.0)


def test_no_free_screen_takes_none_and_says_how_many_are_in_use() -> None:
    asked, claimed = _drive({"lock": [("standard", None)], "count": [(2,)]})
    assert [name for name, _ in asked] == ["lock", "end", "count"]  # no insert
    assert claimed.refusal is not None and claimed.refusal.status == 409
    assert claimed.refusal.body()["in_use"] == 2 and claimed.in_use == 2


def test_on_postgresql_one_statement_is_the_whole_start() -> None:
    asked, claimed = _drive({"claim": [("basic", None, 0)]}, postgres=True)
    assert [name for name, _ in asked] == ["claim"]
    # told the limit of each plan it may take a screen for: those with the title
    assert dict(zip(asked[0][1]["b_plans"], asked[0][1]["b_limits"], strict=True)) == {
        "basic": 1,
        "standard": 2,
    }
    assert claimed == Claimed(None, PLANS["basic"], 1, 0.0)
    _, full = _drive({"claim": [("basic", 3.0, 1)]}, postgres=True)
    assert full.refusal is not None and full.refusal.status == 409
    _, gone = _drive({}, postgres=True)
    assert gone.refusal is not None and gone.refusal.status == 401
    # the plan lacks the title: no count came back, and the refusal says why
    asked, refused = _drive({"claim": [("basic", None, None)]}, postgres=True, title=_title("x"))
    assert asked[0][1]["b_plans"] == [] and refused.refusal is not None
    assert refused.refusal.status == 403


def test_a_title_no_one_can_serve_is_refused_after_the_plan() -> None:
    sqlite: dict[str, Rows] = {"lock": [("basic", None)]}
    postgresql: dict[str, Rows] = {"claim": [("basic", None, None)]}
    for postgres, answers in ((False, sqlite), (True, postgresql)):
        asked, claimed = _drive(answers, postgres=postgres, servable=False)
        assert len(asked) == 1
        assert claimed.refusal is not None and claimed.refusal.status == 503
        if postgres:
            assert asked[0][1]["b_plans"] == []  # no screen taken, none given up


@pytest.mark.parametrize(
    ("plan", "title", "status"),
    [("basic", _title("standard"), 403), ("none", _title(), 403), ("gone", _title(), 403)],
)
def test_a_plan_without_the_title_reads_nothing_else(
    plan: str, title: TitleInfo, status: int
) -> None:
    asked, claimed = _drive({"lock": [(plan, None)]}, title=title)
    assert [name for name, _ in asked] == ["lock"]
    assert claimed.refusal is not None and claimed.refusal.status == status


def test_a_deleted_account_is_refused_at_the_lock() -> None:
    asked, claimed = _drive({})
    assert [name for name, _ in asked] == ["lock"]
    assert claimed.refusal is not None and claimed.refusal.status == 401


hosts = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}(:[0-9]{1,5})?", fullmatch=True)
bases = st.builds(
    lambda scheme, host, slash: f"{scheme}://{host}{slash}",
    st.sampled_from(["http", "https", "HTTP"]),
    hosts,
    st.sampled_from(["", "/"]),
)
paths = st.from_regex(r"(/[A-Za-z0-9._~!$&'()*+,;=:@ -]{1,12}){1,3}", fullmatch=True).filter(
    lambda p: "/./" not in p + "/" and "/../" not in p + "/" and "%" not in p
)


@given(st.lists(bases, max_size=6), paths, st.text(st.characters(codec="ascii"), min_size=1))
def test_signed_urls_are_signed_url_for_each_base(many: list[str], path: str, token: str) -> None:
    assert signed_urls(many, path, token) == [signed_url(b, path, token) for b in many]


@pytest.mark.parametrize("bad", ["http://h/x", "http://h?q", "h:80", "http://h#f"])
def test_signed_urls_refuse_a_base_signed_url_refuses(bad: str) -> None:
    for where in ([bad], ["http://ok", bad]):
        with pytest.raises(ValueError, match="scheme://host"):
            signed_urls(where, "/demo/master.m3u8", "tok")


@given(st.floats(0, 2**47 / 1000), st.integers(0, 2**74 - 1), st.integers(0, 2**74 - 1))
def test_session_ids_are_uuid7_in_time_order_and_keep_every_random_bit(
    now: float, a: int, b: int
) -> None:
    first = uuid.UUID(new_session_id(now, a))
    assert (first.version, first.variant) == (7, uuid.RFC_4122)
    assert first.int >> 80 == int(now * 1000)
    assert (new_session_id(now, a) == new_session_id(now, b)) == (a == b)
    assert new_session_id(now, a) < new_session_id(now + 0.002, b)  # as text, too
