"""Request bodies are read as JSON and nothing else: the properties of the strict parser."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.control.routes.body import BadJson, parse

# Every code point, lone surrogate halves (category Cs) included.
_ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()))


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@given(_ANY_TEXT)
def test_a_string_reads_back_unless_it_holds_a_lone_surrogate(text: str) -> None:
    body = json.dumps({"s": text}).encode()  # ASCII, surrogates as \udxxx escapes
    if _is_unicode(text):
        assert parse(body) == {"s": text}
    else:
        with pytest.raises(BadJson, match="lone UTF-16 surrogate"):
            parse(body)


@given(st.floats())
def test_a_number_reads_back_unless_json_has_no_such_number(x: float) -> None:
    body = json.dumps([x]).encode()  # NaN, Infinity, -Infinity for the non-finite
    if math.isfinite(x):
        assert parse(body) == [x]
    else:
        with pytest.raises(BadJson, match=r"Infinity|NaN"):
            parse(body)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (rb'["\ud800"]', r"\ud800 at byte 2"),  # near the end: msgspec says "truncated"
        (rb'["\udc00\ud800"]', r"\udc00 at byte 2"),  # a low half first
        (rb'["\ud800\ud800\udc00"]', r"\ud800 at byte 2"),  # a high half, then a pair
        (rb'["\ud83d", "\ude00"]', r"\ud83d at byte 2"),  # halves in different strings
        (b'{"lat": 1e999}', "out of range"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a": 1,}', "at '}'"),
    ],
)
def test_what_is_wrong_is_named(body: bytes, named: str) -> None:
    with pytest.raises(BadJson) as refused:
        parse(body)
    assert named in str(refused.value)


def test_an_escaped_backslash_is_not_an_escape() -> None:
    assert parse(rb'["\\ud800"]') == ["\\ud800"]
    assert parse(rb'["\ud83d\ude00"]') == ["\U0001f600"]
