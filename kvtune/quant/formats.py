"""Quantizer specs: what one K or V tensor of one head becomes.

A :class:`QuantSpec` is a frozen, validated description; the maths lives in :mod:`kvtune.quant.ops`.
Tensors are laid out ``[..., T, D]`` (tokens, channels). Two grouping axes:

* ``axis="channel"`` (KIVI keys): statistics per channel, a group runs along ``group`` consecutive
  tokens -> scales ``[..., T/group, D]``.
* ``axis="token"`` (KIVI values): statistics per token, a group runs along ``group`` consecutive
  channels -> scales ``[..., T, D/group]``.

``group=0`` means the whole axis. Code formats are looked up by ``bits`` in :data:`CODE_FORMATS`
(1, 1.58 = ternary, 2, 3, 4, 8, and 16 = fp16 passthrough).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from kvtune.errors import KVTuneError, build_strict

SPEC_VERSION = 1
AXES = ("channel", "token")


@dataclass(frozen=True)
class CodeFormat:
    """How codes of one bit width are stored.

    ``levels``: number of distinct codes. ``per_byte``: codes in one packed byte (0 = not packed,
    stored as fp16). ``planes``: bit widths of the planes a code is split into when a width does not
    divide 8 (3-bit = a 2-bit plane + a 1-bit plane). ``base``: radix of the packing (3 for ternary).
    """

    name: str
    bits: float
    levels: int
    planes: tuple[int, ...]
    base: int = 2

    @property
    def passthrough(self) -> bool:
        return self.levels == 0


CODE_FORMATS: dict[float, CodeFormat] = {
    1: CodeFormat("int1", 1, 2, (1,)),
    1.58: CodeFormat("ternary", 1.58, 3, (0,), base=3),  # 5 trits per byte
    2: CodeFormat("int2", 2, 4, (2,)),
    3: CodeFormat("int3", 3, 8, (2, 1)),
    4: CodeFormat("int4", 4, 16, (4,)),
    8: CodeFormat("int8", 8, 256, (8,)),
    16: CodeFormat("fp16", 16, 0, ()),
}

SCALE_DTYPES: dict[str, int] = {"float16": 16, "bfloat16": 16, "float32": 32}
OUTLIER_BITS = (4, 8, 16, 2)


def code_format(bits: float) -> CodeFormat:
    """Look up the code format of a bit width; unknown widths are a clear error."""
    try:
        return CODE_FORMATS[float(bits) if bits != int(bits) else int(bits)]
    except (KeyError, ValueError, TypeError):
        valid = ", ".join(str(b) for b in CODE_FORMATS)
        raise KVTuneError(f"unsupported bit width {bits!r}", f"use one of {valid}") from None


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer.

    Attributes:
        bits: code width (see :data:`CODE_FORMATS`); 16 stores fp16 as is.
        axis: ``"channel"`` (group along tokens) or ``"token"`` (group along channels).
        group: group size along the grouping axis; 0 = the whole axis.
        symmetric: zero-point-free grid (not allowed at 1 bit: use asymmetric).
        scale_dtype: stored dtype of scales and zero-points.
        hadamard: Walsh-Hadamard rotate channels first (head_dim must be a power of two).
        channel_separable: ZipCache: divide each channel by sqrt(absmax) before a token-axis quantizer.
        fft: VidKV: orthonormal real Fourier transform along tokens within each token group.
        outliers: number of channels kept out of the main quantizer (dense-and-sparse / anomalous).
        outlier_bits: precision of those channels (16 = fp16; 2/4/8 = their own per-channel quantizer).
    """

    bits: float = 16
    axis: str = "token"
    group: int = 0
    symmetric: bool = False
    scale_dtype: str = "float16"
    hadamard: bool = False
    channel_separable: bool = False
    fft: bool = False
    outliers: int = 0
    outlier_bits: float = 16

    def __post_init__(self) -> None:
        fmt = code_format(self.bits)
        object.__setattr__(self, "bits", fmt.bits)
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if not isinstance(self.group, int) or self.group < 0:
            raise ValueError(f"group must be an int >= 0 (0 = whole axis), got {self.group!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.symmetric and fmt.bits == 1:
            raise ValueError("symmetric 1-bit has no zero level: use symmetric=False at 1 bit")
        if self.outliers < 0:
            raise ValueError(f"outliers must be >= 0, got {self.outliers}")
        if self.outliers and float(self.outlier_bits) not in OUTLIER_BITS:
            raise ValueError(f"outlier_bits must be one of {OUTLIER_BITS}, got {self.outlier_bits}")
        if self.channel_separable and self.axis != "token":
            raise ValueError("channel_separable needs axis='token' (ZipCache: per-channel norm, then per-token)")
        if self.fft and (self.axis != "channel" or self.group < 2):
            raise ValueError("fft needs axis='channel' with a token group >= 2 (the FFT runs inside a group)")

    @property
    def format(self) -> CodeFormat:
        return code_format(self.bits)

    @property
    def passthrough(self) -> bool:
        """True when nothing is quantized (fp16)."""
        return self.format.passthrough

    @property
    def token_group(self) -> int:
        """Tokens that must be present before a block can be quantized (1 for token-axis specs)."""
        if self.passthrough or self.axis == "token":
            return 1
        return self.group

    def label(self) -> str:
        """Short human-readable name, e.g. ``2b/ch/g32+h+o2``."""
        if self.passthrough:
            return "fp16"
        text = f"{self.bits:g}b/{'ch' if self.axis == 'channel' else 'tok'}/g{self.group or 'all'}"
        text += "".join(f"+{flag}" for flag, on in (("sym", self.symmetric), ("h", self.hadamard),
                         ("cs", self.channel_separable), ("fft", self.fft)) if on)
        if self.outliers:
            text += f"+o{self.outliers}@{self.outlier_bits:g}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that differ from the defaults (keeps YAML short)."""
        default = QuantSpec()
        return {k: v for k, v in asdict(self).items() if k == "bits" or v != getattr(default, k)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "quantizer") -> QuantSpec:
        """Strict: unknown keys and bad values are :class:`KVTuneError` naming ``where``."""
        if isinstance(data, (int, float)):
            data = {"bits": data}
        return build_strict(cls, data, where)


FP16 = QuantSpec()


def kivi_key(bits: float, group: int = 32) -> QuantSpec:
    """KIVI keys: per-channel, groups of ``group`` tokens, asymmetric."""
    return QuantSpec(bits=bits, axis="channel", group=group)


def kivi_value(bits: float, group: int = 32) -> QuantSpec:
    """KIVI values: per-token, groups of ``group`` channels, asymmetric."""
    return QuantSpec(bits=bits, axis="token", group=group)
