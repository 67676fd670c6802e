"""Correcting the calibration-table proxy with what validation measured: per-role multipliers, refitted.

The proxy predicts a plan's KL as ``key part + value part (+ merge part)`` (:meth:`Evaluator.plan_parts`).
Its per-layer KL weights come from one end-to-end measurement per layer and role, so the balance of key and
value damage is the part most often off. Validated plans fit it: ``KL ~ a_k * key + a_v * (value + merge)``,
non-negative, least relative squared error (plans near the budget have similar KL; relative errors weigh them
alike), each weight at least :data:`BALANCE` of the other.
A two-parameter fit can reorder plans (a key-heavy and a value-heavy plan swap), unlike a monotone
rescaling. Its **held-out Spearman** is measured by leaving each validated plan out of the fit in turn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kvtune.search.validate import spearman

BALANCE = 0.25  # neither role weighs less than this share of the other: a fit on a few noisy points can zero one


def fit(parts: Sequence[Sequence[float]], kls: Sequence[float]) -> tuple[float, float]:
    """``(a_k, a_v)`` >= 0 from plans' ``(key, value, merge)`` proxy parts and their validated KL; ``(1, 1)`` (the
    uncorrected proxy) with fewer than 2 usable points."""
    x = np.array([[p[0], p[1] + p[2]] for p, k in zip(parts, kls) if math.isfinite(k) and k > 0], dtype=np.float64)
    y = np.array([k for k in kls if math.isfinite(k) and k > 0], dtype=np.float64)
    if len(y) < 2:
        return 1.0, 1.0
    z = x / y[:, None]  # relative errors: fit z @ a ~ 1
    a = np.linalg.lstsq(z, np.ones_like(y), rcond=None)[0]
    if (a < 0).any():  # non-negative: the better of the two one-part fits
        fits = []
        for j in (0, 1):
            c = float(z[:, j].sum() / max(float(z[:, j] @ z[:, j]), 1e-300))
            fits.append((float(((z[:, j] * c - 1) ** 2).sum()), j, c))
        _, j, c = min(fits)
        a = np.array([c, 0.0]) if j == 0 else np.array([0.0, c])
    a_k, a_v = float(max(a[0], 0.0)), float(max(a[1], 0.0))
    top = max(a_k, a_v)
    return max(a_k, BALANCE * top), max(a_v, BALANCE * top)


def predict(part: Sequence[float], coef: tuple[float, float]) -> float:
    return coef[0] * part[0] + coef[1] * (part[1] + part[2])


def held_out_spearman(parts: Sequence[Sequence[float]], kls: Sequence[float]) -> float | None:
    """Spearman(corrected proxy, KL) with each plan predicted by a fit on the others (None with < 4 points)."""
    idx = [i for i, k in enumerate(kls) if math.isfinite(k) and k > 0]
    if len(idx) < 4:
        return None
    preds = []
    for i in idx:
        rest = [j for j in idx if j != i]
        preds.append(predict(parts[i], fit([parts[j] for j in rest], [kls[j] for j in rest])))
    return spearman(preds, [kls[i] for i in idx])
