"""End-to-end check of plans on a tiny model, and the rank correlation used to report proxy quality."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvtune.plan import load_plan
from kvtune.plan_types import ModelIdentity
from kvtune.search.validate import spearman, validate_plans


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 25, 90]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties get average ranks
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_validate_plans_on_a_tiny_model(tiny_llama: tuple[Any, Any]) -> None:
    from kvtune.models import model_identity

    model, _ = tiny_llama
    ident = model_identity(model)
    identity = ModelIdentity(**{k: ident[k] for k in ("architecture", "num_layers", "num_heads", "num_kv_heads",
                                                      "head_dim", "fingerprint")})
    plans = [load_plan(name).bind(identity) for name in ("fp16", "kv8", "kv2")]
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(0))
    calls: list[int] = []
    info, results = validate_plans(model, plans, ids, chunk=32, on_plan=calls.append)
    assert calls == [0, 1, 2] and info["sequences"] == 2 and info["length"] == 96
    fp16, kv8, kv2 = (r["kl"] for r in results)
    assert fp16 < 1e-6 and kv2 > 100 * kv8 > 0  # a random tiny model: small KLs, clearly ordered
    assert all(r["ppl"] > 1 and 0 <= r["top1"] <= 1 for r in results)
    assert info["reference_ppl"] == pytest.approx(results[0]["ppl"], rel=1e-3)
