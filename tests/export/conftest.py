"""Export fixtures: a tiny random Llama (6 layers, 2 KV heads, head dim 64) saved with save_pretrained, and a
small calibration of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

LAYERS, KV_HEADS = 6, 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kvtune.models import tiny_model

    out = tmp_path_factory.mktemp("tiny")
    tiny_model(layers=LAYERS, heads=4, kv_heads=KV_HEADS, head_dim=64).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def calib_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    from kvtune.calibrate.artifact import save_calibration
    from kvtune.calibrate.pipeline import calibrate_model
    from kvtune.calibrate.settings import CalibSettings

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
        settings = CalibSettings(tokens=128, seq_len=64, held_len=64, kl_len=32, attention_seqs=1)
        calib = calibrate_model(model, ids, settings, data={"source": "random", "sha256": "0" * 64})
    finally:
        torch.set_num_threads(before)
    return save_calibration(calib, tmp_path_factory.mktemp("calib"))
