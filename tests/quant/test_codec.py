"""The affine grid matrix (bits x axis x group x symmetric): reconstruction bounds, exact packing, and the
whole-spec pipeline (:func:`kvtune.quant.codec.fake_quantize`)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtune.errors import KVTuneError
from kvtune.quant import codes as cf
from kvtune.quant import grid
from kvtune.quant.codec import fake_quantize
from kvtune.quant.formats import QuantSpec, affine

BITS = [1, 1.58, 2, 3, 4, 8]
AXES_GROUPS = [("channel", 32), ("channel", 0), ("channel", 8), ("token", 32), ("token", 0), ("token", 16)]


def _scale_per_element(q: grid.Quantized, spec: QuantSpec, shape: torch.Size) -> torch.Tensor:
    s = q.scale.float()
    if spec.params.axis == "channel":
        g = spec.params.group or shape[-2]
        return s.repeat_interleave(g, dim=-2)
    g = spec.params.group or shape[-1]
    return s.repeat_interleave(g, dim=-1)[..., : shape[-1]]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis,group", AXES_GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_matrix_error_bound_and_packing(bits: float, axis: str, group: int, symmetric: bool) -> None:
    if symmetric and bits == 1:
        pytest.skip("symmetric 1-bit is rejected by design (tested below)")
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 64, 64) * torch.linspace(0.1, 4, 64)).half().float()
    spec = affine(bits=bits, axis=axis, group=group, symmetric=symmetric)
    q = grid.quantize(x, spec.params)
    xh = grid.dequantize(q, spec.params)
    bound = _scale_per_element(q, spec, x.shape) / 2
    # fp16-stored zero-points may shift the grid by one fp16 ulp of the zero: allow that slack.
    slack = 1e-3 * x.abs().amax() + 1e-6
    assert torch.all((x - xh).abs() <= bound + slack)
    assert int(q.codes.max()) < cf.code_format(bits).levels
    packed = cf.pack(q.codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == cf.packed_width(64, bits)
    assert torch.equal(cf.unpack(packed, bits, 64), q.codes)


@pytest.mark.parametrize("bits,width", [(1, 8), (1.58, 13), (2, 16), (3, 24), (4, 32), (8, 64), (16, 128)])
def test_packed_width_exact(bits: float, width: int) -> None:
    assert cf.packed_width(64, bits) == width


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("d", [1, 5, 7, 13, 64, 100])
def test_pack_roundtrip_odd_widths(bits: float, d: int) -> None:
    levels = cf.code_format(bits).levels
    codes = torch.randint(0, levels, (4, 9, d), dtype=torch.uint8)
    assert torch.equal(cf.unpack(cf.pack(codes, bits), bits, d), codes)


def test_pack_layout_is_strided() -> None:
    # 2-bit, D=8: nbytes=2; channel e -> byte e % 2, slot e // 2
    codes = torch.tensor([[1, 2, 3, 0, 0, 1, 2, 3]], dtype=torch.uint8)
    packed = cf.pack(codes, 2)
    assert packed.tolist() == [[1 | (3 << 2) | (0 << 4) | (2 << 6), 2 | (0 << 2) | (1 << 4) | (3 << 6)]]


@settings(max_examples=60, deadline=None)
@given(value=st.floats(-1000, 1000, allow_nan=False, width=16), bits=st.sampled_from(BITS),
       axis=st.sampled_from(["channel", "token"]), t=st.sampled_from([32, 64]))
def test_constant_groups_reconstruct_exactly(value: float, bits: float, axis: str, t: int) -> None:
    x = torch.full((1, 2, t, 32), value)
    spec = affine(bits=bits, axis=axis, group=32)
    y = fake_quantize(x, spec)
    assert torch.isfinite(y).all()
    assert torch.equal(y, x)


@settings(max_examples=60, deadline=None)
@given(data=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=16), min_size=64, max_size=64),
       bits=st.sampled_from(BITS), hadamard=st.booleans(), outliers=st.sampled_from([0, 1, 4]))
def test_never_nan(data: list[float], bits: float, hadamard: bool, outliers: int) -> None:
    x = torch.tensor(data).reshape(1, 1, 2, 32).repeat(1, 1, 16, 1)
    spec = affine(bits=bits, axis="channel", group=32, hadamard=hadamard, outliers=outliers)
    assert torch.isfinite(fake_quantize(x, spec)).all()


def test_zero_tensor_is_exact_everywhere() -> None:
    x = torch.zeros(1, 1, 32, 64)
    for bits in BITS:
        for spec in (affine(bits=bits, axis="channel", group=32, fft=True),
                     affine(bits=bits, axis="token", group=32, channel_separable=True, outliers=2)):
            assert torch.equal(fake_quantize(x, spec), x)


def test_nan_input_is_a_clear_error() -> None:
    x = torch.randn(1, 1, 32, 64)
    x[0, 0, 3, 3] = float("nan")
    with pytest.raises(KVTuneError, match="non-finite"):
        grid.quantize(x, affine(2, "channel", 32).params)


def test_partial_token_group_is_a_clear_error() -> None:
    with pytest.raises(KVTuneError, match="multiple of the key group"):
        grid.quantize(torch.randn(1, 1, 31, 64), affine(2, "channel", 32).params)


@pytest.mark.parametrize("bits", [2, 4])
def test_more_outlier_channels_never_hurt_planted_outliers(bits: float) -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 1, 64, 64)
    x[..., [3, 40]] *= 30
    errs = [float((fake_quantize(x, affine(bits=bits, axis="token", group=64, outliers=o)) - x).pow(2).mean())
            for o in (0, 2)]
    assert errs[1] < errs[0] / 10


def test_channel_separable_helps_on_channel_outliers() -> None:
    torch.manual_seed(2)
    x = torch.randn(1, 1, 64, 64) * torch.cat([torch.full((4,), 20.0), torch.ones(60)])
    plain = affine(bits=2, axis="token", group=64)
    sep = affine(bits=2, axis="token", group=64, channel_separable=True)
    e_plain = (fake_quantize(x, plain) - x).pow(2).mean()
    e_sep = (fake_quantize(x, sep) - x).pow(2).mean()
    assert e_sep < e_plain


def test_error_decreases_with_bits() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 2, 64, 64)
    errs = [float((fake_quantize(x, affine(bits=b, axis="channel", group=32)) - x).pow(2).mean())
            for b in BITS]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-4 and math.isfinite(errs[0])
