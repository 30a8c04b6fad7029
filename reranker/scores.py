"""Score post-processing every path shares (numpy only, so the service's edge imports no torch).

Ranking and cascade selection work on raw logits everywhere; an activation is applied only to the
scores a program writes or returns.
"""

from __future__ import annotations

import numpy as np


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The logistic function in float64, exact across the whole range (no overflow, no cancellation).

    Two branches: ``1 / (1 + e^-x)`` for x >= 0 and ``e^x / (1 + e^x)`` below, so a logit of -30 gives
    9.4e-14 rather than 0 and -12 and -12.0005 stay apart. NaN stays NaN.
    """
    values = np.asarray(logits, dtype=np.float64)
    result = np.empty_like(values)
    positive = values >= 0
    result[positive] = 1.0 / (1.0 + np.exp(-values[positive]))
    exponent = np.exp(values[~positive])
    result[~positive] = exponent / (1.0 + exponent)
    return result
