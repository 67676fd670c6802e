"""Quality of next-token distributions against fp16: perplexity, KL divergence, top-1 agreement, greedy agreement.

Conventions: position ``t`` of a sequence ``ids [T]`` predicts ``ids[t + 1]``, so a sequence scores ``T - 1``
positions. ``KL = sum_v p_ref(v) (log p_ref(v) - log p(v))`` (fp16 reference first: how much the quantized
model's distribution loses of the reference), in nats, averaged over positions. ``top1`` is the share of
positions where the arg-max tokens agree. Perplexity is ``exp(mean NLL)`` of the true next tokens.

Metrics are kept for all positions and for a *tail* (positions ``>= tail_start``), where every query reads a
long quantized history: in a teacher-forced run the first tokens of a sequence see few (or, inside a
residual window, no) quantized tokens, which dilutes the all-position numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

SLICE = 256  # positions per log-softmax slice (bounds the temporary memory to SLICE x vocab floats)


def position_stats(logits: torch.Tensor, ref_logits: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position NLL, KL(ref || logits) and top-1 agreement.

    Args:
        logits: ``[N, V]`` float, the method's logits.
        ref_logits: ``[N, V]`` float, the fp16 reference logits at the same positions.
        targets: ``[N]`` int64, the true next tokens.

    Returns:
        ``(nll [N], kl [N], agree [N])`` float64 tensors (computed in float32: float64 over a 49k vocabulary
        was 15% of an eval's time, and changes KL by < 1e-6).
    """
    nll, kl, agree = [], [], []
    for s in range(0, logits.shape[0], SLICE):
        lp = torch.log_softmax(logits[s:s + SLICE].float(), dim=-1)  # [n, V]
        lr = torch.log_softmax(ref_logits[s:s + SLICE].float(), dim=-1)
        nll.append(-lp.gather(-1, targets[s:s + SLICE, None]).squeeze(-1).double())
        kl.append((lr.exp() * (lr - lp)).sum(-1).double())
        agree.append((lp.argmax(-1) == lr.argmax(-1)).double())
    return torch.cat(nll), torch.cat(kl).clamp_min(0.0), torch.cat(agree)


@dataclass
class MetricSums:
    """Running sums of :func:`position_stats` over sequences."""

    nll: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    count: int = 0

    def add(self, nll: torch.Tensor, kl: torch.Tensor, agree: torch.Tensor) -> None:
        """Add per-position stats ``[N]``."""
        self.nll += float(nll.sum())
        self.kl += float(kl.sum())
        self.agree += float(agree.sum())
        self.count += int(nll.numel())

    def result(self) -> dict[str, float]:
        """``{"ppl", "kl", "top1", "positions"}`` (NaN when empty)."""
        if not self.count:
            return {"ppl": math.nan, "kl": math.nan, "top1": math.nan, "positions": 0}
        return {"ppl": math.exp(self.nll / self.count), "kl": self.kl / self.count,
                "top1": self.agree / self.count, "positions": self.count}


@dataclass
class SequenceScorer:
    """Accumulates all-position and tail metrics of teacher-forced logits against a reference."""

    tail_start: int = 0
    all: MetricSums = field(default_factory=MetricSums)
    tail: MetricSums = field(default_factory=MetricSums)

    def add(self, logits: torch.Tensor, ref_logits: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Score ``logits [B, T, V]`` vs ``ref_logits [B, T, V]`` on ``input_ids [B, T]``."""
        for b in range(input_ids.shape[0]):
            nll, kl, agree = position_stats(logits[b, :-1], ref_logits[b, :-1], input_ids[b, 1:])
            self.all.add(nll, kl, agree)
            t = max(self.tail_start, 0)
            self.tail.add(nll[t:], kl[t:], agree[t:])

    def result(self) -> dict[str, float]:
        r = self.all.result()
        tail = self.tail.result()
        r.update(ppl_tail=tail["ppl"], kl_tail=tail["kl"], top1_tail=tail["top1"], tail_positions=tail["positions"])
        return r


def perplexity(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Perplexity of ``input_ids [B, T]`` under ``logits [B, T, V]`` (all ``B * (T - 1)`` positions)."""
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # [B, T-1, V]
    nll = -lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return math.exp(float(nll.mean()))


@torch.no_grad()
def dense_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """fp16 reference: one dense forward without a cache. ``input_ids [B, T]`` -> logits ``[B, T, V]`` float32."""
    return model(input_ids, use_cache=False).logits.float()


def greedy_agreement(reference: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
    """``(prefix, overall)`` agreement of generated tokens ``[B, N]`` with the reference ``[B, N]``.

    ``prefix``: mean over rows of (tokens before the first divergence) / N. ``overall``: share of equal tokens.
    """
    n = min(reference.shape[-1], tokens.shape[-1])
    if n == 0:
        return math.nan, math.nan
    eq = reference[..., :n] == tokens[..., :n]  # [B, n] bool
    prefix = eq.long().cumprod(-1).sum(-1).double() / n
    return float(prefix.mean()), float(eq.double().mean())


@torch.no_grad()
def greedy_generate(model: Any, input_ids: torch.Tensor, new_tokens: int, cache: Any = None,
                    stop_at_eos: bool = False) -> torch.Tensor:
    """Greedy continuation ``[B, new_tokens]`` (fewer if ``stop_at_eos``) of ``input_ids [B, T]`` via
    ``model.generate(past_key_values=cache)`` (``cache=None``: a fresh ``DynamicCache``)."""
    from transformers import DynamicCache, GenerationConfig

    gen_cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=0 if stop_at_eos else new_tokens,
                               do_sample=False, num_beams=1, eos_token_id=model.generation_config.eos_token_id,
                               pad_token_id=_pad_id(model))
    if cache is None:
        cache = DynamicCache(config=model.config)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache,
                         generation_config=gen_cfg)
    return out[:, input_ids.shape[1]:]


def _pad_id(model: Any) -> int:
    cfg = model.generation_config
    for candidate in (cfg.pad_token_id, cfg.eos_token_id, getattr(model.config, "pad_token_id", None), 0):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0
