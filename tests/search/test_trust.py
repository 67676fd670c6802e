"""The parts that make a search trustworthy: recency pricing, proxy correction, held-out text, successive halving,
baselines and the never-worse choice."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from kvtune.errors import KVTuneError
from kvtune.plan import load_plan
from kvtune.plan_types import ModelIdentity
from kvtune.search import correction
from kvtune.search.baselines import all_baselines, kivi_baselines, uniform_baselines
from kvtune.search.halving import Fidelity, Schedule, held_out_ids
from kvtune.search.judge import Entry, judge
from kvtune.search.objective import Evaluator
from kvtune.search.recency import expected_window, factors
from kvtune.search.space import build_space

from .synthetic import make_tables


def test_correction_recovers_the_key_value_balance() -> None:
    rng = np.random.default_rng(0)
    parts = [tuple(rng.uniform(0.01, 1.0, 2)) + (0.0,) for _ in range(12)]
    kls = [2.0 * k + 0.5 * v for k, v, _ in parts]
    a_k, a_v = correction.fit(parts, kls)
    assert a_k == pytest.approx(2.0, rel=1e-6) and a_v == pytest.approx(0.5, rel=1e-6)
    assert correction.predict(parts[0], (a_k, a_v)) == pytest.approx(kls[0])
    # the raw proxy (a_k = a_v = 1) misranks these plans; the fit on the others ranks each held-out one right
    assert correction.held_out_spearman(parts, kls) == pytest.approx(1.0)
    assert correction.fit(parts[:1], kls[:1]) == (1.0, 1.0)  # too few points: the proxy as it is
    assert correction.held_out_spearman(parts[:3], kls[:3]) is None
    a = correction.fit([(1.0, 0.1, 0.0), (0.1, 1.0, 0.0), (1.0, 1.0, 0.0)], [1.0, 0.0005, 1.0])
    assert min(a) >= correction.BALANCE * max(a) > 0  # no role zeroed out, whatever the points
    assert correction.choose(parts, kls) == (a_k, a_v)  # the fit predicts held-out plans better: used


def test_a_correction_that_predicts_no_better_is_not_used() -> None:
    """Plans the raw proxy ranks right already (KL grows with the proxy, not in proportion): a two-weight fit can
    only tie or misrank, so the proxy stays as it is and the held-out Spearman (choice included) is 1."""
    rng = np.random.default_rng(1)
    parts = [tuple(rng.uniform(0.01, 1.0, 2)) + (0.0,) for _ in range(8)]
    kls = [(k + v) ** 1.7 for k, v, _ in parts]
    assert correction.choose(parts, kls) == (1.0, 1.0)
    assert correction.held_out_spearman(parts, kls) == pytest.approx(1.0)
    assert correction._loo(parts, kls, correction.fit) < 1.0  # the fit alone would have misranked some

def test_recency_factors_interpolate_the_measured_windows() -> None:
    from kvtune.calibrate.recency import WINDOWS

    w = np.asarray(WINDOWS, dtype=np.float64)
    no_sink = np.exp(-w / 64)  # [W]: 1 at R = 0, falling
    table = np.stack([no_sink, no_sink * 0.5], axis=-1)[None, None].repeat(2, 0)  # [L=2, H=1, W, 2]
    assert factors(table, 0, 0)[0, 0] == pytest.approx(1.0)
    assert factors(table, 0, 1)[0, 0] == pytest.approx(0.5)
    mid = (w[1] + w[2]) / 2
    assert factors(table, mid, 0)[0, 0] == pytest.approx((no_sink[1] + no_sink[2]) / 2)
    assert factors(table, 10 * w[-1], 0)[0, 0] == pytest.approx(no_sink[-1])  # flat past the last window
    assert expected_window(0, 1) == 0.0 and expected_window(32, 64) == pytest.approx(32 + 31.5)


def test_recency_errors_fall_as_the_window_grows() -> None:
    from kvtune.calibrate.recency import WINDOWS, recency_errors

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 300, 16, generator=gen) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    kq, vq = k + 0.1 * torch.randn(k.shape, generator=gen), v + 0.1 * torch.randn(v.shape, generator=gen)
    rel_k, rel_v = recency_errors(q, k, v, kq, vq, torch.arange(40, 300, 7), 0.25)
    assert rel_k.shape == rel_v.shape == (2, len(WINDOWS), 2)
    assert torch.allclose(rel_k[:, 0, 0], torch.ones(2)) and torch.allclose(rel_v[:, 0, 0], torch.ones(2))
    for rel in (rel_k, rel_v):
        mean = rel.mean(0)  # [W, 2] over heads (one head may gain a little from an exact key: softmax)
        assert (mean[1:, 0] <= mean[:-1, 0] + 1e-6).all()  # more exact recent tokens, less error
        assert (mean[:, 1] <= mean[:, 0] + 1e-3).all()
        assert (rel[:, -1, 0] < 0.1).all()


def test_schedule_caps_to_the_model_limit() -> None:
    s = Schedule((Fidelity(512), Fidelity(1024), Fidelity(4096, 1, 256)), (4, 2))
    assert [f.length for f in s.capped(8192).fidelities] == [512, 1024, 4096]
    short = s.capped(1024)
    assert [f.length for f in short.fidelities] == [512, 1024] and short.keep == (4,)
    assert [f.length for f in s.capped(300).fidelities] == [300] and s.capped(300).keep == ()
    with pytest.raises(ValueError):
        Schedule((Fidelity(512), Fidelity(1024)), ())
    # a sliding window of 2048 tokens: the last fidelity sees 4 windows, within the model's limit
    assert [f.length for f in s.for_model(32768, 2048).fidelities] == [512, 1024, 8192]
    assert [f.length for f in s.for_model(6000, 2048).fidelities] == [512, 1024, 6000]
    assert [f.length for f in s.for_model(None, None).fidelities] == [512, 1024, 4096]


def test_widest_window_of_a_model_layout() -> None:
    from transformers import MistralConfig, Qwen2Config

    from kvtune.layout import LayerSpan, layout_of
    from kvtune.search.halving import widest_window

    assert widest_window([LayerSpan()] * 3) is None
    assert widest_window([LayerSpan("sliding", 512), LayerSpan()]) == 512
    assert widest_window([LayerSpan("chunked", 8192), LayerSpan("sliding", 512)]) == 8192
    assert widest_window(layout_of(MistralConfig(num_hidden_layers=2, sliding_window=512)).spans) == 512
    off = Qwen2Config(num_hidden_layers=2, sliding_window=4096, use_sliding_window=False)
    assert widest_window(layout_of(off).spans) is None
    mixed = Qwen2Config(num_hidden_layers=4, sliding_window=512, use_sliding_window=True, max_window_layers=2)
    assert widest_window(layout_of(mixed).spans) == 512


def test_held_out_text_follows_what_calibration_read() -> None:
    class Tok:
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            return {"input_ids": list(range(len(text.split())))}

    import kvtune.data as data

    text = " ".join(["w"] * 1000)
    data.SOURCES["test:words"] = lambda: text
    try:
        ids, where = held_out_ids(Tok(), "test:words", 600, 100, 3)
        assert ids.shape == (3, 100) and int(ids[0, 0]) == 600 and "held out" in where
        ids, where = held_out_ids(Tok(), "test:words", 900, 100, 3)
        assert int(ids[0, 0]) == 700 and "overlaps calibration" in where
        with pytest.raises(KVTuneError, match="fewer than"):
            held_out_ids(Tok(), "test:words", 0, 600, 2)
    finally:
        del data.SOURCES["test:words"]


def test_baselines_fit_the_budget_and_are_distinct() -> None:
    tables = make_tables()
    ev = Evaluator(build_space(tables, "layer", None), tables)
    for budget in (2.5, 3.0, 4.5):
        for b in kivi_baselines(ev, budget) + uniform_baselines(ev, budget):
            assert b.bits <= budget and b.proxy is not None and len(b.layers) == tables.identity.num_layers
        found = all_baselines(ev, budget, {n: load_plan(n).bind(tables.identity) for n in ("kv2", "kv4", "kivi-2bit")})
        assert len({b.layers for b in found}) == len(found) and all(b.bits <= budget for b in found)
    assert {b.name for b in all_baselines(ev, 8.0, {"kv4": load_plan("kv4").bind(tables.identity)})} >= {"preset:kv4"}


def _identity(model: Any) -> ModelIdentity:
    from kvtune.models import model_identity

    ident = model_identity(model)
    return ModelIdentity(**{k: ident[k] for k in ("architecture", "num_layers", "num_heads", "num_kv_heads",
                                                  "head_dim", "fingerprint")})


@pytest.mark.parametrize("searched_preset, wins", [("kv2", False), ("kv8", True)])
def test_never_worse_than_a_baseline(tiny_llama: tuple[Any, Any], searched_preset: str, wins: bool) -> None:
    model, _ = tiny_llama
    identity = _identity(model)
    plan = lambda name: load_plan(name).bind(identity)
    searched = Entry("trial 0", "searched", plan(searched_preset), 1.0, 0.0, None, object())
    baselines = [Entry("preset:kv4", "preset", plan("kv4"), 1.0, None, None),
                 Entry("preset:kv2", "preset", plan("kv2"), 1.0, None, None)]
    ids = torch.randint(0, 128, (1, 128), generator=torch.Generator().manual_seed(1))
    schedule = Schedule((Fidelity(32, 1, 16), Fidelity(64, 1, 32), Fidelity(128, 1, 64)), (1, 1))
    with torch.inference_mode():
        j = judge(model, [searched, *baselines], [], ids, schedule)
    assert j.entries[j.best_baseline].name == "preset:kv4"
    assert j.entries[j.winner].searched is wins
    longest = max(r["length"] for r in j.latest)
    assert longest == 128 and j.latest[j.winner]["length"] == longest
    assert j.latest[j.best_baseline]["length"] == longest  # best of each kind meet at the longest fidelity
    assert j.latest[0]["length"] == longest
