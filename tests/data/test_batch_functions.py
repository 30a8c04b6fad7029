import numpy as np
import pyarrow as pa
import pytest

from jobs.scoring import ScoreBatch, rank_group, valid_text_mask
from reranker.settings import ModelSettings

pytestmark = pytest.mark.data


def test_valid_text_mask_flags_null_empty_and_blank():
    """Null, empty and whitespace-only strings are not scorable."""
    mask = valid_text_mask(pa.array(["ok", None, "", "   ", "x"]))
    assert mask.tolist() == [True, False, False, False, True]


def test_all_null_column_is_never_valid():
    """An all-null (null-typed) column has nothing to score."""
    assert valid_text_mask(pa.array([None, None], pa.null())).tolist() == [False, False]


def test_score_batch_gives_null_scores_for_bad_rows(tiny_model_dir):
    """Rows with a null or empty query/passage get a null score; others a float32 score."""
    scorer = ScoreBatch(ModelSettings(model=str(tiny_model_dir)), "query", "passage", "score")
    batch = pa.table(
        {"query": ["solar", None, "sun", ""], "passage": ["panel", "p", None, "x"], "id": [1, 2, 3, 4]}
    )
    out = scorer(batch)
    assert out.column_names == ["query", "passage", "id", "score"]
    assert out.schema.field("score").type == pa.float32()
    assert out.column("score").is_null().to_pylist() == [False, True, True, True]
    expected = scorer.model.score(["solar"], ["panel"]).scores[0]
    assert out.column("score")[0].as_py() == pytest.approx(float(expected), abs=1e-6)


def test_rank_group_orders_ranks_and_cuts():
    """Best first, 1-based ranks, null scores last and unranked, top-k kept."""
    group = pa.table({"qid": [7] * 4, "score": pa.array([0.1, None, 0.9, 0.5], pa.float32())})
    ranked = rank_group(group, "score", add_rank=True, top_k=None)
    assert ranked.column("score").to_pylist()[:3] == pytest.approx([0.9, 0.5, 0.1])
    assert ranked.column("rank").to_pylist() == [1, 2, 3, None]
    top = rank_group(group, "score", add_rank=False, top_k=2)
    assert top.num_rows == 2 and "rank" not in top.column_names
    assert np.isclose(top.column("score").to_pylist(), [0.9, 0.5]).all()
