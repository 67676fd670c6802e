"""``kvtune search --target ENGINE``: the best plan an engine can express within a budget.

The space is what the target expresses (:mod:`kvtune.export`): one cache dtype plus skipped layers (vLLM), one K and
one V type (llama.cpp), a format per layer (ModelOpt), one scheme (compressed-tensors, SGLang). It is small, so it
is solved exactly-enough without a study: every uniform choice (or K x V pair), and for skip / per-layer targets a
greedy walk that returns layers to the model dtype (or a richer choice) in order of predicted error saved per bit
while the budget allows.

Error of a choice in a layer: relative attention-output MSE on the calibration's reservoir rows (``samples.*``:
each query row attends to every key row of its layer) when only K (or only V) is stored in the engine format,
times the layer's KL weight: the calibration's end-to-end KL of its KL-column candidates over the same reservoir
error of those candidates (geometric mean), so predictions are in nats. Engine formats are not calibration
candidates (calibration time stays flat); this costs a few seconds per choice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtune.export.target import AUTO, EngineConfig, Target, describe
from kvtune.plan import Plan
from kvtune.plan_types import ModelIdentity, Provenance
from kvtune.quant import codec
from kvtune.quant.bits import REFERENCE_LENGTH, layers_bits
from kvtune.quant.formats import QuantSpec

log = logging.getLogger(__name__)
ROLES = ("key", "value")


@dataclass(frozen=True)
class EngineSearchResult:
    """The chosen configuration, its plan, predicted KL (nats/token), effective bits, and every configuration tried."""

    target: str
    config: EngineConfig
    description: str
    plan: Plan
    predicted_kl: float
    effective_bits: float
    tried: tuple[dict[str, Any], ...]


def reservoir_error(calib: Any, layer: int, role: str, spec: QuantSpec) -> float:
    """Relative attention-output MSE of ``layer`` over its reservoir rows with only ``role`` quantized by ``spec``."""
    q = calib.tensor("samples.query")[layer].float()  # [Hq, n, D]
    k, v = calib.tensor("samples.key")[layer].float(), calib.tensor("samples.value")[layer].float()  # [Hkv, n, D]
    if spec.passthrough:
        return 0.0
    x = k if role == "key" else v
    extra = calib.tensor("keys.absmax" if role == "key" else "values.absmax")[layer].float().unsqueeze(1)
    state = codec.fit(spec, torch.cat([x, extra], 1))
    xq = codec.decode(codec.encode(x, spec, x.shape[1], state), spec, x.shape[1], x.shape[-1], state)
    k2, v2 = (xq, v) if role == "key" else (k, xq)
    group = q.shape[0] // k.shape[0]

    def out(kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        kk, vv = kk.repeat_interleave(group, 0), vv.repeat_interleave(group, 0)
        return torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ vv

    ref = out(k, v)
    return float((out(k2, v2) - ref).square().sum() / ref.square().sum().clamp_min(1e-30))


def kl_weights(calib: Any) -> dict[str, np.ndarray]:
    """Per role ``[L]``: calibration KL of its KL columns / their reservoir error (geometric mean over columns)."""
    out = {}
    for role in ROLES:
        cands = calib.key_candidates if role == "key" else calib.value_candidates
        cols = calib.kl_candidates.get(role, ())
        kl = calib.tensor(f"kl.{role}").double().numpy()  # [L, n]
        w = np.ones(calib.num_layers)
        for i in range(calib.num_layers):
            logs = [math.log(kl[i, j] / e) for j, c in enumerate(cols)
                    if kl[i, j] > 0 and (e := reservoir_error(calib, i, role, cands[c])) > 0]
            w[i] = math.exp(sum(logs) / len(logs)) if logs else np.nan
        out[role] = np.where(np.isfinite(w), w, np.nanmedian(w) if np.isfinite(w).any() else 1.0)
    return out


def _errors(target: Target, calib: Any, weights: dict[str, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    """``(choice, role) -> [L]`` predicted KL of storing that role of each layer in that choice."""
    cache: dict[QuantSpec, np.ndarray] = {}
    out = {}
    for c in target.choices:
        for role in ROLES:
            spec = c.spec(role)
            if spec not in cache:
                cache[spec] = np.array([reservoir_error(calib, i, role, spec) for i in range(calib.num_layers)])
            out[(c.name, role)] = cache[spec] * weights[role]
    return out


def _score(target: Target, config: EngineConfig, err: dict, ident: ModelIdentity, length: int) -> tuple[float, float]:
    kl = sum(float(err[(n, r)][i]) for r, names in zip(ROLES, (config.key, config.value))
             for i, n in enumerate(names) if n != AUTO)
    return kl, layers_bits(target.layers(config), ident.num_kv_heads, ident.head_dim, length).effective


def configurations(target: Target, ident: ModelIdentity, err: dict, budget: float,
                   length: int = REFERENCE_LENGTH) -> list[EngineConfig]:
    """The configurations worth scoring: every uniform choice (pair), plus greedy refinements under ``budget``."""
    n = ident.num_layers
    names = [c.name for c in target.choices]
    if target.layout == "uniform":
        pairs = [(k, v) for k in names for v in names] if target.split else [(c, c) for c in names]
        return [EngineConfig(target.name, (k,) * n, (v,) * n) for k, v in pairs]
    out = []
    for c in target.choices:
        forced = target.forced_skips(c, ident)
        base = [AUTO if i in forced else c.name for i in range(n)]
        out.append(EngineConfig(target.name, tuple(base), tuple(base)))
        gain = [float(err[(c.name, "key")][i] + err[(c.name, "value")][i]) for i in range(n)]
        for i in sorted((i for i in range(n) if i not in forced), key=lambda i: -gain[i]):
            trial = list(out[-1].key)
            trial[i] = AUTO
            cfg = EngineConfig(target.name, tuple(trial), tuple(trial))
            if _score(target, cfg, err, ident, length)[1] > budget:
                break
            out.append(cfg)
    return out


def engine_search(calib_dir: str | Path, budget: float, target: str,
                  out: str | Path | None = None) -> EngineSearchResult:
    """The configuration of ``target`` with the least predicted KL within ``budget`` effective bits."""
    from kvtune.calibrate.artifact import load_calibration
    from kvtune.errors import KVTuneError
    from kvtune.export import get_target
    from kvtune.export.state import fit_state
    from kvtune.plan import save_plan
    from kvtune.search.tables import _identity

    tgt, calib = get_target(target), load_calibration(calib_dir)
    ident = _identity(calib.model)
    err = _errors(tgt, calib, kl_weights(calib))
    scored = [(cfg, *_score(tgt, cfg, err, ident, REFERENCE_LENGTH))
              for cfg in configurations(tgt, ident, err, budget)]
    tried = tuple({"engine": describe(tgt, c), "predicted_kl": kl, "bits": bits} for c, kl, bits in scored)
    fits = [s for s in scored if s[2] <= budget + 1e-9]
    if not fits:
        cheapest = min(scored, key=lambda s: s[2])
        raise KVTuneError(f"{target} stores no configuration within {budget:g} bits on this model (cheapest: "
                          f"{describe(tgt, cheapest[0])} at {cheapest[2]:.3f} bits)", "raise --budget")
    config, kl, bits = min(fits, key=lambda s: (s[1], s[2]))
    layers = tgt.layers(config)
    text = describe(tgt, config)
    prov = Provenance(source=f"kvtune search --target {target}", extra=(("target", target), ("engine", text)))
    plan = Plan(layers=layers, model=ident, name=f"{target}-{budget:g}bit", description=f"{target}: {text}",
                budget=budget, provenance=prov, tensors=fit_state(layers, calib, ident.num_kv_heads, ident.head_dim))
    if out is not None:
        save_plan(plan, out)
    log.info("engine search %s at %g bits: %s (%.4f bits, predicted KL %.4g)", target, budget, text, bits, kl)
    return EngineSearchResult(target, config, text, plan, kl, bits, tried)
