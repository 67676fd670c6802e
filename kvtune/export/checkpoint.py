"""A checkpoint directory an engine loads: the source model's files linked (or copied), never modified, plus a new
``config.json`` with a quantization block, optional extra JSON files and the KV scale tensors in their own
safetensors file (added to the weight index when the source is sharded, so vLLM's index filter keeps it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.io import atomic_path, write_text_atomic

SCALES_FILE = "kv_cache_scales.safetensors"
INDEX = "model.safetensors.index.json"
REWRITTEN = ("config.json", INDEX)


def check_source(model_dir: Path) -> list[Path]:
    """The source's safetensors weights (a clear error when it has none)."""
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise KVTuneError(f"model directory {model_dir} has no .safetensors weights",
                          "export a Hugging Face directory saved with safetensors (save_pretrained does)")
    return weights


def check_out(out: Path) -> None:
    """``out`` must not exist or be an empty directory."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KVTuneError(f"output directory {out} exists and is not empty", "pass a new --out directory")


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def write_checkpoint(model_dir: Path, out: Path, quantization_config: Mapping[str, Any],
                     scales: Mapping[str, torch.Tensor], extra: Mapping[str, Mapping[str, Any]] | None = None,
                     copy: bool = False) -> list[Path]:
    """Link (``copy``: copy) every source file but ``config.json`` and the index into ``out``; write ``config.json``
    with ``quantization_config``, ``extra`` JSON files, and ``scales`` (tensor name -> tensor). Returns new files."""
    from safetensors.torch import save_file

    check_source(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for src in sorted(p for p in model_dir.iterdir() if p.is_file() and p.name not in REWRITTEN):
        dst = out / src.name
        if copy:
            shutil.copy2(src, dst)
        else:
            os.symlink(src.resolve(), dst)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = dict(quantization_config)
    written.append(write_json(out / "config.json", config))
    for name, data in (extra or {}).items():
        written.append(write_json(out / name, data))
    if scales:
        with atomic_path(out / SCALES_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in scales.items()}, str(tmp), metadata={"format": "pt"})
        written.append(out / SCALES_FILE)
    if (model_dir / INDEX).is_file():
        index = json.loads((model_dir / INDEX).read_text(encoding="utf-8"))
        index.setdefault("weight_map", {}).update(dict.fromkeys(scales, SCALES_FILE))
        written.append(write_json(out / INDEX, index))
    return written


def read_scales(out: Path) -> dict[str, torch.Tensor]:
    """The scale tensors of an exported checkpoint (empty when it has none)."""
    from safetensors.torch import load_file

    path = out / SCALES_FILE
    return load_file(str(path)) if path.is_file() else {}


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise KVTuneError(f"{what} not found: {path}", "pass a directory written by kvtune export")
    return json.loads(path.read_text(encoding="utf-8"))
