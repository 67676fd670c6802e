"""Packed K/V of one layer as the decode kernels read them, and their PyTorch reference (the specification).

:class:`PackedKeys` / :class:`PackedValues` bundle codes (layout of :mod:`kvtune.quant.codes`), scales and
optional zero-points. Every element dequantizes as ``scale * (code_scale * c' + code_offset) + zero``: an
integer grid (``affine``: ``code_scale = 1``, ``code_offset = 0``) or codebook levels scaled per token (``normq``:
no zero-point). ``c' = c + code_bend * (c >= 2)``: evenly spaced levels have ``code_bend = 0`` (``c' = c``); a
symmetric 2-bit codebook ``l0 < l1 < l2 < l3`` (``l3 - l2 = l1 - l0``, e.g. Lloyd-Max for N(0, 1)) is affine in the
code's two bits and reads ``code_scale = l1 - l0``, ``code_offset = l0``, ``code_bend = (l2 - l0) / (l1 - l0) - 2``
(2-bit codes only). Per-token scales may be stored in one byte on a log scale (``normq``'s ``log8``):
with ``scale_range`` float ``[Hkv, 2]`` = ``(lo, hi)`` set, ``scale`` is uint8 ``pos`` and means
``exp2(lo_h + pos * span_h / 255)``, ``span_h = max(hi_h - lo_h, 1e-3)`` (keys ``axis="token"``, values with one
channel group only). :func:`decode_attention_reference` dequantizes everything and runs an fp32
softmax: the kernel in :mod:`kvtune.kernels.decode_attention` is tested against it. Torch only (no triton).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtune.quant.codes import slicing, unpack
from kvtune.quant.grid import LOG_SPAN_FLOOR

AXES = ("channel", "token")


@dataclass(frozen=True)
class _PackedCodes:
    """Codes plus their scale and (optional) zero-point tensors; bits: 1, 1.58, 2, 3, 4 or 8."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: float
    group: int
    code_scale: float = 1.0
    code_offset: float = 0.0
    scale_range: torch.Tensor | None = None
    code_bend: float = 0.0

    @property
    def bent(self) -> bool:
        """2-bit codes whose upper two levels are shifted by ``code_bend`` steps (a symmetric codebook)."""
        return self.code_bend != 0.0

    @property
    def affine(self) -> bool:
        """Codes are plain integers (``code_scale = 1``, ``code_offset = 0``)."""
        return self.code_scale == 1.0 and self.code_offset == 0.0

    def _check_bend(self) -> None:
        if self.bent and (self.bits != 2 or not math.isfinite(self.code_bend)):
            raise ValueError(f"code_bend (a symmetric 2-bit codebook) needs 2-bit codes and a finite bend, got "
                             f"bits={self.bits}, code_bend={self.code_bend}")

    def _check_zero(self) -> None:
        if self.zero is not None and self.zero.shape != self.scale.shape:
            raise ValueError(f"zero {tuple(self.zero.shape)} must have the scale's shape {tuple(self.scale.shape)}")

    def _check_range(self, per_token: bool) -> None:
        """A log-scale range needs uint8 per-token scales and is float ``[Hkv, 2]``; uint8 scales need one."""
        if self.scale_range is None:
            if self.scale.dtype == torch.uint8:
                raise ValueError("uint8 (log8) scales need their scale_range [Hkv, 2]")
            return
        if not per_token:
            raise ValueError("log8 scales (scale_range) need per-token scales: keys axis='token', values one "
                             "channel group (group 0 or >= D)")
        if self.scale.dtype != torch.uint8:
            raise ValueError(f"log8 scales (scale_range set) must be uint8, got {self.scale.dtype}")
        h = self.packed.shape[1]
        r = self.scale_range
        if tuple(r.shape) != (h, 2) or not r.is_floating_point() or r.device != self.scale.device:
            raise ValueError(f"scale_range must be float [Hkv={h}, 2] on {self.scale.device}, got {r.dtype} "
                             f"{tuple(r.shape)} on {r.device}")

    def _scales(self) -> torch.Tensor:
        """fp32 scales, shaped as ``scale``: the stored ones, or ``exp2(lo + pos * span / 255)`` per head."""
        if self.scale_range is None:
            return self.scale.float()
        r = self.scale_range.to(device=self.scale.device, dtype=torch.float32)[:, None, None]  # [Hkv, 1, 1, 2]
        lo = r[..., 0]
        span = (r[..., 1] - lo).clamp_min(LOG_SPAN_FLOOR)
        return torch.exp2(lo + self.scale.float() * span / 255)

    def _levels(self, d: int) -> torch.Tensor:
        c = unpack(self.packed, self.bits, d).float()
        if self.bent:
            c = c + self.code_bend * (c >= 2)
        return c * self.code_scale + self.code_offset


@dataclass(frozen=True)
class PackedKeys(_PackedCodes):
    """Packed keys of one layer.

    packed: uint8 ``[B, Hkv, T, row_bytes]`` (last dim contiguous). ``axis="channel"``: scale (zero) fp16
    ``[B, Hkv, T/group, D]``, one row per group of ``group`` tokens (KIVI). ``axis="token"``: scale (zero) fp16
    ``[B, Hkv, T, 1]``, one per token (``group`` unused), or with ``scale_range`` float ``[Hkv, 2]`` uint8 log8
    positions (see the module docstring).
    """

    axis: str = "channel"

    def __post_init__(self) -> None:
        b, h, t, _ = self.packed.shape
        if self.axis not in AXES:
            raise ValueError(f"key axis must be one of {AXES}, got {self.axis!r}")
        self._check_zero()
        self._check_bend()
        self._check_range(self.axis == "token")
        if self.axis == "token":
            if tuple(self.scale.shape) != (b, h, t, 1):
                raise ValueError(f"per-token key scale must be [B, Hkv, T, 1], got {tuple(self.scale.shape)}")
            return
        if self.group <= 0 or t % self.group:
            raise ValueError(f"T={t} must be a multiple of the key group {self.group}")
        if tuple(self.scale.shape[:3]) != (b, h, t // self.group):
            raise ValueError(f"key scale/zero must be [B, Hkv, T/G, D], got {tuple(self.scale.shape)}")
        if self.packed.shape[-1] != slicing(self.bits, self.scale.shape[-1]).row_bytes:
            raise ValueError(f"packed keys have {self.packed.shape[-1]} bytes a row, expected "
                             f"{slicing(self.bits, self.scale.shape[-1]).row_bytes}")


@dataclass(frozen=True)
class PackedValues(_PackedCodes):
    """Packed values of one layer (per-token groups of ``group`` channels; 0 = all D).

    packed: uint8 ``[B, Hkv, T, row_bytes]``; scale (zero) fp16 ``[B, Hkv, T, ceil(D/group)]``, or with
    ``scale_range`` float ``[Hkv, 2]`` uint8 log8 positions ``[B, Hkv, T, 1]`` (one channel group).
    The head dim ``D`` is taken from the keys or the query.
    """

    def __post_init__(self) -> None:
        if self.group < 0:
            raise ValueError(f"value group must be >= 0, got {self.group}")
        self._check_zero()
        self._check_bend()
        self._check_range(self.scale.dim() == 4 and self.scale.shape[-1] == 1)
        if tuple(self.scale.shape[:3]) != tuple(self.packed.shape[:3]):
            raise ValueError(f"value scale/zero must be [B, Hkv, T, D/Gc], got {tuple(self.scale.shape)}")


def _zero(x: torch.Tensor | None) -> torch.Tensor | float:
    return 0.0 if x is None else x.float()


def dequantize_keys_reference(kq: PackedKeys, d: int) -> torch.Tensor:
    """fp32 keys ``[B, Hkv, T, D]``: ``scale * (code_scale * c' + code_offset) + zero`` per group or token."""
    if kq.axis == "token":
        return kq._levels(d) * kq._scales() + _zero(kq.zero)
    scale = kq.scale.float().repeat_interleave(kq.group, dim=2)
    zero = 0.0 if kq.zero is None else kq.zero.float().repeat_interleave(kq.group, dim=2)
    return kq._levels(d) * scale + zero


def dequantize_values_reference(vq: PackedValues, d: int) -> torch.Tensor:
    """fp32 values ``[B, Hkv, T, D]``: ``scale[t, e // Gc] * (code_scale * c' + code_offset) + zero[t, e // Gc]``."""
    gc = min(vq.group or d, d)
    scale = vq._scales().repeat_interleave(gc, dim=-1)[..., :d]
    zero = 0.0 if vq.zero is None else vq.zero.float().repeat_interleave(gc, dim=-1)[..., :d]
    return vq._levels(d) * scale + zero


def decode_attention_reference(q: torch.Tensor, kq: PackedKeys, vq: PackedValues,
                               extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None,
                               extra_len: torch.Tensor | None = None, start: torch.Tensor | None = None,
                               scaling: float | None = None) -> torch.Tensor:
    """PyTorch twin of :func:`decode_attention` (dequantize everything, fp32 softmax); same arguments."""
    # q: [B, Hq, 1, D]
    bsz, hq, _, d = q.shape
    k = dequantize_keys_reference(kq, d)  # [B, Hkv, T, D]
    v = dequantize_values_reference(vq, d)
    t = k.shape[2]
    valid = torch.ones(bsz, t, dtype=torch.bool, device=q.device)
    if start is not None:
        valid &= torch.arange(t, device=q.device)[None, :] >= start.to(q.device)[:, None]
    if extra_k is not None and extra_k.shape[2]:
        r = extra_k.shape[2]
        if extra_len is None:
            ev = torch.ones(bsz, r, dtype=torch.bool, device=q.device)
        elif extra_len.dtype == torch.bool:
            ev = extra_len.to(q.device)
        else:
            ev = torch.arange(r, device=q.device)[None, :] < extra_len.to(q.device)[:, None]
        k, v = torch.cat([k, extra_k.float()], 2), torch.cat([v, extra_v.float()], 2)
        valid = torch.cat([valid, ev], 1)
    n_rep = hq // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    scaling = 1.0 / math.sqrt(d) if scaling is None else scaling
    s = (q.float() @ k.transpose(-1, -2)) * scaling  # [B, Hq, 1, T+R]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v).to(q.dtype)
