"""Token-type masks from VLM configs (tiny, created locally), spans and user masks; per-type plan policies."""

from __future__ import annotations

import pytest
import torch

from kvtune.errors import KVTuneError
from kvtune.plan import Plan, load_plan, save_plan
from kvtune.plan_types import LayerPlan, SalientPolicy
from kvtune.token_types import TOKEN_TYPES, TokenTypeFeed, as_mask, placeholder_ids, span_mask, token_type_mask

IMG, VID, SYS, TXT = TOKEN_TYPES["image"], TOKEN_TYPES["video"], TOKEN_TYPES["system"], TOKEN_TYPES["text"]


def _llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    return LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2), text_config=text, image_token_index=60)


def _qwen2vl_config():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                      "vocab_size": 64},
                         vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2},
                         image_token_id=61, video_token_id=62)


def test_llava_style_image_tokens() -> None:
    ids = torch.tensor([[1, 2, 60, 60, 60, 3], [60, 4, 5, 6, 7, 8]])
    mask = token_type_mask(ids, _llava_config(), system=1)
    assert mask.dtype == torch.int8 and mask.shape == ids.shape
    assert mask.tolist() == [[SYS, TXT, IMG, IMG, IMG, TXT], [IMG, TXT, TXT, TXT, TXT, TXT]]  # placeholders win


def test_qwen2vl_style_image_and_video_tokens() -> None:
    cfg = _qwen2vl_config()
    assert placeholder_ids(cfg) == {"image": 61, "video": 62}
    mask = token_type_mask(torch.tensor([[5, 61, 61, 62, 62, 62, 9]]), cfg)
    assert mask.tolist() == [[TXT, IMG, IMG, VID, VID, VID, TXT]]


def test_explicit_ids_and_missing_image_token_id() -> None:
    from transformers import LlamaConfig

    ids = torch.tensor([[7, 9, 9, 7]])
    assert token_type_mask(ids, image_token_id=9).tolist() == [[TXT, IMG, IMG, TXT]]
    assert token_type_mask(ids, LlamaConfig(), image_token_id=7).tolist() == [[IMG, TXT, TXT, IMG]]
    with pytest.raises(KVTuneError, match="LlamaConfig has no image placeholder token id"):
        token_type_mask(ids, LlamaConfig())
    with pytest.raises(KVTuneError, match="no image placeholder token id"):
        token_type_mask(ids)


def test_user_masks_and_spans() -> None:
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert as_mask(["text", "image", "image", "video", "system"], ids).tolist() == [[0, 1, 1, 2, 3]] * 2
    assert as_mask(torch.tensor([[0, 1, 1, 0, 0]]), ids).shape == (2, 5)
    assert span_mask(6, {"image": [(1, 3)], "video": [(4, 6)]}).tolist() == [[TXT, IMG, IMG, TXT, VID, VID]]
    with pytest.raises(KVTuneError, match="mask has 4 tokens but the input has 5"):
        as_mask(["text"] * 4, ids)
    with pytest.raises(KVTuneError, match="mask has 3 rows but the input has 2"):
        as_mask(torch.zeros(3, 5), ids)
    with pytest.raises(KVTuneError, match="unknown token type 'audio'"):
        as_mask(["audio"] * 5, ids)
    with pytest.raises(KVTuneError, match="unknown token type code 7"):
        as_mask([0, 1, 7, 0, 0], ids)
    with pytest.raises(KVTuneError, match=r"image span \(3, 9\) is outside"):
        span_mask(6, {"image": [(3, 9)]})


def test_feed_gives_types_by_logical_position() -> None:
    feed = TokenTypeFeed()
    feed.set(torch.tensor([[1, 1, 2]], dtype=torch.int8), start=10)
    assert feed.take(8, 6, 2, torch.device("cpu")).tolist() == [[0, 0, 1, 1, 2, 0]] * 2
    feed.set(None, 0)
    assert feed.take(0, 3, 1, torch.device("cpu")).tolist() == [[0, 0, 0]]


def test_per_type_policy_validates_and_round_trips(tmp_path) -> None:
    sal = SalientPolicy(ratio=0.1, bits=4, token_types={"video": 2, "image": 4})
    assert sal.token_types == (("image", 4.0), ("video", 2.0)) and sal.weight("text") == 1.0
    plan = Plan(layers=(LayerPlan(salient=sal),), name="typed")
    again = Plan.from_dict(plan.to_dict())
    assert again == plan and again.to_dict()["layers"]["all"]["salient"]["token_types"] == {"image": 4.0, "video": 2.0}
    assert load_plan(save_plan(plan, tmp_path / "p")) == plan
    for bad, msg in (({"audio": 1}, "unknown token type 'audio'"), ({"image": -1}, "must be finite and >= 0"),
                     ([1, 2], "must map token types to weights")):
        with pytest.raises(KVTuneError, match=msg):
            LayerPlan.from_dict({"salient": {"ratio": 0.1, "token_types": bad}}, "plan.layers.0")


def test_weights_do_not_change_the_bits() -> None:
    from kvtune.plan_types import ModelIdentity

    ident = ModelIdentity("LlamaForCausalLM", 2, 4, 2, 64)
    plain, typed = load_plan("vidkv-1.58bit"), load_plan("vidkv-1.58bit")
    assert typed.layers[0].salient.token_types  # the preset weights visual tokens
    from dataclasses import replace

    plain = replace(plain, layers=(replace(plain.layers[0], salient=replace(plain.layers[0].salient, token_types=())),))
    assert plain.effective_bits(4096, ident) == typed.effective_bits(4096, ident)
