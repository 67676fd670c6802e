"""Every method preset, and a searched plan, through calibrate -> search -> eval on a tiny random LLaVA.

The VLM (created locally: no weights can be downloaded) is calibrated and evaluated on its language model
with text-only inputs: this checks the plumbing end to end for a VLM class, not quality (quality claims are
made only on the real text model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvtune.calibrate.artifact import save_calibration
from kvtune.calibrate.pipeline import calibrate_model
from kvtune.calibrate.settings import CalibSettings
from kvtune.eval import EvalSettings, evaluate
from kvtune.eval.baselines import plan_method, resolve_baselines

from .conftest import CharTokenizer, word_text

PRESETS = ["akvq-vl-2bit", "vidkv-1.5bit", "vidkv-1.58bit", "zipcache", "elastic-cache", "fp16"]


def test_presets_and_a_searched_plan_through_calibrate_search_eval(tiny_llava: Any, tmp_path: Path) -> None:
    from kvtune.search import search

    model = tiny_llava[0]

    chunks = torch.randint(1, 128, (2, 128), generator=torch.Generator().manual_seed(0))
    settings = CalibSettings(tokens=256, seq_len=128, held_seqs=1, held_len=128, attention_seqs=1, kl_len=64)
    calib = calibrate_model(model, chunks, settings)
    assert calib.model["num_layers"] == 2 and calib.model["head_dim"] == 64
    save_calibration(calib, tmp_path / "calib")
    result = search(tmp_path / "calib", 4.0, out=tmp_path / "plan", trials=12, validate=0)
    assert result.effective_bits <= 4.0

    methods = [plan_method(result.plan), *resolve_baselines(PRESETS)]
    report = evaluate(model, CharTokenizer(), methods, word_text(600),
                      EvalSettings(ctx=96, sequences=1, chunk=32, gen_tokens=4, passkey_lengths=(),
                                   passkey_depths=(0.5,)), jobs=1)
    rows = {r.name: r for r in report.rows}
    assert all(r.error is None for r in report.rows), [(r.name, r.error) for r in report.rows]
    assert set(PRESETS) <= set(rows)
    for r in report.rows:
        assert r.ppl is not None and torch.isfinite(torch.tensor(r.ppl)) and r.kl >= 0
    assert rows["fp16"].kl == pytest.approx(0.0, abs=1e-4)
