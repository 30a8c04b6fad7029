import numpy as np
import pytest

from reranker.cascade import CascadeSettings, CascadeStage, cascade_order, resolve_stages, top_candidates
from reranker.errors import ConfigError
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
