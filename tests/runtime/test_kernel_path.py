"""The fused Triton decode path through KVTuneCache equals the PyTorch reference path.

On a CUDA GPU the kernels run compiled; elsewhere under the Triton interpreter (``TRITON_INTERPRET=1``
is set by :mod:`tests.runtime.kernel_env` before the kernel modules are imported, as in tests/kernels).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from kvtune.plan import Plan, load_plan
from kvtune.plan_types import LayerPlan
from kvtune.runtime import KVTuneCache

from .kernel_env import DEV  # sets up the kernels (or skips this module)


def _plan(name: str) -> Plan:
    """A preset, or a plan of the newer families (rotated per-token codes -- 2-bit Lloyd-Max or evenly spaced --,
    with fp16 or one-byte log8 scales -- ranges fitted on the first block --; static per-channel key steps)."""
    from kvtune.quant.families.normq import normq
    from kvtune.quant.families.static import static
    from kvtune.quant.formats import affine

    layers = {"normq": LayerPlan(key=normq(2), value=normq(1.58, scale_dtype="log8"), residual=8),  # Lloyd-Max keys
              "static-normq": LayerPlan(key=static(2, pairs=False), value=normq(2, "uniform"), residual=16),
              "centered-normq": LayerPlan(key=normq(2, "uniform", scale_dtype="log8", center=True),
                                          value=normq(1.58, center=True), residual=8),
              # grids without a stored zero-point (the zero as a code offset): ternary keys, symmetric 4-bit values
              "derived-zero": LayerPlan(key=affine(bits=1.58, axis="channel", group=32),
                                        value=affine(bits=4, axis="token", group=16, symmetric=True), residual=8)}
    return Plan(layers=(layers[name],), name=name) if name in layers else load_plan(name)


def _decode(model: Any, plan_name: str, backend: str, ids: torch.Tensor,
            steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    cache = KVTuneCache(_plan(plan_name), model, backend=backend)
    logits = model(ids, past_key_values=cache).logits[:, -1:]
    tokens, seen = [], []
    for _ in range(steps):
        tok = logits.argmax(-1)
        tokens.append(tok)
        logits = model(tok, past_key_values=cache).logits
        seen.append(logits)
    if backend == "triton":  # the kernel really ran (every layer's specs are kernel-eligible)
        assert all(layer.kernel_specs for layer in cache.layers)
    return torch.cat(tokens, 1), torch.cat(seen, 1)


@pytest.mark.parametrize("plan_name", ["kv2", "normq", "static-normq", "centered-normq", "derived-zero"])
def test_kernel_decode_equals_reference(tiny_llama: tuple[Any, Any], plan_name: str) -> None:
    model, _ = tiny_llama
    model = copy.deepcopy(model).to(DEV)  # the session fixture stays on the CPU for the tests that follow
    ids = torch.randint(1, 128, (2, 70), generator=torch.Generator().manual_seed(0)).to(DEV)
    ref_tok, ref_logits = _decode(model, plan_name, "reference", ids, 10)
    ker_tok, ker_logits = _decode(model, plan_name, "triton", ids, 10)
    torch.testing.assert_close(ker_logits, ref_logits, atol=2e-3, rtol=0)
    assert torch.equal(ker_tok, ref_tok)


@pytest.mark.parametrize("arch", ["mistral", "llama4"])
def test_kernel_decode_in_windowed_layers(arch: str) -> None:
    """Sliding and chunked layers (window 16, blocks of 32) with a left-padded row: each row's quantized part
    starts at its window in the kernel, as in the reference."""
    from kvtune.tiny import tiny_model

    model = tiny_model(arch, layers=2, window=16).to(DEV)
    ids = torch.randint(1, 128, (2, 70), generator=torch.Generator().manual_seed(0)).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    out = {}
    for backend in ("reference", "triton"):
        cache = KVTuneCache(_plan("kv2"), model, backend=backend)
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1:]
        seen = []
        for _ in range(6):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits = model(logits.argmax(-1), attention_mask=mask, past_key_values=cache).logits
            seen.append(logits)
        mask = mask[:, :70]
        out[backend] = torch.cat(seen, 1)
        assert cache.token_counts(0)["evicted"] > 0
    assert all(layer.kernel_specs for layer in cache.layers)
    torch.testing.assert_close(out["triton"], out["reference"], atol=2e-3, rtol=0)
