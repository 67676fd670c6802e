"""Plan round trip, presets, binding and every validation error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from kvtune.errors import KVTuneError
from kvtune.plan import Plan, load_plan, preset_names, save_plan
from kvtune.plan_types import HeadPlan, LayerPlan, ModelIdentity, Provenance, SalientPolicy
from kvtune.quant.formats import affine, kivi_key, kivi_value

IDENT = ModelIdentity("LlamaForCausalLM", 4, 8, 2, 64, "abc123")
PRESETS = ["fp16", "kivi-2bit", "kivi-4bit", "kv8", "k8v4", "kv4", "k4v2", "kv2"]


def _plan() -> Plan:
    heads = (HeadPlan(kivi_key(4), kivi_value(2)), HeadPlan(affine(bits=1.58, axis="channel", group=32, outliers=2),
                                                          affine(bits=3, axis="token", group=32, hadamard=True)))
    layers = (LayerPlan(key=kivi_key(2), value=kivi_value(2), residual=128),
              LayerPlan(heads=heads, salient=SalientPolicy(ratio=0.1, bits=4, sink_tokens=1)),
              LayerPlan(key=kivi_key(8), value=kivi_value(4)), LayerPlan())
    tensors = {"layers.1.key.outlier_idx": torch.tensor([[0, 5], [7, 63]], dtype=torch.int16)}
    return Plan(layers=layers, model=IDENT, name="t", budget=3.0, tensors=tensors,
                provenance=Provenance(kvtune_version="0.1.0", study="s", trial=7))


def test_roundtrip(tmp_path: Path) -> None:
    plan = _plan()
    save_plan(plan, tmp_path)
    back = load_plan(tmp_path)
    assert back == plan
    assert torch.equal(back.tensors["layers.1.key.outlier_idx"], plan.tensors["layers.1.key.outlier_idx"])
    data = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert data["effective_bits"] == pytest.approx(plan.effective_bits(), abs=1e-6)
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_bind(name: str) -> None:
    assert name in preset_names()
    plan = load_plan(name).bind(IDENT)
    assert len(plan.layers) == 4
    assert 2.0 <= plan.effective_bits() <= 16.0


def test_unknown_preset_lists_valid() -> None:
    with pytest.raises(KVTuneError, match=r"presets: .*kivi-2bit"):
        load_plan("kivi-3bit")


def test_wrong_model_is_clear() -> None:
    other = ModelIdentity("LlamaForCausalLM", 4, 8, 4, 64, "zzz")
    with pytest.raises(KVTuneError, match=r"another model.*num_kv_heads"):
        _plan().bind(other)


def _write(tmp_path: Path, mutate) -> Path:
    save_plan(_plan(), tmp_path)
    data = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    mutate(data)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(colour="red"), "unknown key"),
    (lambda d: d["layers"][0]["key"].update(bits=5), "unsupported bit width 5"),
    (lambda d: d["layers"][0]["key"].update(axis="diagonal"), "axis must be"),
    (lambda d: d["layers"][0].update(window=3), "unknown key"),
    (lambda d: d.update(schema_version=99), "newer than this kvtune"),
    (lambda d: d.pop("schema_version"), "missing schema_version"),
    (lambda d: d["layers"].pop(2), "without gaps"),
    (lambda d: d["layers"][1]["salient"].update(ratio=1.5), "ratio must be in"),
    (lambda d: d["tensors"].update(sha256="0" * 64), "checksum"),
    (lambda d: d["model"].update(num_layers=5), "layers but its model has"),
])
def test_validation_errors(tmp_path: Path, mutate, message: str) -> None:
    _write(tmp_path, mutate)
    with pytest.raises(KVTuneError, match=message):
        load_plan(tmp_path)


def test_truncated_tensors(tmp_path: Path) -> None:
    save_plan(_plan(), tmp_path)
    f = tmp_path / "plan.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(KVTuneError, match="corrupt or truncated"):
        load_plan(tmp_path)


def test_corrupt_yaml(tmp_path: Path) -> None:
    save_plan(_plan(), tmp_path)
    (tmp_path / "plan.yaml").write_text("layers: [unclosed")
    with pytest.raises(KVTuneError, match="not valid YAML"):
        load_plan(tmp_path)


def test_wrong_tensor_shape(tmp_path: Path) -> None:
    plan = _plan()
    tensors = {"layers.1.key.outlier_idx": torch.zeros(2, 3, dtype=torch.int16)}
    with pytest.raises(KVTuneError, match="expected \\[kv_heads, 2\\]"):  # refused when built
        Plan(layers=plan.layers, model=IDENT, tensors=tensors)
    save_plan(Plan(layers=plan.layers, model=IDENT), tmp_path)  # and when a file was edited
    from safetensors.torch import save_file

    from kvtune.io import read_yaml, sha256_file, write_yaml_atomic

    save_file(tensors, str(tmp_path / "plan.safetensors"))
    meta = read_yaml(tmp_path / "plan.yaml", "plan")
    meta["tensors"] = {"file": "plan.safetensors", "sha256": sha256_file(tmp_path / "plan.safetensors"),
                       "names": sorted(tensors)}
    write_yaml_atomic(tmp_path / "plan.yaml", meta)
    with pytest.raises(KVTuneError, match="expected \\[kv_heads, 2\\]"):
        load_plan(tmp_path)


def test_per_head_count_must_match_model() -> None:
    plan = _plan()
    with pytest.raises(KVTuneError, match="per-head specs"):
        Plan(layers=plan.layers).bind(ModelIdentity("LlamaForCausalLM", 4, 8, 3, 64))


def test_written_files_follow_the_umask_and_keep_a_replaced_files_mode(tmp_path: Path) -> None:
    """Atomic writes go through an owner-only temporary file; the plan they leave is readable as any new file
    (umask 022: 0644), so a serving engine running as another user can load it, and a rewrite keeps the mode the
    replaced file had."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        save_plan(_plan(), tmp_path)
        for f in tmp_path.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name
        (tmp_path / "plan.yaml").chmod(0o640)
        save_plan(_plan(), tmp_path)
        assert stat.S_IMODE((tmp_path / "plan.yaml").stat().st_mode) == 0o640
    finally:
        os.umask(old)
