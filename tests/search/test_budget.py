"""Budget parsing: accepted spellings, and one-line errors (format, range, below the achievable minimum)."""

from __future__ import annotations

import pytest

from kvtune.errors import KVTuneError
from kvtune.search import parse_budget
from kvtune.search.budget import check_minimum


@pytest.mark.parametrize("text, value", [("2.0bit", 2.0), ("2bit", 2.0), ("2.0", 2.0), ("2.5 bits", 2.5),
                                         ("3B", 3.0), (" 4bit ", 4.0), (".5", 0.5), (3, 3.0), (2.25, 2.25),
                                         ("16bit", 16.0)])
def test_accepted(text: object, value: float) -> None:
    assert parse_budget(text) == value


@pytest.mark.parametrize("text, words", [("abc", "invalid budget"), ("2.0 bytes", "invalid budget"),
                                         ("", "invalid budget"), ("-1bit", "invalid budget"),
                                         ("0", "positive"), ("17bit", "above 16"), ("1e3", "invalid budget"),
                                         (float("nan"), "positive"), (True, "invalid budget")])
def test_rejected(text: object, words: str) -> None:
    with pytest.raises(KVTuneError, match=words) as info:
        parse_budget(text)
    assert "\n" not in str(info.value)


def test_below_minimum_names_the_minimum() -> None:
    with pytest.raises(KVTuneError, match=r"below the minimum achievable 2\.125 bits") as info:
        check_minimum(parse_budget("2.0bit"), 2.125)
    assert "--budget 2.125bit" in str(info.value)
    check_minimum(parse_budget("2.125"), 2.125)
