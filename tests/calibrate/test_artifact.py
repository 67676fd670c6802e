"""calib.yaml + calib.safetensors: round trip, and every corruption is one clear KVTuneError."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from kvtune.calibrate.artifact import (
    CALIB_TENSORS,
    CALIB_YAML,
    Calibration,
    load_calibration,
    save_calibration,
)
from kvtune.errors import KVTuneError

REQUIRED = ["sensitivity.key", "sensitivity.value", "kl.key", "kl.value", "keys.absmax", "keys_pre_rope.absmax",
            "values.absmax", "keys.quantiles", "outliers.key_scores", "outliers.key_rank", "outliers.value_rank",
            "attention.normalized_score_mean", "attention.entropy", "attention.topk_mass", "attention.sink_score",
            "attention.pattern"]


def test_round_trip(tiny_calibration: Calibration, tmp_path: Path) -> None:
    save_calibration(tiny_calibration, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {CALIB_YAML, CALIB_TENSORS}
    loaded = load_calibration(tmp_path)
    assert loaded == tiny_calibration  # all fields but tensors
    assert set(loaded.tensors) == set(tiny_calibration.tensors)
    for name, value in tiny_calibration.tensors.items():
        assert torch.equal(loaded.tensors[name], value), name
    assert load_calibration(tmp_path / CALIB_YAML).fingerprint == tiny_calibration.fingerprint


def test_required_names_shapes_and_yaml(tiny_calibration: Calibration, tmp_path: Path) -> None:
    c = tiny_calibration
    for name in REQUIRED:
        c.tensor(name)
    assert c.tensor("sensitivity.key").shape == (2, 2, len(c.key_candidates))
    assert c.tensor("sensitivity.value").dtype == torch.float32
    assert c.tensor("kl.key").shape == (2, 1) and c.tensor("attention.entropy").shape == (2, 4)
    assert c.tensor("outliers.key_rank").dtype == torch.int64 and c.tensor("attention.pattern").dtype == torch.int64
    save_calibration(c, tmp_path)
    doc = yaml.safe_load((tmp_path / CALIB_YAML).read_text())
    assert doc["schema_version"] == 1 and doc["model"]["fingerprint"] == c.fingerprint
    assert doc["candidates"]["key"][0] == {"bits": 1, "axis": "channel", "group": 32}
    assert doc["kl_candidates"] == {"key": [2], "value": [2]}
    assert doc["pattern_labels"] == ["dispersed", "text-salient", "pivot-token-salient"]
    assert doc["settings"]["seq_len"] == 64 and len(doc["tensors"]["sha256"]) == 64
    assert set(doc["summary"]) >= {"outlier_channels", "sink_tokens", "pattern_counts"}
    with pytest.raises(KVTuneError, match="no tensor"):
        c.tensor("nope")


def test_corrupt_tensor_file(tiny_calibration: Calibration, tmp_path: Path) -> None:
    save_calibration(tiny_calibration, tmp_path)
    data = bytearray((tmp_path / CALIB_TENSORS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / CALIB_TENSORS).write_bytes(bytes(data))
    with pytest.raises(KVTuneError, match="corrupt or truncated") as info:
        load_calibration(tmp_path)
    assert "\n" not in str(info.value)


def test_truncated_and_missing_tensor_file(tiny_calibration: Calibration, tmp_path: Path) -> None:
    save_calibration(tiny_calibration, tmp_path)
    path = tmp_path / CALIB_TENSORS
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(KVTuneError, match="corrupt or truncated"):
        load_calibration(tmp_path)
    path.unlink()
    with pytest.raises(KVTuneError, match="missing"):
        load_calibration(tmp_path)
    with pytest.raises(KVTuneError, match="not found"):
        load_calibration(tmp_path / "elsewhere")


def _edit_yaml(folder: Path, change) -> None:
    doc = yaml.safe_load((folder / CALIB_YAML).read_text())
    change(doc)
    (folder / CALIB_YAML).write_text(yaml.safe_dump(doc))


def test_schema_and_shape_mismatch(tiny_calibration: Calibration, tmp_path: Path) -> None:
    save_calibration(tiny_calibration, tmp_path)
    _edit_yaml(tmp_path, lambda d: d.update(schema_version=2))
    with pytest.raises(KVTuneError, match="schema_version"):
        load_calibration(tmp_path)
    save_calibration(tiny_calibration, tmp_path)
    _edit_yaml(tmp_path, lambda d: d["model"].update(num_layers=3))
    with pytest.raises(KVTuneError, match="shape"):
        load_calibration(tmp_path)
    (tmp_path / CALIB_YAML).write_text("schema_version: [1\n")
    with pytest.raises(KVTuneError, match="not valid YAML"):
        load_calibration(tmp_path)


def test_dataclass_validation(tiny_calibration: Calibration) -> None:
    tensors = dict(tiny_calibration.tensors)
    tensors["sensitivity.key"] = tensors["sensitivity.key"][:, :, :3]
    with pytest.raises(ValueError, match=r"sensitivity\.key"):
        dataclasses.replace(tiny_calibration, tensors=tensors)
    with pytest.raises(ValueError, match="kl_candidates"):
        dataclasses.replace(tiny_calibration, kl_candidates={"key": (99,), "value": (0,)})
