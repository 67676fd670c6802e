"""Attention statistics from probe queries, without materialising the full ``T x T`` attention matrix.

**Probe queries** (ZipCache): the last ``ceil(5%)`` positions plus a seeded random ``5%`` of the others.
Only their rows of the causal attention are computed, ``[B, Hq, P, T]`` with ``P ~ 0.1 T``; passing every
position as a probe gives the exact statistics (the rows are processed in blocks either way).

Per sequence and query head ``h`` (probe query ``i`` at position ``p_i`` sees keys ``j <= p_i``, and
``j >= first_visible(p_i)`` in a sliding-window or chunked layer, :class:`~kvtune.layout.LayerSpan`):

* **normalized score** ``s[h, j] = sum_i A[h, i, j] / #{i : i sees j}`` -- the mean attention weight key
  ``j`` receives from the probes that can see it (ZipCache's fix of the accumulation bias toward early
  tokens); 0 where no probe sees ``j``.
* **far score** ``f[h, j]``: the same mean over only the probes at distance ``p_i - j >= M`` (``M`` = the
  number of recent probes). The normalized score of the last few hundred keys is inflated by *local*
  attention of the recent probes; a sink must draw attention from far away, so pivots and sinks use ``f``,
  over the **eligible positions** ``j < T - M`` (those some probe sees from at least ``M`` tokens away).
* **pivot** ``= argmax_{eligible j} f[h, j]``; **sink score** ``= f[h, pivot]`` in [0, 1]: the share of each
  distant query's attention the pivot token gets, on average.
* **top-k mass** (k = :data:`TOPK` = 8): mean over probes of the mass on their k largest weights;
  **non-pivot top-k mass**: the k largest weights other than the pivot's. Averaged over probes that see at least
  ``4 k`` keys (all probes if none do).
* **entropy**: ``-sum_j A log A / log(#visible keys)``, i.e. normalised to [0, 1] (0 = one key, 1 = uniform),
  averaged over probes that see at least 2 keys.

Per-sequence values are averaged over sequences. **AKVQ-VL pattern label** of a (layer, head):

* ``"pivot-token-salient"`` if ``sink_score >= PIVOT_MIN_MASS`` (0.3) and ``sink_score >=
  nonpivot_topk_mass``: one pivot token (typically the sink / first token) takes the largest share;
* else ``"text-salient"`` if ``nonpivot_topk_mass >= TEXT_MIN_MASS`` (0.5): 8 non-pivot tokens take at
  least half of the attention;
* else ``"dispersed"``.

**Sink tokens.** In one sequence, an eligible position is a sink of a layer when its head-mean far score
is at least :data:`SINK_MIN_SHARE` (5% of each distant query's attention) and at least :data:`SINK_RATIO`
(20) times the median over eligible positions. The layer's **sink rate** of a position is the share of
sequences in which it is a sink; its sink tokens are the positions with a rate above :data:`SINK_MIN_RATE`
(0.5: a strict majority of the sequences) -- at most :data:`MAX_SINKS` (4), highest rate first, listed by
position. Content sinks at varying positions (a newline that draws attention in one sequence) do not pass
the vote; the first token usually does.
"""

from __future__ import annotations

import math

import torch

from kvtune.layout import GLOBAL, LayerSpan

TOPK = 8
PIVOT_MIN_MASS = 0.3
TEXT_MIN_MASS = 0.5
SINK_MIN_SHARE = 0.05
SINK_RATIO = 20.0
SINK_MIN_RATE = 0.5
MAX_SINKS = 4
PATTERN_LABELS = ("dispersed", "text-salient", "pivot-token-salient")
_BLOCK = 256  # probe rows per block


def probe_positions(seq_len: int, recent: float = 0.05, random: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Sorted probe query positions ``[P]`` int64: the last ``ceil(recent*T)`` plus ``round(random*T)`` others."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n_recent = min(seq_len, max(1, math.ceil(recent * seq_len)))
    rest = seq_len - n_recent
    n_random = min(rest, round(random * seq_len))
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(rest, generator=gen)[:n_random] if n_random else torch.zeros(0, dtype=torch.long)
    return torch.cat([picked.sort().values, torch.arange(rest, seq_len)])


def n_recent_probes(seq_len: int, recent: float = 0.05) -> int:
    """How many trailing positions :func:`probe_positions` always probes."""
    return min(seq_len, max(1, math.ceil(recent * seq_len)))


def visibility(positions: torch.Tensor, seq_len: int, span: LayerSpan = GLOBAL) -> torch.Tensor:
    """Bool ``[P, T]``: probe ``i`` (at ``positions[i]``) may attend key ``j`` (causal, inside ``span``)."""
    j = torch.arange(seq_len, device=positions.device)[None, :]
    p = positions[:, None]
    seen = j <= p
    if span.windowed:
        seen &= j >= span.first_visible(p)
    return seen


def probe_attention(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, scaling: float,
                    span: LayerSpan = GLOBAL) -> torch.Tensor:
    """Causal softmax rows of the probe queries: ``[B, Hq, T, D]``, ``[B, Hkv, T, D]`` -> ``[B, Hq, P, T]`` float32.

    Query head ``h`` uses key head ``h // (Hq / Hkv)`` (grouped-query attention, as transformers' ``repeat_kv``).
    """
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    kt = key.float().transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, D, T]
    rows = []
    for block in positions.split(_BLOCK):
        qp = query[:, :, block.to(query.device)].float().reshape(b, hkv, g, -1, d)  # [B, Hkv, G, p, D]
        scores = (qp @ kt).reshape(b, hq, -1, t) * scaling
        seen = visibility(block.to(query.device), t, span)
        rows.append(scores.masked_fill(~seen, float("-inf")).softmax(dim=-1))
    return torch.cat(rows, dim=2)


def _topk(probs: torch.Tensor, pivot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k mass with and without the pivot column: ``[B, Hq, P, T]``, pivot ``[B, Hq]`` -> ``[B, Hq, P]`` x2."""
    m = min(TOPK + 1, probs.shape[-1])
    vals, idx = probs.topk(m, dim=-1)  # [B, Hq, P, m]
    is_pivot = idx == pivot[..., None, None]
    nonpivot = (vals * ~is_pivot).sum(dim=-1)
    if m == TOPK + 1:  # pivot not among the top k+1: the top k are all non-pivot
        nonpivot = nonpivot - torch.where(is_pivot.any(dim=-1), 0.0, vals[..., TOPK])
    return vals[..., :TOPK].sum(dim=-1), nonpivot


def _entropy(probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Mean normalised entropy over probes seeing >= 2 keys: ``[B, Hq, P, T]``, ``[P]`` -> ``[B, Hq]``."""
    multi = visible >= 2
    if not bool(multi.any()):
        return probs.new_zeros(probs.shape[:2])
    plogp = (probs * probs.clamp_min(1e-30).log()).sum(dim=-1)[..., multi]  # [B, Hq, P']
    return (-plogp / visible[multi].double().log().float()).mean(dim=-1)


def sequence_stats(probs: torch.Tensor, positions: torch.Tensor, margin: int,
                   span: LayerSpan = GLOBAL) -> dict[str, torch.Tensor]:
    """Per-sequence statistics of probe attention ``probs`` ``[B, Hq, P, T]`` (see the module doc).

    ``margin``: the minimum query-key distance of the far score (the recent-probe count). Returns
    ``normalized_score``/``far_score`` ``[B, Hq, T]``, ``sink_score``/``topk_mass``/``nonpivot_topk_mass``/
    ``entropy`` ``[B, Hq]``, ``pivot`` ``[B, Hq]`` int64 and ``sink`` ``[B, T]`` bool.
    """
    t = probs.shape[-1]
    pos = positions.to(probs.device)
    seen = visibility(pos, t, span)  # [P, T]
    norm = probs.sum(dim=2) / seen.sum(dim=0).clamp_min(1)  # [B, Hq, T]
    far = (seen & (pos[:, None] - torch.arange(t, device=pos.device)[None, :] >= margin)).float()  # [P, T]
    far_score = torch.einsum("bhpt,pt->bht", probs, far) / far.sum(dim=0).clamp_min(1)
    sink_score, pivot = far_score[..., : max(1, t - margin)].max(dim=-1)  # [B, Hq]
    visible = seen.sum(dim=1)  # [P]
    use = visible >= 4 * TOPK
    use = use if bool(use.any()) else torch.ones_like(use)
    topk, nonpivot = _topk(probs, pivot)
    return {"normalized_score": norm, "far_score": far_score, "sink_score": sink_score, "pivot": pivot,
            "sink": sequence_sinks(far_score, margin),
            "topk_mass": topk[..., use].mean(dim=-1), "nonpivot_topk_mass": nonpivot[..., use].mean(dim=-1),
            "entropy": _entropy(probs, visible)}


class AttentionStats:
    """Running means of :func:`sequence_stats` for one layer over the sequences it is shown."""

    _MEANS = ("normalized_score", "far_score", "sink_score", "topk_mass", "nonpivot_topk_mass", "entropy", "sink")

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, scaling: float,
               margin: int, span: LayerSpan = GLOBAL) -> None:
        """Add sequences: ``query`` ``[B, Hq, T, D]``, ``key`` ``[B, Hkv, T, D]``, probe ``positions`` ``[P]``."""
        stats = sequence_stats(probe_attention(query, key, positions, scaling, span), positions, margin, span)
        for name in self._MEANS:
            total = stats[name].double().sum(dim=0).cpu()
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.count += query.shape[0]

    def finalize(self, margin: int) -> dict[str, torch.Tensor]:
        """Means over sequences (float32 CPU): ``normalized_score``/``far_score`` ``[Hq, T]``, ``sink`` ``[T]`` (the
        sink rate), the rest ``[Hq]``; plus ``pivot_position`` ``[Hq]`` int64 = argmax of the mean far score
        over eligible positions."""
        if self.count == 0:
            raise ValueError("no sequences were accumulated")
        out = {name: (value / self.count).float() for name, value in self.sums.items()}
        t = out["far_score"].shape[-1]
        out["pivot_position"] = out["far_score"][:, : max(1, t - margin)].argmax(dim=-1)
        return out


def pattern_labels(sink_score: torch.Tensor, nonpivot_topk_mass: torch.Tensor) -> torch.Tensor:
    """AKVQ-VL label codes (indices into :data:`PATTERN_LABELS`), any shape -> same shape int64."""
    pivot = (sink_score >= PIVOT_MIN_MASS) & (sink_score >= nonpivot_topk_mass)
    text = ~pivot & (nonpivot_topk_mass >= TEXT_MIN_MASS)
    return torch.where(pivot, 2, torch.where(text, 1, 0)).long()


def sequence_sinks(far_score: torch.Tensor, margin: int) -> torch.Tensor:
    """Per-sequence sink positions: far score ``[B, Hq, T]`` -> bool ``[B, T]`` (see the module doc)."""
    t = far_score.shape[-1]
    s = far_score.float().mean(dim=1)[:, : max(1, t - margin)]  # [B, T_eligible]
    threshold = (SINK_RATIO * s.median(dim=-1, keepdim=True).values).clamp_min(SINK_MIN_SHARE)
    sink = torch.zeros(s.shape[0], t, dtype=torch.bool, device=s.device)
    sink[:, : s.shape[1]] = s >= threshold
    return sink


def sink_tokens(sink_rate: torch.Tensor) -> list[int]:
    """A layer's sink positions (ascending) from its sink rate ``[T]`` (see the module doc)."""
    rate = sink_rate.float()
    order = sorted(range(rate.shape[0]), key=lambda j: (-float(rate[j]), j))[:MAX_SINKS]
    return sorted(j for j in order if rate[j] > SINK_MIN_RATE)
