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
