"""Centering (``center: true``): a per-head mean taken off before quantizing and added back after."""

from __future__ import annotations

import pytest
import torch

from kvtune.errors import KVTuneError
from kvtune.quant import codec
from kvtune.quant.bits import layers_bits
from kvtune.quant.centering import CENTER_FIELD
from kvtune.quant.families.normq import normq
from kvtune.quant.formats import QuantSpec, affine


def _offset_heads(seed: int = 0) -> torch.Tensor:
    """``[2, 3, 256, 64]``: Gaussian tokens around a large per-head mean (as keys have)."""
    gen = torch.Generator().manual_seed(seed)
    mean = 4 * torch.randn(3, 1, 64, generator=gen)
    return torch.randn(2, 3, 256, 64, generator=gen) + mean


@pytest.mark.parametrize("spec,gain", [(normq(2, "uniform"), 0.5), (normq(1), 0.5),
                                       (normq(1.58, scale_dtype="log8"), 0.5), (affine(2, "token", 32), 0.5),
                                       (affine(3, "channel", 32, hadamard=True, outliers=2), 1.02)])
def test_centering_removes_the_common_part(spec: QuantSpec, gain: float) -> None:
    """Per-token quantizers lose far less on centered data; per-channel groups already absorb a channel offset
    (their zero-points), so there it changes nearly nothing."""
    x = _offset_heads()
    err = {c: float((codec.fake_quantize(x, QuantSpec(**{**spec.__dict__, "center": c})) - x).square().mean())
           for c in (False, True)}
    assert err[True] < gain * err[False]


def test_the_mean_is_state_fitted_on_the_sample_and_kept_when_known() -> None:
    x = _offset_heads()
    spec = normq(2, center=True)
    state = codec.fit(spec, x)
    torch.testing.assert_close(state[CENTER_FIELD].float(), x.mean(dim=(0, 2)), atol=2e-3, rtol=1e-3)
    known = torch.zeros(3, 64, dtype=torch.float16)
    assert codec.fit(spec, x, {CENTER_FIELD: known})[CENTER_FIELD] is known
    # a zero mean is plain quantization: same codes, same decode
    fields = codec.encode(x, spec, 1, {CENTER_FIELD: known, **{k: v for k, v in state.items() if k != CENTER_FIELD}})
    plain = codec.encode(x, normq(2), 1)
    assert torch.equal(fields["codes"], plain["codes"])


def test_encode_decode_use_the_stored_mean() -> None:
    x = _offset_heads(1)
    spec = normq(2, center=True)
    state = codec.fit(spec, x[:, :, :64])
    y = codec.decode(codec.encode(x, spec, 1, state), spec, 1, 64, state)
    assert float((y - x).square().mean()) < 0.1 * float(x.square().mean())
    with pytest.raises(ValueError, match="center"):
        codec.encode(x, spec, 1, {})


def test_yaml_label_bits_and_refusals() -> None:
    spec = normq(1.58, center=True)
    assert spec.to_dict()["center"] is True
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert spec.label().endswith("+mean") and spec.label(short=True).endswith("m")
    with pytest.raises(KVTuneError, match="center"):
        QuantSpec.from_dict({"bits": 2, "center": "yes"})
    with pytest.raises(ValueError, match="centering"):
        QuantSpec(center=True)
    assert codec.kernel_ok(spec, "value")  # the fused kernel reads it (fp16 tokens shifted into its frame)
    decl = codec.layer_fields(spec, 64)[CENTER_FIELD]
    assert (decl.scope, decl.width, decl.dtype) == ("layer", 64, "float16")
    from kvtune.plan_types import LayerPlan

    plain, centered = (layers_bits([LayerPlan(key=s, value=s)], 1, 64) for s in (normq(1.58), spec))
    assert centered.total - plain.total == 2 * 64 * 16  # one fp16 mean per head and role


def test_given_outlier_channels_are_kept_when_centering() -> None:
    """fake_quantize fits the mean of x but keeps the outlier channels it is given (calibration passes them)."""
    x = _offset_heads(2)
    idx = torch.tensor([[5, 9], [0, 63], [17, 18]]).expand(2, 3, 2)
    y = codec.fake_quantize(x, affine(2, "channel", 32, outliers=2, center=True), outlier_idx=idx)
    kept = idx[..., None, :].expand(2, 3, x.shape[2], 2)
    torch.testing.assert_close(y.gather(-1, kept), x.gather(-1, kept), atol=5e-3, rtol=1e-3)  # fp16 outliers
