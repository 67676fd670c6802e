"""The fused decode attention kernel, and the packed layout it reads, against an independent PyTorch reference.

Runs on a CUDA GPU when there is one (compiled kernels, inline-PTX unpacking) and otherwise under the
Triton interpreter: ``TRITON_INTERPRET=1`` is set here, before the kernel modules are imported (triton
reads it when a ``@triton.jit`` function is defined). CI exports it for the whole suite; if a kernel
module was already imported compiled in this process without a GPU, the tests skip with a reason.
The reference below is written from the storage-format text (strided packing, KIVI grids), not from
:mod:`kvtune.quant` (whose ``affine`` family packs the codes the kernel reads: checked against it here).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed")

from kvtune.kernels import decode_attention as da
from kvtune.quant import codec
from kvtune.quant.codes import slicing
from kvtune.quant.formats import kivi_key, kivi_value

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
if DEV == "cpu" and not isinstance(da._decode_split_kernel, triton.runtime.interpreter.InterpretedFunction):
    pytest.skip("kvtune.kernels was imported compiled before TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)

BITS = (1, 1.58, 2, 3, 4, 8)
TOL = 2e-3


# ------------------------------------------------------------------------- reference (from the spec)
def _levels(bits: float) -> int:
    return 3 if bits == 1.58 else 2 ** int(bits)


def ref_quantize(x: torch.Tensor, bits: float, axis: str, group: int):
    """Codes [.., T, D] (int64) and fp16 scale/zero: keys per channel over G tokens, values per token."""
    t, d = x.shape[-2:]
    x = x.float()
    if axis == "channel":
        xg, dim = x.unflatten(-2, (t // group, group)), -2
    else:
        g = min(group or d, d)
        pad = (-d) % g
        xg = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], -1) if pad else x
        xg, dim = xg.unflatten(-1, (-1, g)), -1
    lo, hi = xg.amin(dim, keepdim=True), xg.amax(dim, keepdim=True)
    if bits == 1.58:
        scale = torch.maximum(lo.abs(), hi.abs()).half().float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = -scale
    else:
        zero = lo.half().float()
        scale = ((hi - zero) / (_levels(bits) - 1)).half().float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((xg - zero) / scale).clamp(0, _levels(bits) - 1).long()
    codes = codes.flatten(-3, -2) if axis == "channel" else codes.flatten(-2)[..., :d]
    return codes, scale.squeeze(dim).half(), zero.squeeze(dim).half()


def _plane_unpack(p: torch.Tensor, per: int, width: int, base: int, d: int) -> torch.Tensor:
    nb = math.ceil(d / per)
    e = torch.arange(d, device=p.device)
    byte, slot = p[..., e % nb].long(), e // nb
    if base == 3:
        return (byte // (3 ** slot)) % 3
    return (byte >> (slot * width)) & ((1 << width) - 1)


def ref_unpack(p: torch.Tensor, bits: float, d: int) -> torch.Tensor:
    """Strided layout: channel e in byte e % nbytes, slot e // nbytes; 3-bit = 2-bit plane + 1-bit plane."""
    if bits == 1.58:
        return _plane_unpack(p, 5, 0, 3, d)
    if bits == 3:
        nb2 = math.ceil(d / 4)
        return _plane_unpack(p[..., :nb2], 4, 2, 2, d) | (_plane_unpack(p[..., nb2:], 8, 1, 2, d) << 2)
    return _plane_unpack(p, 8 // int(bits), int(bits), 2, d)


def ref_attention(q, k, v, valid, scaling):
    """q [B, Hq, 1, D]; k, v [B, Hkv, N, D] fp32; valid [B, N] bool -> fp32 [B, Hq, 1, D]."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    s = (q.float() @ k.transpose(-1, -2)) * scaling
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


# ------------------------------------------------------------------------------------------ helpers
def pack(x: torch.Tensor, bits: float, group: int, role: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero)`` of ``x [..., T, D]`` as the runtime stores them (the ``affine`` family): keys per
    channel over ``group`` tokens, values per token over ``group`` channels; ternary derives its zero."""
    spec = kivi_key(bits, group) if role == "key" else kivi_value(bits, group)
    f = codec.encode(x.float(), spec, x.shape[-2])
    return f["codes"], f["scale"], f.get("zero", -f["scale"])



def _case(bits_k, bits_v, n_rep, d, *, b=2, hkv=1, t=64, r=5, g=32, gc=32, extra="len", pad=True, seed=0,
          dtype=torch.float16):
    """Random K/V packed by the kernels, plus what the reference needs."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, t, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, t, d, generator=gen).to(dtype)
    q = torch.randn(b, hkv * n_rep, 1, d, generator=gen).to(dtype)
    ek = torch.randn(b, hkv, r, d, generator=gen).to(dtype)
    ev = torch.randn(b, hkv, r, d, generator=gen).to(dtype)
    kq = da.PackedKeys(*pack(k.to(DEV), bits_k, g, "key"), bits_k, g)
    vq = da.PackedValues(*pack(v.to(DEV), bits_v, gc, "value"), bits_v, gc)
    start = torch.tensor([0, 21, 40, 7][:b], dtype=torch.int32) if pad else None
    ext = {"none": None, "all": None, "len": torch.tensor([r, 2, 0, 3][:b]),
           "mask": torch.rand(b, r, generator=gen) > 0.4}[extra]
    return q, k, v, kq, vq, ek, ev, ext, start


def _reference(q, kq, vq, ek, ev, ext, start, extra, d):
    kc = ref_unpack(kq.packed.cpu(), kq.bits, d).float()
    kd = (kc * kq.scale.cpu().float().repeat_interleave(kq.group, 2)
          + kq.zero.cpu().float().repeat_interleave(kq.group, 2))
    gc = min(vq.group or d, d)
    vc = ref_unpack(vq.packed.cpu(), vq.bits, d).float()
    vd = vc * vq.scale.cpu().float().repeat_interleave(gc, -1)[..., :d] + \
        vq.zero.cpu().float().repeat_interleave(gc, -1)[..., :d]
    return _attend(q, kd, vd, ek, ev, ext, start, extra, d)


def _attend(q, kd, vd, ek, ev, ext, start, extra, d):
    """Reference attention over dequantized ``kd, vd`` fp32 ``[B, Hkv, T, D]`` plus the extra segment."""
    b, t = q.shape[0], kd.shape[2]
    valid = torch.ones(b, t, dtype=torch.bool)
    if start is not None:
        valid = torch.arange(t)[None, :] >= start[:, None]
    if extra != "none":
        r = ek.shape[2]
        ev_mask = torch.ones(b, r, dtype=torch.bool) if ext is None else \
            ext if ext.dtype == torch.bool else torch.arange(r)[None, :] < ext[:, None]
        kd, vd = torch.cat([kd, ek.float()], 2), torch.cat([vd, ev.float()], 2)
        valid = torch.cat([valid, ev_mask], 1)
    return ref_attention(q.float(), kd, vd, valid, 1 / math.sqrt(d))


def _run(q, kq, vq, ek, ev, ext, start, extra, config=None):
    on = extra != "none"
    def dev(x):
        return None if x is None else x.to(DEV)

    return da.decode_attention(dev(q), kq, vq, dev(ek) if on else None, dev(ev) if on else None,
                               dev(ext) if on else None, dev(start), None, config=config).cpu()


# -------------------------------------------------------------------------------------------- tests
def test_import_is_lazy() -> None:
    code = "import sys, kvtune.kernels as k; k.__all__; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("d", [16, 64])
def test_packed_keys_match_spec(bits: float, d: int) -> None:
    x = torch.randn(2, 3, 64, d, generator=torch.Generator().manual_seed(1)).half()
    x[0, 0, :32, 1] = 0.25  # a constant group: scale 1, exact
    packed, scale, zero = pack(x.to(DEV), bits, 32, "key")
    codes, rs, rz = ref_quantize(x, bits, "channel", 32)
    assert packed.shape[-1] == slicing(bits, d).row_bytes
    assert torch.equal(ref_unpack(packed.cpu(), bits, d), codes)
    assert torch.equal(scale.cpu(), rs) and torch.equal(zero.cpu(), rz)
    deq = codes * rs.float().repeat_interleave(32, -2) + rz.float().repeat_interleave(32, -2)
    assert (deq - x.float()).abs().le(rs.float().repeat_interleave(32, -2) * 0.5 + 1e-3).all() or bits == 1.58


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("d", "group"), [(16, 0), (64, 16), (64, 24)])
def test_packed_values_match_spec(bits: float, d: int, group: int) -> None:
    x = torch.randn(2, 37, d, generator=torch.Generator().manual_seed(2)).half()
    packed, scale, zero = pack(x.to(DEV), bits, group, "value")
    codes, rs, rz = ref_quantize(x, bits, "token", group)
    assert torch.equal(ref_unpack(packed.cpu(), bits, d), codes)
    assert torch.equal(scale.cpu(), rs) and torch.equal(zero.cpu(), rz)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n_rep", [1, 3])
@pytest.mark.parametrize("d", [16, 64])
def test_decode_matches_reference(bits: float, n_rep: int, d: int) -> None:
    extra = "len" if n_rep == 3 else "none"
    q, _, _, kq, vq, ek, ev, ext, start = _case(bits, bits, n_rep, d, extra=extra, gc=0 if d == 16 else 32)
    out = _run(q, kq, vq, ek, ev, ext, start, extra)
    ref = _reference(q, kq, vq, ek, ev, ext, start, extra, d)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize(("bits_k", "bits_v", "gc"), [(2, 4, 16), (4, 2, 64), (3, 1.58, 24), (8, 1, 0), (1.58, 3, 32)])
def test_decode_mixed_bits_and_value_groups(bits_k: float, bits_v: float, gc: int) -> None:
    q, _, _, kq, vq, ek, ev, ext, start = _case(bits_k, bits_v, 3, 64, hkv=2, gc=gc, extra="mask")
    out = _run(q, kq, vq, ek, ev, ext, start, "mask")
    torch.testing.assert_close(out.float(), _reference(q, kq, vq, ek, ev, ext, start, "mask", 64), atol=TOL, rtol=0)


@pytest.mark.parametrize("extra", ["none", "all", "len", "mask"])
def test_decode_extra_segment_modes(extra: str) -> None:
    q, _, _, kq, vq, ek, ev, ext, start = _case(2, 2, 2, 64, extra=extra, r=20, b=3)
    out = _run(q, kq, vq, ek, ev, ext, start, extra)
    torch.testing.assert_close(out.float(), _reference(q, kq, vq, ek, ev, ext, start, extra, 64), atol=TOL, rtol=0)


@pytest.mark.parametrize(("t", "g", "block_t", "splits"), [(128, 32, 32, 3), (128, 64, 32, 2), (96, 16, 64, 1),
                                                          (0, 32, 32, 1)])
def test_decode_tiles_splits_and_groups(t: int, g: int, block_t: int, splits: int) -> None:
    q, _, _, kq, vq, ek, ev, ext, start = _case(4, 2, 3, 64, t=t, g=g, extra="len", pad=t > 0)
    cfg = da.DecodeConfig(block_t, splits, 4, 2)
    out = _run(q, kq, vq, ek, ev, ext, start, "len", config=cfg)
    torch.testing.assert_close(out.float(), _reference(q, kq, vq, ek, ev, ext, start, "len", 64), atol=TOL, rtol=0)


@pytest.mark.parametrize(("n_rep", "query_rows"), [(1, 8), (3, 8), (4, 16), (8, 8), (12, 8), (16, 4)])
def test_query_tile_rows(n_rep: int, query_rows: int) -> None:
    """Every query head of a KV head is served whatever the tile's padded row count (8 by default, 16 as before,
    fewer than n_rep: the rows grow to n_rep's power of two), on two KV heads."""
    cfg = da.DecodeConfig(32, 2, 4, 1, query_rows=query_rows)
    assert cfg.rows(n_rep) >= max(n_rep, query_rows) and cfg.rows(n_rep) & (cfg.rows(n_rep) - 1) == 0
    q, _, _, kq, vq, ek, ev, ext, start = _case(2, 2, n_rep, 64, hkv=2, t=96, g=32, extra="len", pad=True)
    out = _run(q, kq, vq, ek, ev, ext, start, "len", config=cfg)
    torch.testing.assert_close(out.float(), _reference(q, kq, vq, ek, ev, ext, start, "len", 64), atol=TOL, rtol=0)


@pytest.mark.parametrize(("d", "n_rep", "bits_v", "g", "gc", "t", "block_t"), [
    (64, 4, 1.58, 32, 0, 224, 64), (128, 1, 1.58, 64, 0, 192, 128), (80, 3, 1.58, 32, 16, 224, 64)])
def test_ternary_fast_tiles(d: int, n_rep: int, bits_v: float, g: int, gc: int, t: int, block_t: int) -> None:
    """Ternary keys (and values) take the fast tiling: a masked head tile (left padding), unmasked whole tiles of
    several key groups, a partial tail (T not a multiple of the tile), two splits, an extra segment; slices of
    ceil(D / 5) channels padded to 16 / 32 lanes (D = 64, 128) or exact (D = 80)."""
    assert da._fast_path(slicing(1.58, d), d) and da._fast_path(slicing(bits_v, d), d)
    q, _, _, kq, vq, ek, ev, ext, start = _case(1.58, bits_v, n_rep, d, t=t, g=g, gc=gc, extra="len")
    out = _run(q, kq, vq, ek, ev, ext, start, "len", config=da.DecodeConfig(block_t, 2, 4, 1))
    torch.testing.assert_close(out.float(), _reference(q, kq, vq, ek, ev, ext, start, "len", d), atol=TOL, rtol=0)


def test_ternary_fp16_digit_constants() -> None:
    """The PTX ternary unpack (``unpack_tl._trit_f16``) in exact fp16 arithmetic: ``fma(1024 + q, TRIT_DIV,
    TRIT_ADD)`` rounds to ``1024 + q // 3`` for every quotient of a byte (q <= 242), and the digit (plain and RAW)
    comes out exact; checked here in float64 with one rounding per fp16 instruction, like the GPU's fma.rn."""
    from kvtune.kernels.unpack_tl import TRIT_ADD, TRIT_DIV

    def h(x):  # one fp16 rounding
        return x.to(torch.float16).to(torch.float64)

    def bits16(v):
        return torch.tensor([v], dtype=torch.int16).view(torch.float16).double()

    m, a = bits16(TRIT_DIV.value), bits16(TRIT_ADD.value)
    x = torch.arange(243, dtype=torch.float64)
    big = h(1024 + x)
    for s in range(5):
        digit = (x // 3 ** s) % 3
        if s < 4:
            nxt = h(big * m + a)
            assert torch.equal(h(big + h(nxt * -3 + 2048)), digit)
            assert torch.equal(h(big + h(nxt * -3 + 3072)), 1024 + digit)
            big = nxt
        else:
            assert torch.equal(h(big - 1024), digit)


def test_decode_padding_covers_whole_splits_and_bf16() -> None:
    q, _, _, kq, vq, ek, ev, ext, start = _case(2, 2, 3, 64, t=128, extra="all", pad=False, dtype=torch.bfloat16)
    start = torch.tensor([100, 127], dtype=torch.int32)  # the first splits see only padding
    out = _run(q, kq, vq, ek, ev, ext, start, "all", config=da.DecodeConfig(32, 4, 4, 2))
    assert out.dtype == torch.bfloat16
    ref = _reference(q, kq, vq, ek, ev, ext, start, "all", 64)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=0)  # bf16 output rounding


def test_module_reference_agrees() -> None:
    q, _, _, kq, vq, ek, ev, ext, start = _case(3, 2, 3, 64, extra="mask")
    mine = _reference(q, kq, vq, ek, ev, ext, start, "mask", 64)
    theirs = da.decode_attention_reference(q, *(da.PackedKeys(kq.packed.cpu(), kq.scale.cpu(), kq.zero.cpu(), 3, 32),
                                                da.PackedValues(vq.packed.cpu(), vq.scale.cpu(), vq.zero.cpu(), 2, 32)),
                                           ek, ev, ext, start)
    torch.testing.assert_close(theirs.float(), mine, atol=1e-3, rtol=0)


@pytest.mark.parametrize("bits", [1.58, 2, 4])
@pytest.mark.parametrize("zero", [False, True])
def test_per_token_keys_and_code_maps(bits: float, zero: bool) -> None:
    """Per-token key scales (``axis="token"``), evenly spaced code levels (``code_scale``/``code_offset``) and
    absent zero-points, on both operands, against the PyTorch reference."""
    from kvtune.quant.codes import code_format
    from kvtune.quant.codes import pack as pack_codes

    gen = torch.Generator().manual_seed(5)
    b, hkv, t, d, n_rep = 2, 2, 96, 64, 3
    levels = code_format(bits).levels
    codes = [torch.randint(0, levels, (b, hkv, t, d), generator=gen, dtype=torch.uint8) for _ in range(2)]
    scales = [(torch.rand(b, hkv, t, 1, generator=gen) + 0.5).half() for _ in range(2)]
    zeros = [(torch.randn(b, hkv, t, 1, generator=gen) * 0.1).half() if zero else None for _ in range(2)]
    step, first = 0.9957, -1.4935
    kq = da.PackedKeys(pack_codes(codes[0], bits).to(DEV), scales[0].to(DEV),
                       None if zeros[0] is None else zeros[0].to(DEV), bits, 0, step, first, axis="token")
    vq = da.PackedValues(pack_codes(codes[1], bits).to(DEV), scales[1].to(DEV),
                         None if zeros[1] is None else zeros[1].to(DEV), bits, 0, step, first)
    q = torch.randn(b, hkv * n_rep, 1, d, generator=gen).half()
    ek, ev = torch.randn(b, hkv, 5, d, generator=gen).half(), torch.randn(b, hkv, 5, d, generator=gen).half()
    start = torch.tensor([0, 17], dtype=torch.int32)
    out = da.decode_attention(q.to(DEV), kq, vq, ek.to(DEV), ev.to(DEV), None, start.to(DEV)).cpu()
    ref = da.decode_attention_reference(q, *(_cpu(x) for x in (kq, vq)), ek, ev, None, start)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3 * float(ref.abs().max()), rtol=0)  # fp16 out


@pytest.mark.parametrize(("d", "n_rep", "key_axis", "bend_k", "bend_v", "gc"), [
    (64, 4, "token", True, True, 0), (128, 1, "token", True, False, 0), (64, 1, "channel", False, True, 32),
    (128, 4, "channel", True, True, 0)])
def test_bent_two_bit_code_maps(d: int, n_rep: int, key_axis: str, bend_k: bool, bend_v: bool, gc: int) -> None:
    """2-bit codes of a symmetric non-uniform codebook (Lloyd-Max: ``code_scale * (c + bend * (c >= 2)) +
    code_offset``) on keys (per-token or per-channel-group scales) and values (one channel group: codes enter the MMA
    bent, not RAW; or channel groups), beside evenly spaced ones: partial head/tail tiles, splits, an extra segment."""
    from kvtune.quant.codes import pack as pack_codes
    from kvtune.quant.families.normq import codebook

    gen = torch.Generator().manual_seed(6)
    b, hkv, t, g = 2, 2, 96, 32
    l0, l1, l2, _ = codebook(4, "lloyd")
    lloyd, even = (l1 - l0, l0, (l2 - l0) / (l1 - l0) - 2), (0.9957, -1.4935, 0.0)  # bend -0.1438
    codes = [torch.randint(0, 4, (b, hkv, t, d), generator=gen, dtype=torch.uint8) for _ in range(2)]
    kshape = (b, hkv, t, 1) if key_axis == "token" else (b, hkv, t // g, d)
    ks = (torch.rand(kshape, generator=gen) + 0.5).half()
    kz = None if key_axis == "token" else (torch.randn(kshape, generator=gen) * 0.1).half()
    vs = (torch.rand(b, hkv, t, math.ceil(d / (gc or d)), generator=gen) + 0.5).half()
    kq = da.PackedKeys(pack_codes(codes[0], 2).to(DEV), ks.to(DEV), None if kz is None else kz.to(DEV), 2,
                       0 if key_axis == "token" else g, *(lloyd if bend_k else even)[:2], None,
                       (lloyd if bend_k else even)[2], axis=key_axis)
    vq = da.PackedValues(pack_codes(codes[1], 2).to(DEV), vs.to(DEV), None, 2, gc, *(lloyd if bend_v else even)[:2],
                         None, (lloyd if bend_v else even)[2])
    assert (kq.bent, vq.bent) == (bend_k, bend_v)
    q = torch.randn(b, hkv * n_rep, 1, d, generator=gen).half()
    ek, ev = torch.randn(b, hkv, 5, d, generator=gen).half(), torch.randn(b, hkv, 5, d, generator=gen).half()
    ext, start = torch.tensor([5, 2]), torch.tensor([0, 17], dtype=torch.int32)
    out = da.decode_attention(q.to(DEV), kq, vq, ek.to(DEV), ev.to(DEV), ext.to(DEV), start.to(DEV),
                              config=da.DecodeConfig(32, 3, 4, 2)).cpu()
    ref = da.decode_attention_reference(q, *(_cpu(x) for x in (kq, vq)), ek, ev, ext, start)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3 * float(ref.abs().max()), rtol=0)  # fp16 out


def test_code_bend_is_checked() -> None:
    """A bend needs 2-bit codes (only there is a symmetric codebook affine in the code's bits)."""
    codes, scale = torch.zeros(1, 2, 16, 16, dtype=torch.uint8), torch.ones(1, 2, 16, 1).half()
    da.PackedValues(codes, scale, None, 2, 0, 1.0, -1.5, None, -0.14)
    with pytest.raises(ValueError, match="2-bit"):
        da.PackedValues(codes, scale, None, 4, 0, 1.0, -1.5, None, -0.14)
    with pytest.raises(ValueError, match="2-bit"):
        da.PackedKeys(codes, scale, None, 1.58, 0, 1.0, -1.5, None, 0.5, axis="token")


def _cpu(x):
    import dataclasses

    return dataclasses.replace(x, packed=x.packed.cpu(), scale=x.scale.cpu(),
                               zero=None if x.zero is None else x.zero.cpu())


# ------------------------------------------------------------------- log8 (one-byte) per-token scales
def _normq(x: torch.Tensor, bits: float, role: str, scale_dtype: str, sample: torch.Tensor | None = None,
           codebook: str = "uniform"):
    """``x [B, h, T, D]`` coded by the ``normq`` family (uniform levels by default, fp16 or log8 scales, the range
    fitted on ``sample``, default ``x``): the kernel operand and the family's own decode (the specification) fp32
    ``[B, h, T, D]``."""
    from kvtune.quant.families.normq import FAMILY, NormQParams

    p = NormQParams(bits=bits, codebook=codebook, scale_dtype=scale_dtype)
    sample = x if sample is None else sample
    state = FAMILY.fit(p, sample.transpose(0, 1).flatten(1, 2).float())  # [h, B*T, D] -> scale_range [h, 2]
    fields = FAMILY.encode(p, x.float(), x.shape[2], state)
    op = FAMILY.kernel_operands(p, role, {n: f.to(DEV) for n, f in fields.items()},
                                {n: f.to(DEV) for n, f in state.items()})
    return op, FAMILY.decode(p, fields, x.shape[2], x.shape[-1], state)


def _log8_case(bits_k, bits_v, n_rep, d, dtypes=("log8", "log8"), *, b=2, hkv=2, t=100, r=5, seed=3):
    gen = torch.Generator().manual_seed(seed)
    # token norms over a few octaves (values: ~8), so that the 256 steps of the range matter; keys not so wide
    # that the fp16 query rounding sharpens the softmax
    k, v = (torch.randn(b, hkv, t, d, generator=gen) * torch.exp2(w * torch.randn(b, hkv, t, 1, generator=gen))
            for w in (0.7, 2.0))
    (kq, kd), (vq, vd) = _normq(k, bits_k, "key", dtypes[0]), _normq(v, bits_v, "value", dtypes[1])
    q = torch.randn(b, hkv * n_rep, 1, d, generator=gen).half()
    ek, ev = torch.randn(b, hkv, r, d, generator=gen).half(), torch.randn(b, hkv, r, d, generator=gen).half()
    return q, kq, kd, vq, vd, ek, ev, torch.tensor([r, 2]), torch.tensor([0, 21], dtype=torch.int32)


@pytest.mark.parametrize("bits", [1, 1.58, 2, 3, 4])
def test_log8_reference_is_the_family_decode(bits: float) -> None:
    """The packed reference's log8 conversion (what the kernel is tested against) is ``normq``'s decode, for keys
    and values, positions 0 and 255 (clamped scales) included."""
    from kvtune.kernels.packed import dequantize_keys_reference, dequantize_values_reference

    x = torch.randn(2, 3, 40, 64, generator=torch.Generator().manual_seed(4)) * torch.exp2(torch.linspace(-8, 8, 40))[
        :, None]
    for role in ("key", "value"):
        op, spec = _normq(x, bits, role, "log8", sample=x[:, :, 12:28])  # the outer tokens clamp
        assert op.scale.dtype == torch.uint8 and op.scale_range.shape == (3, 2)
        assert int(op.scale.min()) == 0 and int(op.scale.max()) == 255
        deq = dequantize_keys_reference if role == "key" else dequantize_values_reference
        torch.testing.assert_close(deq(_cpu(op), 64), spec, atol=0, rtol=1e-6)


@pytest.mark.parametrize("scale_dtype", ["float16", "log8"])
def test_lloyd_reference_is_the_family_decode(scale_dtype: str) -> None:
    """2-bit Lloyd-Max codes reach the kernel as a bent code map; the packed reference's reading of it (what the
    kernel is tested against) is ``normq``'s decode, keys and values; 3- and 4-bit Lloyd-Max stay off the kernel."""
    from kvtune.kernels.packed import dequantize_keys_reference, dequantize_values_reference
    from kvtune.quant.families.normq import FAMILY, NormQParams

    x = torch.randn(2, 3, 40, 64, generator=torch.Generator().manual_seed(7)) * 3
    for role in ("key", "value"):
        op, spec = _normq(x, 2, role, scale_dtype, codebook="lloyd")
        assert op.bent and op.bits == 2
        deq = dequantize_keys_reference if role == "key" else dequantize_values_reference
        torch.testing.assert_close(deq(_cpu(op), 64), spec, atol=1e-6 * float(spec.abs().max()), rtol=1e-6)
        assert FAMILY.kernel_ok(NormQParams(2, "lloyd", scale_dtype), role)
        assert not any(FAMILY.kernel_ok(NormQParams(b, "lloyd", scale_dtype), role) for b in (3, 4))


@pytest.mark.parametrize(("bits_k", "bits_v", "n_rep", "d", "dtypes"), [
    (2, 1, 4, 64, ("log8", "log8")), (4, 1.58, 1, 128, ("log8", "log8")), (1.58, 2, 1, 64, ("log8", "float16")),
    (1, 4, 4, 128, ("float16", "log8")), (3, 3, 4, 64, ("log8", "log8"))])
def test_decode_log8_scales(bits_k: float, bits_v: float, n_rep: int, d: int, dtypes: tuple[str, str]) -> None:
    """Kernel with one-byte log8 per-token scales (keys, values or both) equals attention over the ``normq`` family's
    own decode: partial head/tail tiles (left padding, T not a multiple of the tile), several splits, an extra
    segment."""
    q, kq, kd, vq, vd, ek, ev, ext, start = _log8_case(bits_k, bits_v, n_rep, d, dtypes)
    assert (kq.scale_range is not None, vq.scale_range is not None) == tuple(x == "log8" for x in dtypes)
    out = da.decode_attention(q.to(DEV), kq, vq, ek.to(DEV), ev.to(DEV), ext.to(DEV), start.to(DEV),
                              config=da.DecodeConfig(32, 3, 4, 2)).cpu()
    ref = _attend(q, kd, vd, ek, ev, ext, start, "len", d)
    torch.testing.assert_close(out.float(), ref, atol=2e-3 * float(ref.abs().max()), rtol=0)


def test_log8_operands_are_checked() -> None:
    """log8 scales only on per-token scales, uint8 with a float [Hkv, 2] range; uint8 scales need a range."""
    codes, pos = torch.zeros(1, 2, 16, 16, dtype=torch.uint8), torch.zeros(1, 2, 16, 1, dtype=torch.uint8)
    rng = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="per-token"):
        da.PackedKeys(codes, torch.zeros(1, 2, 1, 64, dtype=torch.uint8), None, 2, 16, scale_range=rng)
    with pytest.raises(ValueError, match="per-token"):
        da.PackedValues(codes, torch.zeros(1, 2, 16, 2, dtype=torch.uint8), None, 2, 32, scale_range=rng)
    with pytest.raises(ValueError, match=r"float \[Hkv=2, 2\]"):
        da.PackedKeys(codes, pos, None, 2, 0, scale_range=torch.zeros(3, 2), axis="token")
    with pytest.raises(ValueError, match="must be uint8"):
        da.PackedValues(codes, pos.half(), None, 2, 0, scale_range=rng)
    with pytest.raises(ValueError, match="need their scale_range"):
        da.PackedValues(codes, pos, None, 2, 0)


@pytest.mark.parametrize("d, n_rep, rot, center", [(64, 2, True, True), (80, 3, True, False), (64, 4, False, True)])
def test_merge_takes_the_output_out_of_the_value_frame(d: int, n_rep: int, rot: bool, center: bool) -> None:
    """``out_rot`` / ``out_mean`` in the merge equal the plain output times ``out_rot`` plus each KV head's mean."""
    q, _, _, kq, vq, ek, ev, ext, start = _case(2, 2, n_rep, d, hkv=2, t=64, gc=d)
    gen = torch.Generator().manual_seed(3)
    rt = torch.linalg.qr(torch.randn(d, d, generator=gen))[0].half().to(DEV) if rot else None
    mean = torch.randn(2, d, generator=gen).half().to(DEV) if center else None
    plain = _run(q, kq, vq, ek, ev, ext, start, "len").float()
    got = da.decode_attention(q.to(DEV), kq, vq, ek.to(DEV), ev.to(DEV), ext.to(DEV), start.to(DEV),
                              out_rot=rt, out_mean=mean).cpu().float()
    want = plain @ rt.cpu().float() if rot else plain
    if center:
        want = want + mean.cpu().float().repeat_interleave(n_rep, 0)[None, :, None, :]
    torch.testing.assert_close(got, want, atol=4e-3, rtol=0)
