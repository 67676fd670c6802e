"""Plan: the deployable artifact (``plan.yaml`` + ``plan.safetensors``), and presets by name.

A plan holds one :class:`~kvtune.plan_types.LayerPlan` per model layer, or exactly one *template*
layer (presets) that :meth:`Plan.bind` expands for a given model, optionally with overrides of its first and last
layers (:class:`~kvtune.plan_types.EdgeLayers`; YAML ``layers: {all: ..., first: {count: 2, layer: ...},
last: ...}``). Tensors -- the quantizers' calibrated
``layer``-scope state, named ``layers.{i}.{key|value}.{field}`` ``[Hkv, width]`` (e.g. outlier channel indices
``outlier_idx`` int16 ``[Hkv, o]``), checked against what the layer's specs declare -- live in the safetensors
file whose sha256 is recorded in the YAML. Loading validates strictly and fails with one clear line.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from kvtune.errors import KVTuneError, strict_mapping
from kvtune.io import atomic_path, read_yaml, sha256_file, write_yaml_atomic
from kvtune.plan_types import EDGES, EdgeLayers, LayerPlan, ModelIdentity, Provenance
from kvtune.quant import codec
from kvtune.quant.bits import REFERENCE_LENGTH, BitBreakdown, layers_bits
from kvtune.quant.outliers import INDEX_FIELD
from kvtune.quant.rotation import rotation

SCHEMA_VERSION = 1
PLAN_YAML, PLAN_TENSORS = "plan.yaml", "plan.safetensors"


@dataclass(frozen=True)
class Plan:
    """Per-layer K/V quantization for one model (or a template for any model)."""

    layers: tuple[LayerPlan, ...]
    model: ModelIdentity | None = None
    name: str = ""
    description: str = ""
    budget: float | None = None
    reference_length: int = REFERENCE_LENGTH
    provenance: Provenance = Provenance()
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False, hash=False)
    edges: tuple[EdgeLayers, ...] = ()

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a plan needs at least one layer")
        if self.edges and (self.model is not None or len(self.layers) != 1):
            raise ValueError("first/last layer overrides belong to a template (one 'all' layer, no model)")
        if len({e.edge for e in self.edges}) != len(self.edges):
            raise ValueError("at most one 'first' and one 'last' override")
        if self.model is not None and len(self.layers) not in (1, self.model.num_layers):
            raise ValueError(f"plan has {len(self.layers)} layers but its model has {self.model.num_layers}")
        if self.reference_length <= 0:
            raise ValueError("reference_length must be > 0")
        _check_tensors(self, f"plan {self.name or ''}".strip())

    @property
    def is_template(self) -> bool:
        """A template (preset) applies one layer plan to every layer of any model."""
        return self.model is None

    def bind(self, identity: ModelIdentity) -> Plan:
        """This plan for ``identity``: expands a template, or checks a bound plan matches."""
        if self.model is not None:
            problem = self.model.mismatch(identity)
            if problem:
                raise KVTuneError(f"plan '{self.name or 'plan'}' was made for another model ({problem})",
                                  "calibrate and search for this model, or load the right plan")
            if self.model.layout is None and identity.layout is not None:  # a plan written before layouts
                return replace(self, model=replace(self.model, layout=identity.layout)).bind(identity)
            if len(self.layers) == identity.num_layers:
                return self
        layers = list(self.layers * identity.num_layers if len(self.layers) == 1 else self.layers)
        for edge in self.edges:
            for i in edge.indices(identity.num_layers):
                layers[i] = edge.layer
        for i, layer in enumerate(layers):
            for spec in (s for h in layer.head_plans(identity.num_kv_heads) for s in (h.key, h.value)):
                if spec.outliers >= identity.head_dim:
                    raise KVTuneError(f"layer {i}: {spec.outliers} outlier channels >= head_dim {identity.head_dim}")
                rotation(spec.rotation).check(identity.head_dim)
        return replace(self, layers=tuple(layers), model=identity, edges=())

    def layer_state(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        """Layer ``i``'s calibrated quantizer state from the plan's tensors: ``{role: {field: [Hkv, width]}}``."""
        state: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in self.tensors.items():
            _, layer, role, field_name = name.split(".", 3)
            if int(layer) == i:
                state.setdefault(role, {})[field_name] = t
        return state

    def bits(self, length: int | None = None, identity: ModelIdentity | None = None) -> BitBreakdown:
        """Exact stored bits at ``length`` (default: the reference length); sliding-window and chunked layers of
        the model's layout are priced by what they hold, against a windowed fp16 cache (:mod:`kvtune.quant.bits`)."""
        plan = self.bind(identity) if identity is not None else self
        if plan.model is None:
            raise KVTuneError("a template plan has no model", "pass the model identity (e.g. --model)")
        return layers_bits(plan.layers, plan.model.num_kv_heads, plan.model.head_dim,
                           length or self.reference_length, plan.model.spans)

    def effective_bits(self, length: int | None = None, identity: ModelIdentity | None = None) -> float:
        return self.bits(length, identity).effective

    def cache(self, model: Any, static: bool = False, **kwargs: Any) -> Any:
        """A :class:`kvtune.runtime.cache.KVTuneCache` for ``model`` (checks the model identity); ``static=True``:
        a :class:`kvtune.runtime.static_cache.StaticKVTuneCache` (``batch=``, ``max_length=``; CUDA graphs)."""
        if static:
            from kvtune.runtime.static_cache import StaticKVTuneCache

            return StaticKVTuneCache(self, model, **kwargs)
        from kvtune.runtime.cache import KVTuneCache

        return KVTuneCache(self, model, **kwargs)

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "name": self.name}
        if self.description:
            d["description"] = self.description
        if self.model is not None:
            d["model"] = self.model.to_dict()
        d["reference_length"] = self.reference_length
        if self.budget is not None:
            d["budget"] = self.budget
        if self.model is not None:
            d["effective_bits"] = round(self.effective_bits(), 6)
        prov = {f.name: getattr(self.provenance, f.name) for f in fields(Provenance)}
        prov["extra"] = dict(self.provenance.extra)
        d["provenance"] = prov
        if len(self.layers) == 1 and self.model is None:
            d["layers"] = {"all": self.layers[0].to_dict(), **{e.edge: e.to_dict() for e in self.edges}}
        else:
            d["layers"] = {i: layer.to_dict() for i, layer in enumerate(self.layers)}
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None,
                  where: str = "plan") -> Plan:
        known = {"schema_version", "name", "description", "model", "reference_length", "budget",
                 "effective_bits", "provenance", "layers", "tensors"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KVTuneError(f"{where}: unknown key(s) {unknown}", f"valid keys are {sorted(known)}")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise KVTuneError(f"{where}: missing schema_version", "re-create the plan with this kvtune")
        if version > SCHEMA_VERSION:
            raise KVTuneError(f"{where}: schema_version {version} is newer than this kvtune's {SCHEMA_VERSION}",
                              "upgrade kvtune")
        layers, edges = _layers_from(data.get("layers"), where)
        model = ModelIdentity.from_dict(data["model"], f"{where}.model") if "model" in data else None
        prov_d = dict(strict_mapping(Provenance, data.get("provenance", {}), f"{where}.provenance"))
        prov_d["extra"] = tuple((str(k), str(v)) for k, v in dict(prov_d.get("extra", {})).items())
        try:
            plan = cls(layers=layers, model=model, name=str(data.get("name", "")),
                       description=str(data.get("description", "")), budget=data.get("budget"),
                       reference_length=int(data.get("reference_length", REFERENCE_LENGTH)),
                       provenance=Provenance(**prov_d), tensors=dict(tensors or {}), edges=edges)
        except KVTuneError as exc:
            raise KVTuneError(str(exc).replace("plan:", f"{where}:", 1)) from None
        except (TypeError, ValueError) as exc:
            raise KVTuneError(f"{where}: {exc}") from None
        return plan


def _layers_from(raw: Any, where: str) -> tuple[tuple[LayerPlan, ...], tuple[EdgeLayers, ...]]:
    """The layers (one template layer, or one per model layer) and a template's edge overrides."""
    if not isinstance(raw, Mapping) or not raw:
        raise KVTuneError(f"{where}: 'layers' must be a non-empty mapping", "see configs/ for examples")
    if "all" in raw:
        extra = sorted(set(raw) - {"all", *EDGES}, key=str)
        if extra:
            raise KVTuneError(f"{where}: a template's layers take 'all', 'first' and 'last', not {extra}",
                              "number every layer, or use a template")
        edges = tuple(EdgeLayers.from_dict(e, raw[e], f"{where}.layers.{e}") for e in EDGES if e in raw)
        return (LayerPlan.from_dict(raw["all"], f"{where}.layers.all"),), edges
    try:
        keys = sorted(int(k) for k in raw)
    except (TypeError, ValueError):
        raise KVTuneError(f"{where}: layer keys must be integers 0..L-1 or 'all'", "fix the YAML") from None
    if keys != list(range(len(keys))):
        raise KVTuneError(f"{where}: layers must be numbered 0..{len(keys) - 1} without gaps", "fix the YAML")
    by_int = {int(k): v for k, v in raw.items()}
    return tuple(LayerPlan.from_dict(by_int[i], f"{where}.layers.{i}") for i in keys), ()


def _check_tensors(plan: Plan, where: str) -> None:
    """Every tensor is ``layers.{i}.{key|value}.{field}`` of a ``layer``-scope field some head's spec declares,
    ``[kv_heads, widest declared width]``; outlier channel indices lie inside the head."""
    for name, t in plan.tensors.items():
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in ("key", "value"):
            raise KVTuneError(f"{where}: unexpected tensor {name!r}", "tensors are layers.N.key|value.FIELD")
        i = int(parts[1])
        if i >= len(plan.layers):
            raise KVTuneError(f"{where}: tensor {name} names layer {i} beyond the plan's {len(plan.layers)}")
        layer = plan.layers[i]
        heads = [layer.head(h) if layer.heads else layer for h in range(max(len(layer.heads), 1))]
        d = plan.model.head_dim if plan.model is not None else 1 << 16
        widths = [codec.layer_fields(getattr(hp, parts[2]), d).get(parts[3]) for hp in heads]
        if not any(widths):
            raise KVTuneError(f"{where}: tensor {name}: the layer's {parts[2]} quantizers store no {parts[3]!r}",
                              "re-run the search")
        want = max(f.width for f in widths if f is not None)
        if plan.model is None:  # head_dim unknown: a width growing with it (a mean, per-channel steps) goes unchecked
            alt = [codec.layer_fields(getattr(hp, parts[2]), d // 2).get(parts[3]) for hp in heads]
            want = want if want == max(f.width for f in alt if f is not None) else t.shape[-1]
        if t.dim() != 2 or t.shape[1] != want:
            raise KVTuneError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected [kv_heads, {want}]",
                              "re-run the search")
        if plan.model is not None and (t.shape[0] != plan.model.num_kv_heads or (
                parts[3] == INDEX_FIELD and t.numel() and int(t.max()) >= plan.model.head_dim)):
            raise KVTuneError(f"{where}: tensor {name} does not fit the model's heads/head_dim", "re-run the search")


def save_plan(plan: Plan, out: str | Path) -> Path:
    """Write ``out/plan.safetensors`` then ``out/plan.yaml`` (with its sha256), each atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / PLAN_TENSORS) as tmp:
        save_file({k: v.contiguous() for k, v in plan.tensors.items()} or {"_empty": torch.zeros(0)}, str(tmp))
        digest = sha256_file(tmp)
    data = plan.to_dict()
    data["tensors"] = {"file": PLAN_TENSORS, "sha256": digest, "names": sorted(plan.tensors)}
    write_yaml_atomic(out / PLAN_YAML, data)
    return out


def load_plan(path_or_preset: str | Path) -> Plan:
    """A plan directory (or its plan.yaml), or the name of a preset in kvtune/configs/."""
    path = Path(path_or_preset)
    if path.is_dir() or (path.suffix in (".yaml", ".yml") and path.exists()):
        return _load_dir(path if path.is_dir() else path.parent, path if path.is_file() else path / PLAN_YAML)
    preset = preset_names().get(str(path_or_preset))
    if preset is None:
        raise KVTuneError(f"no plan directory or preset named {str(path_or_preset)!r}",
                          f"presets: {', '.join(sorted(preset_names()))}")
    data = read_yaml(preset, "preset")
    return Plan.from_dict(data, where=f"preset {path_or_preset}")


def _load_dir(folder: Path, yaml_path: Path) -> Plan:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    data = read_yaml(yaml_path, "plan")
    meta = data.get("tensors") or {}
    tensors: dict[str, torch.Tensor] = {}
    if meta:
        tfile = folder / str(meta.get("file", PLAN_TENSORS))
        if not tfile.is_file():
            raise KVTuneError(f"plan tensors missing: {tfile}", "copy plan.safetensors with plan.yaml")
        if sha256_file(tfile) != meta.get("sha256"):
            raise KVTuneError(f"plan tensors {tfile} do not match the checksum in {yaml_path.name} "
                              "(corrupt or truncated)", "re-copy or re-create the plan")
        try:
            tensors = {k: v for k, v in load_file(str(tfile)).items() if k != "_empty"}
        except (SafetensorError, OSError) as exc:
            raise KVTuneError(f"plan tensors {tfile} cannot be read: {exc}", "re-create the plan") from None
    return Plan.from_dict(data, tensors, where=f"plan {yaml_path}")


def preset_names() -> dict[str, Path]:
    """Preset name -> YAML path, from the package's configs folder."""
    root = importlib.resources.files("kvtune") / "configs"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".yaml")}


def plan_fingerprint(plan: Plan) -> str:
    """Short hash of a plan's YAML form (for caches of results)."""
    return hashlib.sha256(repr(plan.to_dict()).encode()).hexdigest()[:16]
