"""Calibration settings (recorded in the artifact, compared for reuse) and the progress-callback protocol."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from kvtune.errors import build_strict


@dataclass(frozen=True)
class CalibSettings:
    """Everything besides model and text that changes a calibration's result.

    The streaming statistics (moments, quantile sketch, token norms, row reservoir) see all ``tokens``
    (cut into ``seq_len`` chunks). The costlier analyses use subsets, so the defaults fit in 5 minutes on
    2 CPU cores for a 135M model:

    * attention statistics: the first ``attention_seqs`` chunks, probe queries (``probe_recent`` +
      ``probe_random`` of positions);
    * attention-output sensitivity: the first ``held_len`` tokens of the first ``held_seqs`` chunks;
    * end-to-end KL: the first ``kl_len`` tokens of the first ``kl_seqs`` chunks.
    """

    tokens: int = 32768
    seq_len: int = 2048
    held_seqs: int = 2
    held_len: int = 1024
    attention_seqs: int = 4
    kl_seqs: int = 1
    kl_len: int = 256
    probe_recent: float = 0.05
    probe_random: float = 0.05
    quantiles: tuple[float, ...] = (0.001, 0.01, 0.5, 0.99, 0.999)
    hist_bins: int = 512
    samples: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantiles", tuple(float(q) for q in self.quantiles))
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.tokens < self.seq_len:
            raise ValueError(f"tokens ({self.tokens}) must be >= seq_len ({self.seq_len}): at least one chunk")
        for name in ("held_seqs", "held_len", "kl_seqs", "kl_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_seqs < 1 or self.samples < 0 or self.hist_bins < 2:
            raise ValueError("attention_seqs must be >= 1, samples >= 0, hist_bins >= 2")
        if not (0 < self.probe_recent <= 1 and 0 <= self.probe_random <= 1):
            raise ValueError("probe_recent must be in (0, 1] and probe_random in [0, 1]")
        if not self.quantiles or any(not 0 <= q <= 1 for q in self.quantiles):
            raise ValueError(f"quantiles must be levels in [0, 1], got {self.quantiles}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quantiles"] = list(self.quantiles)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "settings") -> CalibSettings:
        return build_strict(cls, data, where)


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report.

    ``stage``: ``"load"``, ``"stats"``, ``"sensitivity"``, ``"kl"``, ``"save"`` or ``"done"``; ``done``/``total``:
    units of the stage (chunks for ``stats``, layers for ``sensitivity``/``kl``); ``layer``: the layer just
    finished, if any; ``tokens_per_s``: throughput of the model so far in this stage (``stats``, ``kl``).
    """

    stage: str
    done: int
    total: int
    layer: int | None = None
    tokens_per_s: float | None = None


class Progress(Protocol):
    """A progress callback: ``progress(event)``; must be quick and must not raise."""

    def __call__(self, event: ProgressEvent) -> None: ...
