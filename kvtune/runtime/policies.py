"""Token policies that run after a layer's attention: probe queries, salient tokens, Elastic merging.

* **Probes** (ZipCache): the layer keeps the last :data:`MAX_PROBES` probe queries: every decode query,
  and of a multi-token call the last 5% plus a random 5% (the plan's ``probe_recent``/``probe_random``).
  A token's *normalized attention score* is the mean softmax probability the probes give it (every probe
  comes after every scored token, so the count of queries that could see it is the number of probes).
* **Salient tokens** (ZipCache, AKVQ-VL, VidKV): when blocks were quantized in this call, the salient set
  is re-selected among the current salient tokens and the new ones: the top ``floor(ratio * Nq)`` by
  score keep a per-token copy at ``salient.bits`` (made from the fp16 values, never from codes). With
  ``salient.token_types`` the score of each token is multiplied by its type's weight first (visual tokens
  become the first candidates); the count, and so the stored bits, stay the same.
* **Elastic merging** (Elastic Cache): while fewer than ``floor(ratio * (L - keep_initial - keep_recent))``
  tokens are merged, the least important window tokens (not initial, not recent, not padding) are
  averaged into their nearest kept successor (the anchor) and dropped.
"""

from __future__ import annotations

import math

import torch

from kvtune.quant import codec
from kvtune.quant.formats import per_token
from kvtune.runtime.heads import HeadGroup, Salient
from kvtune.runtime.layer import KVTuneLayer, Step

MAX_PROBES = 32


def after_attention(step: Step, q: torch.Tensor, pad: torch.Tensor, scaling: float) -> None:
    """After attention of ``q [B, Hq, L, D]``: probes, then the layer's merge + flush, then salient tokens."""
    layer = step.layer
    sal, merge = layer.plan.salient, layer.plan.merge
    if sal.ratio > 0 or merge.method != "none":
        _add_probes(layer, q)
        layer.scaling = scaling
    if merge.method != "none":
        merge_window(layer, pad)
    layer.finish(pad)
    if sal.ratio > 0 and layer.pending:
        for g in layer.groups:
            _select_salient(layer, g, pad)
        layer.pending.clear()


def _add_probes(layer: KVTuneLayer, q: torch.Tensor) -> None:
    """Keep recent probe queries ``[B, Hq, P, D]`` (fp16)."""
    lq, sal = q.shape[2], layer.plan.salient
    if lq == 1:
        new = q
    else:
        recent = max(1, math.ceil(sal.probe_recent * lq))
        gen = torch.Generator().manual_seed(layer.length)
        n_rand = min(lq - recent, math.ceil(sal.probe_random * lq))
        rand = torch.randperm(lq - recent, generator=gen)[:n_rand].sort().values
        idx = torch.cat([rand, torch.arange(lq - recent, lq)]).to(q.device)
        new = q.index_select(2, idx)
    probes = new if layer.probes is None else torch.cat([layer.probes, new.to(layer.probes.dtype)], 2)
    layer.probes = probes[:, :, -MAX_PROBES:].to(torch.float16)


def probe_scores(layer: KVTuneLayer, g: HeadGroup, pad: torch.Tensor) -> torch.Tensor:
    """Normalized attention score of every stored token of ``g``'s heads: ``[B, h, s + Nq + w]`` float32."""
    dk, _ = g.dequantized(keep=layer.stepwise) if g.keys else (g.select(layer.win_k)[:, :, :0].float(), None)
    sink = layer.sink_k.view() if layer.sink_k.n else layer.win_k[:, :, :0]
    keys = torch.cat([g.select(sink).float(), dk, g.select(layer.win_k).float()], 2)  # [B, h, N, D]
    b, hq, p, d = layer.probes.shape
    n_rep = hq // layer.num_kv_heads
    qp = layer.probes.float().reshape(b, layer.num_kv_heads, n_rep, p, d)[:, list(g.heads)]
    scores = (qp @ keys[:, :, None].transpose(-1, -2)) * (layer.scaling or d ** -0.5)
    not_pad = torch.arange(keys.shape[2], device=keys.device)[None, :] >= pad[:, None]  # [B, N]
    scores = scores.masked_fill(~not_pad[:, None, None, None, :], float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0).mean(dim=(2, 3))


def _select_salient(layer: KVTuneLayer, g: HeadGroup, pad: torch.Tensor) -> None:
    """Re-select ``g``'s salient tokens among the current ones and the blocks quantized in this call."""
    spec = per_token(layer.plan.salient.bits)
    s = layer.sink_k.n
    score = probe_scores(layer, g, pad)[:, :, s: s + layer.n_quant]  # [B, h, Nq]
    if layer.track_types:
        score = score * _type_weights(layer, score.device)[g.select(layer.q_types.view()).long()]
    b, h = score.shape[:2]
    pend_idx = torch.cat([torch.arange(i, i + k.shape[2]) for i, k, _ in layer.pending]).to(score.device)
    pk = torch.cat([g.select(k) for _, k, _ in layer.pending], 2).float()
    pv = torch.cat([g.select(v) for _, _, v in layer.pending], 2).float()
    new_k, new_v = codec.encode(pk, spec, 1), codec.encode(pv, spec, 1)
    cand = pend_idx.expand(b, h, -1)
    old = g.salient
    if old is not None and old.idx is not None:
        cand = torch.cat([old.idx.long(), cand], 2)
        new_k = {n: torch.cat([old.k[n], t], 2) for n, t in new_k.items()}
        new_v = {n: torch.cat([old.v[n], t], 2) for n, t in new_v.items()}
    target = min(math.floor(layer.plan.salient.ratio * layer.n_quant), cand.shape[2])
    top = score.gather(2, cand).topk(target, dim=2).indices.sort(dim=2).values  # [B, h, S]
    pick = lambda t: t.gather(2, top.unsqueeze(-1).expand(*top.shape, t.shape[-1]))
    g.salient = Salient(spec, cand.gather(2, top).to(torch.int32),
                        {n: pick(t) for n, t in new_k.items()}, {n: pick(t) for n, t in new_v.items()})


def _type_weights(layer: KVTuneLayer, device: torch.device) -> torch.Tensor:
    """Score weight of each token-type code ``[n_types]`` float32 (``salient.token_types``, default 1)."""
    from kvtune.token_types import TOKEN_TYPES

    sal = layer.plan.salient
    return torch.tensor([sal.weight(name) for name in TOKEN_TYPES], dtype=torch.float32, device=device)


def merge_window(layer: KVTuneLayer, pad: torch.Tensor) -> None:
    """Elastic Cache: merge the least important tokens about to leave the fp16 window into their next kept token.

    Candidates are window tokens older than the last ``max(residual, keep_recent, 1)``, not among the first
    ``keep_initial`` stored tokens and not padding; the count merged so far follows the bit accountant.
    """
    m = layer.plan.merge
    need = math.floor(m.ratio * max(0, layer.length - m.keep_initial - m.keep_recent)) - layer.merged
    w = layer.win_k.shape[2]
    start = layer.sink_k.n + layer.n_quant  # stored index of window token 0
    j = torch.arange(w, device=layer.win_k.device)
    cand = (j < w - max(layer.plan.residual, m.keep_recent, 1)) & (start + j >= m.keep_initial)  # [w]
    cand = cand[None, :] & (start + j[None, :] >= pad[:, None])  # [B, w]
    need = min(need, int(cand.sum(-1).min()) if w else 0)
    if need <= 0:
        return
    imp = torch.cat([probe_scores(layer, g, pad)[:, :, start:] for g in layer.groups], 1)  # [B, Hkv, w]
    order = [h for g in layer.groups for h in g.heads]
    imp = imp[:, torch.argsort(torch.tensor(order))]
    imp = imp.masked_fill(~cand[:, None, :], float("inf"))
    chosen = torch.zeros_like(imp, dtype=torch.bool).scatter_(2, imp.topk(need, 2, largest=False).indices, True)
    layer.win_k, layer.win_v = (_merge_into_anchors(x, chosen, need) for x in (layer.win_k, layer.win_v))
    if layer.win_types is not None:  # an anchor keeps its own type
        keep = (~chosen).nonzero()[:, -1].reshape(*chosen.shape[:2], -1)
        layer.win_types = layer.win_types.gather(2, keep)
    layer.merged += need


def _merge_into_anchors(x: torch.Tensor, chosen: torch.Tensor, need: int) -> torch.Tensor:
    """Average each chosen token of ``x [B, H, w, D]`` into its next non-chosen token; drop the chosen."""
    b, h, w, d = x.shape
    j = torch.arange(w, device=x.device).expand(b, h, w)
    nxt = torch.where(chosen, torch.full_like(j, w), j)
    anchor = nxt.flip(-1).cummin(-1).values.flip(-1)  # next kept index at or after each position
    target = torch.where(chosen, anchor, j)  # chosen -> anchor, kept -> itself
    acc = torch.zeros(b, h, w, d, dtype=torch.float32, device=x.device)
    acc.scatter_add_(2, target.unsqueeze(-1).expand(b, h, w, d), x.float())
    count = torch.zeros(b, h, w, dtype=torch.float32, device=x.device).scatter_add_(2, target,
                                                                                  torch.ones_like(acc[..., 0]))
    merged = (acc / count.clamp_min(1).unsqueeze(-1)).to(x.dtype)
    keep = (~chosen).nonzero()[:, -1].reshape(b, h, w - need)
    return merged.gather(2, keep.unsqueeze(-1).expand(b, h, w - need, d))
