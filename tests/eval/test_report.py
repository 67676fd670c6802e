"""evaluate() on a tiny model: JSON schema, table cells, plot, and the clear errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kvtune.errors import KVTuneError
from kvtune.eval import EvalSettings, evaluate
from kvtune.eval.baselines import HFQuantizedMethod, get_baseline, plan_method
from kvtune.eval.report import COLUMNS, EvalRow, plot, table_cells, validate_report, write_json
from tests.eval.conftest import CharTokenizer

SETTINGS = EvalSettings(ctx=64, sequences=2, chunk=16, gen_tokens=8, passkey_lengths=(), seed=0)
TEXT = "lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 10


@pytest.fixture(scope="module")
def report(tiny_llama: tuple[Any, Any]) -> Any:
    model, _ = tiny_llama
    methods = [plan_method("kv4"), get_baseline("hf-dynamic"),
               HFQuantizedMethod(name="hf-missing-4bit", backend="missing")]
    seen: list[tuple[str, int, int]] = []
    rep = evaluate(model, CharTokenizer(), methods, TEXT, SETTINGS, progress=lambda *a: seen.append(a),
                   data_name="lorem")
    rep.seen = seen
    return rep


def test_rows_and_progress(report: Any) -> None:
    plan, dyn, missing = report.rows
    assert plan.is_plan and plan.error is None and plan.effective_bits_ref is not None
    assert dyn.kl == pytest.approx(0.0, abs=1e-6) and dyn.top1 == 1.0 and dyn.gen_agree == 1.0
    assert dyn.ppl == pytest.approx(report.reference["ppl"], rel=1e-5) and dyn.delta_ppl == pytest.approx(0, abs=1e-3)
    assert dyn.cache_tokens == 64 and dyn.measured_bits == pytest.approx(32.0)  # float32 on CPU
    assert missing.error and "missing" in missing.error and missing.ppl is None
    done = [d for _, d, _ in report.seen]
    assert done == sorted(done) and report.seen[-1][1] == report.seen[-1][2]


def test_json_schema(report: Any, tmp_path: Path) -> None:
    path = write_json(report, tmp_path / "r.json")
    data = json.loads(path.read_text())
    validate_report(data)
    assert data["rows"][0]["name"] == "kv4" and data["settings"]["ctx"] == 64
    for key in ("name", "effective_bits", "ppl", "delta_ppl", "kl", "top1", "passkey", "cache_bytes"):
        assert key in data["rows"][0]
    bad = json.loads(path.read_text())
    bad["rows"][0]["ppl"] = "high"
    with pytest.raises(ValueError, match="ppl"):
        validate_report(bad)
    del bad["rows"]
    with pytest.raises(ValueError, match="rows"):
        validate_report(bad)


def test_table_cells_and_plot(report: Any, tmp_path: Path) -> None:
    cells = table_cells(report.rows[0])
    assert len(cells) == len(COLUMNS) and cells[0] == "kv4 (plan)"
    assert "not run" in table_cells(report.rows[2])[-1] and report.rows[2].error
    assert table_cells(EvalRow(name="x"))[0] == "x"
    out = plot(report, tmp_path / "q.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_clear_errors(tiny_llama: tuple[Any, Any]) -> None:
    model, _ = tiny_llama
    tok, kv4 = CharTokenizer(), [get_baseline("kv4")]
    with pytest.raises(KVTuneError, match="fewer than --ctx"):
        evaluate(model, tok, kv4, "short text", SETTINGS)
    with pytest.raises(KVTuneError, match="beyond the model's limit of 512"):
        evaluate(model, tok, kv4, TEXT * 20, replace(SETTINGS, ctx=1024))
    with pytest.raises(KVTuneError, match="beyond the model's limit"):
        evaluate(model, tok, kv4, TEXT, replace(SETTINGS, passkey_lengths=(600,)))
    from kvtune.plan import Plan
    from kvtune.plan_types import LayerPlan, ModelIdentity

    other = Plan(layers=(LayerPlan(),) * 3, model=ModelIdentity("LlamaForCausalLM", 3, 4, 2, 16), name="other")
    with pytest.raises(KVTuneError, match="another model"):
        evaluate(model, tok, [plan_method(other)], TEXT, SETTINGS)
    with pytest.raises(ValueError, match="prefill"):
        EvalSettings(ctx=64, prefill=64)
