"""Engine formats (``fp8``, ``ggml``) against independent implementations of the same definitions.

llama.cpp's block formats are checked byte for byte against ``gguf-py`` (``gguf.quants``, the reference
quantizer llama.cpp ships for its conversion scripts: the same arithmetic as ``quantize_row_*_ref``), fp8 against
torch's own float8 casts with vLLM's clamp-then-cast rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtune.quant import codec
from kvtune.quant.bits import spec_bits
from kvtune.quant.families.fp8 import FP8Params, fp8
from kvtune.quant.families.ggml import TYPES, ggml
from kvtune.quant.formats import QuantSpec

D = 64


def _x(seed: int = 0, t: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, t, D, generator=gen) * torch.linspace(0.2, 3, D)
    x[..., 5] += 8.0
    x[0, 0, 0, :32] = 0.0  # an all-zero block
    return x.half().float()


def _ggml_bytes(fields: dict[str, torch.Tensor], type_: str) -> np.ndarray:
    """Per block ``d | m | qh | qs``: llama.cpp's ``block_*`` bytes, ``[rows * nb, bytes]``."""
    nb = D // 32
    parts = [fields["d"].reshape(-1, nb, 1).contiguous().view(torch.uint8)]
    if "m" in fields:
        parts.append(fields["m"].reshape(-1, nb, 1).contiguous().view(torch.uint8))
    if "qh" in fields:
        parts.append(fields["qh"].reshape(-1, nb, 4))
    parts.append(fields["qs"].reshape(-1, nb, fields["qs"].shape[-1] // nb))
    return torch.cat(parts, -1).reshape(-1, sum(p.shape[-1] for p in parts)).numpy()


@pytest.mark.parametrize("type_", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_ggml_blocks_are_llama_cpp_bytes(type_: str) -> None:
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    spec = ggml(type_, rotation="none")
    x = _x()
    fields = codec.encode(x, spec, 1)
    qtype = getattr(gguf.GGMLQuantizationType, type_.upper())
    ref = quants.quantize(x.reshape(-1, D).numpy(), qtype).reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
    np.testing.assert_array_equal(_ggml_bytes(fields, type_), ref)
    back = quants.dequantize(ref.reshape(x.shape[0] * x.shape[1] * x.shape[2], -1), qtype)
    np.testing.assert_array_equal(codec.decode(fields, spec, 1, D).reshape(-1, D).numpy(), back.reshape(-1, D))


def test_iq4_nl_decodes_as_llama_cpp() -> None:
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    spec = ggml("iq4_nl", rotation="none")
    x = _x(1)
    fields = codec.encode(x, spec, 1)
    ours = codec.decode(fields, spec, 1, D)
    back = quants.dequantize(_ggml_bytes(fields, "iq4_nl").reshape(-1, 2 * 18), gguf.GGMLQuantizationType.IQ4_NL)
    np.testing.assert_array_equal(ours.reshape(-1, D).numpy(), back.reshape(-1, D))
    assert float((ours - x).square().mean() / x.square().mean()) < 0.02


@pytest.mark.parametrize("type_", sorted(TYPES))
def test_ggml_bits_are_llama_cpp_sizes(type_: str) -> None:
    per_block = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "iq4_nl": 18}[type_]
    spec = ggml(type_)
    assert spec_bits(spec, 100, D, 1).total == 100 * (D // 32) * per_block * 8
    x = _x(2)
    assert codec.decode(codec.encode(x, spec, 1), spec, 1, D).shape == x.shape
    assert QuantSpec.from_dict(spec.to_dict()) == spec


def test_ggml_needs_whole_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        codec.fields(ggml("q8_0"), 48, 1)


@pytest.mark.parametrize(("fmt", "scale"), [("e4m3", "tensor"), ("e4m3", "head"), ("e5m2", "none"),
                                            ("e5m2", "tensor")])
def test_fp8_is_clamp_then_cast(fmt: str, scale: str) -> None:
    spec = fp8(fmt, scale)
    x = _x(3)
    state = codec.fit(spec, x)
    p: FP8Params = spec.params
    if scale == "none":
        s = torch.ones(3, 1, 1)
    else:
        amax = x.abs().amax(dim=(0, 2, 3))
        s = (amax.amax().expand(3) if scale == "tensor" else amax)[:, None, None] / p.max
        torch.testing.assert_close(state["fp8_scale"], s.reshape(3, 1), rtol=0, atol=0)
    fields = codec.encode(x, spec, 1, state)
    expect = (x / s).clamp(-p.max, p.max).to(p.dtype).float() * s
    torch.testing.assert_close(codec.decode(fields, spec, 1, D, state), expect, rtol=0, atol=0)
    # the calibration's per-channel absmax fits the same scale as the data
    absmax = x.abs().amax(dim=(0, 2)).unsqueeze(1)  # [h, 1, D]
    assert all(torch.equal(v, codec.fit(spec, absmax)[k]) for k, v in state.items())


def test_fp8_saturates() -> None:
    spec = fp8("e4m3", "tensor")
    x = torch.full((1, 1, 1, D), 10.0)
    state = {"fp8_scale": torch.tensor([[0.01]])}
    out = codec.decode(codec.encode(x, spec, 1, state), spec, 1, D, state)
    torch.testing.assert_close(out, torch.full_like(x, 4.48))


@pytest.mark.parametrize("bits", [3, 4])
def test_normq_norm_correction_is_turboquant(bits: int) -> None:
    """vLLM TurboQuant keys: nearest Lloyd-Max centroid (for N(0, 1/d)) of each coordinate of the unit vector,
    fp16 norm, decode ``norm * c / |c|`` (turboquant/config.py, centroids.py)."""
    from kvtune.quant.families.normq import codebook, normq

    spec = normq(bits, "lloyd", rotation="none", scale_fit="norm")
    x = _x(4)
    fields = codec.encode(x, spec, 1)
    centroids = torch.tensor(codebook(2 ** bits, "lloyd")) / D ** 0.5
    norm = x.norm(dim=-1, keepdim=True)
    idx = ((x / norm).unsqueeze(-1) - centroids).abs().argmin(-1)
    c = centroids[idx]
    expect = norm.half().float() * c / c.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(codec.decode(fields, spec, 1, D), expect, rtol=1e-5, atol=1e-5)
    assert spec_bits(spec, 10, D, 1).total == 10 * (D * bits + 16)
