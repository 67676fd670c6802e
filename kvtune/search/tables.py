"""What the search reads from a calibration: error tables, candidates, per-layer KL, identity, hashes.

:class:`CalibrationTables` is the search's whole view of a calibration (``kvtune.calibrate``'s
``calib.yaml`` + ``calib.safetensors``): :func:`load_tables` builds it from a calibration directory,
tests build it from synthetic tensors. ``L`` layers, ``H`` KV heads, ``Ck``/``Cv`` key/value candidates.

**Error weights.** ``sensitivity.*`` is the relative MSE of a layer/head's attention output; ``kl.*`` the
end-to-end next-token KL (nats) when one layer's K (or V) is quantized with a few candidates. Their ratio,
per layer, converts attention-output error into predicted KL: ``w_key[l] = kl.key[l, j] / mean_h
sens.key[l, h, c_j]`` (geometric mean over the KL columns ``j``, clipped to ``[median / 10, median * 10]``
so that one noisy layer cannot dominate; the median over layers stands in where a ratio is undefined).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtune.errors import KVTuneError
from kvtune.plan_types import ModelIdentity
from kvtune.quant.formats import QuantSpec
from kvtune.search.state import fitted_from_tensors
from kvtune.search.token_policies import SALIENT_RATIOS, attention_masses

WEIGHT_CLIP = 10.0  # a layer's KL weight stays within this factor of the median layer's
_IDENTITY_KEYS = ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim", "fingerprint")


@dataclass(frozen=True)
class CalibrationTables:
    """The calibration tables the search needs.

    ``sens_key`` float ``[L, H, Ck]``, ``sens_value`` ``[L, H, Cv]``: relative attention-output MSE per
    candidate. ``kl_key`` ``[L, nk]`` / ``kl_value`` ``[L, nv]``: end-to-end KL of candidates
    ``kl_key_candidates`` / ``kl_value_candidates`` (indices into the candidate lists).
    ``key_outlier_rank`` / ``value_outlier_rank`` int ``[L, H, D]`` (optional): channels by calibrated outlier
    score, most outlying first (plans store them for specs with outlier channels). ``sink_mass`` ``[L]`` and
    ``salient_mass`` ``[L, len(SALIENT_RATIOS)]`` (optional): attention shares of the first token and of the top
    salient tokens (:func:`kvtune.search.token_policies.attention_masses`); without them only "no token policy" is
    searched.
    """

    identity: ModelIdentity
    key_candidates: tuple[QuantSpec, ...]
    value_candidates: tuple[QuantSpec, ...]
    sens_key: torch.Tensor
    sens_value: torch.Tensor
    kl_key: torch.Tensor
    kl_value: torch.Tensor
    kl_key_candidates: tuple[int, ...] = ()
    kl_value_candidates: tuple[int, ...] = ()
    key_outlier_rank: torch.Tensor | None = None
    value_outlier_rank: torch.Tensor | None = None
    sink_mass: torch.Tensor | None = None
    salient_mass: torch.Tensor | None = None
    fitted: Mapping[str, torch.Tensor] = field(default_factory=dict)  # role.c.field -> [L, H, w] (search/state.py)
    recency_key: torch.Tensor | None = None  # [L, H, W, 2]: error left with a fp16 window / sink (search/recency.py)
    recency_value: torch.Tensor | None = None
    calibration_hash: str = ""
    data_hash: str = ""
    data_source: str = ""
    data_tokens: int = 0  # tokens of the text calibration read (validation holds out the ones after them)
    max_positions: int = 0  # the model's position limit (0: unknown)

    def __post_init__(self) -> None:
        n_l, h = self.identity.num_layers, self.identity.num_kv_heads
        shapes = {"sens_key": (n_l, h, len(self.key_candidates)), "sens_value": (n_l, h, len(self.value_candidates)),
                  "kl_key": (n_l, len(self.kl_key_candidates)), "kl_value": (n_l, len(self.kl_value_candidates))}
        for name, want in shapes.items():
            got = tuple(getattr(self, name).shape)
            if got != want:
                raise ValueError(f"{name} has shape {list(got)}, expected {list(want)}")
        for name in ("key_outlier_rank", "value_outlier_rank"):
            rank = getattr(self, name)
            if rank is not None and tuple(rank.shape) != (n_l, h, self.identity.head_dim):
                raise ValueError(f"{name} has shape {list(rank.shape)}, expected {[n_l, h, self.identity.head_dim]}")
        for name in ("recency_key", "recency_value"):
            t = getattr(self, name)
            if t is not None and (tuple(t.shape[:2]) != (n_l, h) or t.dim() != 4 or not bool(torch.isfinite(t).all())):
                raise ValueError(f"{name} must be finite with shape [{n_l}, {h}, W, 2], got {list(t.shape)}")
        masses = {"sink_mass": (n_l,), "salient_mass": (n_l, len(SALIENT_RATIOS))}
        for name, want in masses.items():
            t = getattr(self, name)
            if t is not None and (tuple(t.shape) != want or bool((t < 0).any()) or bool((t > 1).any())):
                raise ValueError(f"{name} must have shape {list(want)} with values in [0, 1]")
        for kind in ("key", "value"):
            n = len(getattr(self, f"{kind}_candidates"))
            if any(not 0 <= i < n for i in getattr(self, f"kl_{kind}_candidates")):
                raise ValueError(f"kl_{kind}_candidates out of range 0..{n - 1}")
        for name in ("sens_key", "sens_value", "kl_key", "kl_value"):
            t = getattr(self, name)
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError(f"{name} has negative or non-finite values")

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer KL weights ``(w_key [L], w_value [L])`` float64 (see the module doc)."""
        return (_kl_weights(self.sens_key, self.kl_key, self.kl_key_candidates),
                _kl_weights(self.sens_value, self.kl_value, self.kl_value_candidates))

    def head_errors(self) -> tuple[np.ndarray, np.ndarray]:
        """Predicted KL contribution of each head and candidate: ``w[l] * sens[l, h, c] / H``, float64
        ``[L, H, Ck]`` and ``[L, H, Cv]`` (summing a layer's heads gives its weighted mean error)."""
        w_k, w_v = self.weights()
        h = self.identity.num_kv_heads
        e_k = self.sens_key.double().numpy() * w_k[:, None, None] / h
        e_v = self.sens_value.double().numpy() * w_v[:, None, None] / h
        return e_k, e_v


def _kl_weights(sens: torch.Tensor, kl: torch.Tensor, columns: tuple[int, ...]) -> np.ndarray:
    """``kl [L, n] / mean_h sens[:, :, columns] [L, n]``, geometric mean over columns, clipped around the median."""
    n_layers = sens.shape[0]
    if not columns:
        return np.ones(n_layers)
    att = sens[:, :, list(columns)].double().mean(dim=1).numpy()  # [L, n]
    ratio = np.where((att > 0) & (kl.double().numpy() > 0), kl.double().numpy() / np.maximum(att, 1e-300), np.nan)
    with np.errstate(all="ignore"):
        log_w = np.nanmean(np.log(ratio), axis=1) if ratio.size else np.full(n_layers, np.nan)
    valid = np.isfinite(log_w)
    if not valid.any():
        return np.ones(n_layers)
    median = float(np.median(log_w[valid]))
    log_w = np.where(valid, log_w, median)
    clip = math.log(WEIGHT_CLIP)
    return np.exp(np.clip(log_w, median - clip, median + clip))


def _identity(model: Mapping[str, Any]) -> ModelIdentity:
    from kvtune.models import identity

    return identity(model)


def tables_from_calibration(calib: Any, calibration_hash: str = "") -> CalibrationTables:
    """The tables of a :class:`kvtune.calibrate.artifact.Calibration` (or anything with its attributes)."""
    t = calib.tensors
    sink = salient = None
    if "attention.far_score_mean" in t:
        sink, salient = attention_masses(t["attention.far_score_mean"])
    try:
        return CalibrationTables(
            identity=_identity(calib.model), key_candidates=tuple(calib.key_candidates),
            value_candidates=tuple(calib.value_candidates),
            sens_key=t["sensitivity.key"].float(), sens_value=t["sensitivity.value"].float(),
            kl_key=t["kl.key"].float(), kl_value=t["kl.value"].float(),
            kl_key_candidates=tuple(calib.kl_candidates.get("key", ())),
            kl_value_candidates=tuple(calib.kl_candidates.get("value", ())),
            key_outlier_rank=t.get("outliers.key_rank"), value_outlier_rank=t.get("outliers.value_rank"),
            sink_mass=sink, salient_mass=salient, fitted=fitted_from_tensors(t), recency_key=t.get("recency.key"),
            recency_value=t.get("recency.value"), calibration_hash=calibration_hash,
            data_hash=str(calib.data.get("sha256", "")), data_source=str(calib.data.get("source", "")),
            data_tokens=int(calib.summary.get("tokens_used", 0) or 0),
            max_positions=int(calib.model.get("max_position_embeddings") or 0))
    except (KeyError, ValueError, TypeError) as exc:
        raise KVTuneError(f"calibration tables are unusable: {exc}", "re-run kvtune calibrate --force") from None


def load_tables(path: str | Path) -> CalibrationTables:
    """Load a calibration directory (``calib.yaml`` + ``calib.safetensors``); every problem is one line."""
    from kvtune.calibrate.artifact import CALIB_YAML, load_calibration
    from kvtune.io import read_yaml

    path = Path(path)
    if not path.exists():
        raise KVTuneError(f"calibration not found: {path}", "run kvtune calibrate first or pass --calib DIR")
    calib = load_calibration(path)
    yaml_path = path / CALIB_YAML if path.is_dir() else path
    digest = str((read_yaml(yaml_path, "calibration").get("tensors") or {}).get("sha256", ""))
    return tables_from_calibration(calib, calibration_hash=digest)


def check_model(tables: CalibrationTables, model: str) -> None:
    """Raise unless ``model`` (name or HF directory) is the model the calibration was made from."""
    from kvtune.models import load_identity

    ident = load_identity(model)
    problem = tables.identity.mismatch(ident)
    if problem:
        problem = problem.replace("plan has", "calibration has")
        raise KVTuneError(f"the calibration was made for another model than {model} ({problem})",
                          "calibrate this model first or pass the calibration of this model")
