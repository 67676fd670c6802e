"""Attention over a :class:`~kvtune.runtime.layer.Step` in pure PyTorch: the specification and the CPU path.

Per head group, keys/values are ``[sinks (fp16)] [quantized tokens, dequantized block by block] [fp16
window]`` and the softmax runs in float32. Queries are processed in slices of :data:`QUERY_SLICE` so a
long prefill never materializes a ``T x T`` score matrix. Grouped-query attention: the ``n_rep`` query
heads of one KV head share its keys through broadcasting (no repeated K/V).

In stepwise mode (``step.bounds``) the window tokens that token-by-token decoding would already have
quantized for some query of this call form a "transition" region: query ``i`` reads the first
``bounds[i] - nq_before`` of them quantized (encoded and decoded exactly as the coming flush will store
them) and the rest in fp16, exactly as if the tokens had arrived one at a time.

Keys are masked by their cache position (:meth:`~kvtune.runtime.layer.KVTuneLayer.key_positions`): left padding,
and in a sliding-window or chunked layer everything before each query's first visible position
(:meth:`kvtune.layout.LayerSpan.first_visible`), so the old tokens of a block straddling the window's edge are
never read. :class:`~kvtune.runtime.scores.ScoreMods` (soft-capping, sinks) apply in the blockwise path; SDPA
cannot express them, so such layers always take it.
"""

from __future__ import annotations

import torch

from kvtune.runtime.layer import Step
from kvtune.runtime.scores import PLAIN, ScoreMods, softmax

QUERY_SLICE = 256
SDPA_SLICE = 2048  # queries per SDPA call of a chunked prefill (bounds the [B, 1, l, N] mask)


def left_padding(mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Left-padding tokens per row ``[B]`` from a boolean mask ``[B, 1, q, kv]`` (True = attend), or zeros."""
    if mask is None or mask.dtype != torch.bool:
        return torch.zeros(batch, dtype=torch.long, device=device)
    last = mask[:, 0, -1, :]  # [B, kv]
    return torch.where(last.any(-1), last.float().argmax(-1), torch.zeros_like(last[:, 0], dtype=torch.float)).long()


def attend(step: Step, q: torch.Tensor, pad: torch.Tensor, scaling: float, sdpa: bool | None = None,
           mods: ScoreMods = PLAIN) -> torch.Tensor:
    """Attention of ``q [B, Hq, L, D]`` over the layer's stored tokens; returns ``[B, Hq, L, D]`` in q's dtype.

    sdpa: use :func:`_attend_sdpa` (default: for several queries, without ``mods``)."""
    layer = step.layer
    b, hq, lq, d = q.shape
    if (sdpa if sdpa is not None else lq > 1) and mods.plain:
        return _attend_sdpa(step, q, pad, scaling)
    n_rep = hq // layer.num_kv_heads
    q5 = q.float().reshape(b, layer.num_kv_heads, n_rep, lq, d)
    out = torch.empty(b, layer.num_kv_heads, n_rep, lq, d, dtype=torch.float32, device=q.device)
    for g in layer.groups:
        keys, vals, alt = _segments(step, g)
        newidx = _new_index(step, keys.shape[2])
        heads = list(g.heads)
        for s in range(0, lq, QUERY_SLICE):
            e = min(lq, s + QUERY_SLICE)
            qs = q5[:, heads, :, s:e]  # [B, h, r, l, D]
            valid = _valid(step, pad, newidx, torch.arange(s, e, device=q.device))  # [B, 1, 1, l, N]
            bounds = step.bounds[s:e] if step.bounds is not None else None
            sinks = mods.sink_logits(layer.num_kv_heads, heads)
            out[:, heads, :, s:e] = _attend_slice(qs, keys, vals, valid, alt, bounds, step, scaling, mods, sinks)
    return out.reshape(b, hq, lq, d).to(q.dtype)


def _attend_sdpa(step: Step, q: torch.Tensor, pad: torch.Tensor, scaling: float) -> torch.Tensor:
    """Several queries (a later chunk of a long prompt, or a stepwise chunk): the same attention through
    ``scaled_dot_product_attention`` (fp16 on GPU, float32 elsewhere) over each group's dequantized tokens,
    in slices of :data:`SDPA_SLICE` queries. ``q [B, Hq, L, D]`` -> ``[B, Hq, L, D]`` in q's dtype.

    A stepwise transition's read-back tokens are appended after the keys as a second copy of the window
    tokens they replace: the mask lets each query see exactly one copy of each (:func:`_transition_mask`)."""
    import torch.nn.functional as F

    layer = step.layer
    b, hq, lq, d = q.shape
    n_rep = hq // layer.num_kv_heads
    dt = q.dtype if q.is_cuda else torch.float32
    out = torch.empty(b, hq, lq, d, dtype=q.dtype, device=q.device)
    for g in layer.groups:
        keys, vals, alt = _segments(step, g)
        newidx = _new_index(step, keys.shape[2])
        if alt is not None:
            keys, vals = torch.cat([keys, alt[1]], 2), torch.cat([vals, alt[2]], 2)
        keys, vals = keys.to(dt), vals.to(dt)
        qh = [h * n_rep + r for h in g.heads for r in range(n_rep)]
        qg = q[:, qh].to(dt)
        for s in range(0, lq, SDPA_SLICE):
            e = min(lq, s + SDPA_SLICE)
            valid = _valid(step, pad, newidx, torch.arange(s, e, device=q.device))[:, :, 0]  # [B, 1, l, N]
            if alt is not None:
                valid = _transition_mask(valid, alt[0], alt[1].shape[2], step.bounds[s:e] - step.nq_before)
            o = F.scaled_dot_product_attention(qg[:, :, s:e], keys, vals, attn_mask=valid, scale=scaling,
                                               enable_gqa=n_rep > 1)
            out[:, qh, s:e] = o.nan_to_num(0.0).to(q.dtype)  # a fully masked row (left padding) gives NaN
    return out


def _reads_back(a: int, read: torch.Tensor) -> torch.Tensor:
    """``[l, a]`` bool: whether query ``i`` reads transition token ``j`` back quantized (``j < read[i]``)."""
    return torch.arange(a, device=read.device)[None, :] < read[:, None]


def _transition_mask(valid: torch.Tensor, off: int, a: int, read: torch.Tensor) -> torch.Tensor:
    """``valid [B, 1, l, N]`` over ``N + a`` keys whose last ``a`` are the read-back copies of keys
    ``off..off+a``: query ``i`` sees the first ``read[i]`` of those as copies, the rest as themselves."""
    use = _reads_back(a, read)
    win = valid[..., off:off + a]
    return torch.cat([valid[..., :off], win & ~use, valid[..., off + a:], win & use], -1)


def _segments(step: Step, g) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """Keys/values ``[B, h, N, D]`` float32 and the stepwise transition ``(offset, k, v, fp_k, fp_v)``."""
    layer = step.layer
    if g.keys:
        dk, dv = g.dequantized(keep=layer.stepwise)  # [B, h, Nq, D]
    else:
        dk = dv = g.select(layer.win_k)[:, :, :0].float()
    sk, sv = g.select(step.sink_k).float(), g.select(step.sink_v).float()
    wk, wv = g.select(layer.win_k).float(), g.select(layer.win_v).float()
    keys, vals = torch.cat([sk, dk, wk], 2), torch.cat([sv, dv, wv], 2)
    if step.bounds is None:
        return keys, vals, None
    a = int(step.bounds.max()) - step.nq_before  # window tokens some query reads back quantized
    ak, av = g.roundtrip(layer.padded_block(layer.win_k[:, :, :a], step.nq_before),
                         layer.padded_block(layer.win_v[:, :, :a], step.nq_before), g.select)
    return keys, vals, (sk.shape[2] + dk.shape[2], ak, av, wk[:, :, :a], wv[:, :, :a])


def _new_index(step: Step, n: int) -> torch.Tensor:
    """For each stored key of this call's sequence, its index among this call's tokens (-1: older)."""
    idx = torch.full((n,), -1, dtype=torch.long, device=step.sink_k.device)
    if step.q_len == 1:
        return idx
    s = step.sink_k.shape[2]
    idx[s - step.new_sinks: s] = torch.arange(step.new_sinks, device=idx.device)
    n_rest = step.q_len - step.new_sinks
    if n_rest:
        idx[n - n_rest:] = torch.arange(step.new_sinks, step.q_len, device=idx.device)
    return idx


def _valid(step: Step, pad: torch.Tensor, newidx: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 1, l, N]`` bool: not left padding, causal among this call's tokens (``queries [l]``: their
    indices in it) and, in a windowed layer, inside each query's window (all by cache position)."""
    layer, n = step.layer, newidx.shape[0]
    pos = layer.key_positions(n, pad.device)  # [N]
    not_pad = pos[None, :] >= pad[:, None]  # [B, N]
    causal = newidx[None, :] <= queries[:, None]  # [l, N]
    valid = not_pad[:, None, None, None, :] & causal[None, None, None]
    if not layer.span.windowed:
        return valid
    qpos = layer.length - step.q_len + queries  # [l] cache positions of the queries
    first = layer.span.first_visible(qpos[None, :], pad[:, None])  # [B or 1, l]
    inside = pos[None, None, :] >= first[..., None]  # [B or 1, l, N]
    return valid & inside[:, None, None]


def _attend_slice(qs, keys, vals, valid, alt, bounds, step, scaling, mods=PLAIN, sinks=None) -> torch.Tensor:
    """Softmax attention of ``qs [B, h, r, l, D]`` over ``keys/vals [B, h, N, D]`` (+ transition), scores
    soft-capped and sink logits ``[h, r, 1, 1]`` in the denominator as ``mods`` says."""
    scores = mods.cap((qs @ keys[:, :, None].transpose(-1, -2)) * scaling)  # [B, h, r, l, N]
    use = None
    if alt is not None:
        off, ak, av, _fk, fv = alt
        a = ak.shape[2]
        use = _reads_back(a, bounds - step.nq_before)  # [l, A]
        s_alt = mods.cap((qs @ ak[:, :, None].transpose(-1, -2)) * scaling)
        scores[..., off:off + a] = torch.where(use, s_alt, scores[..., off:off + a])
    scores = scores.masked_fill(~valid, float("-inf"))
    p = softmax(scores, sinks)
    out = p @ vals[:, :, None]  # [B, h, r, l, D]
    if use is not None:
        out = out + (p[..., off:off + a] * use) @ (av - fv)[:, :, None]
    return out
