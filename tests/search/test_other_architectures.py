"""calibrate -> search (validated, never worse than a baseline) on a local model directory of another family.

A tiny random model of another architecture (Qwen2) with the embedded model's tokenizer, saved as an ordinary
HF directory, goes through the same commands a user runs. Random weights
make no quality claim; what is checked is the contract: a plan within the budget, validated on held-out text
at the longest fidelity, never worse there than the best baseline within the budget.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtune.cli import main
from kvtune.plan import load_plan
from kvtune.search import search
from kvtune.search.halving import Fidelity, Schedule


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2"])  # another family (q/k/v biases); ~1 min on 2 cores
def test_calibrate_search_never_worse_on_another_family(tmp_path: Path, arch: str) -> None:
    from transformers import AutoTokenizer

    from kvtune.models import embedded_dir, tiny_model

    tok = AutoTokenizer.from_pretrained(embedded_dir("smollm2-135m"))
    model_dir = tmp_path / arch
    tiny_model(arch, layers=2, heads=4, kv_heads=2, head_dim=32, vocab=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    calib = tmp_path / "calib"
    assert main(["calibrate", "--model", str(model_dir), "--tokens", "512", "--seq-len", "128", "--out",
                 str(calib), "--no-progress"]) == 0
    schedule = Schedule((Fidelity(128, 1, 64), Fidelity(512, 1, 128)), (3,))
    r = search(calib, "2.5bit", out=tmp_path / "plan", trials=40, validate=3, model=str(model_dir),
               validation=schedule, seed=0)
    assert r.effective_bits <= 2.5 and load_plan(tmp_path / "plan").effective_bits() <= 2.5
    j = r.judgement
    assert j is not None and j["best_baseline"] is not None, "validation ran and saw baselines"
    rows = j["entries"]
    longest = max(e["length"] for e in rows if e.get("length"))
    assert longest == 512  # the model's position limit caps the schedule
    won, best = rows[j["winner"]], rows[j["best_baseline"]]
    assert won["length"] == best["length"] == longest
    assert won["kl"] <= best["kl"]  # never worse than the best baseline within the budget
    assert r.validation["text"].startswith("pydoc:calib tokens 512..")  # held out: after what calibration read
