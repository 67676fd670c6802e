"""Passkey retrieval: a random 5-digit number hidden at a depth of a haystack made from the eval text.

A prompt of exactly ``length`` tokens is ``intro + filler[:a] + needle + filler[a:] + question`` where the
filler is a run of the eval text's tokens and ``a`` puts the needle's first token at ``depth`` of the filler
(0.1 = early, 0.9 = late). The model answers by greedy decoding a few tokens through the cache under test;
the answer is right when the first run of digits in the decoded text is the passkey.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvtune.errors import KVTuneError

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey case: ``input_ids [1, length]`` int64 with the needle at tokens ``[needle_start, needle_end)``."""

    input_ids: torch.Tensor
    key: str
    length: int
    depth: float
    needle_start: int
    needle_end: int


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False, verbose=False)["input_ids"])


def build_prompt(tok: Any, haystack: list[int], length: int, depth: float, key: str, offset: int = 0) -> PasskeyPrompt:
    """A prompt of exactly ``length`` tokens hiding ``key`` at ``depth`` (0..1) of ``haystack[offset:]``."""
    if not 0.0 <= depth <= 1.0:
        raise KVTuneError(f"passkey depth must be in [0, 1], got {depth}")
    intro, needle, question = (_encode(tok, s) for s in (INTRO, NEEDLE.format(key=key), QUESTION))
    n_fill = length - len(intro) - len(needle) - len(question)
    if n_fill < 1:
        raise KVTuneError(f"passkey length {length} is too short for the prompt "
                          f"({length - n_fill + 1} tokens at least)", "use longer passkey lengths")
    if offset + n_fill > len(haystack):
        raise KVTuneError(f"the text has {len(haystack)} tokens, too few for a {length}-token passkey haystack",
                          "use a longer text or shorter passkey lengths")
    filler = haystack[offset:offset + n_fill]
    a = round(depth * n_fill)
    ids = intro + filler[:a] + needle + filler[a:] + question
    start = len(intro) + a
    return PasskeyPrompt(torch.tensor([ids], dtype=torch.long), key, length, depth, start, start + len(needle))


def extract_answer(text: str) -> str | None:
    """The first run of digits in ``text`` (the model's answer), or None."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def score_answer(text: str, key: str) -> bool:
    """True when the first run of digits in ``text`` is exactly ``key``."""
    return extract_answer(text) == key


def passkey_prompts(tok: Any, haystack: list[int], lengths: tuple[int, ...], depths: tuple[float, ...] = DEFAULT_DEPTHS,
                    seed: int = 0) -> list[PasskeyPrompt]:
    """One prompt per (length, depth), keys drawn with ``random.Random(seed)``; haystacks start at different
    offsets of ``haystack`` so that cases do not share their filler."""
    rng = random.Random(seed)
    prompts = []
    for _i, length in enumerate(lengths):
        for _j, depth in enumerate(depths):
            key = str(rng.randint(10000, 99999))
            span = max(len(haystack) - length, 0)
            offset = (rng.randint(0, span) if span else 0)
            prompts.append(build_prompt(tok, haystack, length, depth, key, offset))
    return prompts


def run_passkey(model: Any, tok: Any, prompts: list[PasskeyPrompt], make_cache: Callable[[], Any],
                step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Greedy-decode :data:`ANSWER_TOKENS` tokens for each prompt through a fresh cache.

    Returns ``{"accuracy", "by_length": {length: accuracy}, "cases": [{length, depth, key, answer, ok}]}``.
    """
    from kvtune.eval.quality import greedy_generate

    cases = []
    for prompt in prompts:
        out = greedy_generate(model, prompt.input_ids, ANSWER_TOKENS, cache=make_cache(), stop_at_eos=True)
        text = tok.decode(out[0], skip_special_tokens=True)
        cases.append({"length": prompt.length, "depth": prompt.depth, "key": prompt.key,
                      "answer": extract_answer(text), "ok": score_answer(text, prompt.key)})
        if step is not None:
            step()
    return summarize(cases)


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall and per length of scored cases (``ok`` booleans)."""
    by_length: dict[int, list[bool]] = {}
    for case in cases:
        by_length.setdefault(int(case["length"]), []).append(bool(case["ok"]))
    acc = sum(c["ok"] for c in cases) / len(cases) if cases else float("nan")
    return {"accuracy": acc, "by_length": {str(k): sum(v) / len(v) for k, v in sorted(by_length.items())},
            "cases": cases}


def default_lengths(ctx: int, start: int = 512) -> tuple[int, ...]:
    """Doublings from ``start`` up to ``ctx``, plus ``ctx`` itself (512, 1024, 2048 at ctx 2048)."""
    lengths = []
    n = min(start, ctx)
    while n < ctx:
        lengths.append(n)
        n *= 2
    return (*lengths, ctx)
