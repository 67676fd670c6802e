"""Fixtures of the eval tests: a character-level tokenizer and a tiny saved model directory with a text file."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest


class CharTokenizer:
    """Byte-value-per-character tokenizer (vocab 128): enough for prompts and passkey scoring."""

    vocab_size = 128

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [min(ord(c), 127) for c in text]}

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return "".join(chr(int(i)) for i in ids)


@pytest.fixture(scope="session")
def char_tok() -> CharTokenizer:
    return CharTokenizer()


def word_text(n: int, seed: int = 0) -> str:
    """``n`` random words ``w1``..``w127`` (one token each with the tiny dir's word-level tokenizer)."""
    rng = random.Random(seed)
    return " ".join(f"w{rng.randint(1, 127)}" for _ in range(n))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama (2 layers, head dim 16, vocab 128, 512 positions) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kvtune.models import tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, model.config.vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(word_text(1200), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine a starved OpenMP worker
    turns every small matmul into a ~20 ms scheduler wait: run eval tests single-threaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
