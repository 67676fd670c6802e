"""Calibration test fixtures: one torch thread (small ops on a busy 2-core box are far faster single-threaded)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_calibration() -> object:
    """A :class:`Calibration` of a tiny random Llama (2 layers, 4 heads, 2 KV heads, head dim 16), 4 x 64 tokens."""
    from kvtune.calibrate.pipeline import calibrate_model
    from kvtune.calibrate.settings import CalibSettings
    from kvtune.models import tiny_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
        settings = CalibSettings(tokens=256, seq_len=64, held_len=64, kl_len=32, attention_seqs=2)
        return calibrate_model(tiny_model("llama"), ids, settings, data={"source": "random", "sha256": "0" * 64})
    finally:
        torch.set_num_threads(before)
