"""Token-policy search dimensions: Elastic Cache merge ratio and the visual token-type weight (the "all" set)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvtune.errors import KVTuneError
from kvtune.plan import load_plan, save_plan
from kvtune.plan_types import LayerPlan, MergePolicy, SalientPolicy
from kvtune.quant.bits import layer_bits, layers_bits, token_counts
from kvtune.search import search
from kvtune.search.objective import Evaluator
from kvtune.search.space import SPACE_VERSION, SearchSpace, build_space
from kvtune.search.token_policies import (
    SALIENT_RATIOS,
    TOKEN_POLICIES,
    TokenPolicy,
    kept_share,
    merged_share,
    policy_of,
)
from tests.search.synthetic import KEYS, VALUES, make_tables

MERGE = TokenPolicy(1, merge=0.5)
VISUAL = TokenPolicy(1, 0.05, 4, visual=4.0)


def test_token_policy_fields() -> None:
    assert MERGE.merge_policy() == MergePolicy(ratio=0.5, method="elastic")  # anchors at MergePolicy's defaults
    assert TokenPolicy(1).merge_policy() == MergePolicy()
    assert VISUAL.salient().token_types == (("image", 4.0), ("video", 4.0)) and VISUAL.salient().weight("text") == 1
    assert TokenPolicy(1, 0.05, 4).salient().token_types == ()
    assert (MERGE.label(), VISUAL.label()) == ("sink1+merge0.5", "sink1+sal0.05@4+vis4")
    for p in (MERGE, VISUAL, TokenPolicy(), TokenPolicy(2, 0.1, 4, 0.25, 0.5)):
        assert TokenPolicy.from_list(p.to_list()) == p
    for kwargs in ({"merge": 1.0}, {"merge": -0.1}, {"visual": 4.0}, {"ratio": 0.05, "bits": 4, "visual": -1.0},
                   {"ratio": 0.05, "bits": 4, "visual": float("nan")}):
        with pytest.raises(ValueError):
            TokenPolicy(1, **kwargs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        MERGE.merge = 0.25  # type: ignore[misc]
    assert {MERGE, VISUAL} <= set(TOKEN_POLICIES["all"]) and set(TOKEN_POLICIES["salient"]) < set(TOKEN_POLICIES["all"])
    assert not any(p.merge or p.visual != 1 for name in ("sinks", "salient") for p in TOKEN_POLICIES[name])


def test_space_round_trips_the_new_fields() -> None:
    space = build_space(make_tables(), "layer", groups=3, tokens="all")
    assert space.token_policies == TOKEN_POLICIES["all"]
    d = space.to_dict()
    assert d["version"] == SPACE_VERSION == 3
    again = SearchSpace.from_dict(d)
    assert again == space and again.hash() == space.hash()
    assert again.token_policies[space.token_policies.index(MERGE)].merge == 0.5
    assert again.token_policies[space.token_policies.index(VISUAL)].visual == 4.0
    with pytest.raises(KVTuneError, match="version"):
        SearchSpace.from_dict({**d, "version": 2})
    assert build_space(make_tables(), "layer", groups=3).hash() != space.hash()


def test_layer_plan_sets_merge_and_token_types() -> None:
    space = build_space(make_tables(), "layer", groups=3, tokens="all")
    merged = space.layer_plan((1, 1), (1, 1), 32, space.token_policies.index(MERGE))
    assert merged.merge == MergePolicy(0.5, "elastic") and merged.salient == SalientPolicy(sink_tokens=1)
    visual = space.layer_plan((1, 1), (1, 1), 32, space.token_policies.index(VISUAL))
    assert visual.merge == MergePolicy() and visual.salient.weight("image") == visual.salient.weight("video") == 4.0
    params = {name: c[0] for name, c in space.params().items()}
    params["tokens.1"] = space.token_policies.index(MERGE)
    layers = space.layers(params)
    assert [layer.merge.ratio for layer in layers] == [0.5 if g == 1 else 0.0 for g in space.residual_group]


def test_policy_of_round_trips() -> None:
    for p in TOKEN_POLICIES["all"]:
        assert policy_of(p.salient(), p.merge_policy()) == p
        assert policy_of(LayerPlan(salient=p.salient(), merge=p.merge_policy()).salient,
                         LayerPlan(merge=p.merge_policy()).merge) == p
    assert policy_of(SalientPolicy(sink_tokens=1)) == TokenPolicy(1)  # merge defaults to none
    for salient, merge in ((SalientPolicy(), MergePolicy(0.5, "elastic", keep_recent=8)),  # other anchors
                           (SalientPolicy(), MergePolicy(0.0, "elastic")),
                           (SalientPolicy(0.05, 4, token_types={"image": 4.0}), MergePolicy()),  # image only
                           (SalientPolicy(token_types={"image": 4.0, "video": 4.0}), MergePolicy()),  # no salient
                           (SalientPolicy(0.05, 4, probe_recent=0.1), MergePolicy())):  # other probes
        assert policy_of(salient, merge) is None
    space = build_space(make_tables(), "layer", groups=2, tokens="all")
    template = LayerPlan(key=KEYS[1], value=VALUES[1], residual=MERGE.window(32), salient=MERGE.salient(),
                         merge=MERGE.merge_policy())  # 32 fp16 recent tokens, the sink among them
    p = space.params_for(template)
    assert p is not None and {p[f"tokens.{r}"] for r in range(space.n_residual_groups)} == \
        {space.token_policies.index(MERGE)}
    assert all(layer.merge == template.merge for layer in space.layers(p))
    assert build_space(make_tables(), "layer", groups=2).params_for(template) is None  # not in the default set


def test_merge_lowers_bits_exactly_and_costs_proxy() -> None:
    tables = make_tables(layers=4, heads=2)
    space = build_space(tables, "head", groups=4, tokens="all")
    ev = Evaluator(space, tables)
    ident = tables.identity
    base = {name: c[len(c) // 2] for name, c in space.params().items()}
    base.update({f"tokens.{r}": space.token_policies.index(TokenPolicy(1)) for r in range(space.n_residual_groups)})
    merged = {**base, "tokens.0": space.token_policies.index(MERGE)}
    for params in (base, merged):
        layers = space.layers(params)
        assert ev(params).bits == layers_bits(layers, ident.num_kv_heads, ident.head_dim, 4096).effective
        assert ev.plan_proxy(layers) == pytest.approx(ev(params).proxy, rel=1e-12)
    assert ev(merged).bits < ev(base).bits and ev(merged).proxy > ev(base).proxy
    # the documented proxy: quantized share x (1 - kept) x chosen errors + merged share x the most lossy errors
    e_k, e_v = tables.head_errors()
    a = space.assignment(merged)
    want = 0.0
    for i, layer in enumerate(space.layers(merged)):
        policy = space.token_policies[a["tokens"][i]]
        counts = token_counts(layer, 4096)
        masses = dict(zip(SALIENT_RATIOS, tables.salient_mass[i].tolist()))
        kept = kept_share(policy, float(tables.sink_mass[i]), masses)
        want += counts["quantized"] / 4096 * (1 - kept) * sum(e_k[i, h, a["key"][i, h]] + e_v[i, h, a["value"][i, h]]
                                                            for h in range(2))
        want += counts["merged"] / 4096 * (e_k[i].sum(0).max() + e_v[i].sum(0).max())
        assert counts["merged"] / 4096 == merged_share(policy, 4096)
        assert layer_bits(layer, 2, ident.head_dim).total < layer_bits(
            dataclasses.replace(layer, merge=MergePolicy()), 2, ident.head_dim).total or not counts["merged"]
    assert ev(merged).proxy == pytest.approx(want, rel=1e-9)
    # the visual weight: same bits and proxy as without it (text-only calibration)
    plain = {**base, "tokens.0": space.token_policies.index(TokenPolicy(1, 0.05, 4))}
    assert ev({**base, "tokens.0": space.token_policies.index(VISUAL)}) == ev(plain)


def test_min_params_merge_only_where_the_set_has_it() -> None:
    tables = make_tables()
    for tokens in ("sinks", "salient"):
        ev = Evaluator(build_space(tables, "layer", groups=3, tokens=tokens), tables)
        assert ev.min_params() == ev.space.min_params(ev.key_cost, ev.value_cost)
        assert ev(ev.min_params()).bits == 2.0  # 1-bit K and V plus their scales
    ev = Evaluator(build_space(tables, "layer", groups=3, tokens="all"), tables)
    cheapest = ev.min_params()
    assert ev(cheapest).bits < 1.8  # merging goes below the unmerged minimum
    for r in range(ev.space.n_residual_groups):
        assert ev.space.token_policies[cheapest[f"tokens.{r}"]].merge == 0.5


def test_all_set_searches_end_to_end(tmp_path: Path) -> None:
    tables = make_tables()
    r = search(tables, "1.8bit", out=None, storage=f"sqlite:///{tmp_path / 's.db'}", trials=12, validate=0, groups=3,
               tokens="all")  # below the unmerged minimum: needs merging
    ident = tables.identity
    assert r.effective_bits <= 1.8
    assert layers_bits(r.plan.layers, ident.num_kv_heads, ident.head_dim, 4096).effective == r.effective_bits
    save_plan(r.plan, tmp_path / "plan")
    plan = load_plan(tmp_path / "plan")
    assert plan.layers == r.plan.layers and plan.effective_bits() == r.effective_bits
    assert any(layer.merge.ratio > 0 for layer in plan.layers)
    for layer in plan.layers:
        policy = policy_of(layer.salient, layer.merge)
        assert policy in TOKEN_POLICIES["all"] and layer.merge == policy.merge_policy()


def test_command_offers_all(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtune.cli import main

    assert main(["search", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "[sinks|salient|all]" in text and "merging" in text
