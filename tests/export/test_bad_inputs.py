"""Bad input to ``kvtune export``, for every target: one clear line naming the fix, nothing left half-written in
``--out``, and the source model directory unchanged (file list and bytes) whether the export fails or succeeds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from kvtune.errors import KVTuneError
from kvtune.export import TARGETS, export, read_back
from kvtune.plan import Plan, load_plan
from kvtune.plan_types import LayerPlan
from kvtune.quant.families.fp8 import fp8
from kvtune.quant.formats import FP16
from tests.export.conftest import KV_HEADS, LAYERS

FP8 = LayerPlan(key=fp8("e4m3", "tensor"), value=fp8("e4m3", "tensor"))
CHECKPOINT_TARGETS = ("compressed-tensors", "modelopt", "sglang", "vllm")  # fp8 writes a checkpoint for these


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (what "unchanged" means)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_plan_the_target_cannot_express_names_the_nearest_configuration(target: str, model_dir: Path,
                                                                          calib_dir: Path, tmp_path: Path) -> None:
    before, out = _tree(model_dir), tmp_path / "out"
    with pytest.raises(KVTuneError, match=rf"^{target} cannot store plan 'kv2' exactly; the nearest expressible "
                                          r"configuration is \S.* \(\d+\.\d{3} bits vs the plan's 3\.000\) "
                                          r"\(pass --round-up to export it"):
        export(load_plan("kv2"), target, out, model=str(model_dir), calib=calib_dir)
    assert _nothing_written(out) and _tree(model_dir) == before


@pytest.mark.parametrize("target", ["compressed-tensors", "sglang"])
def test_a_full_precision_layer_on_an_fp8_only_target_names_the_model_dtype(target: str, model_dir: Path,
                                                                            calib_dir: Path, tmp_path: Path) -> None:
    plan = Plan(layers=(LayerPlan(key=FP16, value=FP16), *(FP8,) * (LAYERS - 1)), name="first-layer-fp16")
    for round_up in (False, True):  # no fp8 configuration keeps layer 0 at 16 bits: --round-up cannot help
        with pytest.raises(KVTuneError, match="nearest expressible configuration is no KV-cache quantization"):
            export(plan, target, tmp_path / f"o{round_up}", model=str(model_dir), calib=calib_dir, round_up=round_up)
        assert _nothing_written(tmp_path / f"o{round_up}")
    # ModelOpt's per-layer map leaves layer 0 out: the same plan exports exactly
    result = export(plan, "modelopt", tmp_path / "mo", model=str(model_dir), calib=calib_dir)
    assert result.exact and read_back(tmp_path / "mo").layers == plan.layers


@pytest.mark.parametrize("target", CHECKPOINT_TARGETS)
def test_a_model_directory_without_safetensors(target: str, model_dir: Path, calib_dir: Path,
                                               tmp_path: Path) -> None:
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"  # config.json + pytorch_model.bin: what an old save_pretrained wrote
    legacy.mkdir()
    (legacy / "config.json").write_text((model_dir / "config.json").read_text())
    torch.save(load_file(str(model_dir / "model.safetensors")), legacy / "pytorch_model.bin")
    before = _tree(legacy)
    with pytest.raises(KVTuneError, match=r"model directory .*legacy has no \.safetensors weights \(export a "):
        export(Plan(layers=(FP8,), name="fp8"), target, tmp_path / "o", model=str(legacy), calib=calib_dir)
    assert _nothing_written(tmp_path / "o") and _tree(legacy) == before


def test_a_calibration_or_plan_of_another_model(model_dir: Path, calib_dir: Path, tmp_path: Path) -> None:
    from kvtune.models import load_identity, tiny_model

    other = tmp_path / "other"  # same shape, another vocabulary: another config fingerprint
    tiny_model(layers=LAYERS, heads=4, kv_heads=KV_HEADS, head_dim=64, vocab=256).save_pretrained(other)
    before = _tree(other)
    with pytest.raises(KVTuneError, match=r"calibration .* was made for another model .*calibrate this model"):
        export(Plan(layers=(FP8,)), "compressed-tensors", tmp_path / "c", model=str(other), calib=calib_dir)
    bound = Plan(layers=(FP8,) * LAYERS, name="mine", model=load_identity(str(model_dir)))
    with pytest.raises(KVTuneError, match=r"plan 'mine' was made for another model"):
        export(bound, "modelopt", tmp_path / "p", model=str(other), calib=calib_dir)
    assert _nothing_written(tmp_path / "c") and _nothing_written(tmp_path / "p") and _tree(other) == before


@pytest.mark.parametrize("kind", ["file", "non-empty directory"])
def test_an_existing_out_is_refused(kind: str, model_dir: Path, calib_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("keep me")
    else:
        out.mkdir()
        (out / "keep").write_text("keep me")
    before = _tree(tmp_path)
    with pytest.raises(KVTuneError, match=r"output directory .*out exists and is not empty \(pass a new --out"):
        export(Plan(layers=(FP8,)), "compressed-tensors", out, model=str(model_dir), calib=calib_dir)
    assert _tree(tmp_path) == before
    empty = tmp_path / "empty"  # an empty directory is fine
    empty.mkdir()
    export(Plan(layers=(FP8,)), "compressed-tensors", empty, model=str(model_dir), calib=calib_dir)


@pytest.mark.parametrize("copy", [False, True])
def test_the_source_model_directory_never_changes(copy: bool, model_dir: Path, calib_dir: Path,
                                                  tmp_path: Path) -> None:
    before = _tree(model_dir)
    for target in CHECKPOINT_TARGETS:
        out = tmp_path / target
        export(Plan(layers=(FP8,)), target, out, model=str(model_dir), calib=calib_dir, copy=copy)
        weights = out / "model.safetensors"
        assert weights.is_symlink() != copy and weights.read_bytes() == (model_dir / "model.safetensors").read_bytes()
        (out / "config.json").write_text("{}")  # editing the export must not reach the source either
    assert _tree(model_dir) == before


def test_cli_bad_input_is_one_line_and_exit_code_2(model_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from kvtune.cli import main

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main(["export", "llamacpp-q8_0", "--to", "llama.cpp", "--out", str(busy), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output directory") and "Traceback" not in err and len(err.splitlines()) == 1
