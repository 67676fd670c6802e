"""Quantizer specs: what one K or V tensor of one head becomes.

A :class:`QuantSpec` names a family (:mod:`kvtune.quant.family`: how codes are made and what is stored),
holds that family's parameters, and the two wrappers any family can use: a channel ``rotation`` applied
first (:mod:`kvtune.quant.rotation`) and ``outliers`` channels split off and kept at ``outlier_bits``
(:mod:`kvtune.quant.outliers`). The maths lives in :mod:`kvtune.quant.codec`.

YAML form: one flat mapping, ``{family: NAME, <the family's parameters>, rotation: hadamard, outliers: 2,
outlier_bits: 16}``. Without ``family`` it is ``affine`` (``fp16`` when ``bits: 16``), so the plans of the
first schema (``{bits: 2, axis: channel, group: 32, hadamard: true}``) read unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from kvtune.errors import KVTuneError, build_strict
from kvtune.quant import family as families
from kvtune.quant.rotation import ROTATIONS

OUTLIER_BITS = (4, 8, 16, 2)
WRAPPER_KEYS = ("rotation", "hadamard", "outliers", "outlier_bits", "center")


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer: a family with its parameters, plus rotation and outlier channels.

    Attributes:
        family: registered family name (``fp16``, ``affine``, ...).
        params: the family's ``Params`` (None = its defaults).
        rotation: registered rotation applied to channels first (``none``, ``hadamard``).
        outliers: number of channels kept out of the family's quantizer (dense-and-sparse / anomalous).
        outlier_bits: precision of those channels (16 = fp16; 2/4/8 = their own per-channel quantizer).
        center: subtract a calibrated per-head mean vector before quantizing, add it back after
            (:mod:`kvtune.quant.centering`).
    """

    family: str = "fp16"
    params: Any = None
    rotation: str = "none"
    outliers: int = 0
    outlier_bits: float = 16
    center: bool = False

    def __post_init__(self) -> None:
        fam = families.get(self.family)
        if self.params is None:
            object.__setattr__(self, "params", fam.Params())
        if not isinstance(self.params, fam.Params):
            raise ValueError(f"family {self.family!r} takes {fam.Params.__name__}, got {type(self.params).__name__}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {tuple(ROTATIONS)}, got {self.rotation!r}")
        if not isinstance(self.outliers, int) or self.outliers < 0:
            raise ValueError(f"outliers must be an int >= 0, got {self.outliers!r}")
        if self.outliers and float(self.outlier_bits) not in OUTLIER_BITS:
            raise ValueError(f"outlier_bits must be one of {OUTLIER_BITS}, got {self.outlier_bits}")
        if not isinstance(self.center, bool):
            raise ValueError(f"center must be true or false, got {self.center!r}")
        if fam.passthrough and (self.outliers or self.rotation != "none" or self.center):
            raise ValueError(f"{self.family} stores tensors as they are: no rotation, outlier channels or centering")

    # -- what it is ------------------------------------------------------------------------------------
    @property
    def fam(self) -> families.QuantFamily:
        return families.get(self.family)

    @property
    def bits(self) -> float:
        """Nominal code width of the main channels (16 for fp16)."""
        return self.fam.bits(self.params)

    @property
    def passthrough(self) -> bool:
        """True when nothing is quantized (fp16)."""
        return self.fam.passthrough

    @property
    def rotated(self) -> bool:
        return self.rotation != "none"

    @property
    def token_group(self) -> int:
        """Tokens a flushed block must be a multiple of (1 = any; 0 = one group per block)."""
        return 1 if self.passthrough else self.fam.token_group(self.params)

    def label(self, short: bool = False) -> str:
        """Human-readable name, e.g. ``2b/ch/g32+h+o2@16`` (``short``: ``2hg32``-style, for plots)."""
        text = self.fam.label(self.params, short)
        if short:
            return (text + ("h" if self.rotated else "") + (f"o{self.outliers}" if self.outliers else "")
                    + ("m" if self.center else ""))
        text += f"+{self.rotation[0]}" if self.rotated else ""
        text += f"+o{self.outliers}@{self.outlier_bits:g}" if self.outliers else ""
        return text + ("+mean" if self.center else "")

    def with_params(self, **changes: Any) -> QuantSpec:
        """This spec with some family parameters changed."""
        return replace(self, params=replace(self.params, **changes))

    # -- YAML ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The flat YAML form, only what differs from the defaults (``bits`` always)."""
        p = asdict(self.params)
        default = asdict(type(self.params)(**({"bits": p["bits"]} if "bits" in p else {})))
        d: dict[str, Any] = {} if self.family == _implied_family(p) else {"family": self.family}
        d.update({k: v for k, v in p.items() if k == "bits" or v != default.get(k)})
        if self.rotated:
            d["rotation"] = self.rotation
        if self.outliers:
            d["outliers"] = self.outliers
            d["outlier_bits"] = self.outlier_bits
        if self.center:
            d["center"] = True
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | float, where: str = "quantizer") -> QuantSpec:
        """Strict: unknown keys and bad values are :class:`KVTuneError` naming ``where``."""
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            data = {"bits": data}
        if not isinstance(data, Mapping):
            raise KVTuneError(f"{where}: expected a mapping, got {type(data).__name__}", "see configs/ for examples")
        rest = dict(data)
        name = str(rest.pop("family", None) or _implied_family(rest))
        wrap: dict[str, Any] = {k: rest.pop(k) for k in WRAPPER_KEYS if k in rest}
        if "hadamard" in wrap:  # schema 1 spelling
            on = wrap.pop("hadamard")
            if not isinstance(on, bool):
                raise KVTuneError(f"{where}: hadamard must be true or false, got {on!r}")
            wrap.setdefault("rotation", "hadamard" if on else "none")
        try:
            fam = families.get(name)
        except KVTuneError as exc:
            raise KVTuneError(f"{where}: {exc}") from None
        params = build_strict(fam.Params, rest, where)
        try:
            return cls(family=name, params=params, **wrap)
        except (TypeError, ValueError) as exc:
            raise KVTuneError(f"{where}: {exc}") from None


def _implied_family(flat: Mapping[str, Any]) -> str:
    """The family a flat mapping without ``family`` means: ``fp16`` at 16 bits, else ``affine``."""
    return "fp16" if flat.get("bits", 16) == 16 else "affine"


def param_names(name: str) -> tuple[str, ...]:
    """The YAML keys of family ``name``'s parameters."""
    return tuple(f.name for f in fields(families.get(name).Params))


FP16 = QuantSpec()


def affine(bits: float, axis: str = "token", group: int = 0, *, rotation: str = "none", hadamard: bool = False,
           outliers: int = 0, outlier_bits: float = 16, center: bool = False, **params: Any) -> QuantSpec:
    """An integer-grid spec (``affine`` family; ``fp16`` at 16 bits): ``affine(2, "channel", 32, hadamard=True)``."""
    if bits == 16:
        return QuantSpec()
    p = families.get("affine").Params(bits=bits, axis=axis, group=group, **params)
    return QuantSpec("affine", p, "hadamard" if hadamard else rotation, outliers, outlier_bits, center)


def kivi_key(bits: float, group: int = 32) -> QuantSpec:
    """KIVI keys: per-channel, groups of ``group`` tokens, asymmetric."""
    return affine(bits, "channel", group)


def kivi_value(bits: float, group: int = 32) -> QuantSpec:
    """KIVI values: per-token, groups of ``group`` channels, asymmetric."""
    return affine(bits, "token", group)


def per_token(bits: float) -> QuantSpec:
    """One group per token over all channels (salient copies): fp16 at 16 bits."""
    return affine(bits, "token", 0)
