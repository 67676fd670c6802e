"""Launch choices of the decode kernel (no GPU, no triton): the register cap reaches the launch only when set."""

from __future__ import annotations

import torch

from kvtune.kernels.decode_config import DecodeConfig, default_config


def test_launch_options_carry_the_register_cap_only_when_set() -> None:
    assert DecodeConfig(128, 17, 4, 3).launch_options() == {"num_warps": 4, "num_stages": 3}
    assert DecodeConfig(128, 17, 4, 3, 168).launch_options() == {"num_warps": 4, "num_stages": 3, "maxnreg": 168}


def test_no_register_cap_off_the_gpu() -> None:
    """The interpreter (CPU) takes no compile options beyond warps and stages."""
    cfg = default_config(8, 8, 32640, 128, torch.device("cpu"), 32, 2)
    assert cfg.max_registers is None and cfg.num_warps == 4 and cfg.block_t == 128


def test_query_rows_follow_the_backend(monkeypatch) -> None:
    """8 rows where an m16n8k16 product pads them itself (NVIDIA, the interpreter), 16 on ROCm (no 8-row matrix
    core shape); n_rep above that grows the tile to its power of two."""
    default_config.cache_clear()
    cfg = default_config(1, 8, 4096, 128, torch.device("cpu"), 32, 2)
    assert cfg.query_rows == 8 and cfg.rows(4) == 8 and cfg.rows(12) == 16 and cfg.rows(32) == 32
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    default_config.cache_clear()
    try:
        assert default_config(1, 8, 4096, 128, torch.device("cpu"), 32, 2).rows(4) == 16
    finally:
        default_config.cache_clear()
