"""End to end: tiny Llama/Mistral/Qwen2 in seconds, calibrate() input errors, reuse, and the real model (slow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvtune.calibrate import hooks, run
from kvtune.calibrate.artifact import load_calibration, save_calibration
from kvtune.calibrate.attention import PATTERN_LABELS
from kvtune.calibrate.pipeline import calibrate_model
from kvtune.calibrate.settings import CalibSettings, ProgressEvent
from kvtune.errors import KVTuneError
from kvtune.models import tiny_model

TEXT = "def f(x):\n    return x * 2  # doubles its argument\n" * 40


class CharTokenizer:
    """Stands in for a HF tokenizer in token_chunks: one token per character."""

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 128 for c in text]}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_tiny_models_end_to_end(arch: str, tmp_path: Path) -> None:
    model = tiny_model(arch, layers=2, heads=4, kv_heads=2, head_dim=16)
    ids = torch.randint(0, 128, (3, 64), generator=torch.Generator().manual_seed(0))
    events: list[ProgressEvent] = []
    settings = CalibSettings(tokens=192, seq_len=64, held_len=64, kl_len=32, attention_seqs=2)
    calib = calibrate_model(model, ids, settings, data={"source": "random"}, progress=events.append)
    assert [e.done for e in events if e.stage == "stats"] == [1, 2, 3]
    assert {e.stage for e in events} == {"stats", "sensitivity", "kl"}
    assert all(e.tokens_per_s > 0 for e in events if e.stage == "stats")
    assert calib.model["architecture"].lower().startswith(arch)
    assert sum(calib.summary["pattern_counts"].values()) == 2 * 4
    assert calib.tensor("sensitivity.value").isfinite().all() and (calib.tensor("sensitivity.value") >= 0).all()
    save_calibration(calib, tmp_path)
    assert load_calibration(tmp_path).tensor("kl.value").shape == (2, 1)
    assert model.config._attn_implementation == "sdpa" and not hooks._ROUTES  # nothing left behind
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_planted_outlier_channel_in_a_model_is_found() -> None:
    """Scaling one k_proj output row (KV head 1, channel 3) makes a pre-RoPE outlier channel; RoPE pairs
    channel c with c + D/2, so after RoPE the outlier sits in channel 3 or 11."""
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight[16 + 3] *= 40
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    settings = CalibSettings(tokens=128, seq_len=64, held_len=64, kl_len=16, attention_seqs=1)
    calib = calibrate_model(model, ids, settings)
    assert (calib.tensor("outliers.key_pre_rope_rank")[:, 1, 0] == 3).all()
    assert set(calib.tensor("outliers.key_rank")[:, 1, :2].flatten().tolist()) == {3, 11}
    assert (calib.tensor("outliers.key_pre_rope_scores")[:, 1, 3] > 10).all()
    assert calib.summary["outlier_channels"]["key_pre_rope"][0][1][0] == 3


@pytest.fixture
def tiny_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A saved tiny Llama directory; run._load is patched to load it with a character tokenizer."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    (tmp_path / "text.txt").write_text(TEXT)
    loads: list[str] = []

    def fake_load(name: str, device: str) -> tuple[Any, Any]:
        loads.append(name)
        return AutoModelForCausalLM.from_pretrained(name, local_files_only=True).eval(), CharTokenizer()

    monkeypatch.setattr(run, "_load", fake_load)
    return {"model": str(folder), "data": str(tmp_path / "text.txt"), "out": tmp_path / "calib", "loads": loads}


def test_calibrate_saves_reuses_and_forces(tiny_dir: dict[str, Any]) -> None:
    kw = {"data": tiny_dir["data"], "tokens": 1024, "seq_len": 256, "out": tiny_dir["out"]}
    first = run.calibrate(tiny_dir["model"], **kw)
    assert (tiny_dir["out"] / "calib.yaml").is_file() and first.summary["tokens_used"] == 1024
    again = run.calibrate(tiny_dir["model"], **kw)
    assert len(tiny_dir["loads"]) == 1 and again == first  # reused, model never loaded
    run.calibrate(tiny_dir["model"], **kw, force=True)
    assert len(tiny_dir["loads"]) == 2
    run.calibrate(tiny_dir["model"], **{**kw, "seq_len": 128})  # other settings: recomputed
    assert len(tiny_dir["loads"]) == 3


def test_out_dir_of_another_model(tiny_dir: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "other"
    tiny_model("llama", layers=3).save_pretrained(other)
    kw = {"data": tiny_dir["data"], "tokens": 512, "seq_len": 256, "out": tiny_dir["out"]}
    run.calibrate(tiny_dir["model"], **kw)
    with pytest.raises(KVTuneError, match="another model"):
        run.calibrate(str(other), **kw)
    assert run.calibrate(str(other), **kw, force=True).num_layers == 3


def test_bad_inputs_are_one_line_errors(tiny_dir: dict[str, Any], tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [
        ({"model_name_or_path": str(tmp_path / "missing")}, "model not found"),
        ({"data": str(tmp_path / "nope.txt")}, "not found"),
        ({"data": str(empty)}, "empty"),
        ({"tokens": 100, "seq_len": 256}, "less than one sequence"),
        ({"tokens": 4096, "seq_len": 1024}, "exceeds the model's context of 512"),
        ({"tokens": 10_000, "seq_len": 256}, None),  # more tokens than the text has: uses what there is
    ]
    for change, message in cases:
        kw = {"model_name_or_path": tiny_dir["model"], "data": tiny_dir["data"], "tokens": 512, "seq_len": 256,
              "out": tmp_path / "out", **change}
        if message is None:
            assert run.calibrate(**kw).summary["tokens_used"] == len(TEXT) // 256 * 256
            continue
        with pytest.raises(KVTuneError, match=message) as info:
            run.calibrate(**kw)
        assert "\n" not in str(info.value)


@pytest.mark.slow
def test_embedded_model_first_token_is_a_sink(smollm: tuple[Any, Any]) -> None:
    from kvtune.data import load_text, token_chunks

    model, tokenizer = smollm
    chunks = token_chunks(tokenizer, load_text("pydoc:calib"), 256, 512)  # 2 x 256 tokens
    settings = CalibSettings(tokens=512, seq_len=256, held_len=256, kl_len=8, attention_seqs=2)
    calib = calibrate_model(model, chunks, settings)
    sinks = calib.summary["sink_tokens"]
    assert sum(0 in s for s in sinks.values()) >= 0.6 * len(sinks)
    counts = calib.summary["pattern_counts"]
    assert sum(counts.values()) == 30 * 9 and counts[PATTERN_LABELS[2]] > 0
    assert calib.tensor("sensitivity.key").shape == (30, 3, len(calib.key_candidates))
    assert model.config._attn_implementation == "sdpa" and not hooks._ROUTES
