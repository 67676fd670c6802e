"""Text sources (pydoc halves, files), token chunking and data hashes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvtune.data import data_hash, load_text, pydoc_topics, token_chunks
from kvtune.errors import KVTuneError


class CharTokenizer:
    """One token per character (its code point): enough to test chunking without a real tokenizer."""

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


def test_pydoc_halves_are_disjoint_deterministic_and_complete() -> None:
    from pydoc_data.topics import topics

    calib, evals = pydoc_topics("calib"), pydoc_topics("eval")
    assert calib and evals and not set(calib) & set(evals)
    assert sorted(calib + evals) == sorted(topics)
    assert pydoc_topics("calib") == calib
    text = load_text("pydoc:calib")
    assert text == load_text("pydoc:calib") and text != load_text("pydoc:eval")
    assert topics[calib[0]].strip() in text and topics[calib[0]].strip() not in load_text("pydoc:eval")


def test_file_source(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("héllo wörld\n", encoding="utf-8")
    assert load_text(str(path)) == "héllo wörld\n"


@pytest.mark.parametrize("content", [b"", b"  \n\t\n", b"\xff\xfe\x00bad"])
def test_bad_files_are_kvtune_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(KVTuneError, match=str(path)):
        load_text(str(path))


@pytest.mark.parametrize("source", ["pydoc:nope", "/definitely/not/here.txt", "."])
def test_unknown_sources_are_kvtune_errors(source: str) -> None:
    with pytest.raises(KVTuneError, match="pydoc:calib"):
        load_text(source)


def test_token_chunks_shapes_and_order() -> None:
    chunks = token_chunks(CharTokenizer(), "abcdefghij", seq_len=3)
    assert chunks.dtype == torch.long and chunks.shape == (3, 3)
    assert chunks.flatten().tolist() == [ord(c) for c in "abcdefghi"]
    assert token_chunks(CharTokenizer(), "abcdefghij", seq_len=3, max_tokens=7).shape == (2, 3)


def test_token_chunks_errors() -> None:
    with pytest.raises(KVTuneError, match="has 5 tokens"):
        token_chunks(CharTokenizer(), "abcde", seq_len=6)
    with pytest.raises(KVTuneError, match="less than one chunk"):
        token_chunks(CharTokenizer(), "abcdefgh", seq_len=4, max_tokens=3)
    with pytest.raises(KVTuneError, match=">= 1"):
        token_chunks(CharTokenizer(), "abc", seq_len=0)


@given(n=st.integers(0, 200), seq_len=st.integers(1, 50))
def test_token_chunks_property(n: int, seq_len: int) -> None:
    text = "x" * n
    if n < seq_len:
        with pytest.raises(KVTuneError):
            token_chunks(CharTokenizer(), text, seq_len)
    else:
        assert token_chunks(CharTokenizer(), text, seq_len).shape == (n // seq_len, seq_len)


def test_data_hash() -> None:
    h = data_hash("abc")
    assert h == data_hash("abc") and h != data_hash("abd") and len(h) == 64


@pytest.mark.slow
def test_pydoc_halves_with_smollm_tokenizer(smollm: tuple[Any, Any]) -> None:
    _, tokenizer = smollm
    for source in ("pydoc:calib", "pydoc:eval"):
        chunks = token_chunks(tokenizer, load_text(source), seq_len=512)
        assert 60 <= chunks.shape[0] <= 200  # ~100-120 on CPython 3.11 (51k-62k tokens per half)
        assert int(chunks.max()) < 49152
