"""How much each candidate quantizer hurts each layer/head: attention-output error and end-to-end KL.

**Attention-output error** (per layer, per KV head, per candidate), on the held sample:
``rel_mse = ||O_q - O||^2 / ||O||^2`` with ``O = softmax(Q K^T * scaling) V`` (causal), summed over the query
heads that share the KV head, over probe query rows (ZipCache probes: last 5% + random 5% of positions, so
the ``T x T`` matrix is never built) and over the held sequences. A key candidate quantizes only K, a value
candidate only V. Keys are fake-quantized *post-RoPE* (KIVI), as the runtime cache stores them; KVQuant's
pre-RoPE keys are a possible extension (the pre-RoPE statistics are already collected).

Token grouping: a channel-axis spec with group G quantizes the first ``floor(T/G)*G`` tokens and keeps the
rest in fp16 (:func:`quantize_tokens`), as the runtime's residual window does. Outlier channels come from
calibration (``rank``, per head, for specs without rotation) or, when rotated, from the rotated data.

**End-to-end KL** (:func:`layer_kl`): for a few candidates, per layer, the mean over positions of
``KL(p_fp || p_q)`` of next-token distributions when only that layer's K (or V) is quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from kvtune.calibrate.attention import probe_attention
from kvtune.calibrate.hooks import AttentionCall, capture
from kvtune.errors import KVTuneError
from kvtune.layout import GLOBAL, LayerSpan
from kvtune.quant import codec
from kvtune.quant import family as families
from kvtune.quant.codec import fake_quantize
from kvtune.quant.formats import QuantSpec, kivi_key, kivi_value
from kvtune.quant.outliers import INDEX_FIELD
from kvtune.quant.rotation import rotation


def default_candidates(head_dim: int | None = None) -> tuple[tuple[QuantSpec, ...], tuple[QuantSpec, ...]]:
    """``(key_candidates, value_candidates)``: every registered family's candidates, in registry order (the order
    is part of the artifact), without those a head of ``head_dim`` channels cannot hold (a rotation the head
    dim does not allow, as many outlier channels as the head has).

    The ``affine`` family's ends reach below 2 bits (g128 keys, whole-head value groups): without them the
    cheapest plan stores 2.0 bits (1-bit g32 everywhere) and a 2-bit budget could only be met by 1-bit
    everything (validated KL 6.5 on SmolLM2-135M).
    """
    fams = families.all_families()
    keys = tuple(s for f in fams for s in f.candidates("key", head_dim) if _fits(s, head_dim))
    values = tuple(s for f in fams for s in f.candidates("value", head_dim) if _fits(s, head_dim))
    return keys, values


def _fits(spec: QuantSpec, head_dim: int | None) -> bool:
    if head_dim is None:
        return True
    try:
        rotation(spec.rotation).check(head_dim)
    except KVTuneError:
        return False
    return spec.outliers < head_dim


def default_kl_candidates(keys: tuple[QuantSpec, ...], values: tuple[QuantSpec, ...]) -> tuple[list[int], list[int]]:
    """Indices of the candidates that get an end-to-end KL: plain 2-bit keys (KIVI) and plain 2-bit values."""
    return [keys.index(kivi_key(2))], [values.index(kivi_value(2))]


def quantize_tokens(x: torch.Tensor, spec: QuantSpec, outlier_idx: torch.Tensor | None = None,
                    state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Fake-quantize ``x`` ``[..., T, D]``: whole token groups through ``spec``, the tail rounded to fp16
    (``state``: the spec's calibrated ``layer`` fields, e.g. from :func:`fitted_states`)."""
    g = spec.token_group or x.shape[-2]  # channel axis: a token group; group 0 = all tokens
    n = (x.shape[-2] // g) * g
    if n == x.shape[-2]:
        return fake_quantize(x, spec, outlier_idx, state)
    head = fake_quantize(x[..., :n, :], spec, outlier_idx, state) if n else x[..., :0, :]
    return torch.cat([head, x[..., n:, :].to(torch.float16).to(x.dtype)], dim=-2)


def fitted_states(specs: tuple[QuantSpec, ...], x: torch.Tensor,
                  rank: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """Each spec's calibrated ``layer`` fields other than outlier channels (a family's own state, e.g. static
    steps ``[Hkv, D]``), fitted on ``x [B, Hkv, T, D]`` around the calibrated outlier channels; ``{}`` for specs
    without such state."""
    out = []
    for spec in specs:
        names = codec.layer_fields(spec, x.shape[-1]).keys() - {INDEX_FIELD}
        idx = _outlier_idx(spec, rank, 1)
        known = {INDEX_FIELD: idx[0]} if idx is not None else {}
        out.append({k: v for k, v in codec.fit(spec, x, known).items() if k in names} if names else {})
    return out


def _outlier_idx(spec: QuantSpec, rank: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Calibrated outlier channels ``[B, Hkv, o]`` from ``rank`` ``[Hkv, D]``, or None (take them from the data)."""
    if not spec.outliers or spec.rotated or rank is None:
        return None
    return rank[:, : spec.outliers].sort(dim=-1).values.unsqueeze(0).expand(batch, -1, -1)


def _grouped_out(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``probs`` ``[B, Hq, P, T]`` @ ``value`` ``[B, Hkv, T, D]`` -> ``[B, Hkv, G, P, D]``."""
    b, hq, p, t = probs.shape
    hkv = value.shape[1]
    return probs.view(b, hkv, hq // hkv, p, t) @ value.float().unsqueeze(2)


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative squared error per KV head: ``[B, Hkv, G, P, D]`` x2 -> ``[Hkv]``."""
    dims = (0, 2, 3, 4)
    return (out - ref).square().sum(dim=dims) / ref.square().sum(dim=dims).clamp_min(1e-30)


def layer_sensitivity(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                      scaling: float, key_specs: tuple[QuantSpec, ...], value_specs: tuple[QuantSpec, ...],
                      key_rank: torch.Tensor | None = None, value_rank: torch.Tensor | None = None,
                      span: LayerSpan = GLOBAL, key_states: list[dict[str, torch.Tensor]] | None = None,
                      value_states: list[dict[str, torch.Tensor]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative attention-output MSE of every candidate for one layer.

    ``query`` ``[B, Hq, T, D]``, ``key``/``value`` ``[B, Hkv, T, D]``, probe ``positions`` ``[P]``,
    ``key_rank``/``value_rank`` ``[Hkv, D]`` calibrated channel order, ``key_states``/``value_states`` the
    candidates' calibrated state (default: :func:`fitted_states` on this sample). Returns float32 ``[Hkv, Ck]``,
    ``[Hkv, Cv]``.
    """
    b = key.shape[0]
    key_states = key_states if key_states is not None else fitted_states(key_specs, key, key_rank)
    value_states = value_states if value_states is not None else fitted_states(value_specs, value, value_rank)
    probs = probe_attention(query, key, positions, scaling, span)  # [B, Hq, P, T]
    ref = _grouped_out(probs, value)
    k_err = [_rel_error(_grouped_out(probe_attention(query, quantize_tokens(key, s, _outlier_idx(s, key_rank, b), st),
                                                     positions, scaling, span), value), ref)
             for s, st in zip(key_specs, key_states)]
    v_err = [_rel_error(_grouped_out(probs, quantize_tokens(value, s, _outlier_idx(s, value_rank, b), st)), ref)
             for s, st in zip(value_specs, value_states)]
    return torch.stack(k_err, dim=-1).float(), torch.stack(v_err, dim=-1).float()


def _perturb(layer: int, key_specs: list[QuantSpec], value_specs: list[QuantSpec], n_seq: int) -> Callable:
    """Observer quantizing, at ``layer`` only, K of batch block ``i`` (``i < len(key_specs)``) or V of the next
    blocks."""

    def observer(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor] | None:
        if call.layer != layer:
            return None
        key, value = call.key.clone(), call.value.clone()
        for i, spec in enumerate(key_specs):
            rows = slice(i * n_seq, (i + 1) * n_seq)
            key[rows] = quantize_tokens(call.key[rows], spec)
        for i, spec in enumerate(value_specs, start=len(key_specs)):
            rows = slice(i * n_seq, (i + 1) * n_seq)
            value[rows] = quantize_tokens(call.value[rows], spec)
        return key, value

    return observer


def _log_probs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``[B, T, V]`` float32."""
    return model(input_ids=ids, use_cache=False).logits.float().log_softmax(dim=-1)


def layer_kl(model: Any, input_ids: torch.Tensor, key_specs: list[QuantSpec], value_specs: list[QuantSpec],
             on_layer: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer end-to-end KL: ``input_ids`` ``[n, T]`` -> ``kl_key`` ``[L, len(key_specs)]``,
    ``kl_value`` ``[L, nv]``.

    One forward per layer, batched over candidates (``n * (nk + nv)`` sequences). ``on_layer(i)`` is called
    after layer ``i``. Runs under ``torch.inference_mode``.
    """
    from kvtune.calibrate.hooks import attention_modules

    n, nk = input_ids.shape[0], len(key_specs)
    blocks = nk + len(value_specs)
    layers = [i for i, _ in attention_modules(model)]
    rows = torch.zeros(len(layers), blocks)
    with torch.inference_mode():
        with capture(model, on_attention=lambda call: None):
            ref = _log_probs(model, input_ids)  # [n, T, V]
        p_ref = ref.exp()
        batch = input_ids.repeat(blocks, 1)
        for row, layer in enumerate(layers):
            with capture(model, on_attention=_perturb(layer, key_specs, value_specs, n)):
                logq = _log_probs(model, batch).view(blocks, n, *ref.shape[1:])
            kl = (p_ref * (ref - logq)).sum(dim=-1)  # [blocks, n, T]
            rows[row] = kl.mean(dim=(1, 2)).clamp_min(0).cpu()  # >= 0 up to float rounding
            if on_layer is not None:
                on_layer(row)
    return rows[:, :nk].contiguous(), rows[:, nk:].contiguous()
