"""A long passage in the job and the Ray Data stage: one row, its best window's score (chunked)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data

from jobs.rescore import main
from jobs.stage import add_scores
from reranker.chunking import best_of
from reranker.model import CrossEncoderModel
from reranker.settings import ModelOptions
from tests.helpers import build_tiny_cross_encoder
from tests.model.test_chunking import QUERY, long_document

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def test_the_job_and_the_stage_score_a_long_passage_as_its_best_window(tmp_path):
    """--max-chunks-per-doc: each long passage is one output row whose score is the max of its windows
    scored one by one (short ones unchanged), in the job and in add_scores; the manifest records it."""
    model_dir = build_tiny_cross_encoder(tmp_path / "m512", max_position=512)
    passages = [long_document(3000), "solar panels convert sunlight", long_document(900, seed=2), None]
    table = pa.table({"qid": [1, 1, 2, 2], "query": [QUERY] * 4, "passage": passages})
    pq.write_table(table, tmp_path / "in.parquet")
    args = [
        "--model",
        str(model_dir),
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
    ]
    assert main([*args, "--max-chunks-per-doc", "10"]) == 0
    written = pq.read_table(tmp_path / "out").sort_by("passage")
    model = CrossEncoderModel(str(model_dir))
    texts = passages[:3]
    split = model.split_long([QUERY] * 3, texts, 10)
    alone = np.array([model.score([QUERY], [window]).scores[0] for window in split.passages])
    expected = dict(zip(texts, best_of(alone, split.owner), strict=True))
    assert written.num_rows == 4
    for passage, score in zip(written["passage"].to_pylist(), written["score"].to_pylist(), strict=True):
        assert (
            score is None if passage is None else score == pytest.approx(float(expected[passage]), abs=1e-5)
        )
    assert '"max_chunks_per_doc": 10' in (tmp_path / "out" / "_rescore_job.json").read_text()
    options = ModelOptions(model=str(model_dir), max_chunks_per_doc=10)
    staged = add_scores(ray.data.from_arrow(table), options).take_all()
    for row in staged:
        if row["passage"] is not None:
            assert row["score"] == pytest.approx(float(expected[row["passage"]]), abs=1e-5)
