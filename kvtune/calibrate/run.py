"""``calibrate()``: model name/path + text source -> a saved :class:`~kvtune.calibrate.artifact.Calibration`.

Inputs are checked before any weights load (bad path, empty text, ``tokens < seq_len``, ``seq_len`` beyond
the model's context: one-line :class:`~kvtune.errors.KVTuneError`). An ``out`` directory that already holds
a calibration made from the same inputs (model fingerprint, data hash, settings, candidate lists) is reused
unless ``force``; one that holds another model's calibration is an error unless ``force`` (which replaces it).

Devices: ``"auto"`` = CPU (float32) without CUDA; with CUDA, one GPU (bfloat16) when the weights fit in
its free memory, else ``device_map="auto"`` (accelerate) spreading layers over the GPUs and CPU -- the
statistics then accumulate on each layer's device and are moved to CPU at the end.

Measured, SmolLM2-135M, model cached, ``timing`` in ``calib.yaml`` records each run's: on 2 cores of an
AVX-512 Xeon, 61,440 tokens (the pydoc calib text has 61,784): 1 min 58 s wall (stats pass 91 s at 675 tok/s,
sensitivity 6.5 s, KL 16.5 s), peak RSS 2.1 GB; on 2 cores of an AVX2 AMD EPYC (~100 GFLOP/s, the bare
forward alone runs 300 tok/s) the same took 5 min 49 s (stats 255 s, sensitivity 31 s with 63 candidates,
KL 62 s). The default is therefore 32,768 tokens (16 chunks of 2048), which keeps every machine of that
kind under 5 minutes; the statistics converge well before that (outlier channels and sinks are the same).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from kvtune.calibrate.artifact import CALIB_YAML, Calibration, load_calibration, save_calibration
from kvtune.calibrate.pipeline import calibrate_model
from kvtune.calibrate.sensitivity import default_candidates, default_kl_candidates
from kvtune.calibrate.settings import CalibSettings, Progress, ProgressEvent
from kvtune.errors import KVTuneError

log = logging.getLogger(__name__)


def _settings(tokens: int, seq_len: int) -> CalibSettings:
    if not isinstance(tokens, int) or not isinstance(seq_len, int) or seq_len < 1:
        raise KVTuneError(f"tokens and seq_len must be positive integers, got {tokens!r} and {seq_len!r}")
    if tokens < seq_len:
        raise KVTuneError(f"tokens ({tokens}) is less than one sequence of seq_len ({seq_len})",
                          "raise --tokens or lower --seq-len")
    try:
        return CalibSettings(tokens=tokens, seq_len=seq_len)
    except ValueError as exc:
        raise KVTuneError(f"invalid calibration settings: {exc}") from None


def _config_identity(model_name_or_path: str) -> dict[str, Any]:
    """Identity (incl. fingerprint, max_position_embeddings) from the model's config alone."""
    from transformers import AutoConfig

    from kvtune.models import config_identity, resolve_model_dir

    model_dir = resolve_model_dir(model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KVTuneError(f"could not read {model_dir}/config.json: {first}", "check the model directory") from None
    return config_identity(config, fallback_arch=type(config).__name__)


def _check_out(out: Path) -> None:
    """Fail before any work if ``out`` cannot become a calibration directory (a file, or not writable)."""
    if out.exists() and not out.is_dir():
        raise KVTuneError(f"output path {out} exists and is not a directory", "choose another --out")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KVTuneError(f"cannot write to {parent}", "choose another --out")


def _existing(out: Path, fingerprint: str, force: bool) -> Calibration | None:
    """The calibration already in ``out``, if any and readable; another model's is an error unless ``force``."""
    if not (out / CALIB_YAML).is_file():
        return None
    try:
        old = load_calibration(out)
    except KVTuneError as exc:
        log.warning("ignoring unreadable calibration in %s: %s", out, exc)
        return None
    if old.fingerprint != fingerprint and not force:
        raise KVTuneError(f"{out} holds a calibration of another model ({old.model.get('architecture')}, "
                          f"fingerprint {old.fingerprint})", "choose another output directory or pass --force")
    return old


def _gpu_fits(model_dir: Path, device: int = 0) -> bool:
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    free, _ = torch.cuda.mem_get_info(device)
    return torch.cuda.device_count() == 1 and weights * 1.3 < free


def _load(model_name_or_path: str, device: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` on ``device`` ("auto", "cpu", "cuda", "cuda:N"), in eval mode."""
    from kvtune.models import load_model, resolve_model_dir

    if device == "auto" and not torch.cuda.is_available():
        device = "cpu"
    if device != "auto":
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        return load_model(model_name_or_path, device=device, dtype=dtype)
    model_dir = resolve_model_dir(model_name_or_path)
    if _gpu_fits(model_dir):
        return load_model(model_name_or_path, device="cuda", dtype=torch.bfloat16)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("model does not fit one GPU: loading with device_map='auto'")
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.bfloat16,
                                                 device_map="auto")
    return model.eval(), AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _same_inputs(old: Calibration, fingerprint: str, digest: str, settings: CalibSettings) -> bool:
    keys, values = default_candidates(int(old.model.get("head_dim", 0)) or None)
    kl_k, kl_v = default_kl_candidates(keys, values)
    return (old.fingerprint == fingerprint and old.data.get("sha256") == digest and old.settings == settings
            and old.key_candidates == keys and old.value_candidates == values
            and tuple(old.kl_candidates.get("key", ())) == tuple(kl_k)
            and tuple(old.kl_candidates.get("value", ())) == tuple(kl_v))


def calibrate(model_name_or_path: str, data: str = "pydoc:calib", tokens: int = 32768, seq_len: int = 2048,
              out: str | Path = "kvtune-calib", device: str = "auto", force: bool = False,
              progress: Progress | None = None) -> Calibration:
    """Calibrate ``model_name_or_path`` on ``data`` and save ``out/calib.yaml`` + ``out/calib.safetensors``.

    ``model_name_or_path``: an embedded model name (``smollm2-135m``) or a local HF directory. ``data``:
    ``pydoc:calib``, ``pydoc:eval`` or a UTF-8 text file. ``tokens``: at most this many tokens are used (all
    the text has if fewer), cut into ``seq_len`` chunks. ``progress(event: ProgressEvent)`` is called per
    chunk / layer. Returns the (new or reused) calibration.
    """
    from kvtune.data import data_hash, load_text, token_chunks

    settings = _settings(tokens, seq_len)
    text = load_text(data)
    if not text.strip():
        raise KVTuneError(f"text source {data!r} is empty", "pass a non-empty text")
    ident = _config_identity(model_name_or_path)
    max_pos = ident.get("max_position_embeddings")
    if max_pos and seq_len > max_pos:
        raise KVTuneError(f"seq_len {seq_len} exceeds the model's context of {max_pos} tokens",
                          f"use --seq-len <= {max_pos}")
    out, digest = Path(out), data_hash(text)
    _check_out(out)
    old = _existing(out, ident["fingerprint"], force)
    if old is not None and not force and _same_inputs(old, ident["fingerprint"], digest, settings):
        log.info("reusing the calibration in %s (same model, data and settings)", out)
        return old
    if progress is not None:
        progress(ProgressEvent("load", 0, 1))
    model, tokenizer = _load(model_name_or_path, device)
    chunks = token_chunks(tokenizer, text, seq_len, tokens)
    if chunks.numel() < tokens:
        log.info("the text gives %d tokens (%d chunks of %d), fewer than the %d asked for",
                 chunks.numel(), chunks.shape[0], seq_len, tokens)
    source = {"source": str(data), "sha256": digest, "chars": len(text)}
    calib = calibrate_model(model, chunks, settings, data=source, progress=progress)
    if progress is not None:
        progress(ProgressEvent("save", 0, 1))
    save_calibration(calib, out)
    if progress is not None:
        progress(ProgressEvent("done", 1, 1))
    return calib
