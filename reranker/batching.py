"""Length-aware batching: sort pairs by token length, then cut batches by a padded-token budget.

Sorting keeps similar lengths together so short pairs are not padded to a long neighbour; the
budget (pairs x longest pair in the batch) bounds activation memory so long passages can't blow it.
"""

from __future__ import annotations

import numpy as np


def plan_batches(lengths: np.ndarray, max_batch_tokens: int, max_batch_pairs: int) -> list[np.ndarray]:
    """Group pair indices into batches whose padded size fits the budget.

    Args:
        lengths: Token length of each pair (after truncation).
        max_batch_tokens: Upper bound on ``len(batch) * max(lengths[batch])``; a single pair longer
            than the budget still gets a batch of its own.
        max_batch_pairs: Upper bound on ``len(batch)``.

    Returns:
        Index arrays into ``lengths``, shortest pairs first; together they cover every index once.

    """
    if max_batch_tokens < 1 or max_batch_pairs < 1:
        raise ValueError("max_batch_tokens and max_batch_pairs must be positive")
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    for position, index in enumerate(order):
        size = position - start + 1
        if position > start and (size * lengths[index] > max_batch_tokens or size > max_batch_pairs):
            batches.append(order[start:position])
            start = position
    if start < len(order):
        batches.append(order[start:])
    return batches


def pad_batch(
    values: np.ndarray, offsets: np.ndarray, batch: np.ndarray, pad_value: int, left: bool = False
) -> np.ndarray:
    """Pad the rows ``batch`` of a flat ragged array into one int64 matrix.

    Args:
        values: Every row's values, concatenated.
        offsets: Row ``i`` is ``values[offsets[i]:offsets[i + 1]]``.
        batch: Row numbers to take, in matrix order.
        pad_value: Fill for positions past a row's end (before its start with ``left``).
        left: Pad on the left, as causal LMs need (the last position is each row's last token).

    """
    starts, lengths = offsets[batch], offsets[batch + 1] - offsets[batch]
    width = int(lengths.max(initial=1))
    inside = attention_mask(lengths, left).astype(bool)
    positions = np.arange(width) - (width - lengths[:, None] if left else 0)
    matrix = np.full((len(batch), width), pad_value, dtype=np.int64)
    matrix[inside] = values[(starts[:, None] + positions)[inside]]
    return matrix


def attention_mask(lengths: np.ndarray, left: bool = False) -> np.ndarray:
    """1 where a padded row (padded on the right, or the left) holds one of its ``lengths`` tokens."""
    width = int(lengths.max(initial=1))
    positions = np.arange(width)
    inside = positions >= width - lengths[:, None] if left else positions < lengths[:, None]
    return inside.astype(np.int64)
