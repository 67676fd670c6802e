"""Baselines a searched plan must beat at its budget: presets, and uniform plans generated to fill any budget.

* **presets** (``kvtune/configs/``) within the budget;
* **KIVI** at key groups 32/64/128 (per channel), value groups 32/64/128 (per token), 2/3/4 bits each, with
  0-128 recent tokens in fp16 and with or without the first token (sinks come out of the window:
  :meth:`~kvtune.search.token_policies.TokenPolicy.window`): the one predicted best within the budget (the
  most bits where the calibration cannot price it);
* **uniform pairs**: every calibrated key candidate with every value candidate, the same in all layers, with the
  same window and sink choices: the :data:`UNIFORM_KEEP` predicted best within the budget.

Every baseline is priced by the bit accountant; the proxy only picks which generated ones to validate.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvtune.errors import KVTuneError
from kvtune.plan import Plan
from kvtune.plan_types import LayerPlan, ModelIdentity
from kvtune.quant.formats import kivi_key, kivi_value
from kvtune.search.objective import Evaluator
from kvtune.search.token_policies import TokenPolicy

log = logging.getLogger(__name__)

KIVI_GROUPS = (32, 64, 128)
KIVI_BITS = (2, 3, 4)
WINDOWS = (0, 32, 64, 128)
SINKS = (TokenPolicy(), TokenPolicy(1))
UNIFORM_KEEP = 2


@dataclass(frozen=True)
class Baseline:
    """A uniform plan: ``kind`` ``preset`` / ``kivi`` / ``uniform``, its layers (bound), bits and proxy (None where
    the calibration cannot price it)."""

    name: str
    kind: str
    layers: tuple[LayerPlan, ...]
    bits: float
    proxy: float | None


def _layer(key: object, value: object, fp16: int, policy: TokenPolicy) -> LayerPlan:
    return LayerPlan(key=key, value=value, residual=policy.window(fp16), salient=policy.salient())


def _uniform(ev: Evaluator, name: str, kind: str, layer: LayerPlan) -> Baseline:
    ident = ev.space.identity
    layers = (layer,) * ident.num_layers
    bits = Plan(layers=layers, model=ident, reference_length=ev.space.reference_length).effective_bits()
    return Baseline(name, kind, layers, bits, ev.plan_proxy(layers))


def _best(items: Sequence[Baseline], budget: float, keep: int) -> list[Baseline]:
    """The ``keep`` fitting ones with the least proxy (the most bits first where none is priced)."""
    fit = [b for b in items if b.bits <= budget]
    priced = sorted((b for b in fit if b.proxy is not None), key=lambda b: (b.proxy, -b.bits, b.name))
    if priced:
        return priced[:keep]
    return sorted(fit, key=lambda b: (-b.bits, b.name))[:keep]


def kivi_baselines(ev: Evaluator, budget: float) -> list[Baseline]:
    """The best KIVI configuration within ``budget`` (see the module doc)."""
    items = []
    for gk, gv, bk, bv, fp16, policy in itertools.product(KIVI_GROUPS, KIVI_GROUPS, KIVI_BITS, KIVI_BITS, WINDOWS,
                                                          SINKS):
        name = f"kivi-k{bk}g{gk}-v{bv}g{gv}-r{fp16}" + ("-sink" if policy.sinks else "")
        items.append(_uniform(ev, name, "kivi", _layer(kivi_key(bk, gk), kivi_value(bv, gv), fp16, policy)))
    return _best(items, budget, 1)


def uniform_baselines(ev: Evaluator, budget: float, keep: int = UNIFORM_KEEP) -> list[Baseline]:
    """The ``keep`` best uniform pairs of calibrated candidates within ``budget``, priced in bulk: a uniform
    plan's proxy is the tables' errors summed over layers and heads times the layer factors."""
    space, heads = ev.space, ev.space.identity.num_kv_heads
    windowed = [i for i, span in enumerate(ev.spans) if span.windowed]
    found: list[tuple[float, float, int, int, int, int]] = []
    for fp16, policy in itertools.product(WINDOWS, SINKS):
        if policy not in space.token_policies:
            continue
        t = space.token_policies.index(policy)
        for k, v in itertools.product(range(len(space.key_candidates)), range(len(space.value_candidates))):
            flush = math.lcm(ev.key_group[k], ev.value_group[v])
            bits = sum(ev._head(k, v, fp16, t, flush, span) for span in ev.spans) * heads / ev.elements
            if bits > budget:
                continue
            fk, fv = ev.factors(fp16, t, flush)
            if windowed:  # windowed layers run without token policies: the share of their tokens held quantized
                fk, fv = fk.copy(), fv.copy()
                for i in windowed:
                    fk[i] = fv[i] = ev._share(fp16, t, flush, ev.spans[i])
            proxy = float((ev.e_key[:, :, k] * fk).sum() + (ev.e_value[:, :, v] * fv).sum())
            found.append((proxy, -bits, k, v, fp16, t))
    out = []
    for *_, k, v, fp16, t in sorted(found)[:keep]:
        policy = space.token_policies[t]
        key, value = space.key_candidates[k], space.value_candidates[v]
        name = f"uniform-K{key.label(short=True)}-V{value.label(short=True)}-r{fp16}"
        name += "-sink" if policy.sinks else ""
        out.append(_uniform(ev, name, "uniform", _layer(key, value, fp16, policy)))
    return out


def bound_presets(identity: ModelIdentity) -> dict[str, Plan]:
    """Every preset bound to the model, without those it cannot take (a format needing another head dim, more
    outlier channels than it has, ...)."""
    from kvtune.plan import load_plan, preset_names

    out = {}
    for name in sorted(preset_names()):
        try:
            plan = load_plan(name).bind(identity)
            plan.effective_bits()
        except KVTuneError as exc:
            log.info("preset %s skipped: %s", name, exc)
            continue
        out[name] = plan
    return out


def preset_baselines(ev: Evaluator, budget: float, presets: Mapping[str, Plan]) -> list[Baseline]:
    """The presets (bound to the model) within ``budget``."""
    out = []
    for name, plan in sorted(presets.items()):
        bits = plan.effective_bits()
        if bits <= budget:
            out.append(Baseline(f"preset:{name}", "preset", plan.layers, bits, ev.plan_proxy(plan.layers)))
    return out


def all_baselines(ev: Evaluator, budget: float, presets: Mapping[str, Plan]) -> list[Baseline]:
    """Presets (bound to the model), the best KIVI and the best uniform pairs within ``budget`` (distinct layer
    plans)."""
    seen: set[tuple[LayerPlan, ...]] = set()
    out = []
    for b in [*preset_baselines(ev, budget, presets), *kivi_baselines(ev, budget), *uniform_baselines(ev, budget)]:
        if b.layers not in seen:
            seen.add(b.layers)
            out.append(b)
    return out
