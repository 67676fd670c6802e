"""Candidate lists, token-group handling, attention-output sensitivity and per-layer KL."""

from __future__ import annotations

import torch

from kvtune.calibrate.attention import probe_positions
from kvtune.calibrate.pipeline import outlier_ranking
from kvtune.calibrate.sensitivity import (
    default_candidates,
    default_kl_candidates,
    layer_kl,
    layer_sensitivity,
    quantize_tokens,
)
from kvtune.models import tiny_model
from kvtune.quant.formats import QuantSpec, affine


def test_default_candidates() -> None:
    keys, values = default_candidates()
    assert 20 <= len(keys) <= 50 and 20 <= len(values) <= 50
    assert len(set(keys)) == len(keys) and len(set(values)) == len(values)
    assert {s.bits for s in keys} >= {1, 1.58, 2, 3, 4, 8} and {s.bits for s in values} >= {1, 1.58, 2, 3, 4, 8}
    assert {s.family for s in keys} == {"affine", "normq", "static"}
    assert {s.family for s in values} == {"affine", "normq"}
    assert all(s.params.axis == "channel" for s in keys if s.family == "affine")
    assert any(s.rotated for s in values)
    assert any(s.params.channel_separable for s in values if s.family == "affine")
    assert {s.outliers for s in keys} >= {0, 1, 2, 4}
    k, v = default_kl_candidates(keys, values)
    assert keys[k[0]] == affine(2, "channel", 32) and values[v[0]] == affine(2, "token", 32)
    assert all(QuantSpec.from_dict(s.to_dict()) == s for s in keys + values)


def test_quantize_tokens_keeps_the_ragged_tail_in_fp16() -> None:
    x = torch.randn(1, 2, 70, 16, generator=torch.Generator().manual_seed(0))
    y = quantize_tokens(x, affine(2, "channel", 32))
    torch.testing.assert_close(y[..., 64:, :], x[..., 64:, :].half().float())
    assert (y[..., :64, :] - x[..., :64, :]).abs().max() > 1e-2
    assert quantize_tokens(x, affine(2, "token", 32)).shape == x.shape


def _planted_qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [1, 4, 256, 32], k/v [1, 2, 256, 32]; key channel 5 of KV head 1 is a 30x outlier."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 256, 32, generator=gen) for h in (4, 2, 2))
    k[:, 1, :, 5] = k[:, 1, :, 5] * 30 + 10
    return q, k, v


def test_planted_outlier_channel_is_ranked_first() -> None:
    _, k, _ = _planted_qkv()
    scores, rank = outlier_ranking(k.abs().amax(dim=2))  # [1, Hkv, D]
    assert rank[0, 1, 0] == 5 and scores[0, 1, 5] > 10 and scores[0, 0].max() < 3


def test_sensitivity_orders_bits_and_rewards_outliers() -> None:
    q, k, v = _planted_qkv()
    keys = (affine(2, "channel", 32), affine(2, "channel", 32, outliers=1), affine(8, "channel", 32))
    values = (affine(2, "token", 32), affine(4, "token", 32), affine(8, "token", 32))
    _, rank = outlier_ranking(k.abs().amax(dim=2))
    sk, sv = layer_sensitivity(q, k, v, probe_positions(256), 32 ** -0.5, keys, values, key_rank=rank[0])
    assert sk.shape == (2, 3) and sv.shape == (2, 3) and sk.dtype == torch.float32
    assert (sv[:, 0] > sv[:, 1]).all() and (sv[:, 1] > sv[:, 2]).all()
    assert (sk[:, 2] < sk[:, 0]).all()
    assert sk[1, 1] < sk[1, 0] * 0.5  # keeping the planted channel in fp16 helps head 1


def test_layer_kl_shapes_and_ordering() -> None:
    model = tiny_model("llama", layers=2)
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    kl_k, kl_v = layer_kl(model, ids, [affine(1, "channel", 32), affine(8, "channel", 32)],
                          [affine(16)])
    assert kl_k.shape == (2, 2) and kl_v.shape == (2, 1)
    assert (kl_k[:, 0] > kl_k[:, 1]).all() and (kl_k >= 0).all()
    assert kl_v.abs().max() < 1e-6  # fp16 passthrough ~ lossless


def test_default_candidates_reach_below_two_bits_without_one_bit_everywhere() -> None:
    """A 2-bit budget needs cheaper choices than 1-bit g32 (2.0 bits stored): 2-bit keys at g128 and
    ternary values over a whole 64-channel head fit it together."""
    from kvtune.search.space import spec_cost

    keys, values = default_candidates()
    per_elem = lambda s: spec_cost(s, 64) / (4096 * 64)
    assert min(per_elem(s) for s in keys) < 1.5 and min(per_elem(s) for s in values) < 1.6
    two_bit_keys = [per_elem(s) for s in keys if s.bits == 2]
    low_values = [per_elem(s) for s in values if s.bits >= 1.58]
    assert (min(two_bit_keys) + min(low_values)) / 2 < 2.1
    cs = next(s for s in values if s.family == "affine" and s.params.channel_separable and s.bits == 2
              and s.params.group == 32)
    assert per_elem(cs) == 2 + 32 / 32 + 16 / 32  # codes, scale+zero per 32 channels, norm per 32-token block
