"""JSON text for reports: any string survives as UTF-8, non-finite numbers are refused."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from executor.jsontext import dumps, rescrub, scrub

# Every code point, lone surrogates included (hypothesis leaves them out by default).
any_text = st.text(st.characters(codec=None, exclude_categories=()))
clean_text = st.text(st.characters(exclude_categories=["Cs"]))


def json_values(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    numbers = st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    scalars = st.none() | st.booleans() | numbers | text
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
        max_leaves=20,
    )


def scrubbed(value: Any) -> Any:
    """What a reader gets back: every string scrubbed, keys too."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [scrubbed(v) for v in value]
    if isinstance(value, dict):
        return {scrub(k): scrubbed(v) for k, v in value.items()}
    return value


@given(json_values(any_text))
def test_any_value_becomes_strict_utf8_json(value: Any) -> None:
    encoded = dumps(value).encode("utf-8")  # would raise on a lone surrogate
    assert json.loads(encoded.decode("utf-8", "strict")) == scrubbed(value)


@given(json_values(clean_text))
def test_values_without_lone_surrogates_round_trip_unchanged(value: Any) -> None:
    assert json.loads(dumps(value)) == value


@given(any_text)
def test_scrub_replaces_exactly_the_lone_surrogates(text: str) -> None:
    scrubbed = scrub(text)
    assert scrubbed.encode("utf-8").decode("utf-8") == scrubbed
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        assert scrubbed == text


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(number: float) -> None:
    with pytest.raises(ValueError):
        dumps({"x": [number]})


def test_escaped_lone_surrogates_are_scrubbed_and_pairs_kept() -> None:
    assert json.loads(rescrub('{"a": "\\ud800", "b": "\\ud83d\\ude00"}')) == {
        "a": "\ufffd",
        "b": "\U0001f600",
    }
