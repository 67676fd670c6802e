"""Calibrate an already-loaded model on token chunks: statistics pass, sensitivity, KL, summary.

:func:`calibrate_model` is the model-object entry point (tests pass tiny random models);
:func:`kvtune.calibrate.run.calibrate` resolves names, text and the output directory around it.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch

from kvtune.calibrate.artifact import Calibration
from kvtune.calibrate.attention import MAX_SINKS, PATTERN_LABELS, pattern_labels, probe_positions, sink_tokens
from kvtune.calibrate.collect import Collector
from kvtune.calibrate.hooks import capture
from kvtune.calibrate.recency import recency_errors
from kvtune.calibrate.sensitivity import (
    default_candidates,
    default_kl_candidates,
    fitted_states,
    layer_kl,
    layer_sensitivity,
    quantize_tokens,
)
from kvtune.calibrate.settings import CalibSettings, Progress, ProgressEvent
from kvtune.models import check_supported, model_identity
from kvtune.quant.formats import QuantSpec

log = logging.getLogger(__name__)
TOP_OUTLIERS = 4  # outlier channels per head listed in the YAML summary


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def _emit(progress: Progress | None, *args: Any, **kwargs: Any) -> None:
    if progress is not None:
        progress(ProgressEvent(*args, **kwargs))


def input_device(model: Any) -> torch.device:
    """Where the token ids must go (the embedding's device; also right under ``device_map="auto"``)."""
    return model.get_input_embeddings().weight.device


def _stats_pass(model: Any, chunks: torch.Tensor, settings: CalibSettings, progress: Progress | None) -> Collector:
    """Run every chunk ``[n, T]`` through the decoder (no LM head) under capture hooks."""
    ident = model_identity(model)
    collector = Collector(ident["num_layers"], ident["num_kv_heads"], ident["head_dim"], settings)
    dev, start = input_device(model), time.perf_counter()
    with capture(model, on_attention=collector.on_attention, on_key_pre_rope=collector.on_key_pre_rope):
        for i, chunk in enumerate(chunks):
            collector.begin_chunk(i)
            model.model(input_ids=chunk[None].to(dev), use_cache=False)
            rate = (i + 1) * chunks.shape[1] / (time.perf_counter() - start)
            _emit(progress, "stats", i + 1, len(chunks), tokens_per_s=rate)
    return collector


def outlier_ranking(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``absmax`` ``[L, H, D]`` -> (scores = absmax / the head's median channel absmax, rank by score desc)
    ``[L, H, D]``."""
    scores = absmax / absmax.median(dim=-1, keepdim=True).values.clamp_min(1e-12)
    return scores, scores.argsort(dim=-1, descending=True)


def _stat_tensors(stats: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Flatten the collector's output into artifact tensor names (see :mod:`kvtune.calibrate.artifact`)."""
    tensors: dict[str, torch.Tensor] = {}
    for kind in ("keys", "keys_pre_rope", "values"):
        tensors.update({f"{kind}.{k}": v for k, v in stats[kind].items() if k != "samples"})
    for kind, src in (("key", "keys"), ("key_pre_rope", "keys_pre_rope"), ("value", "values")):
        scores, rank = outlier_ranking(stats[src]["absmax"])
        tensors[f"outliers.{kind}_scores"], tensors[f"outliers.{kind}_rank"] = scores, rank
    tensors.update({"samples.key": stats["keys"]["samples"], "samples.value": stats["values"]["samples"],
                    "samples.query": stats["queries"]["samples"]})
    att = stats["attention"]
    tensors["attention.normalized_score_mean"] = att["normalized_score"]
    tensors["attention.far_score_mean"] = att["far_score"]
    tensors["attention.sink_rate"] = att["sink"]
    for name in ("entropy", "topk_mass", "nonpivot_topk_mass", "sink_score", "pivot_position"):
        tensors[f"attention.{name}"] = att[name]
    tensors["attention.pattern"] = pattern_labels(att["sink_score"], att["nonpivot_topk_mass"])
    return tensors


def _sink_tensor(sink_rate: torch.Tensor) -> torch.Tensor:
    """Sink rate ``[L, T]`` -> sink positions per layer ``[L, MAX_SINKS]`` int64, padded with -1."""
    out = torch.full((sink_rate.shape[0], MAX_SINKS), -1, dtype=torch.long)
    for layer, rate in enumerate(sink_rate):
        sinks = sink_tokens(rate)
        out[layer, : len(sinks)] = torch.tensor(sinks, dtype=torch.long)
    return out


def _sensitivity(collector: Collector, tensors: dict[str, torch.Tensor], keys: tuple[QuantSpec, ...],
                 values: tuple[QuantSpec, ...], progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-output error of every candidate, per layer: ``[L, Hkv, Ck]``, ``[L, Hkv, Cv]``. The candidates'
    fitted state (a family's calibrated ``layer`` fields) goes into ``tensors`` as ``fitted.{key|value}.{c}.{field}``
    ``[L, Hkv, width]``, and the value of the fp16 window and sink as ``recency.{key,value}``
    (:mod:`kvtune.calibrate.recency`)."""
    s = collector.options
    k_rows, v_rows = [], []
    extra: dict[str, list[torch.Tensor]] = {}  # fitted.* and recency.* rows per layer
    n_layers = len(collector.held)
    for layer in range(n_layers):
        q, k, v = collector.held_sample(layer)
        positions = probe_positions(k.shape[2], s.probe_recent, s.probe_random, s.seed)
        k_rank, v_rank = tensors["outliers.key_rank"][layer], tensors["outliers.value_rank"][layer]
        k_states, v_states = fitted_states(keys, k, k_rank), fitted_states(values, v, v_rank)
        sk, sv = layer_sensitivity(q, k, v, positions, collector.scaling[layer], keys, values, k_rank, v_rank,
                                   collector.span[layer], k_states, v_states)
        (ck,), (cv,) = default_kl_candidates(keys, values)  # the reference quantizers of the recency table
        rk, rv = recency_errors(q, k, v, quantize_tokens(k, keys[ck]), quantize_tokens(v, values[cv]), positions,
                                collector.scaling[layer], collector.span[layer])
        extra.setdefault("recency.key", []).append(rk)
        extra.setdefault("recency.value", []).append(rv)
        for role, states in (("key", k_states), ("value", v_states)):
            for c, state in enumerate(states):
                for name, t in state.items():
                    extra.setdefault(f"fitted.{role}.{c}.{name}", []).append(t.float().cpu())
        k_rows.append(sk)
        v_rows.append(sv)
        _emit(progress, "sensitivity", layer + 1, n_layers, layer=layer)
    tensors.update({name: torch.stack(rows) for name, rows in extra.items()})
    return torch.stack(k_rows), torch.stack(v_rows)


def _kl(model: Any, chunks: torch.Tensor, settings: CalibSettings, keys: list[QuantSpec], values: list[QuantSpec],
        progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor]:
    ids = chunks[: settings.kl_seqs, : settings.kl_len].to(input_device(model))
    n_layers, start = model_identity(model)["num_layers"], time.perf_counter()
    per_forward = ids.numel() * (len(keys) + len(values))

    def on_layer(i: int) -> None:
        rate = (i + 1) * per_forward / (time.perf_counter() - start)
        _emit(progress, "kl", i + 1, n_layers, layer=i, tokens_per_s=rate)

    return layer_kl(model, ids, keys, values, on_layer)


def _summary(tensors: Mapping[str, torch.Tensor], keys: tuple[QuantSpec, ...], values: tuple[QuantSpec, ...],
             chunks: torch.Tensor) -> dict[str, Any]:
    """The human-readable part of ``calib.yaml`` (plain Python types only)."""
    def top(name: str) -> dict[int, list[list[int]]]:
        return {i: r[:, :TOP_OUTLIERS].tolist() for i, r in enumerate(tensors[f"outliers.{name}_rank"])}

    patterns = tensors["attention.pattern"]
    k2, v2 = default_kl_candidates(keys, values)
    sens_k = tensors["sensitivity.key"][:, :, k2[0]].mean(dim=1)
    sens_v = tensors["sensitivity.value"][:, :, v2[0]].mean(dim=1)
    return {
        "tokens_used": int(chunks.numel()), "sequences": int(chunks.shape[0]),
        "outlier_channels": {"key": top("key"), "key_pre_rope": top("key_pre_rope"), "value": top("value")},
        "sink_tokens": {i: [int(j) for j in row if j >= 0] for i, row in enumerate(tensors["attention.sink_tokens"])},
        "pattern_counts": {label: int((patterns == code).sum()) for code, label in enumerate(PATTERN_LABELS)},
        "most_sensitive_layers": {f"key {keys[k2[0]].label()}": sens_k.argsort(descending=True)[:5].tolist(),
                                  f"value {values[v2[0]].label()}": sens_v.argsort(descending=True)[:5].tolist()},
    }


def calibrate_model(model: Any, chunks: torch.Tensor, settings: CalibSettings | None = None,
                    data: Mapping[str, Any] | None = None, progress: Progress | None = None) -> Calibration:
    """Calibrate a loaded, supported model on token ``chunks`` ``[n, T]`` int64 (``T == settings.seq_len``).

    ``data`` is recorded as the artifact's data section (source, sha256). Nothing is written to disk.
    """
    check_supported(model)
    settings = settings or CalibSettings(tokens=int(chunks.numel()), seq_len=int(chunks.shape[1]))
    if chunks.dim() != 2 or chunks.shape[1] != settings.seq_len or chunks.shape[0] < 1:
        raise ValueError(f"chunks must be [n >= 1, {settings.seq_len}], got {list(chunks.shape)}")
    keys, values = default_candidates(int(model_identity(model)["head_dim"]))
    kl_k, kl_v = default_kl_candidates(keys, values)
    timing: dict[str, float] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        collector = _stats_pass(model, chunks, settings, progress)
        timing["stats_s"] = time.perf_counter() - start
        tensors = _stat_tensors(collector.finalize())
        tensors["attention.sink_tokens"] = _sink_tensor(tensors["attention.sink_rate"])
        t0 = time.perf_counter()
        tensors["sensitivity.key"], tensors["sensitivity.value"] = _sensitivity(collector, tensors, keys, values,
                                                                                progress)
        del collector
        timing["sensitivity_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tensors["kl.key"], tensors["kl.value"] = _kl(model, chunks, settings, [keys[i] for i in kl_k],
                                                     [values[i] for i in kl_v], progress)
        timing["kl_s"] = time.perf_counter() - t0
    timing.update(total_s=time.perf_counter() - start, stats_tokens_per_s=chunks.numel() / timing["stats_s"],
                  peak_rss_mib=peak_rss_mib())
    from kvtune import __version__

    return Calibration(model=model_identity(model), data=dict(data or {}), settings=settings,
                       key_candidates=keys, value_candidates=values,
                       kl_candidates={"key": tuple(kl_k), "value": tuple(kl_v)},
                       summary=_summary(tensors, keys, values, chunks), kvtune_version=__version__,
                       timing={k: round(float(v), 3) for k, v in timing.items()}, tensors=tensors)
