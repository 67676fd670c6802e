"""evaluate() on the embedded SmolLM2-135M, kept short: measured bytes equal the accountant, fp16 ~ dense."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def two_threads() -> Any:
    """Override the package's one-thread fixture: the real model's matmuls are worth two threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def test_embedded_eval_short(smollm: tuple[Any, Any]) -> None:
    from kvtune.data import load_text
    from kvtune.eval import EvalSettings, evaluate
    from kvtune.eval.baselines import get_baseline, identity_of, plan_method

    model, tok = smollm
    settings = EvalSettings(ctx=192, sequences=1, chunk=64, gen_tokens=8, gen_prompts=1, passkey_lengths=(192,),
                            passkey_depths=(0.5,))
    report = evaluate(model, tok, [plan_method("kivi-2bit"), get_baseline("fp16")], load_text("pydoc:eval"),
                      settings, data_name="pydoc:eval")
    plan, fp16 = report.rows
    assert plan.error is None and fp16.error is None
    ident = identity_of(model)
    elements = 2 * 192 * ident.num_layers * ident.num_kv_heads * ident.head_dim
    for row in (plan, fp16):  # the live cache holds exactly what the bit accountant counts at ctx
        assert row.cache_tokens == 192 and row.cache_bytes * 8 == pytest.approx(row.effective_bits * elements)
    assert fp16.effective_bits == pytest.approx(16.0) and plan.effective_bits < 16.0
    assert fp16.kl < 1e-3 and fp16.top1 > 0.98 and abs(fp16.delta_ppl) < 0.05 * report.reference["ppl"]
    assert plan.kl > fp16.kl and 0.0 <= plan.passkey <= 1.0 and plan.gen_agree is not None
