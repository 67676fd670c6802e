"""Encode one block of tokens of one quantizer spec into stored tensors, and decode them back.

A block is ``F`` consecutive tokens (the layer's ``flush``) of some KV heads: ``x [B, h, F, D]``.
The pipeline is the one of :func:`kvtune.quant.ops.fake_quantize` (that function is the
specification; ``decode(encode(x))`` equals it bit for bit): Hadamard rotation -> outlier split ->
FFT along tokens -> channel-separable normalisation -> grid quantization -> bit packing.

Stored fields (every one concatenates along dim 2, so a store is a dict of growing tensors):

* ``codes``: uint8 ``[B, h, F, packed_width(D', bits)]`` (``D' = D - outliers``);
* ``scale``: ``[B, h, F/G, D']`` (channel axis) or ``[B, h, F, ceil(D'/G)]`` (token axis), scale dtype;
* ``zero``: same shape as ``scale``; absent for symmetric and ternary grids (derived from the scale);
* ``norm``: fp16 ``[B, h, n_blocks, D']``, one row per block (channel-separable only);
* ``out.*``: the outlier channels ``[B, h, F, o]``, fp16 (``out.raw``) or their own channel-axis codec.

A channel-axis spec with ``group = 0`` ("whole axis") groups the tokens of one block, since a
streaming cache never sees the whole axis at once; :mod:`kvtune.quant.bits` counts it the same way.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kvtune.quant.formats import QuantSpec
from kvtune.quant.ops import Quantized, dequantize, pack, quantize, unpack
from kvtune.quant.outliers import merge_channels, split_channels
from kvtune.quant.transforms import channel_norm, fft_tokens, hadamard, ifft_tokens

Fields = dict[str, torch.Tensor]


def streaming_spec(spec: QuantSpec, flush: int) -> QuantSpec:
    """``spec`` with a channel-axis ``group = 0`` resolved to the block length ``flush``."""
    if spec.axis == "channel" and spec.group == 0 and not spec.passthrough:
        return replace(spec, group=flush)
    return spec


def outlier_spec(spec: QuantSpec, flush: int) -> QuantSpec:
    """The quantizer of a spec's outlier channels (channel axis, the main spec's token group)."""
    group = spec.group if spec.axis == "channel" else 0
    return streaming_spec(QuantSpec(bits=spec.outlier_bits, axis="channel", group=group), flush)


def _stores_zero(spec: QuantSpec) -> bool:
    return not (spec.symmetric or spec.format.base == 3)


def _derived_zero(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    half = 1 if spec.format.base == 3 else 2 ** (int(spec.bits) - 1) - 1
    return -half * scale.float()


def _encode_grid(x: torch.Tensor, spec: QuantSpec) -> Fields:
    """Grid-quantize and pack ``x [B, h, F, D']`` (float32)."""
    q = quantize(x, spec)
    fields = {"codes": pack(q.codes, spec.bits), "scale": q.scale}
    if _stores_zero(spec):
        fields["zero"] = q.zero
    return fields


def _decode_grid(fields: Fields, spec: QuantSpec, d: int) -> torch.Tensor:
    """Inverse of :func:`_encode_grid`: float32 ``[B, h, T, d]``."""
    codes = unpack(fields["codes"], spec.bits, d)
    zero = fields["zero"] if "zero" in fields else _derived_zero(fields["scale"], spec)
    return dequantize(Quantized(codes, fields["scale"], zero), spec)


def encode(x: torch.Tensor, spec: QuantSpec, flush: int, idx: torch.Tensor | None = None) -> Fields:
    """Encode whole blocks ``x [B, h, n*F, D]`` with ``spec``; ``idx [h, o]`` are the outlier channels."""
    spec = streaming_spec(spec, flush)
    if spec.passthrough:
        return {"raw": x.to(torch.float16)}
    y = hadamard(x.float()) if spec.hadamard else x.float()
    fields: Fields = {}
    if spec.outliers:
        main, out = split_channels(y, _expand_idx(idx, y))
        ospec = outlier_spec(spec, flush)
        sub = {"raw": out.to(torch.float16)} if ospec.passthrough else _encode_grid(out, ospec)
        fields.update({f"out.{k}": v for k, v in sub.items()})
        y = main
    if spec.fft:
        y = fft_tokens(y, spec.group)
    if spec.channel_separable:
        b, h, t, dm = y.shape
        norm = channel_norm(y.reshape(b, h, t // flush, flush, dm)).to(torch.float16)  # [B, h, nb, 1, D']
        fields["norm"] = norm.squeeze(3)
        y = (y.reshape(b, h, t // flush, flush, dm) / norm.float()).reshape(b, h, t, dm)
    fields.update(_encode_grid(y, spec))
    return fields


def decode(fields: Fields, spec: QuantSpec, flush: int, d: int, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Decode stored fields of ``T`` tokens (whole blocks) back to float32 ``[B, h, T, d]``."""
    spec = streaming_spec(spec, flush)
    if spec.passthrough:
        return fields["raw"].float()
    dm = d - spec.outliers
    y = _decode_grid(fields, spec, dm)
    if spec.channel_separable:
        y = y * fields["norm"].float().repeat_interleave(flush, dim=2)
    if spec.fft:
        y = ifft_tokens(y, spec.group)
    if spec.outliers:
        ospec = outlier_spec(spec, flush)
        sub = {k[4:]: v for k, v in fields.items() if k.startswith("out.")}
        out = sub["raw"].float() if ospec.passthrough else _decode_grid(sub, ospec, spec.outliers)
        y = merge_channels(y, out, _expand_idx(idx, y))
    return hadamard(y) if spec.hadamard else y


def _expand_idx(idx: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Outlier indices ``[h, o]`` broadcast to ``[B, h, o]`` for tensors ``[B, h, T, *]``."""
    if idx is None:
        raise ValueError("a spec with outlier channels needs their indices")
    return idx.to(device=x.device, dtype=torch.long).unsqueeze(0).expand(x.shape[0], *idx.shape)
