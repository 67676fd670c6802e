"""The search space: which choices each layer (or KV head) gets, shrunk as KVTuner does, but computed.

A *unit* is a layer (``granularity="layer"``) or one KV head of a layer (``"head"``). Units with similar
sensitivity profiles are clustered (:func:`ward_groups`: Ward agglomerative clustering of their
log-error vectors, deterministic) into *groups* that share one key and one value quantizer; the
residual window and the token policy (fp16 sinks, salient tokens, merging: :mod:`kvtune.search.token_policies`) are per
layer, so they are chosen per group of layers (the same groups in layer mode).
In each group, a candidate that another beats on both the group's predicted error and its stored bits is
dropped (:func:`prune_dominated`): with a shared choice every member pays the same bits, so this is exact.

Parameters (Optuna names): ``key.{g}`` / ``value.{g}`` = candidate index, ``residual.{r}`` = recent tokens kept fp16
(sinks included: a layer plan's ``residual`` is this minus its sinks, :meth:`TokenPolicy.window`),
``tokens.{r}`` = index into the space's token policies.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtune.errors import KVTuneError
from kvtune.plan_types import HeadPlan, LayerPlan, ModelIdentity
from kvtune.quant.bits import REFERENCE_LENGTH, spec_bits
from kvtune.quant.formats import QuantSpec
from kvtune.search.tables import CalibrationTables
from kvtune.search.token_policies import TOKEN_POLICIES, TokenPolicy, policy_of

GRANULARITIES = ("layer", "head")
RESIDUALS = (0, 32, 64, 128)
DEFAULT_GROUPS = 8
DEFAULT_TOKENS = "sinks"
SPACE_VERSION = 3  # 3: token policies gained merge and visual


def prune_dominated(err: Sequence[float], bits: Sequence[float]) -> tuple[list[int], list[int]]:
    """``(kept, dominator)``: candidates no other beats on both error and bits, and for every candidate
    the kept one with the least error among those with no more bits (itself if kept). Exact ties keep
    the lowest index."""
    n = len(err)
    kept = [c for c in range(n) if not any(
        err[o] <= err[c] and bits[o] <= bits[c] and (err[o] < err[c] or bits[o] < bits[c] or o < c)
        for o in range(n) if o != c)]
    dominator = [min((k for k in kept if bits[k] <= bits[c]), key=lambda k: (err[k], bits[k], k)) for c in range(n)]
    return kept, dominator


def ward_groups(features: np.ndarray, k: int) -> list[int]:
    """Ward agglomerative clustering of ``features`` ``[N, F]`` into ``k`` groups, deterministic.

    Returns a group id per row, numbered by first appearance (row 0 is in group 0).
    """
    x = features.astype(np.float64)
    n = x.shape[0]
    k = max(1, min(k, n))
    clusters = [[i] for i in range(n)]
    sizes = np.ones(n)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)  # Ward criterion (x2) between singletons
    dist[np.tril_indices(n)] = np.inf  # only i < j is used
    alive = np.ones(n, dtype=bool)
    for _ in range(n - k):
        i, j = np.unravel_index(int(np.argmin(dist)), dist.shape)  # first minimum: ties broken by index
        d_ik = np.minimum(dist[i], dist[:, i])  # distances to i / j from every cluster (one side is inf)
        d_jk = np.minimum(dist[j], dist[:, j])
        new = (((sizes[i] + sizes) * d_ik + (sizes[j] + sizes) * d_jk - sizes * dist[i, j])
               / (sizes[i] + sizes[j] + sizes))
        new[~alive] = np.inf
        new[[i, j]] = np.inf
        dist[i, i + 1:], dist[:i, i] = new[i + 1:], new[:i]  # Lance-Williams update of the merged cluster i
        dist[j, :], dist[:, j] = np.inf, np.inf
        sizes[i] += sizes[j]
        clusters[i] += clusters[j]
        alive[j] = False
    labels = np.empty(n, dtype=int)
    for gid, i in enumerate(sorted(np.flatnonzero(alive), key=lambda i: min(clusters[i]))):
        labels[clusters[i]] = gid
    return labels.tolist()


MIN_BLOCK = 32
"""Flushed-block size used to price a spec for dominance: a layer flushes blocks of its key's token group (a
channel-axis key, g32 at least), so per-block costs (ZipCache's channel normalization) are paid per 32
tokens at most -- not per token, as a token-axis spec's own ``token_group`` of 1 would price them."""


def spec_cost(spec: QuantSpec, head_dim: int, length: int = REFERENCE_LENGTH) -> float:
    """Stored bits of one head's ``length`` tokens under ``spec`` alone (for dominance only), via bits.py."""
    return spec_bits(spec, length, head_dim, max(spec.token_group, MIN_BLOCK)).total


@dataclass(frozen=True)
class SearchSpace:
    """Units, groups and the choices of each group (candidate indices), plus what a plan needs."""

    granularity: str
    identity: ModelIdentity
    key_candidates: tuple[QuantSpec, ...]
    value_candidates: tuple[QuantSpec, ...]
    units: tuple[tuple[int, int], ...]  # (layer, head); head -1 = the whole layer
    spec_group: tuple[int, ...]  # per unit
    residual_group: tuple[int, ...]  # per layer
    key_choices: tuple[tuple[int, ...], ...]  # per spec group
    value_choices: tuple[tuple[int, ...], ...]
    key_dominator: tuple[tuple[int, ...], ...]  # per spec group: candidate -> kept candidate
    value_dominator: tuple[tuple[int, ...], ...]
    residuals: tuple[int, ...] = RESIDUALS
    token_policies: tuple[TokenPolicy, ...] = (TokenPolicy(),)
    reference_length: int = REFERENCE_LENGTH

    @property
    def n_groups(self) -> int:
        return len(self.key_choices)

    @property
    def n_residual_groups(self) -> int:
        return max(self.residual_group) + 1

    def params(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> choices, in a fixed order."""
        p: dict[str, tuple[int, ...]] = {}
        for g in range(self.n_groups):
            p[f"key.{g}"], p[f"value.{g}"] = self.key_choices[g], self.value_choices[g]
        p.update({f"residual.{r}": self.residuals for r in range(self.n_residual_groups)})
        p.update({f"tokens.{r}": tuple(range(len(self.token_policies))) for r in range(self.n_residual_groups)})
        return p

    def param_cells(self) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
        """Parameter name -> (``"key"``/``"value"``/``"residual"``/``"tokens"``, layer indices, head indices) it
        sets; a residual or token policy sets whole layers (head indices empty)."""
        n_h = self.identity.num_kv_heads
        cells: dict[str, tuple[list[int], list[int]]] = {name: ([], []) for name in self.params()}
        for (layer, head), g in zip(self.units, self.spec_group):
            heads = range(n_h) if head < 0 else [head]
            for kind in ("key", "value"):
                cells[f"{kind}.{g}"][0].extend([layer] * len(heads))
                cells[f"{kind}.{g}"][1].extend(heads)
        for layer, r in enumerate(self.residual_group):
            cells[f"residual.{r}"][0].append(layer)
            cells[f"tokens.{r}"][0].append(layer)
        return {name: (name.split(".")[0], np.array(ls, dtype=int), np.array(hs, dtype=int))
                for name, (ls, hs) in cells.items()}

    def assignment(self, params: Mapping[str, int]) -> dict[str, np.ndarray]:
        """``params`` -> int arrays ``key``/``value`` (candidate) ``[L, H]``, ``residual`` (tokens), ``tokens``
        (policy index) ``[L]``."""
        n_l, n_h = self.identity.num_layers, self.identity.num_kv_heads
        keys, values = np.zeros((n_l, n_h), dtype=int), np.zeros((n_l, n_h), dtype=int)
        for (layer, head), g in zip(self.units, self.spec_group):
            heads = slice(None) if head < 0 else head
            keys[layer, heads], values[layer, heads] = params[f"key.{g}"], params[f"value.{g}"]
        res = np.array([params[f"residual.{r}"] for r in self.residual_group], dtype=int)
        toks = np.array([params[f"tokens.{r}"] for r in self.residual_group], dtype=int)
        return {"key": keys, "value": values, "residual": res, "tokens": toks}

    def layer_plan(self, keys: Sequence[int], values: Sequence[int], residual: int, tokens: int = 0) -> LayerPlan:
        """One layer from per-head candidate indices (heads collapse when they all agree), window, policy index."""
        pairs = [(self.key_candidates[k], self.value_candidates[v]) for k, v in zip(keys, values)]
        key, value = Counter(pairs).most_common(1)[0][0]
        heads = () if len(set(pairs)) == 1 else tuple(HeadPlan(k, v) for k, v in pairs)
        policy = self.token_policies[int(tokens)]
        return LayerPlan(key=key, value=value, heads=heads, residual=policy.window(int(residual)),
                         salient=policy.salient(), merge=policy.merge_policy())

    def layers(self, params: Mapping[str, int]) -> tuple[LayerPlan, ...]:
        a = self.assignment(params)
        return tuple(self.layer_plan(tuple(a["key"][i]), tuple(a["value"][i]), a["residual"][i], a["tokens"][i])
                     for i in range(len(a["residual"])))

    def min_params(self, key_bits: Sequence[float], value_bits: Sequence[float]) -> dict[str, int]:
        """The cheapest point: least-bits choice everywhere (first on ties), the smallest window."""
        p = {}
        for g in range(self.n_groups):
            p[f"key.{g}"] = min(self.key_choices[g], key=lambda c: (key_bits[c], c))
            p[f"value.{g}"] = min(self.value_choices[g], key=lambda c: (value_bits[c], c))
        p.update({f"residual.{r}": min(self.residuals) for r in range(self.n_residual_groups)})
        p.update({f"tokens.{r}": self.token_policies.index(TokenPolicy()) for r in range(self.n_residual_groups)})
        return p

    def params_for(self, layer: LayerPlan) -> dict[str, int] | None:
        """Params giving ``layer`` (a uniform template) everywhere, each spec replaced by its group's
        dominator (no more bits, no more error); None if a spec is not a candidate or the window is not a choice."""
        policy = policy_of(layer.salient, layer.merge)
        if policy is None or layer.heads or policy.window(layer.residual + policy.sinks) != layer.residual:
            return None
        fp16 = layer.residual + policy.sinks
        if fp16 not in self.residuals or policy not in self.token_policies or layer != \
                LayerPlan(key=layer.key, value=layer.value, residual=layer.residual, salient=layer.salient,
                          merge=layer.merge):
            return None
        if layer.key not in self.key_candidates or layer.value not in self.value_candidates:
            return None
        k, v = self.key_candidates.index(layer.key), self.value_candidates.index(layer.value)
        p = {}
        for g in range(self.n_groups):
            p[f"key.{g}"], p[f"value.{g}"] = self.key_dominator[g][k], self.value_dominator[g][v]
        p.update({f"residual.{r}": fp16 for r in range(self.n_residual_groups)})
        p.update({f"tokens.{r}": self.token_policies.index(policy) for r in range(self.n_residual_groups)})
        return p

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored in the study's user attributes)."""
        return {"version": SPACE_VERSION, "granularity": self.granularity, "identity": self.identity.to_dict(),
                "key_candidates": [s.to_dict() for s in self.key_candidates],
                "value_candidates": [s.to_dict() for s in self.value_candidates],
                "units": [list(u) for u in self.units], "spec_group": list(self.spec_group),
                "residual_group": list(self.residual_group),
                "key_choices": [list(c) for c in self.key_choices],
                "value_choices": [list(c) for c in self.value_choices],
                "key_dominator": [list(c) for c in self.key_dominator],
                "value_dominator": [list(c) for c in self.value_dominator],
                "residuals": list(self.residuals), "token_policies": [p.to_list() for p in self.token_policies],
                "reference_length": self.reference_length}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchSpace:
        if d.get("version") != SPACE_VERSION:
            raise KVTuneError(f"search space version {d.get('version')!r} is not {SPACE_VERSION}",
                              "re-run the search with this kvtune into a new study")
        tup = lambda xs: tuple(tuple(x) for x in xs)
        return cls(granularity=d["granularity"], identity=ModelIdentity.from_dict(d["identity"]),
                   key_candidates=tuple(QuantSpec.from_dict(s) for s in d["key_candidates"]),
                   value_candidates=tuple(QuantSpec.from_dict(s) for s in d["value_candidates"]),
                   units=tup(d["units"]), spec_group=tuple(d["spec_group"]), residual_group=tuple(d["residual_group"]),
                   key_choices=tup(d["key_choices"]), value_choices=tup(d["value_choices"]),
                   key_dominator=tup(d["key_dominator"]), value_dominator=tup(d["value_dominator"]),
                   residuals=tuple(d["residuals"]),
                   token_policies=tuple(TokenPolicy.from_list(p) for p in d["token_policies"]),
                   reference_length=int(d["reference_length"]))

    def hash(self) -> str:
        """Hash of everything that defines the space (a study must keep one space)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _features(e_k: np.ndarray, e_v: np.ndarray) -> np.ndarray:
    """Log-error profile ``[N, Ck + Cv]`` of units with errors ``[N, Ck]``, ``[N, Cv]``."""
    return np.log(np.concatenate([e_k, e_v], axis=1) + 1e-12)


def _choices(err: np.ndarray, cost: Sequence[float]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    kept, dominator = prune_dominated(err.tolist(), list(cost))
    return tuple(kept), tuple(dominator)


def build_space(tables: CalibrationTables, granularity: str = "layer", groups: int | None = None,
                residuals: Sequence[int] = RESIDUALS, tokens: str = DEFAULT_TOKENS) -> SearchSpace:
    """Units, groups (``groups`` clusters, default :data:`DEFAULT_GROUPS`; at most one per unit), pruned choices,
    and the token policies ``tokens`` (a :data:`~kvtune.search.token_policies.TOKEN_POLICIES` name; only "none" without
    the calibration's attention statistics)."""
    if granularity not in GRANULARITIES:
        raise KVTuneError(f"unknown granularity {granularity!r}", f"use one of {', '.join(GRANULARITIES)}")
    if tokens not in TOKEN_POLICIES:
        raise KVTuneError(f"unknown token policies {tokens!r}", f"use one of {', '.join(TOKEN_POLICIES)}")
    groups = DEFAULT_GROUPS if groups is None else groups
    if not isinstance(groups, int) or groups < 1:
        raise KVTuneError(f"groups must be a positive integer, got {groups!r}")
    ident = tables.identity
    e_k, e_v = tables.head_errors()  # [L, H, C]
    layer_k, layer_v = e_k.sum(axis=1), e_v.sum(axis=1)  # [L, C]
    if granularity == "layer":
        units = tuple((i, -1) for i in range(ident.num_layers))
        unit_k, unit_v = layer_k, layer_v
    else:
        units = tuple((i, h) for i in range(ident.num_layers) for h in range(ident.num_kv_heads))
        unit_k, unit_v = e_k.reshape(len(units), -1), e_v.reshape(len(units), -1)
    spec_group = ward_groups(_features(unit_k, unit_v), groups)
    has_masses = tables.sink_mass is not None and tables.salient_mass is not None
    policies = TOKEN_POLICIES[tokens] if has_masses else (TokenPolicy(),)
    residual_group = (spec_group if granularity == "layer" else ward_groups(_features(layer_k, layer_v), groups))
    k_cost = [spec_cost(s, ident.head_dim) for s in tables.key_candidates]
    v_cost = [spec_cost(s, ident.head_dim) for s in tables.value_candidates]
    k_choices, v_choices, k_dom, v_dom = [], [], [], []
    for g in range(max(spec_group) + 1):
        members = [u for u, gu in enumerate(spec_group) if gu == g]
        kc, kd = _choices(unit_k[members].sum(axis=0), k_cost)
        vc, vd = _choices(unit_v[members].sum(axis=0), v_cost)
        k_choices.append(kc), v_choices.append(vc), k_dom.append(kd), v_dom.append(vd)
    return SearchSpace(granularity=granularity, identity=ident, key_candidates=tables.key_candidates,
                       value_candidates=tables.value_candidates, units=units, spec_group=tuple(spec_group),
                       residual_group=tuple(residual_group), key_choices=tuple(k_choices),
                       value_choices=tuple(v_choices), key_dominator=tuple(k_dom), value_dominator=tuple(v_dom),
                       residuals=tuple(int(r) for r in residuals), token_policies=policies)


def pruning_summary(tables: CalibrationTables, space: SearchSpace) -> dict[str, Any]:
    """How much the space shrank: per-layer non-dominated counts and the group choices (for pareto.json)."""
    e_k, e_v = tables.head_errors()
    hd = space.identity.head_dim
    k_cost = [spec_cost(s, hd) for s in space.key_candidates]
    v_cost = [spec_cost(s, hd) for s in space.value_candidates]
    per_layer = [[len(prune_dominated(e_k[i].sum(0).tolist(), k_cost)[0]),
                  len(prune_dominated(e_v[i].sum(0).tolist(), v_cost)[0])] for i in range(e_k.shape[0])]
    return {"granularity": space.granularity, "groups": space.n_groups, "residual_groups": space.n_residual_groups,
            "candidates": [len(space.key_candidates), len(space.value_candidates)],
            "per_layer_kept": per_layer, "spec_group": list(space.spec_group),
            "residual_group": list(space.residual_group),
            "group_choices": [{"key": [space.key_candidates[c].label() for c in kc],
                               "value": [space.value_candidates[c].label() for c in vc]}
                              for kc, vc in zip(space.key_choices, space.value_choices)],
            "space_hash": space.hash()}
