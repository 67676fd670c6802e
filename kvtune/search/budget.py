"""Parsing a bit budget: ``"2.0bit"``, ``"2bit"``, ``"2.0"`` (or a number) -> effective bits per K/V element."""

from __future__ import annotations

import math
import re

from kvtune.errors import KVTuneError
from kvtune.quant.bits import REFERENCE_LENGTH

MAX_BUDGET = 16.0  # fp16 stores 16 bits an element: a larger budget compresses nothing
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:bits?|b)?\s*$", re.IGNORECASE)


def parse_budget(text: str | float) -> float:
    """The budget in effective bits (parsed once, where a user gave it); anything unparsable, <= 0 or > 16 is a
    KVTuneError."""
    if isinstance(text, bool):
        raise KVTuneError(f"invalid budget {text!r}", "write it like 2.0bit, 2bit or 2.0")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _BUDGET.match(str(text))
        if match is None:
            raise KVTuneError(f"invalid budget {text!r}",
                              "write it like 2.0bit, 2bit or 2.0 (effective bits per element)")
        value = float(match.group(1))
    if not math.isfinite(value) or value <= 0:
        raise KVTuneError(f"budget must be a positive number of bits, got {text!r}", "e.g. --budget 2.5bit")
    if value > MAX_BUDGET:
        raise KVTuneError(f"budget {value:g} bits is above {MAX_BUDGET:g} (fp16 stores 16 bits an element)",
                          "pick a budget <= 16bit")
    return value


def check_minimum(budget: float, minimum: float) -> None:
    """A KVTuneError when ``budget`` is below ``minimum``, the least a plan can store (every K/V at its cheapest
    candidate, no fp16 window)."""
    if budget < minimum:
        least = math.ceil(minimum * 1000) / 1000
        raise KVTuneError(f"budget {budget:g} bits is below the minimum achievable {minimum:.4g} bits "
                          f"(every K/V at its cheapest candidate, at {REFERENCE_LENGTH} tokens)",
                          f"use --budget {least:g}bit or more")
