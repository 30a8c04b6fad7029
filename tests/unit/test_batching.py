import numpy as np
import pytest

from reranker.batching import pad_batch, plan_batches

pytestmark = pytest.mark.unit


def test_batches_cover_every_index_exactly_once():
    """Every pair lands in exactly one batch."""
    lengths = np.random.default_rng(0).integers(5, 300, size=1000)
    batches = plan_batches(lengths, max_batch_tokens=2048, max_batch_pairs=64)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))


def test_batches_respect_token_budget_and_pair_cap():
    """Padded size (pairs x longest) and pair count stay within their limits."""
    lengths = np.random.default_rng(1).integers(5, 300, size=1000)
    for batch in plan_batches(lengths, max_batch_tokens=2048, max_batch_pairs=16):
        assert len(batch) <= 16
        assert len(batch) * lengths[batch].max() <= 2048


def test_batches_group_similar_lengths():
    """Short pairs are not padded up to long ones: batches come out in length order."""
    lengths = np.array([300, 5, 300, 5, 6, 299])
    batches = plan_batches(lengths, max_batch_tokens=600, max_batch_pairs=100)
    assert [sorted(lengths[b].tolist()) for b in batches] == [[5, 5, 6], [299, 300], [300]]


def test_pair_longer_than_budget_gets_its_own_batch():
    """A single over-budget pair is still scored, alone."""
    batches = plan_batches(np.array([10, 5000, 10]), max_batch_tokens=100, max_batch_pairs=8)
    assert [b.tolist() for b in batches] == [[0, 2], [1]]


def test_empty_input_gives_no_batches():
    """No pairs, no batches."""
    assert plan_batches(np.array([], dtype=np.int64), 100, 8) == []


def test_invalid_limits_are_rejected():
    """Zero budgets are a programming error."""
    with pytest.raises(ValueError):
        plan_batches(np.array([1]), 0, 8)


def test_pad_batch_right_pads_the_chosen_rows():
    """The chosen rows of a flat ragged array, in the given order, right-padded to the longest."""
    values, offsets = np.array([1, 2, 3, 4, 5, 6], dtype=np.int32), np.array([0, 3, 4, 6])
    matrix = pad_batch(values, offsets, np.array([2, 1, 0]), pad_value=0)
    assert matrix.tolist() == [[5, 6, 0], [4, 0, 0], [1, 2, 3]]
    assert matrix.dtype == np.int64
