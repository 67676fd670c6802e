"""What some models do to attention scores beyond ``softmax(q k^T * scaling)``, and their own attention.

Two things arrive as keyword arguments of the attention function that transformers' SDPA path ignores:

* ``softcap`` (Gemma 2's ``attn_logit_softcapping``): scores become ``tanh(s / cap) * cap`` before the mask;
* ``s_aux`` (gpt-oss): one learned logit per query head joins the softmax denominator (an attention sink that
  takes probability mass and gives no value): ``p_j = exp(s_j) / (sum_k exp(s_k) + exp(sink))``.

:class:`ScoreMods` carries them to every kvtune attention path (the PyTorch reference applies them; the Triton
kernel does not, so such layers never take it). :func:`model_attention` is the model's own attention for calls
without a kvtune cache and for a prompt's first forward: transformers' SDPA when neither is set (unchanged
numbers), else the eager formula of those models in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ScoreMods:
    """``softcap`` (None: none) and ``sinks``: per-query-head sink logits ``[Hq]`` (None: none)."""

    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be > 0, got {self.softcap}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> ScoreMods:
        cap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
        return cls(float(cap) if cap is not None else None, sinks)

    @property
    def plain(self) -> bool:
        return self.softcap is None and self.sinks is None

    def cap(self, scores: torch.Tensor) -> torch.Tensor:
        """Soft-capped ``scores`` (any shape, float32)."""
        return scores if self.softcap is None else torch.tanh(scores / self.softcap) * self.softcap

    def sink_logits(self, hkv: int, heads: list[int] | None = None) -> torch.Tensor | None:
        """Sink logits float32 ``[h, r, 1, 1]`` for grouped scores ``[B, h, r, l, N]`` (KV heads ``heads`` of
        ``hkv``, ``r`` query heads each), or None."""
        if self.sinks is None:
            return None
        s = self.sinks.float().reshape(hkv, -1)
        return (s if heads is None else s[heads])[..., None, None]


PLAIN = ScoreMods()  # plain softmax(q k^T * scaling)


def model_score_mods(model: Any) -> list[str]:
    """What in ``model``'s attention is not a plain softmax (the fused decode kernel's maths): ``"soft-capping"``
    (a config's ``attn_logit_softcapping``), ``"learned sinks"`` (attention modules with a ``sinks`` parameter)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    found = ["soft-capping"] if getattr(config, "attn_logit_softcapping", None) else []
    if any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules()):
        found.append("learned sinks")
    return found


def softmax(scores: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last axis of float32 ``scores [..., N]`` (-inf = masked; a fully masked row gives 0),
    with an extra denominator term ``exp(sinks)`` broadcast to ``[..., 1]`` when given."""
    if sinks is None:
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)
    top = torch.maximum(scores.amax(dim=-1, keepdim=True), sinks)
    e = (scores - top).exp()
    return e / (e.sum(dim=-1, keepdim=True) + (sinks - top).exp())


def model_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The model's attention: ``query [B, Hq, L, D]``, ``key/value [B, Hkv, N, D]``, mask ``[B, 1, L, N]``
    (bool, True = attend; or additive float; None = causal) -> ``(out [B, L, Hq, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mods = ScoreMods.from_kwargs(kwargs)
    if mods.plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    b, hq, lq, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    scaling = d ** -0.5 if scaling is None else float(scaling)
    q5 = query.float().reshape(b, hkv, hq // hkv, lq, d)  # [B, Hkv, r, L, D]
    scores = mods.cap((q5 @ key.float()[:, :, None].transpose(-1, -2)) * scaling)  # [B, Hkv, r, L, N]
    if attention_mask is None:  # causal, the queries being the last L positions
        attention_mask = torch.ones(lq, n, dtype=torch.bool, device=query.device).tril(n - lq)[None, None]
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[:, :, None], float("-inf"))
    else:
        scores = scores + attention_mask[:, :, None].float()
    probs = softmax(scores, mods.sink_logits(hkv))
    out = probs @ value.float()[:, :, None]  # [B, Hkv, r, L, D]
    return out.reshape(b, hq, lq, d).transpose(1, 2).contiguous().to(query.dtype), None
