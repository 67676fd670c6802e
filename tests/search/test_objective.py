"""Scoring: bits always equal the bit accountant's; the proxy is the documented formula; KL weights; greedy."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from kvtune.quant.bits import layers_bits, token_counts
from kvtune.search.objective import Evaluator, greedy_descent, greedy_path, seed_points
from kvtune.search.space import build_space
from kvtune.search.token_policies import SALIENT_RATIOS, TokenPolicy, kept_share
from tests.search.synthetic import make_tables


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_bits_match_the_accountant(granularity: str) -> None:
    tables = make_tables(layers=5, heads=3)
    space = build_space(tables, granularity, groups=4)
    ev = Evaluator(space, tables)
    rng = random.Random(0)
    ident = tables.identity
    for _ in range(40):
        params = {name: rng.choice(c) for name, c in space.params().items()}
        layers = space.layers(params)
        assert ev(params).bits == layers_bits(layers, ident.num_kv_heads, ident.head_dim, 4096).effective


def test_proxy_formula() -> None:
    tables = make_tables(layers=3, heads=2)
    space = build_space(tables, "head", groups=6, tokens="salient")
    ev = Evaluator(space, tables)
    params = {name: c[len(c) // 2] for name, c in space.params().items()}
    w_k, w_v = tables.weights()
    a = space.assignment(params)
    keys, values = a["key"], a["value"]
    want = 0.0
    for i, layer in enumerate(space.layers(params)):
        policy = space.token_policies[a["tokens"][i]]
        salient = dict(zip(SALIENT_RATIOS, tables.salient_mass[i].tolist()))
        kept = kept_share(policy, float(tables.sink_mass[i]), salient)
        share = token_counts(layer, 4096)["quantized"] / 4096 * (1 - kept)
        for h in range(2):
            want += share * (w_k[i] * float(tables.sens_key[i, h, keys[i, h]])
                             + w_v[i] * float(tables.sens_value[i, h, values[i, h]])) / 2
    assert ev(params).proxy == pytest.approx(want, rel=1e-9)
    assert ev.plan_proxy(space.layers(params)) == pytest.approx(want, rel=1e-9)


def test_kl_weights() -> None:
    tables = make_tables(layers=4)
    w_k, _ = tables.weights()
    att = tables.sens_key[:, :, 1].double().mean(1).numpy()
    ratio = tables.kl_key[:, 0].double().numpy() / att
    np.testing.assert_allclose(w_k, ratio, rtol=1e-6)  # within the clip range: exactly KL / attention error
    kl = tables.kl_key.clone()
    kl[0, 0] = kl[0, 0] * 1e6  # one wild layer is clipped to 10x the median
    from dataclasses import replace

    w_wild, _ = replace(tables, kl_key=kl).weights()
    log_w = np.log(ratio)
    log_w[0] += np.log(1e6)
    assert w_wild[0] == pytest.approx(np.exp(np.median(log_w) + np.log(10)), rel=1e-6)
    np.testing.assert_allclose(w_wild[1:], ratio[1:], rtol=1e-6)
    empty = replace(tables, kl_key=torch.zeros(4, 0), kl_key_candidates=())
    assert (empty.weights()[0] == 1).all()


def test_greedy_path_and_seeds() -> None:
    tables = make_tables(layers=6)
    space = build_space(tables, "layer", groups=3)
    ev = Evaluator(space, tables)
    path = greedy_path(ev, 4.0)
    bits = [s.bits for _, s in path]
    proxy = [s.proxy for _, s in path]
    assert bits[0] == ev(ev.min_params()).bits and max(bits) <= 4.0
    assert all(b <= a for a, b in itertools.pairwise(proxy))
    for params, score in path:
        assert ev(params) == score
    down, score = greedy_descent(ev, 3.0)
    assert score.bits <= 3.0 and ev(down) == score and score.proxy < ev(ev.min_params()).proxy
    seeds = seed_points(ev, 3.0, {})
    assert seeds[0][0] == "min" and all(ev(p).bits <= 3.0 for _, p in seeds)
    assert "descent" in [label for label, _ in seeds] or any(p == down for _, p in seeds)
    assert len({tuple(sorted(p.items())) for _, p in seeds}) == len(seeds)


def test_token_policies() -> None:
    """Sinks remove the first token's attention share; salient tokens more of the rest; exact bits either way."""
    tables = make_tables(layers=3)
    space = build_space(tables, "layer", groups=3, tokens="salient")
    assert len(space.token_policies) > 2 and space.token_policies[0] == TokenPolicy()
    assert build_space(tables, "layer", groups=3).token_policies == (TokenPolicy(), TokenPolicy(1))
    assert kept_share(TokenPolicy(1), 0.4, {}) == pytest.approx(0.4)
    assert kept_share(TokenPolicy(1, 0.05, 8), 0.4, {0.05: 0.5}) == pytest.approx(0.4 + 0.5 * (1 - 4.0 ** -6))
    assert kept_share(TokenPolicy(1, 0.05, 4), 0.6, {0.05: 0.5}) == 1.0
    ev = Evaluator(space, tables)
    base = ev.min_params()
    sink = {**base, **{f"tokens.{r}": 1 for r in range(space.n_residual_groups)}}
    assert ev(sink).proxy < ev(base).proxy and ev(sink).bits > ev(base).bits
    ident = tables.identity
    layers = space.layers(sink)
    assert all(layer.salient.sink_tokens == 1 for layer in layers)
    assert ev(sink).bits == layers_bits(layers, ident.num_kv_heads, ident.head_dim, 4096).effective
    from dataclasses import replace

    plain = build_space(replace(tables, sink_mass=None, salient_mass=None), "layer", groups=3)
    assert plain.token_policies == (TokenPolicy(),) and plain.hash() != space.hash()


def test_attention_masses() -> None:
    from kvtune.search.token_policies import attention_masses

    far = torch.full((2, 3, 100), 0.001)
    far[:, :, 0] = torch.tensor([[0.5, 0.3, 0.1], [0.0, 0.0, 0.0]])
    far[1, :, 10] = 0.4  # one token takes 40% of layer 1's distant attention
    far[1, :, 99] = 0.9  # recent positions are not ranked
    sink, salient = attention_masses(far, ratios=(0.01, 0.1))
    assert sink.tolist() == pytest.approx([0.3, 0.0])
    assert salient[0].tolist() == pytest.approx([0.001, 0.009], rel=1e-4)  # 1 and 9 of positions 1..94
    assert salient[1].tolist() == pytest.approx([0.4, 0.408], rel=1e-4)
