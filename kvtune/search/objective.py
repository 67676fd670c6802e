"""Scoring a point of the space from the calibration tables alone: (proxy, effective bits), no model.

**Proxy** = predicted end-to-end KL (nats) at the reference length:
``sum_l q_l * sum_h (w_key[l] * sens_key[l, h, k_lh] + w_value[l] * sens_value[l, h, v_lh]) / H``, where
``w`` are the per-layer KL weights (:mod:`kvtune.search.tables`) and ``q_l`` is the share of the layer's
tokens that are quantized at the reference length (sinks and the fp16 residual window are not; counted by
:func:`kvtune.quant.bits.token_counts`) times ``1 - kept``, the share of the error the layer's token policy is
predicted to remove (:func:`kvtune.search.token_policies.kept_share`), plus, for a token policy that merges tokens
(Elastic Cache), ``m_l * (max_k sum_h w_key[l] * sens_key[l, h, k] + max_v sum_h w_value[l] * sens_value[l, h, v])
/ H``: the merged share ``m_l`` of the layer's tokens (merged / reference length, by ``token_counts``;
:func:`kvtune.search.token_policies.merged_share`) charged, first order, as if quantized by the layer's most lossy
key and value candidates (a merged token's contribution is replaced by its anchor's), not reduced by ``kept``: merging
is never free bits. A visual token-type weight does not change the proxy (text-only calibration). **Bits** come
from :func:`kvtune.quant.bits.layer_bits` (exact, everything counted, merged tokens as not stored); layer
results are memoised per distinct layer plan, so a trial costs microseconds.

:func:`greedy_path` walks from the cheapest point upwards, each step taking the single change with the
best proxy gain per added bit: the points it passes seed the first generation of the study.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kvtune.layout import GLOBAL, LayerSpan
from kvtune.plan_types import LayerPlan
from kvtune.quant.bits import layer_bits, token_counts
from kvtune.search.recency import expected_window, factors
from kvtune.search.space import SearchSpace, spec_cost
from kvtune.search.tables import CalibrationTables
from kvtune.search.token_policies import SALIENT_RATIOS, TokenPolicy, kept_share, merged_share, policy_of


@dataclass(frozen=True)
class Score:
    """One point: ``proxy`` (predicted KL, nats) and ``bits`` (effective bits at the reference length)."""

    proxy: float
    bits: float


class Evaluator:
    """``evaluator(params) -> Score`` for one space and one calibration."""

    def __init__(self, space: SearchSpace, tables: CalibrationTables) -> None:
        self.space = space
        self.e_key, self.e_value = tables.head_errors()  # [L, H, Ck], [L, H, Cv] float64
        ident = space.identity
        self.spans = ident.spans  # windowed layers are priced by what they hold (kvtune.quant.bits)
        self.elements = sum(2 * s.fp16_tokens(space.reference_length) * ident.head_dim * ident.num_kv_heads
                            for s in self.spans)
        self._heads: dict[tuple[int, int, int, int, int, LayerSpan], float] = {}
        self._shares: dict[tuple[int, int, int, LayerSpan], float] = {}
        self.key_group = [s.token_group for s in space.key_candidates]
        self.value_group = [s.token_group for s in space.value_candidates]
        self.key_cost = [spec_cost(s, ident.head_dim) for s in space.key_candidates]
        self.value_cost = [spec_cost(s, ident.head_dim) for s in space.value_candidates]
        self.recency = None if tables.recency_key is None or tables.recency_value is None else (
            tables.recency_key.double().numpy(), tables.recency_value.double().numpy())  # [L, H, W, 2] each
        self.kept = _kept_shares(space, tables, sinks=self.recency is None)  # [L, P]: error share a policy removes
        self._factors: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.merged = np.array([merged_share(p, space.reference_length) for p in space.token_policies])  # [P]
        # [L]: proxy of a layer's tokens all at its most lossy key and value candidates (what merged tokens cost)
        self.merge_err = self.e_key.sum(axis=1).max(axis=1) + self.e_value.sum(axis=1).max(axis=1)

    def scaled(self, key: float, value: float) -> Evaluator:
        """This evaluator with key errors times ``key`` and value errors times ``value`` (a proxy correction
        fitted on validated plans, :mod:`kvtune.search.correction`); bits are unchanged."""
        out = copy.copy(self)
        out.e_key, out.e_value = self.e_key * key, self.e_value * value
        out.merge_err = out.e_key.sum(axis=1).max(axis=1) + out.e_value.sum(axis=1).max(axis=1)
        return out

    def _head(self, key: int, value: int, residual: int, tokens: int, flush: int, span: LayerSpan = GLOBAL) -> float:
        """Stored bits of one head's K and V in a layer whose flush block is ``flush`` (memoised).

        A layer's bits are the sum over its heads of this (the token counts depend only on the window, the
        token policy and the flush block, all per layer), so ``layer_bits`` on a one-head layer is exact.
        """
        memo_key = (key, value, residual, tokens, flush, span)
        hit = self._heads.get(memo_key)
        if hit is None:
            policy = self.space.token_policies[tokens]
            plan = LayerPlan(key=self.space.key_candidates[key], value=self.space.value_candidates[value],
                             residual=policy.window(residual), block=flush, salient=policy.salient(),
                             merge=policy.merge_policy())
            hit = layer_bits(plan, 1, self.space.identity.head_dim, self.space.reference_length, span).total
            self._heads[memo_key] = hit
        return hit

    def _share(self, residual: int, tokens: int, flush: int, span: LayerSpan = GLOBAL) -> float:
        """Share of a layer's tokens quantized and held (not merged, not sinks, not in the window, not evicted
        from a windowed layer, whole blocks assumed) at the reference length (memoised)."""
        hit = self._shares.get((residual, tokens, flush, span))
        if hit is None:
            length = self.space.reference_length
            policy = self.space.token_policies[tokens]
            plan = LayerPlan(residual=policy.window(residual), block=flush, salient=policy.salient(),
                             merge=policy.merge_policy()).windowed(span)
            hit = token_counts(plan, length, span, flush)["quantized"] / length
            self._shares[(residual, tokens, flush, span)] = hit
        return hit

    def factors(self, residual: int, tokens: int, flush: int) -> tuple[np.ndarray, np.ndarray]:
        """``[L, H]`` key and value error factors of a layer keeping ``residual`` recent tokens fp16 (sinks
        included) under token policy ``tokens``, flushing blocks of ``flush`` (memoised): the measured recency
        tables (:mod:`kvtune.search.recency`) times what salient tokens remove; without the tables (older
        calibrations), the share of tokens quantized times what the policy (sinks included) removes."""
        hit = self._factors.get((residual, tokens, flush))
        if hit is None:
            kept = 1.0 - self.kept[:, tokens, None]  # [L, 1]
            if self.recency is None:
                share = self._share(residual, tokens, flush) * kept
                hit = (np.broadcast_to(share, self.e_key.shape[:2]),) * 2
            else:
                policy = self.space.token_policies[tokens]
                window = expected_window(policy.window(residual), flush)
                hit = tuple(factors(table, window, policy.sinks) * kept for table in self.recency)
            self._factors[(residual, tokens, flush)] = hit
        return hit

    def layer_parts(self, a: Mapping[str, np.ndarray], i: int) -> tuple[float, float, float, float]:
        """(stored bits, key proxy, value proxy, merge proxy) of layer ``i`` under an assignment ``a``."""
        heads = np.arange(a["key"].shape[1])
        k, v, r, t = a["key"][i].tolist(), a["value"][i].tolist(), int(a["residual"][i]), int(a["tokens"][i])
        flush = math.lcm(*(self.key_group[c] for c in k), *(self.value_group[c] for c in v))
        span = self.spans[i]
        bits = sum(self._head(b, c, r, t, flush, span) for b, c in zip(k, v))
        if span.windowed:  # no token policies in a window (LayerPlan.windowed): the share of tokens held quantized
            share = self._share(r, t, flush, span)
            pk = share * float(self.e_key[i, heads, a["key"][i]].sum())
            return bits, pk, share * float(self.e_value[i, heads, a["value"][i]].sum()), 0.0
        fk, fv = self.factors(r, t, flush)
        pk = float((self.e_key[i, heads, a["key"][i]] * fk[i]).sum())
        pv = float((self.e_value[i, heads, a["value"][i]] * fv[i]).sum())
        return bits, pk, pv, float(self.merged[t] * self.merge_err[i])

    def layer_terms(self, a: Mapping[str, np.ndarray], layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(stored bits, proxy) of ``layers`` under an assignment ``a`` (:meth:`SearchSpace.assignment`)."""
        bits, proxy = np.empty(len(layers)), np.empty(len(layers))
        for j, i in enumerate(layers):
            b, pk, pv, pm = self.layer_parts(a, i)
            bits[j], proxy[j] = b, pk + pv + pm
        return bits, proxy

    def __call__(self, params: Mapping[str, int]) -> Score:
        a = self.space.assignment(params)
        bits, proxy = self.layer_terms(a, range(len(a["residual"])))
        return Score(proxy=float(proxy.sum()), bits=float(bits.sum()) / self.elements)

    def min_params(self) -> dict[str, int]:
        """The cheapest point (:meth:`SearchSpace.min_params`); where the space has merging token policies, each
        group of layers takes the one with the fewest bits (ties: no policy), since merging stores fewer tokens."""
        p = self.space.min_params(self.key_cost, self.value_cost)
        policies = self.space.token_policies
        if any(pol.merge for pol in policies):
            none = policies.index(TokenPolicy())
            for r in range(self.space.n_residual_groups):
                name = f"tokens.{r}"
                p[name] = min(range(len(policies)), key=lambda t: (self({**p, name: t}).bits, t != none, t))
        return p

    def plan_parts(self, layers: Sequence[LayerPlan]) -> tuple[float, float, float] | None:
        """(key, value, merge) proxy parts of any bound plan whose specs (fp16: error 0) are candidates and whose
        token policies the space has; None otherwise."""
        n_h = self.space.identity.num_kv_heads
        total = np.zeros(3)
        for i, layer in enumerate(layers):
            policy = policy_of(layer.salient, layer.merge)
            if policy not in self.space.token_policies:
                return None
            t = self.space.token_policies.index(policy)
            span = self.spans[i]
            if span.windowed:  # as the layer runs: no token policies, whole blocks evicted (as in _share)
                share = token_counts(layer.windowed(span), self.space.reference_length, span, layer.flush)
                fk = fv = np.full(self.e_key.shape[:2], share["quantized"] / self.space.reference_length)
            else:
                fk, fv = self.factors(layer.residual + policy.sinks, t, layer.flush)
            for h, head in enumerate(layer.head_plans(n_h)):
                for j, (spec, cands, err, f) in enumerate(((head.key, self.space.key_candidates, self.e_key, fk),
                                                           (head.value, self.space.value_candidates, self.e_value,
                                                            fv))):
                    if spec.passthrough:
                        continue
                    if spec not in cands:
                        return None
                    total[j] += err[i, h, cands.index(spec)] * f[i, h]
            total[2] += 0.0 if span.windowed else self.merged[t] * self.merge_err[i]
        return float(total[0]), float(total[1]), float(total[2])

    def plan_proxy(self, layers: Sequence[LayerPlan]) -> float | None:
        """Proxy of any bound plan :meth:`plan_parts` can price."""
        parts = self.plan_parts(layers)
        return None if parts is None else sum(parts)


def _kept_shares(space: SearchSpace, tables: CalibrationTables, sinks: bool = True) -> np.ndarray:
    """``[L, P]`` float64: the error share each of the space's token policies removes in each layer (``sinks``:
    counting the sink's share; without it, only salient tokens', the recency tables pricing the sink)."""
    n_layers, policies = space.identity.num_layers, space.token_policies
    kept = np.zeros((n_layers, len(policies)))
    if tables.sink_mass is None or tables.salient_mass is None:
        return kept
    for i in range(n_layers):
        salient = dict(zip(SALIENT_RATIOS, tables.salient_mass[i].tolist()))
        sink = float(tables.sink_mass[i]) if sinks else 0.0
        kept[i] = [kept_share(p, sink, salient) for p in policies]
    return kept


def greedy_path(evaluator: Evaluator, max_bits: float, max_steps: int = 1000,
                start: Mapping[str, int] | None = None) -> list[tuple[dict[str, int], Score]]:
    """Points from ``start`` (default: the cheapest) upwards, each adding the change with the best proxy gain per
    bit, up to ``max_bits``.

    Only the layers a parameter touches are re-scored for a move (exact: bits and proxy add up over layers).
    """
    space = evaluator.space
    cells = space.param_cells()
    params = dict(start) if start is not None else evaluator.min_params()
    state = space.assignment(params)
    bits, proxy = evaluator.layer_terms(state, range(len(state["residual"])))
    path = [(dict(params), Score(float(proxy.sum()), float(bits.sum()) / evaluator.elements))]
    budget_total = max_bits * evaluator.elements
    for _ in range(max_steps):
        best = _best_move(evaluator, cells, params, state, bits, proxy, budget_total)
        if best is None:
            break
        name, c, state, layers, b, p = best
        params = {**params, name: c}
        bits[layers], proxy[layers] = b, p
        path.append((dict(params), Score(float(proxy.sum()), float(bits.sum()) / evaluator.elements)))
    return path


def _moves(evaluator: Evaluator, cells: Mapping[str, tuple[str, np.ndarray, np.ndarray]], params: Mapping[str, int],
           state: Mapping[str, np.ndarray], bits: np.ndarray, proxy: np.ndarray) -> Iterator[tuple]:
    """Every single-parameter change: ``(name, choice, moved state, layers, their bits, their proxy, d_proxy,
    d_bits)``."""
    for name, options in evaluator.space.params().items():
        kind, ls, hs = cells[name]
        layers = np.unique(ls)
        for c in options:
            if c == params[name]:
                continue
            moved = dict(state)
            moved[kind] = state[kind].copy()
            if kind in ("residual", "tokens"):
                moved[kind][ls] = c
            else:
                moved[kind][ls, hs] = c
            b, p = evaluator.layer_terms(moved, layers)
            d_proxy, d_bits = float(p.sum() - proxy[layers].sum()), float(b.sum() - bits[layers].sum())
            yield name, c, moved, layers, b, p, d_proxy, d_bits


def _best_move(evaluator: Evaluator, cells: Mapping[str, tuple[str, np.ndarray, np.ndarray]],
               params: Mapping[str, int], state: Mapping[str, np.ndarray], bits: np.ndarray, proxy: np.ndarray,
               budget_total: float) -> tuple | None:
    """The single parameter change with the best proxy gain per added bit that stays within the budget."""
    best, best_ratio = None, 0.0
    for *move, d_proxy, d_bits in _moves(evaluator, cells, params, state, bits, proxy):
        if d_proxy >= 0 or bits.sum() + d_bits > budget_total:
            continue
        ratio = -d_proxy / d_bits if d_bits > 0 else float("inf")
        if best is None or ratio > best_ratio:
            best, best_ratio = tuple(move), ratio
    return best


def greedy_descent(evaluator: Evaluator, max_bits: float, max_steps: int = 2000) -> tuple[dict[str, int], Score]:
    """The other way round from :func:`greedy_path`: from the lowest-proxy point (each parameter at its best
    choice), drop the change costing the least proxy per bit saved until the point fits ``max_bits``, then
    spend the bits left over as :func:`greedy_path` does.

    Lands at about the budget by a different route, so validation has a second strong alternative."""
    space, cells = evaluator.space, evaluator.space.param_cells()
    params = dict(evaluator.min_params())
    for name, options in space.params().items():  # one coordinate pass to the least proxy (most bits on ties)
        params[name] = min(options, key=lambda c: (evaluator({**params, name: c}).proxy, -evaluator({**params,
                           name: c}).bits))
    state = space.assignment(params)
    bits, proxy = evaluator.layer_terms(state, range(len(state["residual"])))
    for _ in range(max_steps):
        if bits.sum() <= max_bits * evaluator.elements:
            break
        best, best_ratio = None, float("inf")
        for *move, d_proxy, d_bits in _moves(evaluator, cells, params, state, bits, proxy):
            ratio = d_proxy / -d_bits if d_bits < 0 else float("inf")
            if ratio < best_ratio:
                best, best_ratio = tuple(move), ratio
        if best is None:
            break
        name, c, state, layers, b, p = best
        params[name] = c
        bits[layers], proxy[layers] = b, p
    return greedy_path(evaluator, max_bits, start=params)[-1]  # spend what the last cut left over


def seed_points(evaluator: Evaluator, budget: float, presets: Mapping[str, Sequence[LayerPlan]],
                n_budgets: int = 16) -> list[tuple[str, dict[str, int]]]:
    """``(label, params)`` to enqueue first: the cheapest point, uniform presets (mapped into the space)
    within ``budget``, the :func:`greedy_descent` point, and greedy points at ``n_budgets`` budgets from the
    minimum up to ``budget``."""
    seeds: list[tuple[str, dict[str, int]]] = [("min", evaluator.min_params())]
    for name, layers in presets.items():
        p = evaluator.space.params_for(layers[0]) if len(set(layers)) == 1 else None
        if p is not None and evaluator(p).bits <= budget:
            seeds.append((f"preset:{name}", p))
    down, score = greedy_descent(evaluator, budget)
    if score.bits <= budget:
        seeds.append(("descent", down))
    path = greedy_path(evaluator, budget)
    lo = path[0][1].bits
    for j in range(1, n_budgets + 1):
        target = lo + (budget - lo) * j / n_budgets
        fit = [p for p, s in path if s.bits <= target]
        if fit:
            seeds.append((f"greedy:{target:.3f}", fit[-1]))
    unique: list[tuple[str, dict[str, int]]] = []
    for label, p in seeds:
        if all(p != q for _, q in unique):
            unique.append((label, p))
    return unique
