"""calibrate -> search -> eval on a tiny hybrid model (Gemma 3 style: 5 sliding layers of 16 tokens + 1 global)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtune.plan import load_plan
from kvtune.runtime import teacher_forced_logits
from kvtune.tiny import tiny_model


def test_calibrate_search_eval_on_a_hybrid_model(tmp_path: Path) -> None:
    from kvtune.calibrate.artifact import save_calibration
    from kvtune.calibrate.pipeline import calibrate_model
    from kvtune.calibrate.settings import CalibSettings
    from kvtune.search import search

    model = tiny_model("gemma3", layers=6, heads=2, kv_heads=1, head_dim=64, window=16)
    settings = CalibSettings(tokens=128, seq_len=64, held_seqs=1, held_len=64, attention_seqs=1, kl_seqs=1,
                             kl_len=32, samples=8, hist_bins=16)
    chunks = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    calib = calibrate_model(model, chunks, settings, data={"source": "random", "sha256": "x"})
    assert calib.model["layout"] == ["sliding:16"] * 5 + ["global"]
    calib_dir = save_calibration(calib, tmp_path / "calib")
    result = search(calib_dir, "4bit", out=tmp_path / "plan", trials=12, validate=0, seed=0)
    plan = load_plan(tmp_path / "plan")
    assert plan.model is not None and plan.model.layout is not None and plan.model.layout.windowed
    assert plan.effective_bits() <= 4.0 + 1e-9
    assert result is not None
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.float()
    logits = teacher_forced_logits(model, plan, ids, chunk=8, prefill=16)
    assert torch.isfinite(logits).all()
    assert float((ref.softmax(-1) * (ref.log_softmax(-1) - logits.log_softmax(-1))).sum(-1).mean()) < 0.5
    cache = plan.cache(model)
    teacher_forced_logits(model, cache, ids, chunk=8, prefill=16)
    assert cache.nbytes() * 8 == pytest.approx(plan.bits(64).total)
