"""compile_pointwise fuses the norms, MLPs and rotary embedding of a model without changing what it computes."""

from __future__ import annotations

import pytest
import torch
import transformers.models.llama.modeling_llama as modeling_llama

from kvtune.models import tiny_model
from kvtune.runtime.fuse import compile_pointwise


def test_compiled_norms_mlps_and_rope_compute_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    # the rotary function is swapped in transformers' modeling module: put the original back for the other tests
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16, vocab=64).float().eval()
    ids = torch.randint(1, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        assert compile_pointwise(model) == 2 * 2 + 1 + 2 + 1  # two norms and an MLP a layer, the final norm, rope
        out = model(ids).logits
        assert compile_pointwise(model) == 7  # the modules again (a fresh compile), the function not twice
    fused = [m for m in model.modules() if "forward" in vars(m)]  # an instance attribute replaces the class's
    assert len(fused) == 7 and all(type(m).__name__.endswith(("RMSNorm", "MLP")) for m in fused)
    assert getattr(modeling_llama.apply_rotary_pos_emb, "_kvtune_compiled", False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
