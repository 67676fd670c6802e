"""The measured value of a layer's fp16 window and sink (calibration's ``recency.*`` tables) as proxy factors.

Calibration measured, per layer and KV head, the share of a reference quantizer's attention-output error left
when the last ``R`` tokens (and the sink) stay fp16 (:mod:`kvtune.calibrate.recency`). A layer whose plan keeps
``residual`` window tokens behind ``sinks`` fp16 sinks, flushing blocks of ``F`` tokens, holds on average
``residual + (F - 1) / 2`` recent tokens in fp16; its error factor is the table interpolated there (linear in
``R`` between the measured windows, flat beyond the last), with or without the sink.
"""

from __future__ import annotations

import numpy as np

from kvtune.calibrate.recency import WINDOWS


def expected_window(residual: int, flush: int) -> float:
    """Mean fp16 window tokens of a layer flushing blocks of ``flush`` once ``residual + flush`` are buffered."""
    return residual + (flush - 1) / 2 if residual or flush > 1 else 0.0


def factors(table: np.ndarray, window: float, sinks: int) -> np.ndarray:
    """``[L, H]`` error factors from a ``recency`` table ``[L, H, len(WINDOWS), 2]`` at ``window`` recent fp16
    tokens, with the sink kept when ``sinks``."""
    col = table[..., 1 if sinks else 0]  # [L, H, W]
    xs = np.asarray(WINDOWS, dtype=np.float64)
    w = min(max(float(window), 0.0), xs[-1])
    hi = int(np.searchsorted(xs, w))
    if hi == 0:
        return col[..., 0]
    lo = hi - 1
    t = (w - xs[lo]) / (xs[hi] - xs[lo])
    return (1 - t) * col[..., lo] + t * col[..., hi]
