"""The runtime on the real embedded model (SmolLM2-135M): an 8-bit plan decodes greedily exactly as fp16."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache

from kvtune.data import load_text
from kvtune.plan import load_plan

pytestmark = pytest.mark.slow


def test_kv8_greedy_64_tokens_equal_fp16(smollm: tuple[Any, Any]) -> None:
    """Exact equality is only meaningful where fp16's own greedy path has no near-tie (an 8-bit cache moves
    logits by ~0.1; this prompt's smallest top-2 margin is asserted to be larger than that)."""
    model, tok = smollm
    ids = tok(load_text("pydoc:eval")[:20000], return_tensors="pt").input_ids[:, 2000:2400]
    kw = {"max_new_tokens": 64, "min_new_tokens": 64, "do_sample": False, "attention_mask": torch.ones_like(ids),
          "output_scores": True, "return_dict_in_generate": True}
    ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
    top2 = torch.stack(ref.scores, 1)[0].topk(2).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 0.15
    ours = model.generate(ids, past_key_values=load_plan("kv8").cache(model), **kw)
    assert torch.equal(ours.sequences, ref.sequences)
