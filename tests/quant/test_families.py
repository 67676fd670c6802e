"""Every registered quantizer family through one parametrised contract.

For each family and a sample of its calibration candidates (fp16: the plain spec): the YAML form round-trips;
``encode`` stores exactly the declared fields (names, dtypes, widths, rows) so that bytes stored equal the
bit accountant's count; streaming block by block equals one whole-tensor round trip; the error is bounded;
and where the fused decode kernel reads the format, the kernel (interpreted on CPU) equals attention over
``decode``'s output.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from kvtune.quant import codec
from kvtune.quant import family as families
from kvtune.quant.bits import spec_bits
from kvtune.quant.formats import QuantSpec

D, FLUSH, BLOCKS = 64, 64, 3


def _samples() -> list[tuple[str, QuantSpec]]:
    out: list[tuple[str, QuantSpec]] = []
    for fam in families.all_families():
        specs = [s for role in ("key", "value") for s in fam.candidates(role)]
        if not specs:
            specs = [QuantSpec(fam.name)]
        step = max(1, len(specs) // 12)  # a spread of each family's candidates keeps the matrix fast
        out += [(f"{fam.name}:{s.label()}", s) for s in specs[::step]]
    return out


SAMPLES = _samples()
IDS = [name for name, _ in SAMPLES]


def _x(seed: int = 0, t: int = FLUSH * BLOCKS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, t, D, generator=gen) * torch.linspace(0.2, 3, D)
    x[..., 5] += 8.0  # an outlier channel
    return x.half().float()


def _flush(spec: QuantSpec) -> int:
    return math.lcm(FLUSH, spec.token_group or 1)


@pytest.mark.parametrize(("name", "spec"), SAMPLES, ids=IDS)
def test_yaml_round_trip(name: str, spec: QuantSpec) -> None:
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert spec.label() and spec.label(short=True)


@pytest.mark.parametrize(("name", "spec"), SAMPLES, ids=IDS)
def test_fields_are_what_is_stored_and_counted(name: str, spec: QuantSpec) -> None:
    flush = _flush(spec)
    x = _x(t=flush * 2)
    state = codec.fit(spec, x[:, :, :flush])
    decls = codec.fields(spec, D, flush)
    layer = {f.name: f for f in decls if f.scope == "layer"}
    assert state.keys() == layer.keys()
    stored = codec.encode(x, spec, flush, state)
    assert stored.keys() == {f.name for f in codec.stored_fields(spec, D, flush)}
    n = x.shape[2]
    total = 0
    for f in codec.stored_fields(spec, D, flush):
        t = stored[f.name]
        assert t.dtype == f.torch_dtype and tuple(t.shape) == (2, 3, f.rows(n, flush), f.width), f.name
        total += t[0, 0].numel() * t.element_size() * 8
    for name_, t in state.items():
        assert tuple(t.shape) == (3, layer[name_].width) and t.dtype == layer[name_].torch_dtype
        total += t[0].numel() * t.element_size() * 8
    assert total == spec_bits(spec, n, D, flush).total  # one head's bytes == the accountant's bits


@pytest.mark.parametrize(("name", "spec"), SAMPLES, ids=IDS)
def test_streaming_equals_whole_blocks_and_error_is_bounded(name: str, spec: QuantSpec) -> None:
    flush = _flush(spec)
    x = _x(1, flush * 2)
    state = codec.fit(spec, x[:, :, :flush])
    whole = codec.decode(codec.encode(x, spec, flush, state), spec, flush, D, state)
    blocks = torch.cat([codec.decode(codec.encode(x[:, :, s:s + flush], spec, flush, state), spec, flush, D, state)
                        for s in range(0, x.shape[2], flush)], 2)
    assert torch.equal(whole, blocks)
    assert whole.shape == x.shape and torch.isfinite(whole).all()
    rel = float((whole - x).square().mean() / x.square().mean())
    bound = 1e-5 if spec.passthrough else 0.05 if spec.bits >= 4 else 0.5 if spec.bits >= 2 else 4.0  # 1-bit min/max
    assert rel < bound, rel


def _kernel_cases() -> list[tuple[str, QuantSpec, QuantSpec]]:
    keys = [(n, s) for n, s in SAMPLES if codec.kernel_ok(s, "key")]
    values = [(n, s) for n, s in SAMPLES if codec.kernel_ok(s, "value")]
    if not keys or not values:
        return []
    return [(f"{kn}|{values[i % len(values)][0]}", ks, values[i % len(values)][1]) for i, (kn, ks) in enumerate(keys)]


@pytest.mark.parametrize(("name", "kspec", "vspec"), _kernel_cases(), ids=[c[0] for c in _kernel_cases()])
def test_kernel_reads_what_decode_specifies(name: str, kspec: QuantSpec, vspec: QuantSpec) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from kvtune.kernels.decode_attention import decode_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    flush = _flush(kspec) * _flush(vspec) // math.gcd(_flush(kspec), _flush(vspec))
    k, v = _x(2, flush * 2).to(dev), _x(3, flush * 2).to(dev)
    q = torch.randn(2, 6, 1, D, generator=torch.Generator().manual_seed(4)).half().to(dev)
    ks, vs = codec.fit(kspec, k), codec.fit(vspec, v)
    kf, vf = codec.encode(k, kspec, flush, ks), codec.encode(v, vspec, flush, vs)
    kq, vq = codec.kernel_operands(kspec, "key", kf, ks), codec.kernel_operands(vspec, "value", vf, vs)
    from kvtune.quant.rotation import rotation

    krot, vrot = rotation(kspec.rotation), rotation(vspec.rotation)
    from kvtune.quant import centering

    # a centered value spec: the kernel attends over centered values, the runtime adds the mean back
    out = centering.unshift(vspec, vs, vrot.inverse(decode_attention(krot.forward(q), kq, vq).float()))
    dk, dv = codec.decode(kf, kspec, flush, D, ks), codec.decode(vf, vspec, flush, D, vs)
    ref = torch.softmax((q.float() @ dk.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(D), -1) \
        @ dv.repeat_interleave(2, 1)
    scale = float(ref.abs().max().clamp_min(1.0))  # the kernel dequantizes and multiplies in fp16
    torch.testing.assert_close(out.cpu(), ref.cpu(), atol=1e-3 * scale, rtol=0)


def test_log8_kernel_operands_need_their_range() -> None:
    """normq log8 scales reach the kernel with their calibrated range ``[h, 2]``; without it stored tokens are
    refused in one line, an empty store gets a stand-in (no scale is read)."""
    from kvtune.errors import KVTuneError
    from kvtune.quant.families.normq import normq

    spec = normq(1.58, "uniform", scale_dtype="log8")
    assert codec.kernel_ok(spec, "value") and not codec.kernel_ok(normq(2, scale_fit="norm"), "key")
    x = _x(5, FLUSH)
    state = codec.fit(spec, x)
    stored = codec.encode(x, spec, FLUSH, state)
    assert torch.equal(codec.kernel_operands(spec, "value", stored, state).scale_range, state["scale_range"])
    with pytest.raises(KVTuneError, match="calibrated scale range") as err:
        codec.kernel_operands(spec, "key", stored, {})
    assert "\n" not in str(err.value)
    empty = {n: t[:, :, :0] for n, t in stored.items()}
    assert codec.kernel_operands(spec, "key", empty, {}).scale_range.shape == (3, 2)
