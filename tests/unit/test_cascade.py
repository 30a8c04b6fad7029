import numpy as np
import pytest

from reranker.cascade import (
    TIER_GAP,
    CascadeSettings,
    CascadeStage,
    cascade_order,
    monotone_scores,
    resolve_stages,
    top_candidates,
)
from reranker.errors import ConfigError
from reranker.scores import sigmoid
from reranker.settings import ModelOptions

pytestmark = pytest.mark.unit
NAN = np.nan


def test_stages_take_unset_options_from_the_model_settings():
    """A stage's own options win; the ones it leaves unset come from the model settings."""
    model = ModelOptions(model="base", precision="bf16", max_length=256)
    stages = resolve_stages(model, [CascadeStage(model="a", rerank_count=5), CascadeStage(max_length=64)])
    assert [(s.model, s.precision, s.max_length, s.rerank_count) for s in stages] == [
        ("a", "bf16", 256, 5),
        ("base", "bf16", 64, None),
    ]
    assert [s.model for s in resolve_stages(model, [])] == ["base"]  # no cascade: the model alone


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"model": "a"}], "2 or more stages"),
        ([{"model": "a"}, {"model": "b"}], "stage 1 needs rerank_count"),
        ([{"model": "a", "rerank_count": 5}, {"model": "b", "rerank_count": 3}], "last stage"),
        ([{"model": "a", "rerank_count": 0}, {"model": "b"}], "rerank_count"),
        ([{"model": "a", "rerank_count": 5, "name": "x"}, {"model": "b", "name": "x"}], "names must differ"),
    ],
)
def test_a_bad_cascade_is_one_config_error(stages, message):
    """Each malformed cascade is refused with a message that says what is wrong."""
    with pytest.raises(ConfigError, match=message):
        CascadeSettings.load(cascade=stages)


def test_cascade_order_puts_later_stages_first_then_earlier_order():
    """Rows that reached stage 2 rank by it, the rest by stage 1, unscored rows last; ties by position."""
    stage1 = np.array([0.9, 0.1, 0.5, 0.7, NAN, 0.5])
    stage2 = np.array([0.2, NAN, NAN, 0.8, NAN, NAN])
    order, final, reached = cascade_order([stage1, stage2], positions=np.array([0, 1, 2, 3, 4, 5]))
    assert order.tolist() == [3, 0, 2, 5, 1, 4]
    assert reached.tolist() == [2, 1, 1, 2, 0, 1]
    np.testing.assert_array_equal(final, [0.2, 0.1, 0.5, 0.8, NAN, 0.5])


def test_top_candidates_skips_unscored_and_breaks_ties_by_position():
    """The best k by score, never a NaN, equal scores to the lower position."""
    scores = np.array([0.5, NAN, 0.9, 0.5, 0.1])
    assert top_candidates(scores, 2, positions=np.array([9, 0, 5, 3, 1])).tolist() == [2, 3]
    assert top_candidates(scores, 10).tolist() == [0, 2, 3, 4]


def test_reported_scores_never_increase_along_the_order():
    """A row that stopped at stage 1 never reports more than a stage-2 row ranked above it (the service
    once answered order [0, 2, 1] with scores [0.018, 0.881, 0.731]); each group keeps its spacing, the
    last stage's scores are unchanged, and a group already below is not moved."""
    stage1 = np.array([0.1, 3.0, 2.0, -1.0, 4.0, NAN])
    stage2 = np.array([NAN, 1.0, NAN, NAN, 0.2, NAN])
    order, final, reached = cascade_order([stage1, stage2])
    reported = monotone_scores(order, final, reached)[order]
    assert order.tolist() == [1, 4, 2, 0, 3, 5]
    assert np.all(np.diff(reported[:-1]) < 0) and np.isnan(reported[-1])
    assert reported[:2].tolist() == [1.0, 0.2]  # the last stage: unchanged
    shift = 2.0 - (0.2 - TIER_GAP)
    np.testing.assert_allclose(reported[2:5], [2.0 - shift, 0.1 - shift, -1.0 - shift])
    below = cascade_order([np.array([-5.0, 3.0, -6.0]), np.array([NAN, 1.0, NAN])])
    np.testing.assert_array_equal(monotone_scores(*below)[below[0]], [1.0, -5.0, -6.0])


def test_sigmoid_is_exact_for_far_negative_logits_and_keeps_them_apart():
    """float64, two branches: no exact 0 below -17, -12 and -12.0005 stay apart, no overflow."""
    logits = np.array([-745.0, -40.0, -17.5, -12.0005, -12.0, 0.0, 12.0, 40.0, 800.0, NAN])
    values = sigmoid(logits)
    assert values.dtype == np.float64
    assert np.all(values[:-1] > 0) and np.isnan(values[-1])
    assert values[3] < values[4] and values[3].astype(np.float32) < values[4].astype(np.float32)
    np.testing.assert_allclose(values[1], np.exp(-40.0) / (1 + np.exp(-40.0)), rtol=1e-15)
    assert values[5] == 0.5 and values[8] == 1.0
    assert np.all(np.diff(values[:-1]) >= 0)
