"""The runtime: :class:`KVTuneCache` (bit-packed storage following a plan), the ``"kvtune"`` attention
function, and teacher-forced logits through it. Nothing is imported from triton until a CUDA decode runs."""

from kvtune.runtime.cache import KVTuneCache
from kvtune.runtime.teacher import teacher_forced_logits

__all__ = ["KVTuneCache", "teacher_forced_logits"]
