"""The statistics pass: an observer for :func:`kvtune.calibrate.hooks.capture` that feeds the accumulators.

One :class:`Collector` watches every forward of the calibration chunks. Per layer it keeps

* :class:`TensorStats` of keys (post-RoPE), keys before RoPE and values: per-channel moments, a quantile
  sketch, per-token L2-norm summaries per head, and a reservoir of token rows (Q too) -- all bounded;
* :class:`~kvtune.calibrate.attention.AttentionStats` over the first ``attention_seqs`` chunks (probe queries);
* the *held* sample: post-RoPE Q/K/V of the first ``held_len`` tokens of the first ``held_seqs`` chunks
  (float32, CPU), which sensitivity analysis replays without running the model again.

Call :meth:`Collector.begin_chunk` before each forward. Tensors may live on any device (``device_map="auto"``
puts layers on several GPUs); each accumulator stays on its layer's device and finalizes to CPU.
"""

from __future__ import annotations

import torch

from kvtune.calibrate.attention import AttentionStats, n_recent_probes, probe_positions
from kvtune.calibrate.hooks import AttentionCall
from kvtune.calibrate.settings import CalibSettings
from kvtune.calibrate.stats import HistogramSketch, MomentStats, ReservoirSampler, RowReservoir
from kvtune.layout import GLOBAL, LayerSpan

KINDS = ("keys", "keys_pre_rope", "values")


class TensorStats:
    """Streaming statistics of one tensor kind of one layer, fed ``[B, H, T, D]`` blocks."""

    def __init__(self, heads: int, head_dim: int, bins: int, samples: int) -> None:
        self.heads, self.head_dim = heads, head_dim
        self.moments = MomentStats(heads * head_dim)
        self.sketch = HistogramSketch(heads * head_dim, bins)
        self.norm_moments = MomentStats(heads)
        self.norm_sketch = HistogramSketch(heads, bins)
        self.reservoir = RowReservoir(samples)

    def update(self, x: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add ``x`` ``[B, H, T, D]``; ``plan`` = the sampler's ``(src, dst)`` over the ``B*T`` token rows."""
        b, h, t, d = x.shape
        x = x.detach().float()
        rows = x.transpose(1, 2).reshape(b * t, h * d)  # [B*T, H*D]
        self.moments.update(rows)
        self.sketch.update(rows)
        norms = x.norm(dim=-1).transpose(1, 2).reshape(b * t, h)  # [B*T, H]
        self.norm_moments.update(norms)
        self.norm_sketch.update(norms)
        if plan is not None:
            self.reservoir.update(x.transpose(0, 1).reshape(h, b * t, d), *plan)

    def finalize(self, levels: tuple[float, ...], filled: int) -> dict[str, torch.Tensor]:
        """``absmax/min/max/mean/var`` ``[H, D]``, ``quantiles`` ``[H, D, nq]``, ``token_norm_{mean,var,max}``
        ``[H]``, ``token_norm_quantiles`` ``[H, nq]``, ``samples`` ``[H, n, D]`` (float32 CPU)."""
        h, d = self.heads, self.head_dim
        out = {k: v.view(h, d) for k, v in self.moments.finalize().items()}
        out["quantiles"] = self.sketch.quantiles(levels).view(h, d, -1)
        norms = self.norm_moments.finalize()
        out.update(token_norm_mean=norms["mean"], token_norm_var=norms["var"], token_norm_max=norms["max"],
                   token_norm_quantiles=self.norm_sketch.quantiles(levels))
        if self.reservoir.rows is not None:
            out["samples"] = self.reservoir.finalize(filled)
        return out


class Collector:
    """Observer of a whole model during the statistics pass (see the module doc)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, settings: CalibSettings) -> None:
        self.options, self.seq_len = settings, settings.seq_len
        o, seq_len = settings, settings.seq_len
        self.stats = {kind: [TensorStats(num_kv_heads, head_dim, o.hist_bins, o.samples) for _ in range(num_layers)]
                      for kind in KINDS}
        self.query_samples = [RowReservoir(o.samples) for _ in range(num_layers)]
        self.attention = [AttentionStats() for _ in range(num_layers)]
        self.held: list[dict[str, list[torch.Tensor]]] = [{"query": [], "key": [], "value": []}
                                                          for _ in range(num_layers)]
        self.scaling: list[float] = [head_dim ** -0.5] * num_layers
        self.span: list[LayerSpan] = [GLOBAL] * num_layers
        self.sampler = ReservoirSampler(o.samples, o.seed)
        self.probes = probe_positions(seq_len, o.probe_recent, o.probe_random, o.seed)
        self.margin = n_recent_probes(seq_len, o.probe_recent)  # far-score distance
        self._chunk, self._plan = -1, None

    def begin_chunk(self, index: int, batch: int = 1) -> None:
        """Announce chunk ``index`` (``batch`` sequences of ``seq_len`` tokens) before its forward pass."""
        self._chunk = index
        self._plan = self.sampler.plan(batch * self.seq_len)

    def on_key_pre_rope(self, layer: int, key: torch.Tensor) -> None:
        self.stats["keys_pre_rope"][layer].update(key, self._plan)

    def on_attention(self, call: AttentionCall) -> None:
        """Feed one layer's post-RoPE ``query`` ``[B, Hq, T, D]``, ``key``/``value`` ``[B, Hkv, T, D]``."""
        layer, o = call.layer, self.options
        self.scaling[layer], self.span[layer] = call.scaling, call.span
        self.stats["keys"][layer].update(call.key, self._plan)
        self.stats["values"][layer].update(call.value, self._plan)
        b, hq, t, d = call.query.shape
        self.query_samples[layer].update(call.query.detach().transpose(0, 1).reshape(hq, b * t, d), *self._plan)
        if self._chunk < o.attention_seqs:
            self.attention[layer].update(call.query, call.key, self.probes, call.scaling, self.margin, call.span)
        if self._chunk < o.held_seqs:
            n = min(o.held_len, t)
            for name, x in (("query", call.query), ("key", call.key), ("value", call.value)):
                self.held[layer][name].append(x[:, :, :n].detach().float().cpu())

    def held_sample(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The held ``(query [n, Hq, t, D], key [n, Hkv, t, D], value [n, Hkv, t, D])`` of ``layer`` (CPU)."""
        h = self.held[layer]
        return torch.cat(h["query"]), torch.cat(h["key"]), torch.cat(h["value"])

    def finalize(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{kind: {stat: tensor [L, ...]}}`` for kinds ``keys``/``keys_pre_rope``/``values``/``queries``/
        ``attention``."""
        levels, filled = self.options.quantiles, self.sampler.filled
        out: dict[str, dict[str, torch.Tensor]] = {}
        for kind in KINDS:
            per_layer = [s.finalize(levels, filled) for s in self.stats[kind]]
            out[kind] = {name: torch.stack([p[name] for p in per_layer]) for name in per_layer[0]}
        out["queries"] = {"samples": torch.stack([r.finalize(filled) for r in self.query_samples])}
        per_layer = [a.finalize(self.margin) for a in self.attention]
        out["attention"] = {name: torch.stack([p[name] for p in per_layer]) for name in per_layer[0]}
        return out
