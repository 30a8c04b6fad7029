"""Score post-processing every path shares (numpy only, so the service's edge imports no torch)."""

from __future__ import annotations

import numpy as np


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable float32 sigmoid."""
    values = np.asarray(logits, dtype=np.float32)
    return (0.5 * (1.0 + np.tanh(0.5 * values))).astype(np.float32)
