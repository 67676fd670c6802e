"""The bit accountant against hand-computed examples (D=64, 3 KV heads, L=4096)."""

from __future__ import annotations

import pytest

from kvtune.plan_types import LayerPlan, MergePolicy, SalientPolicy
from kvtune.quant.bits import layer_bits, token_counts
from kvtune.quant.formats import QuantSpec, affine, kivi_key, kivi_value

H, D, L = 3, 64, 4096


def test_fp16_is_sixteen_bits() -> None:
    assert layer_bits(LayerPlan(), H, D, L).effective == 16.0


@pytest.mark.parametrize("bits,expected", [(2, 3.0), (4, 5.0), (8, 9.0), (1, 2.0), (3, 4.0)])
def test_uniform_g32_asymmetric(bits: float, expected: float) -> None:
    # codes b bits + (16-bit scale + 16-bit zero) / 32 elements = b + 1
    layer = LayerPlan(key=kivi_key(bits), value=kivi_value(bits))
    assert layer_bits(layer, H, D, L).effective == pytest.approx(expected)


def test_kivi2_with_residual_by_hand() -> None:
    # 4096 - 128 = 3968 quantized tokens at 3 bits, 128 fp16 tokens
    layer = LayerPlan(key=kivi_key(2), value=kivi_value(2), residual=128)
    assert layer_bits(layer, H, D, L).effective == pytest.approx((3968 * 3 + 128 * 16) / 4096)


def test_ternary_symmetric_stores_no_zero() -> None:
    # 13 bytes per 64 channels = 1.625 bits + 16-bit scale per 32-token group per channel = 0.5
    layer = LayerPlan(key=affine(bits=1.58, axis="channel", group=32),
                      value=affine(bits=1.58, axis="channel", group=32))
    b = layer_bits(layer, H, D, L)
    assert b.zeros == 0
    assert b.effective == pytest.approx(13 * 8 / 64 + 0.5)


def test_partial_group_tokens_stay_fp16() -> None:
    layer = LayerPlan(key=kivi_key(2), value=kivi_value(2))
    assert token_counts(layer, 100) == {"merged": 0, "fp16": 4, "quantized": 96, "salient": 0, "evicted": 0}
    assert token_counts(LayerPlan(key=kivi_key(2), value=kivi_value(2), residual=128), 100)["fp16"] == 100


def test_outliers_counted_with_indices() -> None:
    spec = affine(bits=2, axis="channel", group=32, outliers=2)
    b = layer_bits(LayerPlan(key=spec, value=QuantSpec()), 1, D, 32)
    # key: 62 main channels -> 16 bytes/token codes, scales+zeros 62*32 bits, outliers 2*16 bits/token + 2 idx
    assert b.codes == 32 * 16 * 8 + 32 * 64 * 16
    assert b.outliers == 32 * 2 * 16
    assert b.indices == 2 * 16
    assert b.scales == 62 * 16 and b.zeros == 62 * 16


def test_salient_and_sinks() -> None:
    layer = LayerPlan(key=kivi_key(2), value=kivi_value(2), salient=SalientPolicy(ratio=0.1, bits=16, sink_tokens=4))
    counts = token_counts(layer, 4096)
    assert counts["fp16"] == 4 + (4092 % 32) and counts["quantized"] == 4092 - 4092 % 32
    assert counts["salient"] == int(0.1 * counts["quantized"])
    b = layer_bits(layer, 1, D, 4096)
    assert b.salient == 2 * counts["salient"] * (D * 16 + 16)


def test_merge_reduces_stored_tokens() -> None:
    layer = LayerPlan(key=kivi_key(2), value=kivi_value(2), merge=MergePolicy(ratio=0.5, method="elastic"))
    assert token_counts(layer, 4096)["merged"] == int(0.5 * (4096 - 36))
    assert layer_bits(layer, H, D, L).effective < 2.0


def test_per_head_mix_is_the_mean() -> None:
    from kvtune.plan_types import HeadPlan

    heads = (HeadPlan(kivi_key(4), kivi_value(4)), HeadPlan(kivi_key(2), kivi_value(2)))
    b = layer_bits(LayerPlan(heads=heads), 2, D, L)
    assert b.effective == pytest.approx(4.0)


def test_windowed_layers_count_what_they_hold() -> None:
    """A sliding layer holds its window (+ what a flush needs); its elements are a windowed fp16 cache's."""
    from kvtune.layout import LayerSpan
    from kvtune.plan_types import SalientPolicy
    from kvtune.quant.bits import evict_step

    span = LayerSpan("sliding", 512)
    fp16 = LayerPlan()
    assert evict_step(fp16, 2, 64) == 1 and evict_step(LayerPlan(key=kivi_key(2), value=kivi_value(2)), 2, 64) == 32
    assert token_counts(fp16, 4096, span, 1) == {"merged": 0, "fp16": 0, "quantized": 511, "salient": 0,
                                                 "evicted": 3585}
    assert layer_bits(fp16, 2, 64, 4096, span).effective == 16.0
    kivi = LayerPlan(key=kivi_key(2), value=kivi_value(2), residual=128, salient=SalientPolicy(sink_tokens=4))
    counts = token_counts(kivi.windowed(span), 4096, span, 32)
    assert (counts["evicted"], counts["quantized"], counts["fp16"]) == (3584, 384, 128)  # 512 held, 511 visible
    assert layer_bits(kivi, 2, 64, 4096, span).elements == 2 * 511 * 64 * 2
    assert layer_bits(kivi, 2, 64, 100, span) == layer_bits(kivi.windowed(span), 2, 64, 100)  # inside the window
