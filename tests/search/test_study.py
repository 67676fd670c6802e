"""search() / resolve() on synthetic tables: budget, outputs, determinism, resume, re-solve, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvtune.errors import KVTuneError
from kvtune.plan import load_plan
from kvtune.quant.bits import layers_bits
from kvtune.search import SearchProgress, resolve, search
from kvtune.search.space import build_space
from tests.search.synthetic import make_tables


def _url(tmp_path: Path, name: str = "s.db") -> str:
    return f"sqlite:///{tmp_path / name}"


def _trials(url: str, study: str = "kvtune-search") -> list:
    import optuna

    return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


def test_search_writes_a_plan_within_budget(tmp_path: Path) -> None:
    tables = make_tables()
    events: list[SearchProgress] = []
    out = tmp_path / "plan"
    r = search(tables, "2.6bit", out=out, trials=30, validate=0, groups=3, progress=events.append)
    ident = tables.identity
    assert r.effective_bits <= 2.6
    assert layers_bits(r.plan.layers, ident.num_kv_heads, ident.head_dim, 4096).effective == r.effective_bits
    assert all(p["bits"] <= 2.6 for p in r.front) and r.front[0]["proxy"] == r.proxy
    for name in ("plan.yaml", "plan.safetensors", "pareto.json", "pareto.png", "bits.png", "study.db"):
        assert (out / name).is_file(), name
    plan = load_plan(out)
    assert plan.budget == 2.6 and plan.effective_bits() == r.effective_bits
    assert plan.provenance.study == "kvtune-search" and plan.provenance.trial == r.trial
    assert plan.provenance.calibration_hash == "synth-hash"
    assert [e.done for e in events if e.stage == "trials"] == list(range(1, 31))
    assert events[-1].stage == "done" and events[-1].best_proxy == r.proxy
    assert r.trials_total == 30 and r.spearman is None and r.kl is None


@pytest.mark.parametrize("budget", ["2.0", "2.3bit", "3.5bit", "9bit"])
def test_every_budget_is_respected(tmp_path: Path, budget: str) -> None:
    r = search(make_tables(), budget, out=None, storage=_url(tmp_path), trials=20, validate=0, groups=3)
    assert r.effective_bits <= float(budget.removesuffix("bit"))
    assert r.plan.effective_bits() == r.effective_bits


def test_below_minimum_budget(tmp_path: Path) -> None:
    with pytest.raises(KVTuneError, match="below the minimum achievable 2 bits"):
        search(make_tables(), "1.5bit", out=tmp_path, trials=5, validate=0)
    assert not (tmp_path / "study.db").exists()


def test_deterministic_with_a_seed(tmp_path: Path) -> None:
    runs = [search(make_tables(), "2.8bit", out=None, storage=_url(tmp_path, f"{i}.db"), trials=40, validate=0,
                   groups=3, seed=7) for i in range(2)]
    a, b = (_trials(_url(tmp_path, f"{i}.db")) for i in range(2))
    assert [t.params for t in a] == [t.params for t in b]
    assert runs[0].plan.layers == runs[1].plan.layers and runs[0].trial == runs[1].trial


def test_resume_and_resolve(tmp_path: Path) -> None:
    url = _url(tmp_path)
    first = search(make_tables(), "3bit", out=None, storage=url, trials=15, validate=0, groups=3)
    second = search(make_tables(), "3bit", out=None, storage=url, trials=15, validate=0, groups=3)
    assert (first.trials_total, second.trials_total) == (15, 30)
    numbers = [t.number for t in _trials(url)]
    assert numbers == list(range(30))
    assert second.proxy <= first.proxy
    again = resolve(url, "kvtune-search", "2.4bit", out=tmp_path / "low")
    assert again.effective_bits <= 2.4 and again.trials_total == 30 and again.trials_run == 0
    assert load_plan(tmp_path / "low").effective_bits() <= 2.4
    assert len(_trials(url)) == 30
    with pytest.raises(KVTuneError, match="below the minimum"):
        resolve(url, "kvtune-search", "1.9bit")
    with pytest.raises(KVTuneError, match="no study named 'nope'"):
        resolve(url, "nope", "3bit")


def test_space_mismatch_leaves_the_study_alone(tmp_path: Path) -> None:
    import optuna

    url = _url(tmp_path)
    search(make_tables(), "3bit", out=None, storage=url, trials=10, validate=0, groups=3)
    before = optuna.load_study(study_name="kvtune-search", storage=url).user_attrs
    for kwargs, words in (({"groups": 2}, "groups differ"), ({"granularity": "head"}, "granularity differ"),
                          ({"groups": 3, "tables": make_tables(fingerprint="other")}, "model differ"),
                          ({"groups": 3, "tokens": "salient"}, "token policies differ"),
                          ({"groups": 3, "tables": make_tables(calibration_hash="x")}, "another calibration")):
        tables = kwargs.pop("tables", make_tables())
        with pytest.raises(KVTuneError, match=words):
            search(tables, "3bit", out=None, storage=url, trials=10, validate=0, **kwargs)
    after = optuna.load_study(study_name="kvtune-search", storage=url)
    assert after.user_attrs == before and len(after.trials) == 10
    other = search(make_tables(), "3bit", out=None, storage=url, study="heads", trials=5, validate=0,
                   granularity="head", groups=3)
    assert other.trials_total == 5


def test_tpe_and_head_granularity(tmp_path: Path) -> None:
    r = search(make_tables(layers=4), "2.7bit", out=None, storage=_url(tmp_path), trials=25, validate=0,
               sampler="tpe", granularity="head", groups=4, tokens="salient")
    assert r.effective_bits <= 2.7 and r.trials_total == 25
    assert r.plan.effective_bits() == r.effective_bits


@pytest.mark.parametrize("url, words", [("postgresql://kv:secret@127.0.0.1:9/db", "cannot open storage"),
                                        ("nosuchdb://x/y", "cannot open storage")])
def test_unreachable_storage(tmp_path: Path, url: str, words: str) -> None:
    pytest.importorskip("psycopg2") if url.startswith("postgres") else None
    with pytest.raises(KVTuneError, match=words) as info:
        search(make_tables(), "3bit", out=tmp_path, storage=url, trials=5, validate=0)
    assert "secret" not in str(info.value) and "\n" not in str(info.value)


def test_bad_calibration_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(KVTuneError, match="calibration not found"):
        search(tmp_path / "missing", "3bit", out=tmp_path / "o", trials=5)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "calib.yaml").write_text("schema_version: [unclosed\n")
    with pytest.raises(KVTuneError, match="not valid YAML"):
        search(bad, "3bit", out=tmp_path / "o", trials=5)
    for kwargs, words in (({"sampler": "cmaes"}, "unknown sampler"), ({"trials": -1}, "trials"),
                          ({"validate": -2}, "validate"), ({"granularity": "x"}, "granularity")):
        with pytest.raises(KVTuneError, match=words):
            search(make_tables(), "3bit", out=tmp_path / "o", **{"trials": 5, "validate": 0, **kwargs})


def test_calibration_of_another_model(tmp_path: Path) -> None:
    from kvtune.models import tiny_model

    tiny_model("llama", layers=6, heads=4, kv_heads=2, head_dim=32).config.save_pretrained(tmp_path / "m")
    with pytest.raises(KVTuneError, match="calibration was made for another model"):
        search(make_tables(), "3bit", out=tmp_path / "o", trials=5, validate=0, model=str(tmp_path / "m"))


def test_plan_carries_calibrated_outlier_channels(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from kvtune.plan import save_plan
    from kvtune.search.objective import Evaluator
    from kvtune.search.select import plan_for
    from kvtune.search.study import _outliers

    tables = make_tables(layers=3, heads=2)
    space = build_space(tables, "layer", groups=3)
    outlier_key = 7  # 2b/ch/g32 + 2 fp16 outlier channels
    params = {name: (outlier_key if name.startswith("key") else c[0]) for name, c in space.params().items()}
    trial = SimpleNamespace(params=params, number=4, values=(Evaluator(space, tables)(params).proxy, 2.5))
    attrs = {"kvtune.space_hash": space.hash(), "kvtune.outliers": _outliers(tables, space)}
    plan = plan_for(space, trial, attrs, 3.0, "s")
    assert sorted(plan.tensors) == [f"layers.{i}.key.outlier_idx" for i in range(3)]
    assert plan.tensors["layers.1.key.outlier_idx"].tolist() == tables.key_outlier_rank[1, :, :2].tolist()
    save_plan(plan, tmp_path)
    assert load_plan(tmp_path).tensors["layers.2.key.outlier_idx"].dtype == torch.int16


def test_search_from_a_saved_calibration(tmp_path: Path, tiny_calib: Path) -> None:
    from kvtune.io import read_yaml

    r = search(tiny_calib, "3bit", out=tmp_path / "plan", trials=30, validate=0)
    assert r.effective_bits <= 3.0
    assert r.plan.provenance.calibration_hash == read_yaml(tiny_calib / "calib.yaml", "c")["tensors"]["sha256"]
    data = json.loads((tmp_path / "plan" / "pareto.json").read_text())
    assert data["winner"]["trial"] == r.trial and data["budget"] == 3.0 and data["chosen_by"] == "proxy"
    assert all(p["bits"] <= 3.0 for p in data["front"] if p["within_budget"])
    assert {p["name"] for p in data["presets"]} >= {"kv2", "kivi-2bit", "fp16"}


def test_validation_candidates_are_distinct_and_near_the_budget() -> None:
    from types import SimpleNamespace

    from kvtune.search.select import candidates, pareto_front

    t = lambda n, proxy, bits, p: SimpleNamespace(number=n, values=(proxy, bits), params={"a": p})
    trials = [t(0, 1.0, 2.0, 0), t(1, 0.5, 2.9, 1), t(2, 0.5, 2.9, 1), t(3, 0.6, 2.95, 2), t(4, 0.1, 3.5, 3),
              t(5, 0.55, 2.8, 4)]
    assert [c.number for c in candidates(trials, 3.0, 3)] == [1, 3, 5]  # 2 repeats 1; 4 is over budget; 5 is
    # further than 5% below the budget: it comes after 3
    assert [c.number for c in candidates([*trials, t(6, 1.01, 3.0, 5)], 3.0, 9)] == [1, 3, 5, 0]  # 6: proxy > 2x
    # the least
    assert [c.number for c in pareto_front(trials, 3.0)] == [1, 5, 0]  # 3 is dominated by 1 but still a candidate
