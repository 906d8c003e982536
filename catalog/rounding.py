"""The one rounding every answer's floats go through, so that both stores answer alike."""

from __future__ import annotations

import math

SIG_DIGITS = 6


def rnd(x: float | None) -> float | None:
    """Round to SIG_DIGITS significant digits (the one rounding both stores' answers go through)."""
    if x is None or not math.isfinite(x):
        return x
    return float(f"{x:.{SIG_DIGITS}g}") + 0.0  # + 0.0: -0.0 prints as 0.0 (min/max of tied zeros pick either)
