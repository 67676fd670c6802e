"""Validation that sees deployment: held-out text, up to the reference length, by successive halving.

**Held-out text**: the calibration read the first ``tokens`` tokens of its text; validation reads the tokens
after those (never scored by any trial), cut into sequences. Where too few are left, it takes the text's last
tokens (and says so).

**Successive halving**: every candidate runs at the first fidelity (short sequences, cheap); the best
``keep[i]`` by KL go on to fidelity ``i + 1``, up to the reference length (4096 tokens, or the model's limit,
and at least 4 sliding windows). The best baseline and the best searched plan seen so far always go on, so the
final comparison between them is made at the longest fidelity.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.layout import LayerSpan
from kvtune.plan import Plan
from kvtune.search.validate import validate_plans

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fidelity:
    """``sequences`` held-out sequences of ``length`` tokens, fed ``chunk`` tokens a forward."""

    length: int
    sequences: int = 1
    chunk: int = 128

    def __post_init__(self) -> None:
        if self.length < 16 or self.sequences < 1 or self.chunk < 1:
            raise ValueError("a fidelity needs length >= 16, sequences >= 1, chunk >= 1")


@dataclass(frozen=True)
class Schedule:
    """Fidelities (shortest first) and how many candidates survive each (``keep[i]`` go on to ``i + 1``)."""

    fidelities: tuple[Fidelity, ...] = (Fidelity(512, 1, 128), Fidelity(1024, 1, 128), Fidelity(4096, 1, 256))
    keep: tuple[int, ...] = (4, 2)

    def __post_init__(self) -> None:
        if not self.fidelities or len(self.keep) != len(self.fidelities) - 1 or any(k < 1 for k in self.keep):
            raise ValueError("a schedule needs one keep count (>= 1) between each pair of fidelities")

    def for_model(self, limit: int | None, window: int | None) -> Schedule:
        """The schedule for a model with position ``limit`` (None: unknown) whose sliding-window layers see
        ``window`` tokens (None: none): the last fidelity reaches at least ``4 * window`` tokens, then nothing
        is longer than ``limit``."""
        out = self
        if window:
            last = self.fidelities[-1]
            if last.length < 4 * window:
                out = Schedule((*self.fidelities[:-1], Fidelity(4 * window, last.sequences, last.chunk)), self.keep)
        return out.capped(limit) if limit else out

    def capped(self, length: int) -> Schedule:
        """The schedule with no sequence longer than ``length`` tokens (stages of one length merge)."""
        fids = [Fidelity(min(f.length, length), f.sequences, min(f.chunk, length)) for f in self.fidelities]
        out, keep = [fids[0]], []
        for f, k in zip(fids[1:], self.keep):
            if f.length == out[-1].length:
                out[-1] = f
            else:
                out.append(f)
                keep.append(k)
        return Schedule(tuple(out), tuple(keep))


def widest_window(spans: Sequence[LayerSpan]) -> int | None:
    """The widest sliding window (or chunk) among a model's layer spans (:mod:`kvtune.layout`), None when every
    layer is global."""
    return max((s.size for s in spans if s.windowed), default=None)


def held_out_ids(tokenizer: Any, source: str, skip: int, length: int, sequences: int) -> tuple[torch.Tensor, str]:
    """``([sequences, length] int64, where)``: tokens of ``source`` after the first ``skip`` (those calibration
    read), or its last tokens where too few are left."""
    from kvtune.data import load_text

    ids = torch.tensor(tokenizer(load_text(source), add_special_tokens=False)["input_ids"], dtype=torch.long)
    need = length * sequences
    if ids.numel() < need:
        raise KVTuneError(f"the validation text {source} has {ids.numel()} tokens, fewer than {need}",
                          "calibrate on a longer text or validate shorter sequences")
    start = skip if ids.numel() - skip >= need else ids.numel() - need
    where = f"{source} tokens {start}..{start + need}" + (" (held out)" if start >= skip else " (overlaps calibration)")
    return ids[start:start + need].view(sequences, length), where


def reference_logits(model: Any, ids: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """The unquantized model's logits ``[n, T, V]`` float32 over the widest sequences and length of ``schedule``
    (cut from ``ids``), computed once: the model is causal, so every stage reads a prefix of them."""
    from kvtune.eval.quality import dense_logits

    fids = schedule.fidelities
    return dense_logits(model, ids[: max(f.sequences for f in fids), : max(f.length for f in fids)])


def successive_halving(model: Any, plans: Sequence[Plan], ids: torch.Tensor, schedule: Schedule,
                       protect: Callable[[list[dict[str, float]]], set[int]],
                       on_plan: Callable[[int, int], None] | None = None,
                       reference: torch.Tensor | None = None) -> tuple[list[dict[str, Any]], list[int]]:
    """Run ``plans`` through the schedule on ``ids [n, T]`` (sequences and lengths cut from it; ``reference``:
    :func:`reference_logits`, computed here when not given).

    ``protect(results)`` names plans that go on whatever their rank (results: the latest KL of every plan, NaN
    where not run). Returns ``(stages, finalists)``: per stage ``{"fidelity", "plans": [indices], "results":
    [...]}`` and the plans of the last stage."""
    alive = list(range(len(plans)))
    latest: list[dict[str, float]] = [{"kl": math.nan} for _ in plans]
    stages = []
    reference = reference if reference is not None else reference_logits(model, ids, schedule)
    for s, fid in enumerate(schedule.fidelities):
        x = ids[: fid.sequences, : fid.length]
        info, results = validate_plans(model, [plans[i] for i in alive], x, fid.chunk,
                                       None if on_plan is None else (lambda j, s=s: on_plan(s, j)), reference)
        for i, r in zip(alive, results):
            latest[i] = {**r, "length": fid.length}
        stages.append({"fidelity": {"length": fid.length, "sequences": fid.sequences, "chunk": fid.chunk},
                       "reference_ppl": info["reference_ppl"], "seconds": info["seconds"], "plans": list(alive),
                       "results": results})
        if s == len(schedule.keep):
            break
        ranked = sorted(alive, key=lambda i: (_finite(latest[i]["kl"]), i))
        keep = set(ranked[: schedule.keep[s]]) | (protect(latest) & set(alive))
        alive = [i for i in alive if i in keep]
    return stages, alive


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf
