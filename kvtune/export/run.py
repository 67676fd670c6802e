"""``export``: a plan -> what one engine loads, plus the kvtune plan of exactly that engine configuration.

Steps: bind the plan to the model; find the engine configuration storing it exactly, or (``round_up``) the cheapest
one keeping every layer at least as many code bits (:func:`kvtune.export.target.nearest`); fit the engine's
calibrated state (fp8 scales) from the calibration; let the target write its files; write ``OUT/kvtune-plan``
(``kvtune eval OUT/kvtune-plan`` scores what will be deployed). :func:`read_back` rebuilds that plan from the
engine's own files alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.export.checkpoint import check_out
from kvtune.export.profile import PROFILE
from kvtune.export.state import fit_state
from kvtune.export.target import EngineConfig, Target, describe, nearest
from kvtune.io import read_yaml
from kvtune.plan import PLAN_YAML, Plan, load_plan, save_plan
from kvtune.plan_types import LayerPlan, ModelIdentity, Provenance

log = logging.getLogger(__name__)
PLAN_DIR = "kvtune-plan"


@dataclass(frozen=True)
class Job:
    """Everything a target writes from: the engine configuration and plan, the source model, the output folder."""

    target: Target
    config: EngineConfig
    plan: Plan
    out: Path
    model: str
    model_dir: Path | None
    copy: bool = False

    @property
    def identity(self) -> ModelIdentity:
        assert self.plan.model is not None
        return self.plan.model

    def state(self, i: int, role: str, name: str) -> torch.Tensor | None:
        return self.plan.tensors.get(f"layers.{i}.{role}.{name}")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` did: the configuration, whether it stores the plan exactly, what was rounded up, the
    effective bits of the plan and of the engine configuration, and the files written."""

    target: str
    config: EngineConfig
    description: str
    exact: bool
    changes: tuple[str, ...]
    plan_bits: float
    engine_bits: float
    engine_plan: Plan
    files: tuple[Path, ...]
    notes: tuple[str, ...] = field(default=())


def _calibration(calib: str | Path | None, identity: ModelIdentity) -> Any:
    if calib is None:
        return None
    from kvtune.calibrate.artifact import load_calibration

    c = load_calibration(calib)
    if c.fingerprint and identity.fingerprint and c.fingerprint != identity.fingerprint:
        raise KVTuneError(f"calibration {calib} was made for another model (fingerprint {c.fingerprint}, model "
                          f"{identity.fingerprint})", "calibrate this model, or pass the calibration made for it")
    return c


def changes(old: tuple[LayerPlan, ...], new: tuple[LayerPlan, ...]) -> tuple[str, ...]:
    """Runs of layers whose K/V quantizers (or token policies) the engine configuration changes, one line each."""
    def label(layer: LayerPlan) -> str:
        extras = [f"residual {layer.residual}"] * bool(layer.residual) + ["heads"] * bool(layer.heads)
        extras += ["salient/sinks"] * (layer.salient != LayerPlan().salient)
        extras += ["merge"] * (layer.merge != LayerPlan().merge)
        text = f"K {layer.key.label()}, V {layer.value.label()}"
        return text + (f" ({', '.join(extras)})" if extras else "")

    lines, start = [], 0
    pairs = [(label(a), label(b)) for a, b in zip(old, new)]
    for i in range(1, len(pairs) + 1):
        if i == len(pairs) or pairs[i] != pairs[start]:
            a, b = pairs[start]
            if a != b:
                span = f"layer {start}" if i - 1 == start else f"layers {start}-{i - 1}"
                lines.append(f"{span}: {a} -> {b}")
            start = i
    return tuple(lines)


def export(plan: Plan | str | Path, target: str, out: str | Path, model: str = "smollm2-135m",
           calib: str | Path | None = None, round_up: bool = False, copy: bool = False) -> ExportResult:
    """Export ``plan`` for ``target`` (a :data:`kvtune.export.TARGETS` name) into the new directory ``out``."""
    from kvtune.export import get_target
    from kvtune.models import load_identity, resolve_model_dir

    tgt, out = get_target(target), Path(out)
    check_out(out)
    plan = load_plan(plan) if not isinstance(plan, Plan) else plan
    identity = load_identity(model)
    bound = plan.bind(identity)
    config, exact = nearest(tgt, bound.layers, identity, bound.reference_length)
    layers = tgt.layers(config)
    text = describe(tgt, config)
    engine_bits = Plan(layers=layers, model=identity, reference_length=bound.reference_length).effective_bits()
    if not exact and not round_up:
        raise KVTuneError(f"{target} cannot store plan '{plan.name or 'plan'}' exactly; the nearest expressible "
                          f"configuration is {text} ({engine_bits:.3f} bits vs the plan's "
                          f"{bound.effective_bits():.3f})", f"pass --round-up to export it, or search with "
                          f"--target {target}")
    tensors = fit_state(layers, _calibration(calib, identity), identity.num_kv_heads, identity.head_dim)
    prov = Provenance(source=f"kvtune export --to {target}", calibration_hash=bound.provenance.calibration_hash,
                      extra=(("target", target), ("engine", text), ("from_plan", plan.name or "")))
    engine_plan = Plan(layers=layers, model=identity, name=f"{plan.name or 'plan'}@{target}",
                       description=f"{target}: {text}", budget=plan.budget,
                       reference_length=bound.reference_length, provenance=prov, tensors=tensors)
    model_dir = resolve_model_dir(model)
    job = Job(tgt, config, engine_plan, out, model, model_dir, copy)
    files = [*tgt.write(job), save_plan(engine_plan, out / PLAN_DIR) / PLAN_YAML]
    log.info("exported %s for %s into %s", plan.name, target, out)
    return ExportResult(target, config, text, exact, changes(bound.layers, layers), bound.effective_bits(),
                        engine_bits, engine_plan, tuple(files), tuple(getattr(tgt, "notes", lambda c: ())(config)))


def read_back(out: str | Path) -> Plan:
    """The kvtune plan of what the engine loads from ``out``, rebuilt from the engine's files (the launch profile,
    config.json / hf_quant_config.json and the scale tensors), not from ``OUT/kvtune-plan``'s layers."""
    from kvtune.export import get_target

    out = Path(out)
    profile = read_yaml(out / PROFILE, "launch profile")
    tgt = get_target(str(profile.get("target", "")))
    written = load_plan(out / PLAN_DIR)  # for the model identity only
    assert written.model is not None
    config, tensors = tgt.read(out, written.model)
    return Plan(layers=tgt.layers(config), model=written.model, reference_length=written.reference_length,
                tensors=tensors)
