"""A small real calibration (of the tiny random Llama) saved once for the search tests that read a directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_calib(tiny_llama: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``calib.yaml`` + ``calib.safetensors`` of the tiny Llama on random tokens (a few seconds, once)."""
    from kvtune.calibrate.artifact import save_calibration
    from kvtune.calibrate.pipeline import calibrate_model
    from kvtune.calibrate.settings import CalibSettings

    settings = CalibSettings(tokens=128, seq_len=64, held_seqs=1, held_len=64, attention_seqs=1, kl_seqs=1,
                             kl_len=32, samples=8, hist_bins=16)
    chunks = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    calib = calibrate_model(tiny_llama[0], chunks, settings, data={"source": "pydoc:calib", "sha256": "x"})
    return save_calibration(calib, tmp_path_factory.mktemp("calib") / "calib")
