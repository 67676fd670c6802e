"""Launch configuration of the fused decode attention kernel (tile size, splits, warps, stages)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


def _p2(n: int) -> int:
    """Smallest power of two >= max(n, 1), in plain Python (``triton.next_power_of_2`` costs ~10 us a call
    on the decode launch path)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


@lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class DecodeConfig:
    """Launch choices: tokens a tile, splits of the quantized sequence, warps, pipeline stages, a register cap
    per thread (None: the compiler's choice; a lower cap fits more programs on a multiprocessor), and the rows of a
    program's query tile (its ``n_rep`` query heads padded to the power of two >= ``max(query_rows, n_rep)``).

    Eight rows, not sixteen: an ``m16n8k16`` product pads an 8-row operand itself, and every ``[rows, tokens]``
    accumulator fragment then holds one row half, not two. Compiled offline for sm_90 with the Triton the H200 runs
    (3.6; benchmarks/results/kernel_sass_sm90.json, tree fd10103), the hot loop of every 2-bit format at the
    Llama-3-8B shape issues 14-17% fewer instructions a token (normq2-log8: 22.8 warp instructions vs 26.6) and fits
    168 registers with no spill (16 rows: up to 104 bytes of stack), and KIVI 4-bit fits it with 24 bytes (16 rows:
    192).
    """

    block_t: int
    num_splits: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None
    query_rows: int = 8

    def rows(self, n_rep: int) -> int:
        """Rows of the query tile for ``n_rep`` query heads a KV head."""
        return _p2(max(self.query_rows, n_rep))

    def launch_options(self) -> dict[str, int]:
        """Compile options of a launch: warps, stages and (when set) ``maxnreg``."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        return opts | ({"maxnreg": self.max_registers} if self.max_registers else {})


# registers a thread under which three 4-warp programs fit on a multiprocessor (65536 / (3 * 128), rounded down to 8)
THREE_PROGRAMS_REGS = 168
# value code widths whose 4-warp, 128-token tiles fit that cap without spills (8-row query tiles, sm_90)
CAPPED_BITS = (2, 4)


def tile_choice(d: int, value_width: int | None = None, value_bits: float | None = None,
                gpu: bool = True) -> tuple[int, int, int, int | None]:
    """``(block_t, num_warps, num_stages, max_registers)`` of a launch over heads of ``d`` channels whose values are
    ``value_bits`` codes in slices of ``value_width`` channels (``gpu`` False: the interpreter's single stage, no cap).

    Warps: 4, unless a value slice is narrower than 32 lanes after padding to a power of two (2-bit codes of a
    64-channel head: 16; 1-bit codes of a 128-channel head: 16), where the ``[QH, BT] @ [BT, W]`` products cannot
    spread 4 warps over W (Triton would replicate the whole tile on every warp): then one warp on 64-token tiles.
    1.58-bit slices of a 128-channel head (26 channels, 32 lanes) take 4 warps: Lloyd-Max 2-bit keys with them
    0.223 ms vs 0.347 on one warp (Llama-3-8B, B=8, 32k; benchmarks/results/kernel_formats_llama3-8b_h200.json).

    Registers: left to the compiler, 16-row tiles took all 255 a thread, so only two 4-warp programs shared a
    multiprocessor (8 warps: the kernel is latency-bound, ~0.4 instructions issued a cycle a scheduler). For
    2-bit values on 128-token tiles a cap of 168 fit three: Llama-3-8B, B=8, 32k, 0.159 ms instead of 0.190
    (decode_kernel_h200_sweep.json; 8k: 0.051 vs 0.059, B=1 unchanged). 4-bit 16-row tiles spilled at that cap
    and ran slower (0.201 vs 0.195 ms; benchmarks/results/decode_kernel_variants_h200.json); 8-row tiles
    (:class:`DecodeConfig`) fit it without spills (benchmarks/results/kernel_sass_sm90.json), so 4-bit takes the
    cap too. One-warp tiles take none (SmolLM2 shape, capped: 0.060 vs 0.032 ms).
    """
    narrow = value_width is not None and _p2(value_width) < 32  # lanes after padding (1.58-bit, D=128: 26 -> 32)
    block_t = 64 if narrow or d > 128 else 128
    warps = 1 if narrow else 4
    cap = THREE_PROGRAMS_REGS if gpu and warps == 4 and block_t == 128 and value_bits in CAPPED_BITS else None
    return block_t, warps, 3 if gpu else 1, cap


@lru_cache(maxsize=256)
def default_config(batch: int, hkv: int, t: int, d: int, device: torch.device,
                   value_width: int | None = None, value_bits: float | None = None) -> DecodeConfig:
    """Launch choice for ``batch * hkv`` sequences of ``t`` quantized tokens (values of ``value_bits`` codes in
    slices of ``value_width`` channels): the tiles of :func:`tile_choice`, and splits.

    Splits: about 8 programs a multiprocessor (of 1 or 4 warps), each with >= 2 tiles when possible. On the H200
    at B=8, 32k, 2-bit this is the fastest swept split count for the SmolLM2 shape (44 splits: 0.033 ms vs 0.037 at
    88 and 0.056 at 22) and within 7% of it for Llama-3-8B (17 splits: 0.19 ms; 4: 0.18, 5: 0.25, 9: 0.21).
    """
    gpu = device.type == "cuda"
    block_t, warps, stages, cap = tile_choice(d, value_width, value_bits, gpu)
    sms = _num_sms(device.index or 0) if gpu else 4
    tiles = max(1, math.ceil(t / block_t))
    programs = 8 * sms
    splits = max(1, min(math.ceil(programs / max(batch * hkv, 1)), math.ceil(tiles / 2)))
    # ROCm's matrix cores have no 8-row shape: Triton falls back to FMAs there, so tiles keep 16 rows
    return DecodeConfig(block_t, splits, warps, stages, cap, 16 if torch.version.hip else 8)
