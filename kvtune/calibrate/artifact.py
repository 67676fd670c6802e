"""The calibration artifact: ``calib.yaml`` (readable summary) + ``calib.safetensors`` (tensors).

Both files are written atomically; the YAML records the safetensors' sha256, and loading checks it, the
schema version and every tensor's shape against the model identity, so a corrupt, truncated or mismatched
file is one clear :class:`~kvtune.errors.KVTuneError`. ``L`` layers, ``Hq``/``Hkv`` query/KV heads, ``D``
head dim, ``T`` seq_len, ``nq`` quantile levels, ``Ck``/``Cv`` key/value candidates, ``n`` reservoir rows.

Tensors (float32 unless noted; the search reads these names):

* ``sensitivity.key`` ``[L, Hkv, Ck]``, ``sensitivity.value`` ``[L, Hkv, Cv]``: relative attention-output MSE;
* ``kl.key`` ``[L, nk]``, ``kl.value`` ``[L, nv]``: end-to-end KL; column ``i`` is candidate ``kl_candidates[..][i]``;
* ``{keys,keys_pre_rope,values}.{absmax,min,max,mean,var}`` ``[L, Hkv, D]``, ``.quantiles`` ``[L, Hkv, D, nq]``,
  ``.token_norm_{mean,var,max}`` ``[L, Hkv]``, ``.token_norm_quantiles`` ``[L, Hkv, nq]``;
* ``outliers.{key,key_pre_rope,value}_scores`` ``[L, Hkv, D]`` (absmax / the head's median channel absmax),
  ``outliers.*_rank`` int64 ``[L, Hkv, D]`` (channel indices by score, descending);
* ``attention.{entropy,topk_mass,nonpivot_topk_mass,sink_score}`` ``[L, Hq]``, ``attention.pattern`` and
  ``attention.pivot_position`` int64 ``[L, Hq]``, ``attention.{normalized,far}_score_mean`` ``[L, Hq, T]``,
  ``attention.sink_rate`` ``[L, T]`` (share of sequences in which a position is a sink),
  ``attention.sink_tokens`` int64 ``[L, 4]`` (-1 = none);
* ``samples.query`` ``[L, Hq, n, D]``, ``samples.key``/``samples.value`` ``[L, Hkv, n, D]``: reservoir rows;
* ``recency.{key,value}`` ``[L, Hkv, len(WINDOWS), 2]``: the error left by the reference 2-bit key / value
  quantizer when the last ``R`` tokens (and the sink) stay fp16, relative to none (:mod:`kvtune.calibrate.recency`);
* ``fitted.{key|value}.{c}.{field}`` ``[L, Hkv, width]``: candidate ``c``'s calibrated ``layer``-scope state
  (e.g. a ``static`` spec's per-channel steps), fitted on the sensitivity sample; plans copy the chosen ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvtune.calibrate.attention import MAX_SINKS, PATTERN_LABELS
from kvtune.calibrate.recency import WINDOWS
from kvtune.calibrate.settings import CalibSettings
from kvtune.errors import KVTuneError
from kvtune.io import atomic_path, read_yaml, sha256_file, write_yaml_atomic
from kvtune.quant import codec
from kvtune.quant.formats import QuantSpec
from kvtune.quant.outliers import INDEX_FIELD

SCHEMA_VERSION = 1
CALIB_YAML, CALIB_TENSORS = "calib.yaml", "calib.safetensors"
IDENTITY_KEYS = ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim", "fingerprint")
_MOMENTS = ("absmax", "min", "max", "mean", "var")
_ATTN_FLOAT = ("entropy", "topk_mass", "nonpivot_topk_mass", "sink_score")


@dataclass(frozen=True)
class Calibration:
    """What calibration learned about one model on one text (see the module doc for tensor names)."""

    model: Mapping[str, Any]
    data: Mapping[str, Any]
    settings: CalibSettings
    key_candidates: tuple[QuantSpec, ...]
    value_candidates: tuple[QuantSpec, ...]
    kl_candidates: Mapping[str, tuple[int, ...]]
    summary: Mapping[str, Any] = field(default_factory=dict)
    timing: Mapping[str, float] = field(default_factory=dict)
    kvtune_version: str = ""
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        missing = [k for k in IDENTITY_KEYS if k not in self.model]
        if missing:
            raise ValueError(f"model identity lacks {missing}")
        if not self.key_candidates or not self.value_candidates:
            raise ValueError("candidate lists must not be empty")
        for kind, specs in (("key", self.key_candidates), ("value", self.value_candidates)):
            cols = tuple(self.kl_candidates.get(kind, ()))
            if any(not 0 <= i < len(specs) for i in cols):
                raise ValueError(f"kl_candidates.{kind} {list(cols)} out of range 0..{len(specs) - 1}")
        problem = check_tensors(self)
        if problem:
            raise ValueError(problem)

    @property
    def fingerprint(self) -> str:
        return str(self.model["fingerprint"])

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor by name; a clear error if this calibration does not have it."""
        if name not in self.tensors:
            raise KVTuneError(f"calibration has no tensor {name!r}", "re-run kvtune calibrate with this version")
        return self.tensors[name]

    def to_dict(self) -> dict[str, Any]:
        """The YAML document (without the ``tensors`` section, which :func:`save_calibration` adds)."""
        return {"schema_version": SCHEMA_VERSION, "kvtune_version": self.kvtune_version, "model": dict(self.model),
                "data": dict(self.data), "settings": self.settings.to_dict(),
                "candidates": {"key": [s.to_dict() for s in self.key_candidates],
                               "value": [s.to_dict() for s in self.value_candidates]},
                "kl_candidates": {k: list(v) for k, v in self.kl_candidates.items()},
                "pattern_labels": list(PATTERN_LABELS), "summary": dict(self.summary), "timing": dict(self.timing)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                  where: str = "calibration") -> Calibration:
        """Strict inverse of :meth:`to_dict`; every problem is a :class:`KVTuneError` naming ``where``."""
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise KVTuneError(f"{where}: schema_version {version!r} is not {SCHEMA_VERSION}",
                              "re-run kvtune calibrate with this kvtune (or upgrade kvtune)")
        try:
            cands = data["candidates"]
            keys = tuple(QuantSpec.from_dict(d, f"{where}.candidates.key[{i}]") for i, d in enumerate(cands["key"]))
            values = tuple(QuantSpec.from_dict(d, f"{where}.candidates.value[{i}]")
                           for i, d in enumerate(cands["value"]))
            kl = {k: tuple(int(i) for i in v) for k, v in dict(data["kl_candidates"]).items()}
            return cls(model=dict(data["model"]), data=dict(data["data"]),
                       settings=CalibSettings.from_dict(data["settings"], f"{where}.settings"),
                       key_candidates=keys, value_candidates=values, kl_candidates=kl,
                       summary=dict(data.get("summary") or {}), timing=dict(data.get("timing") or {}),
                       kvtune_version=str(data.get("kvtune_version", "")), tensors=dict(tensors))
        except KVTuneError:
            raise
        except ValueError as exc:
            raise KVTuneError(f"{where}: {exc}", "re-run kvtune calibrate --force") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise KVTuneError(f"{where}: invalid calibration ({type(exc).__name__}: {exc})",
                              "re-run kvtune calibrate --force") from None


def expected_shapes(c: Calibration) -> dict[str, tuple[int | None, ...]]:
    """Tensor name -> shape (None = any size) implied by the model identity, settings and candidates."""
    m, s = c.model, c.settings
    n_l, hq, hkv, d, nq = (int(m["num_layers"]), int(m["num_heads"]), int(m["num_kv_heads"]),
                           int(m["head_dim"]), len(s.quantiles))
    shapes: dict[str, tuple[int | None, ...]] = {
        "sensitivity.key": (n_l, hkv, len(c.key_candidates)), "sensitivity.value": (n_l, hkv, len(c.value_candidates)),
        "kl.key": (n_l, len(c.kl_candidates.get("key", ()))), "kl.value": (n_l, len(c.kl_candidates.get("value", ()))),
        "attention.normalized_score_mean": (n_l, hq, s.seq_len),
        "attention.far_score_mean": (n_l, hq, s.seq_len), "attention.sink_rate": (n_l, s.seq_len),
        "attention.sink_tokens": (n_l, MAX_SINKS),
        "attention.pattern": (n_l, hq), "attention.pivot_position": (n_l, hq),
        "samples.query": (n_l, hq, None, d), "samples.key": (n_l, hkv, None, d), "samples.value": (n_l, hkv, None, d)}
    for kind in ("keys", "keys_pre_rope", "values"):
        shapes.update({f"{kind}.{st}": (n_l, hkv, d) for st in _MOMENTS})
        shapes.update({f"{kind}.quantiles": (n_l, hkv, d, nq), f"{kind}.token_norm_quantiles": (n_l, hkv, nq)})
        shapes.update({f"{kind}.token_norm_{st}": (n_l, hkv) for st in ("mean", "var", "max")})
    for kind in ("key", "key_pre_rope", "value"):
        shapes.update({f"outliers.{kind}_scores": (n_l, hkv, d), f"outliers.{kind}_rank": (n_l, hkv, d)})
    shapes.update({f"attention.{st}": (n_l, hq) for st in _ATTN_FLOAT})
    shapes.update({f"recency.{role}": (n_l, hkv, len(WINDOWS), 2) for role in ("key", "value")})
    for role, cands in (("key", c.key_candidates), ("value", c.value_candidates)):
        for i, spec in enumerate(cands):
            shapes.update({f"fitted.{role}.{i}.{name}": (n_l, hkv, f.width)
                           for name, f in codec.layer_fields(spec, d).items() if name != INDEX_FIELD})
    return shapes


def check_tensors(c: Calibration) -> str | None:
    """The first problem with ``c.tensors`` (missing, unexpected, or wrongly shaped), or None."""
    shapes = expected_shapes(c)
    for name, shape in shapes.items():
        t = c.tensors.get(name)
        if t is None:
            return f"tensor {name} is missing"
        if t.dim() != len(shape) or any(w is not None and w != n for w, n in zip(shape, t.shape)):
            return f"tensor {name} has shape {list(t.shape)}, expected {[w if w is not None else '*' for w in shape]}"
    extra = sorted(set(c.tensors) - set(shapes))
    return f"unexpected tensor(s) {extra}" if extra else None


def save_calibration(calib: Calibration, out: str | Path) -> Path:
    """Write ``out/calib.safetensors`` then ``out/calib.yaml`` (with its sha256), each atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / CALIB_TENSORS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in calib.tensors.items()}, str(tmp))
        digest = sha256_file(tmp)
    data = calib.to_dict()
    data["tensors"] = {"file": CALIB_TENSORS, "sha256": digest, "names": sorted(calib.tensors)}
    write_yaml_atomic(out / CALIB_YAML, data)
    return out


def load_calibration(path: str | Path) -> Calibration:
    """Load a calibration directory (or its ``calib.yaml``), validating checksum, schema and shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    yaml_path = path / CALIB_YAML if path.is_dir() or path.suffix not in (".yaml", ".yml") else path
    data = read_yaml(yaml_path, "calibration")
    where = f"calibration {yaml_path}"
    meta = data.get("tensors")
    if not isinstance(meta, Mapping) or "sha256" not in meta:
        raise KVTuneError(f"{where} has no tensors section", "re-run kvtune calibrate --force")
    tfile = yaml_path.parent / str(meta.get("file", CALIB_TENSORS))
    if not tfile.is_file():
        raise KVTuneError(f"calibration tensors missing: {tfile}", "copy calib.safetensors with calib.yaml")
    if sha256_file(tfile) != meta["sha256"]:
        raise KVTuneError(f"calibration tensors {tfile} do not match the checksum in {yaml_path.name} "
                          "(corrupt or truncated)", "re-copy it or re-run kvtune calibrate --force")
    try:
        tensors = load_file(str(tfile))
    except (SafetensorError, OSError) as exc:
        raise KVTuneError(f"calibration tensors {tfile} cannot be read: {exc}",
                          "re-run kvtune calibrate --force") from None
    return Calibration.from_dict({k: v for k, v in data.items() if k != "tensors"}, tensors, where)
