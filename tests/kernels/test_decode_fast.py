"""The swapped decode kernel (:mod:`kvtune.kernels.decode_fast`) against the PyTorch reference, including the
device-side lengths of a fixed (CUDA-graph) launch. Compiled on a GPU, interpreted elsewhere (as in
test_triton_interpret.py)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed")

from kvtune.kernels import decode_fast as df
from kvtune.kernels.packed import PackedKeys, PackedValues, decode_attention_reference
from kvtune.quant.codes import code_format
from kvtune.quant.codes import pack as pack_codes

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
if DEV == "cpu" and not isinstance(df._fast_split_kernel, triton.runtime.interpreter.InterpretedFunction):
    pytest.skip("kvtune.kernels was imported compiled before TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)


def _case(bk: int, bv: int, *, d=64, t=256, b=2, hkv=2, nrep=3, g=64, kax="channel", kzero=True, vzero=True,
          step=1.0, off=0.0, r=7, seed=0):
    """Random packed K/V (codes uniform over the levels, scales ~1 / levels), q and a fp16 extra segment."""
    gen = torch.Generator().manual_seed(seed)
    lk, lv = code_format(bk).levels, code_format(bv).levels
    kc = torch.randint(0, lk, (b, hkv, t, d), generator=gen, dtype=torch.uint8)
    vc = torch.randint(0, lv, (b, hkv, t, d), generator=gen, dtype=torch.uint8)
    rows = t // g if kax == "channel" else t
    width = d if kax == "channel" else 1
    ks = (torch.rand(b, hkv, rows, width, generator=gen) + 0.5).half() / lk
    kz = torch.randn(b, hkv, rows, width, generator=gen).half() if kzero else None
    vs = (torch.rand(b, hkv, t, 1, generator=gen) + 0.5).half() / lv
    vz = torch.randn(b, hkv, t, 1, generator=gen).half() if vzero else None
    kq = PackedKeys(pack_codes(kc, bk), ks, kz, bk, g if kax == "channel" else 0, step, off, axis=kax)
    vq = PackedValues(pack_codes(vc, bv), vs, vz, bv, 0, step, off)
    q = torch.randn(b, hkv * nrep, 1, d, generator=gen).half()
    ek = torch.randn(b, hkv, r, d, generator=gen).half()
    ev = torch.randn(b, hkv, r, d, generator=gen).half()
    return q, kq, vq, ek, ev


def _dev(x):
    import dataclasses

    if isinstance(x, (PackedKeys, PackedValues)):
        return dataclasses.replace(x, packed=x.packed.to(DEV), scale=x.scale.to(DEV),
                                   zero=None if x.zero is None else x.zero.to(DEV))
    return None if x is None else x.to(DEV)


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=2e-3 * max(1.0, float(ref.abs().max())), rtol=0)


@pytest.mark.parametrize(("bk", "bv", "d", "g", "nrep"), [(2, 2, 64, 64, 3), (2, 2, 128, 128, 4), (4, 2, 64, 32, 2),
                                                          (8, 4, 64, 32, 1), (4, 8, 128, 64, 8), (2, 4, 32, 64, 3)])
@pytest.mark.parametrize("extra", ["len", "mask", "all", "none"])
def test_fast_matches_reference(bk: int, bv: int, d: int, g: int, nrep: int, extra: str) -> None:
    q, kq, vq, ek, ev = _case(bk, bv, d=d, g=g, nrep=nrep, seed=bk * 10 + bv)
    start = torch.tensor([0, 37], dtype=torch.int32)
    ext = {"len": torch.tensor([7, 3]), "mask": torch.rand(2, 7, generator=torch.Generator().manual_seed(1)) > 0.4,
           "all": None, "none": None}[extra]
    ek, ev = (None, None) if extra == "none" else (ek, ev)
    assert df.fast_eligible(kq, vq, d)
    out = df.decode_fast(*map(_dev, (q, kq, vq, ek, ev, ext, start)))
    _close(out, decode_attention_reference(q, kq, vq, ek, ev, ext, start))


@pytest.mark.parametrize(("kzero", "vzero"), [(True, True), (False, False), (True, False)])
def test_fast_per_token_keys_and_code_maps(kzero: bool, vzero: bool) -> None:
    """normq-style operands: per-token key scales, no zero-points, evenly spaced levels (code_scale/offset)."""
    q, kq, vq, ek, ev = _case(2, 2, kax="token", kzero=kzero, vzero=vzero, step=0.9957, off=-1.4935)
    start = torch.tensor([5, 0], dtype=torch.int32)
    out = df.decode_fast(*map(_dev, (q, kq, vq, ek, ev, None, start)))
    _close(out, decode_attention_reference(q, kq, vq, ek, ev, None, start))


@pytest.mark.parametrize(("t", "splits", "block_t"), [(320, 3, 64), (64, 4, 32), (0, 2, 64)])
def test_fast_device_lengths(t: int, splits: int, block_t: int) -> None:
    """A fixed launch over a capacity of 384 tokens: ``t`` in use (read from device memory), extra tokens
    ``extra_start[b] <= r < extra_count`` valid; equals the reference over exactly those tokens."""
    cap = 384
    q, kq, vq, ek, ev = _case(2, 4, t=cap, g=32, r=9)
    count, estart = torch.tensor([6], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32)
    cfg = df.DecodeConfig(block_t, splits, 4, 1)
    out = df.decode_fast(*map(_dev, (q, kq, vq, ek, ev)), config=cfg, t_dev=_dev(torch.tensor([t], dtype=torch.int32)),
                         extra_count=_dev(count), extra_start=_dev(estart))
    import dataclasses

    used_k = dataclasses.replace(kq, packed=kq.packed[:, :, :t], scale=kq.scale[:, :, : t // 32],
                                 zero=kq.zero[:, :, : t // 32])
    used_v = dataclasses.replace(vq, packed=vq.packed[:, :, :t], scale=vq.scale[:, :, :t], zero=vq.zero[:, :, :t])
    mask = (torch.arange(9)[None, :] < 6) & (torch.arange(9)[None, :] >= estart[:, None])
    _close(out, decode_attention_reference(q, used_k, used_v, ek, ev, mask))


def test_fast_static_key_rows() -> None:
    """``static``-family keys: one step row per head broadcast over the groups (stride 0), no zero-point, centred
    codes (code_offset); the kernel then tiles freely (tiles larger than the nominal 16-token group)."""
    import dataclasses

    q, kq, vq, ek, ev = _case(2, 2, d=64, t=256, g=16, kzero=False, off=-1.5)
    row = kq.scale[:, :, :1]                                     # [B, Hkv, 1, D]
    kq = dataclasses.replace(kq, scale=row.expand(-1, -1, 256 // 16, -1), code_scale=1.0, code_offset=-1.5)
    vq = dataclasses.replace(vq, code_scale=1.0, code_offset=0.0)
    assert kq.scale.stride(2) == 0 and df.fast_eligible(kq, vq, 64)
    start = torch.tensor([0, 21], dtype=torch.int32)
    kd = dataclasses.replace(_dev(kq), scale=row.to(DEV).expand(-1, -1, 256 // 16, -1))  # keep stride 0 on a GPU
    out = df.decode_fast(q.to(DEV), kd, *map(_dev, (vq, ek, ev, None, start)), config=df.DecodeConfig(64, 2, 4, 1))
    _close(out, decode_attention_reference(q, kq, vq, ek, ev, None, start))
