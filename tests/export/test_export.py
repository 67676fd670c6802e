"""``kvtune export`` on a tiny random model saved with ``save_pretrained``: every target writes what its engine
loads (names, shapes, dtypes as the loaders read them), reads back to the same plan, leaves the source model
untouched, and bad input is one clear line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtune.errors import KVTuneError
from kvtune.export import export, get_target, read_back
from kvtune.plan import Plan, load_plan
from kvtune.plan_types import LayerPlan
from kvtune.quant.families.fp8 import fp8
from tests.export.conftest import KV_HEADS, LAYERS


def _fp8_plan(scale: str = "tensor") -> Plan:
    return Plan(layers=(LayerPlan(key=fp8("e4m3", scale), value=fp8("e4m3", scale)),), name=f"fp8-{scale}")


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


CASES = {  # target -> plan it expresses exactly
    "compressed-tensors": lambda: _fp8_plan("tensor"),
    "modelopt": lambda: _fp8_plan("tensor"),
    "vllm": lambda: load_plan("turboquant_k3v4_nc"),
    "sglang": lambda: _fp8_plan("tensor"),
    "llama.cpp": lambda: load_plan("llamacpp-q8_0"),
}


@pytest.mark.parametrize("target", sorted(CASES))
def test_export_reads_back_to_the_same_plan(target: str, model_dir: Path, calib_dir: Path, tmp_path: Path) -> None:
    before = _hashes(model_dir)
    out = tmp_path / "out"
    result = export(CASES[target](), target, out, model=str(model_dir), calib=calib_dir)
    assert result.exact and not result.changes and result.plan_bits == pytest.approx(result.engine_bits)
    written = load_plan(out / "kvtune-plan")
    back = read_back(out)
    assert back.layers == written.layers == result.engine_plan.layers
    assert back.tensors.keys() == written.tensors.keys()
    for name, t in written.tensors.items():
        torch.testing.assert_close(back.tensors[name], t.float(), rtol=0, atol=0)
    assert (out / "launch.yaml").is_file()
    assert _hashes(model_dir) == before  # the source model never changes


def _scales(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "kv_cache_scales.safetensors"))


@pytest.mark.parametrize("scale", ["tensor", "head"])
def test_compressed_tensors_files_are_what_the_loaders_read(scale: str, model_dir: Path, calib_dir: Path,
                                                            tmp_path: Path) -> None:
    from kvtune.calibrate.artifact import load_calibration

    out = tmp_path / "ct"
    export(_fp8_plan(scale), "compressed-tensors", out, model=str(model_dir), calib=calib_dir)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    strategy = "tensor" if scale == "tensor" else "attn_head"
    assert qc["quant_method"] == "compressed-tensors" and qc["kv_cache_scheme"]["strategy"] == strategy
    # vllm/model_executor/layers/quantization/kv_cache.py: model.layers.N.self_attn.{k,v}_scale, float32,
    # [1] per tensor or [num_kv_heads, 1, 1] per head; k_scale = amax / 448 over the calibration
    scales = _scales(out)
    assert sorted(scales) == sorted(f"model.layers.{i}.self_attn.{r}_scale" for i in range(LAYERS) for r in "kv")
    shape = (1,) if scale == "tensor" else (KV_HEADS, 1, 1)
    assert all(t.dtype == torch.float32 and tuple(t.shape) == shape for t in scales.values())
    absmax = load_calibration(calib_dir).tensor("keys.absmax")[3]  # [Hkv, D]
    amax = absmax.amax() if scale == "tensor" else absmax.amax(-1)
    torch.testing.assert_close(scales["model.layers.3.self_attn.k_scale"].flatten(), (amax / 448).reshape(-1))
    # links, not copies: weights are the source's
    assert (out / "model.safetensors").is_symlink()


def test_compressed_tensors_config_validates_with_its_own_models(model_dir: Path, calib_dir: Path,
                                                                 tmp_path: Path) -> None:
    ct = pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (in the [dev] extra)")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig

    for scale in ("tensor", "head"):
        out = tmp_path / scale
        export(_fp8_plan(scale), "compressed-tensors", out, model=str(model_dir), calib=calib_dir)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        parsed = QuantizationConfig.model_validate(qc)
        args = QuantizationArgs.model_validate(qc["kv_cache_scheme"])
        assert parsed.kv_cache_scheme == args and args.num_bits == 8 and args.type == "float"
    assert ct.__version__


def test_modelopt_files_are_what_the_loaders_read(model_dir: Path, calib_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mo"
    export(_fp8_plan(), "modelopt", out, model=str(model_dir), calib=calib_dir)
    hf = json.loads((out / "hf_quant_config.json").read_text())
    assert hf["producer"]["name"] == "modelopt" and hf["quantization"]["kv_cache_quant_algo"] == "FP8"
    scales = _scales(out)  # vLLM modelopt.py: self_attn.k_proj.k_scale / v_proj.v_scale, float32 scalars
    assert "model.layers.0.self_attn.k_proj.k_scale" in scales and scales[
        "model.layers.5.self_attn.v_proj.v_scale"].shape == ()
    # a plan with unquantized layers: the per-layer MIXED_PRECISION map lists only the quantized ones
    mixed = Plan(layers=(LayerPlan(key=fp8(), value=fp8()),), name="mixed",
                 edges=load_plan("turboquant_4bit_nc").edges)
    out2 = tmp_path / "mo2"
    export(mixed, "modelopt", out2, model=str(model_dir), calib=calib_dir)
    q = json.loads((out2 / "hf_quant_config.json").read_text())["quantization"]
    assert q["kv_cache_quant_algo"] == "MIXED_PRECISION" and q["kv_cache_schema_version"] == 1
    assert sorted(q["kv_cache_quantized_layers"]) == [f"model.layers.{i}.self_attn" for i in (2, 3)]
    assert read_back(out2).layers == load_plan(out2 / "kvtune-plan").layers


@pytest.mark.parametrize("target", ["compressed-tensors", "modelopt"])
def test_transformers_loads_the_checkpoint_and_generates_the_same_tokens(target: str, model_dir: Path,
                                                                         calib_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ckpt"
    export(_fp8_plan(), target, out, model=str(model_dir), calib=calib_dir)
    ids = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    kw: dict[str, Any] = {"max_new_tokens": 8, "do_sample": False}
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval().generate(ids, **kw)
    got = AutoModelForCausalLM.from_pretrained(out).eval().generate(ids, **kw)
    assert torch.equal(ref, got)


def test_round_up_names_the_nearest_configuration(model_dir: Path, calib_dir: Path, tmp_path: Path) -> None:
    plan = load_plan("kivi-2bit")
    # 6 layers: TurboQuant would keep 4 at the model dtype, so fp8 (E4M3, scaled; before E5M2 on a tie) is cheapest
    with pytest.raises(KVTuneError, match=r"nearest expressible configuration is fp8 \(8.000 bits .*--round-up"):
        export(plan, "vllm", tmp_path / "a", model=str(model_dir))
    result = export(plan, "vllm", tmp_path / "b", model=str(model_dir), calib=calib_dir, round_up=True)
    assert not result.exact and result.changes and result.engine_bits > result.plan_bits
    assert any("residual 128" in line for line in result.changes)


@pytest.mark.parametrize("target", ["llama.cpp", "sglang", "compressed-tensors", "modelopt"])
def test_every_target_rounds_a_2bit_plan_up(target: str, model_dir: Path, calib_dir: Path, tmp_path: Path) -> None:
    result = export(load_plan("kv2"), target, tmp_path / "o", model=str(model_dir), calib=calib_dir, round_up=True)
    assert read_back(tmp_path / "o").layers == result.engine_plan.layers


def test_bad_inputs_are_one_line_errors(model_dir: Path, calib_dir: Path, tmp_path: Path) -> None:
    from kvtune.models import tiny_model

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(KVTuneError, match="exists and is not empty"):
        export(_fp8_plan(), "compressed-tensors", busy, model=str(model_dir), calib=calib_dir)
    with pytest.raises(KVTuneError, match="needs calibrated scales"):
        export(_fp8_plan(), "compressed-tensors", tmp_path / "n", model=str(model_dir))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(KVTuneError, match=r"no \.safetensors weights"):
        export(_fp8_plan(), "compressed-tensors", tmp_path / "m", model=str(bare), calib=calib_dir)
    other = tmp_path / "other"
    tiny_model(layers=LAYERS, heads=4, kv_heads=KV_HEADS, head_dim=64, vocab=256).save_pretrained(other)
    with pytest.raises(KVTuneError, match=r"calibration .* was made for another model"):
        export(_fp8_plan(), "compressed-tensors", tmp_path / "c", model=str(other), calib=calib_dir)
    with pytest.raises(KVTuneError, match="unknown export target"):
        get_target("tgi")


def test_cli_prints_bits_and_files(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtune.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "cli"
    assert main(["export", "kivi-2bit", "--to", "llama.cpp", "--out", str(out), "--model", str(model_dir)]) == 2
    assert "--round-up" in capsys.readouterr().err
    assert main(["export", "kivi-2bit", "--to", "llama.cpp", "--out", str(out), "--model", str(model_dir),
                 "--round-up"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "plan 3.4062 -> engine 4.5000" in text and "launch.yaml" in text and "kvtune eval --plan" in text
