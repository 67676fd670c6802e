"""Correcting the calibration-table proxy with what validation measured: per-role multipliers, refitted.

The proxy predicts a plan's KL as ``key part + value part (+ merge part)`` (:meth:`Evaluator.plan_parts`).
Its per-layer KL weights come from one end-to-end measurement per layer and role, so the balance of key and
value damage is the part most often off. Validated plans fit it: ``KL ~ a_k * key + a_v * (value + merge)``,
non-negative, least relative squared error (plans near the budget have similar KL; relative errors weigh them
alike), each weight at least :data:`BALANCE` of the other.
A two-parameter fit can reorder plans (a key-heavy and a value-heavy plan swap), unlike a monotone
rescaling. On a handful of near-budget plans such a fit can also reorder them wrongly, so it is **used only when
it predicts better**: :func:`choose` keeps the fit when its leave-one-out Spearman beats the uncorrected proxy's
Spearman on the same plans (which no fit touched), else the uncorrected proxy. Its **held-out Spearman** runs the
whole procedure (choice included) on all plans but one and predicts that one, in turn.
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


def _usable(kls: Sequence[float]) -> list[int]:
    return [i for i, k in enumerate(kls) if math.isfinite(k) and k > 0]


def _loo(parts: Sequence[Sequence[float]], kls: Sequence[float], make) -> float | None:
    """Spearman of predictions of each usable plan by ``make(parts, kls)`` on the others (None with < 4)."""
    idx = _usable(kls)
    if len(idx) < 4:
        return None
    preds = []
    for i in idx:
        rest = [j for j in idx if j != i]
        preds.append(predict(parts[i], make([parts[j] for j in rest], [kls[j] for j in rest])))
    return spearman(preds, [kls[i] for i in idx])


def choose(parts: Sequence[Sequence[float]], kls: Sequence[float]) -> tuple[float, float]:
    """:func:`fit` when its leave-one-out Spearman beats the uncorrected proxy's on the same plans, else ``(1, 1)``."""
    idx = _usable(kls)
    fitted = _loo(parts, kls, fit)
    raw = spearman([sum(parts[i]) for i in idx], [kls[i] for i in idx])
    if fitted is None or raw is None or fitted <= raw:
        return 1.0, 1.0
    return fit(parts, kls)


def held_out_spearman(parts: Sequence[Sequence[float]], kls: Sequence[float]) -> float | None:
    """Spearman(corrected proxy, KL) with each plan predicted by :func:`choose` on the others (None with < 4)."""
    return _loo(parts, kls, choose)
