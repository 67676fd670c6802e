"""What the fp16 recent window and the sink token are worth, measured: the error left when they stay exact.

A cache keeps the ``R`` most recent tokens (and optionally the first, the attention sink) in fp16. Which share
of a quantizer's damage that removes depends on how much attention each layer pays to its recent tokens and to
the sink -- not on how many tokens they are -- so it is measured. For one reference key quantizer and one
value quantizer, per layer and KV head, on the sensitivity sample's probe queries (each probe at position ``p``
keeps keys ``j > p - R`` exact, and key 0 with the sink): the attention-output error relative to quantizing
every token, for ``R`` in :data:`WINDOWS`, without and with the sink. Tensor ``recency.{key,value}``
``[L, Hkv, len(WINDOWS), 2]`` (``[..., 0, 0] = 1``); the search prices a layer's window and sink with it.
"""

from __future__ import annotations

import torch

from kvtune.calibrate.attention import visibility
from kvtune.layout import GLOBAL, LayerSpan

WINDOWS = (0, 16, 32, 64, 128, 256)
_BLOCK = 128  # probe rows per block


def _kept(positions: torch.Tensor, t: int, r: int, sink: bool) -> torch.Tensor:
    """Bool ``[P, T]``: key ``j`` stays fp16 for the probe at ``positions[i]``."""
    j = torch.arange(t, device=positions.device)[None, :]
    kept = j > positions[:, None] - r if r else torch.zeros(len(positions), t, dtype=torch.bool,
                                                            device=positions.device)
    return kept | (j == 0) if sink else kept


def _rows(query: torch.Tensor, key: torch.Tensor, block: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scores of the probe rows ``block``: ``[B, Hq, p, T]`` float32 (grouped-query heads share keys)."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    qp = query[:, :, block].float().reshape(b, hkv, hq // hkv, -1, d)
    return (qp @ key.float().transpose(-1, -2).unsqueeze(2)).reshape(b, hq, -1, key.shape[2]) * scaling


def recency_errors(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_q: torch.Tensor,
                   value_q: torch.Tensor, positions: torch.Tensor, scaling: float,
                   span: LayerSpan = GLOBAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative errors ``([Hkv, W, 2], [Hkv, W, 2])`` float32 of quantized keys ``key_q`` (values exact) and of
    quantized values ``value_q`` (keys exact) when the last ``R`` keys of each probe (and the sink) stay exact,
    divided by the error with every key quantized. ``query [B, Hq, T, D]``, the rest ``[B, Hkv, T, D]``; ``span``:
    the layer's attention span (a windowed layer's probes see only their window)."""
    b, hq, t, _ = query.shape
    hkv = key.shape[1]
    shape = (b, hkv, hq // hkv)
    n = len(WINDOWS)
    err_k, err_v = torch.zeros(n, 2, hkv, device=query.device), torch.zeros(n, 2, hkv, device=query.device)
    dv = (value.float() - value_q.float()).unsqueeze(2)  # [B, Hkv, 1, T, D]
    dv = dv.to(query.device)
    for block in positions.to(query.device).split(_BLOCK):
        seen = visibility(block, t, span)  # [p, T]: causal, inside a sliding window or chunk
        s_full, s_q = _rows(query, key, block, scaling), _rows(query, key_q, block, scaling)
        probs = s_full.masked_fill(~seen, float("-inf")).softmax(-1)  # [B, Hq, p, T]
        ref = probs.view(*shape, -1, t) @ value.float().unsqueeze(2)  # [B, Hkv, G, p, D]
        for i, r in enumerate(WINDOWS):
            for s in (0, 1):
                kept = _kept(block, t, r, bool(s))
                pk = torch.where(kept, s_full, s_q).masked_fill(~seen, float("-inf")).softmax(-1)
                out_k = pk.view(*shape, -1, t) @ value.float().unsqueeze(2)
                err_k[i, s] += (out_k - ref).square().sum(dim=(0, 2, 3, 4))
                quantized = (probs * ~kept).view(*shape, -1, t)
                err_v[i, s] += (quantized @ dv).square().sum(dim=(0, 2, 3, 4))
    rel_k = (err_k / err_k[0, 0].clamp_min(1e-30)).permute(2, 0, 1)  # [Hkv, W, 2]
    rel_v = (err_v / err_v[0, 0].clamp_min(1e-30)).permute(2, 0, 1)
    return rel_k.clamp(0, 1).float().cpu(), rel_v.clamp(0, 1).float().cpu()
