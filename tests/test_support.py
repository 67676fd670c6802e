"""Unsupported designs are one-line KVTuneErrors before any work: from the config, at load, at cache creation."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoConfig

from kvtune.errors import KVTuneError
from kvtune.models import load_identity, load_model
from kvtune.plan import load_plan
from kvtune.support import check_config

REFUSED = {  # model_type -> words the message must contain
    "t5": "encoder-decoder", "whisper": "encoder-decoder", "deepseek_v3": "latent attention",
    "qwen3_next": "linear_attention", "jamba": "linear_attention", "falcon_h1": "'hybrid'",
    "mllama": "cross-attention",
}


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_config_refused_in_one_line(model_type: str) -> None:
    with pytest.raises(KVTuneError, match=REFUSED[model_type]) as info:
        check_config(AutoConfig.for_model(model_type))
    assert "\n" not in str(info.value) and "(use " in str(info.value)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma2", "gemma3_text", "gpt_oss", "llama4_text"])
def test_supported_configs_pass(model_type: str) -> None:
    check_config(AutoConfig.for_model(model_type))


def test_load_refuses_before_reading_weights(tmp_path: Path) -> None:
    AutoConfig.for_model("deepseek_v3").save_pretrained(tmp_path)  # config.json only: no weights to read
    with pytest.raises(KVTuneError, match="latent attention"):
        load_model(str(tmp_path))
    with pytest.raises(KVTuneError, match="latent attention"):
        load_identity(str(tmp_path))


def test_cache_creation_refuses_unsupported_model() -> None:
    fake = SimpleNamespace(config=AutoConfig.for_model("qwen3_next"), training=False)
    with pytest.raises(KVTuneError, match="linear_attention"):
        load_plan("fp16").cache(fake)


def test_window_without_size_is_refused(tmp_path: Path) -> None:
    cfg = AutoConfig.for_model("gemma2").to_dict()
    cfg["sliding_window"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KVTuneError):
        load_identity(str(tmp_path))
