"""End-to-end check of a few plans: next-token KL to the fp16 model and perplexity, on given token ids
(held-out calibration text: :mod:`kvtune.search.halving`).

Each plan runs teacher-forced through the real runtime (:func:`kvtune.runtime.teacher_forced_logits`: a
fresh bit-packed cache of the plan, filled ``chunk`` tokens at a time in stepwise mode, so every query reads
exactly the quantized history decoding would show it). Metrics come from :mod:`kvtune.eval.quality`
(KL(fp16 || plan), nats per position).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvtune.plan import Plan

log = logging.getLogger(__name__)


def validate_plans(model: Any, plans: Sequence[Plan], input_ids: torch.Tensor, chunk: int = 64,
                   on_plan: Callable[[int], None] | None = None,
                   reference: torch.Tensor | None = None) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Score ``plans`` (bound to ``model``) on ``input_ids`` ``[n, T]`` against the unquantized model (its logits
    ``[n', T', V]`` float32 with ``n' >= n, T' >= T`` when already computed: the model is causal, so a prefix of
    them is the reference of a prefix of the tokens).

    Returns ``(info, results)``: ``info`` = path used, reference perplexity, seconds; one result per plan:
    ``kl`` (all positions), ``ppl``, ``top1``, ``kl_tail`` (second half of each sequence), ``seconds`` (NaN
    metrics and ``error`` where the runtime could not run a plan: it is logged, and the search goes on).
    ``on_plan(i)`` is called after plan ``i``.
    """
    from kvtune.eval.quality import SequenceScorer, dense_logits, perplexity
    from kvtune.runtime import teacher_forced_logits

    start = time.perf_counter()
    tail = input_ids.shape[1] // 2
    n, t = input_ids.shape
    ref = dense_logits(model, input_ids) if reference is None else reference[:n, :t]  # [n, T, V]
    ref_ppl = perplexity(ref, input_ids)
    results = []
    for i, plan in enumerate(plans):
        t0 = time.perf_counter()
        scorer = SequenceScorer(tail_start=tail)
        try:
            scorer.add(teacher_forced_logits(model, plan, input_ids, chunk=chunk, prefill=0), ref, input_ids)
            r = {k: scorer.result()[k] for k in ("kl", "ppl", "top1", "kl_tail")}
        except (RuntimeError, ValueError, NotImplementedError) as exc:  # the runtime cannot run this plan
            log.warning("validation of plan %d (%s) failed: %s", i, plan.name, exc)
            r = {"kl": math.nan, "ppl": math.nan, "top1": math.nan, "kl_tail": math.nan, "error": str(exc)}
        results.append({**r, "seconds": round(time.perf_counter() - t0, 2)})
        if on_plan is not None:
            on_plan(i)
    info = {"path": "kvtune.runtime (bit-packed cache, stepwise)", "sequences": int(input_ids.shape[0]),
            "length": int(input_ids.shape[1]),
            "chunk": chunk, "reference_ppl": ref_ppl, "seconds": round(time.perf_counter() - start, 2)}
    return info, results


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than 3 points or no spread."""
    if len(x) != len(y) or len(x) < 3:
        return None

    def ranks(v: Sequence[float]) -> torch.Tensor:
        t = torch.tensor(list(v), dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for value in t.unique():  # average the ranks of ties
            tie = t == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else None
