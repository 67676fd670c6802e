"""Passkey prompt construction (lengths, needle position) and answer scoring."""

from __future__ import annotations

from typing import Any

import pytest

from kvtune.errors import KVTuneError
from kvtune.eval.retrieval import (
    INTRO,
    NEEDLE,
    QUESTION,
    build_prompt,
    default_lengths,
    extract_answer,
    passkey_prompts,
    score_answer,
    summarize,
)

HAYSTACK_TEXT = "The quick brown fox jumps over the lazy dog. " * 200


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("length", [300, 1000])
def test_prompt_has_exact_length_and_needle_at_depth(char_tok: Any, depth: float, length: int) -> None:
    hay = char_tok(HAYSTACK_TEXT)["input_ids"]
    p = build_prompt(char_tok, hay, length, depth, "12345", offset=3)
    ids = p.input_ids[0].tolist()
    assert p.input_ids.shape == (1, length) and p.length == length
    text = char_tok.decode(ids)
    assert text.startswith(INTRO) and text.endswith(QUESTION)
    assert char_tok.decode(ids[p.needle_start:p.needle_end]) == NEEDLE.format(key="12345")
    n_fill = length - len(INTRO) - len(NEEDLE.format(key="12345")) - len(QUESTION)
    assert p.needle_start - len(INTRO) == round(depth * n_fill)
    assert text.count("12345") == 2  # only in the needle
    filler = ids[len(INTRO):p.needle_start] + ids[p.needle_end:length - len(QUESTION)]
    assert filler == hay[3:3 + n_fill]


def test_prompts_per_length_and_depth_are_seeded(char_tok: Any) -> None:
    hay = char_tok(HAYSTACK_TEXT)["input_ids"]
    a = passkey_prompts(char_tok, hay, (300, 600), (0.1, 0.9), seed=3)
    b = passkey_prompts(char_tok, hay, (300, 600), (0.1, 0.9), seed=3)
    assert [(p.length, p.depth) for p in a] == [(300, 0.1), (300, 0.9), (600, 0.1), (600, 0.9)]
    assert [p.key for p in a] == [p.key for p in b] and all(len(p.key) == 5 and p.key.isdigit() for p in a)
    assert len({p.key for p in a}) > 1


def test_prompt_errors(char_tok: Any) -> None:
    hay = char_tok(HAYSTACK_TEXT)["input_ids"]
    with pytest.raises(KVTuneError, match="too short"):
        build_prompt(char_tok, hay, 50, 0.5, "12345")
    with pytest.raises(KVTuneError, match="too few"):
        build_prompt(char_tok, hay[:100], 1000, 0.5, "12345")
    with pytest.raises(KVTuneError, match="depth"):
        build_prompt(char_tok, hay, 300, 1.5, "12345")


def test_scoring() -> None:
    assert extract_answer(" 12345. Remember it.") == "12345"
    assert score_answer(" 12345.", "12345")
    assert not score_answer(" 1234", "12345")
    assert not score_answer(" 123456", "12345")
    assert not score_answer(" no number here", "12345")
    assert not score_answer(" 54321 and 12345", "12345")
    s = summarize([{"length": 512, "ok": True}, {"length": 512, "ok": False}, {"length": 1024, "ok": True}])
    assert s["accuracy"] == pytest.approx(2 / 3) and s["by_length"] == {"512": 0.5, "1024": 1.0}


def test_default_lengths() -> None:
    assert default_lengths(2048) == (512, 1024, 2048)
    assert default_lengths(3000) == (512, 1024, 2048, 3000)
    assert default_lengths(100) == (100,)
