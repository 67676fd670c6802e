"""Space shrinking: dominated-candidate pruning, deterministic grouping, serialisation, preset mapping."""

from __future__ import annotations

import numpy as np
import pytest

from kvtune.errors import KVTuneError
from kvtune.plan_types import LayerPlan
from kvtune.search.space import SearchSpace, build_space, prune_dominated, ward_groups
from tests.search.synthetic import DOMINATED_KEY, KEYS, VALUES, make_tables


def test_prune_dominated() -> None:
    err = [1.0, 0.5, 0.6, 0.1, 0.5]
    bits = [2.0, 3.0, 3.0, 5.0, 3.0]  # 2 is beaten by 1 (same bits, more error); 4 ties 1 exactly
    kept, dom = prune_dominated(err, bits)
    assert kept == [0, 1, 3]
    assert dom == [0, 1, 1, 3, 1]
    kept, _ = prune_dominated([0.2, 0.1], [2.0, 1.0])  # cheaper and better: the other goes
    assert kept == [1]


def test_ward_groups_separates_blobs_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (5, 3)), rng.normal(5, 0.1, (4, 3)), rng.normal(-5, 0.1, (3, 3))])
    order = rng.permutation(len(x))
    labels = ward_groups(x[order], 3)
    assert labels == ward_groups(x[order], 3)
    assert labels[0] == 0 and sorted(set(labels)) == [0, 1, 2]
    truth = np.array([0] * 5 + [1] * 4 + [2] * 3)[order]
    for g in range(3):  # every cluster is one blob
        assert len(set(truth[np.array(labels) == g])) == 1
    assert ward_groups(x, 1) == [0] * len(x)
    assert sorted(ward_groups(x, 99)) == list(range(len(x)))


def test_build_space_prunes_and_groups() -> None:
    tables = make_tables(layers=8)
    space = build_space(tables, "layer", groups=3)
    assert space.n_groups == 3 and len(space.units) == 8 and len(space.spec_group) == 8
    assert set(space.spec_group) == {0, 1, 2}
    assert space.residual_group == space.spec_group
    for choices, dom in zip(space.key_choices, space.key_dominator):
        assert DOMINATED_KEY not in choices
        assert dom[DOMINATED_KEY] == KEYS.index(KEYS[1])  # plain 2-bit keys: same bits, less error
    params = space.params()
    assert list(params) == ["key.0", "value.0", "key.1", "value.1", "key.2", "value.2",
                            "residual.0", "residual.1", "residual.2", "tokens.0", "tokens.1", "tokens.2"]
    again = build_space(make_tables(layers=8), "layer", groups=3)
    assert again == space and again.hash() == space.hash()
    assert SearchSpace.from_dict(space.to_dict()) == space
    assert build_space(tables, "layer", groups=2).hash() != space.hash()


def test_head_granularity() -> None:
    tables = make_tables(layers=4, heads=2)
    space = build_space(tables, "head", groups=3)
    assert len(space.units) == 8 and space.units[1] == (0, 1)
    assert space.n_groups == 3 and space.n_residual_groups == 3
    params = {name: choices[-1] for name, choices in space.params().items()}
    layers = space.layers(params)
    assert len(layers) == 4
    a = space.assignment(params)
    assert a["key"].shape == (4, 2) and a["residual"].shape == (4,) and a["tokens"].shape == (4,)
    assert all(layer.salient == space.token_policies[-1].salient() for layer in layers)


def test_bad_arguments() -> None:
    tables = make_tables()
    with pytest.raises(KVTuneError, match="granularity"):
        build_space(tables, "channel")
    with pytest.raises(KVTuneError, match="groups"):
        build_space(tables, "layer", groups=0)
    with pytest.raises(KVTuneError, match="token policies"):
        build_space(tables, "layer", tokens="everything")


def test_params_for_maps_presets_to_dominators() -> None:
    space = build_space(make_tables(), "layer", groups=2)
    p = space.params_for(LayerPlan(key=KEYS[DOMINATED_KEY], value=VALUES[1], residual=128))
    assert p is not None and p["key.0"] == 1 and p["residual.1"] == 128
    assert all(p[f"value.{g}"] in space.value_choices[g] for g in range(space.n_groups))
    assert space.params_for(LayerPlan(key=KEYS[1], value=VALUES[1], residual=100)) is None  # not a window choice
    assert space.params_for(LayerPlan()) is None  # fp16 is not a candidate
