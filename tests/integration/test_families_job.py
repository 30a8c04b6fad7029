"""Every model family through the job and the Ray Data stage: the scores of sentence-transformers'
CrossEncoder.predict on the same pairs (raw, fp32, 1e-5), an instruction where the model takes one."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
import torch

from jobs.rescore import main
from jobs.stage import add_scores
from tests.helpers import (
    build_tiny_llm_reranker,
    build_tiny_modular_cross_encoder,
    build_tiny_templated_classifier,
    build_tiny_xlmr_classifier,
    pairs_table,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]
BUILDERS = {
    "xlm-r": build_tiny_xlmr_classifier,
    "modular": build_tiny_modular_cross_encoder,
    "llm-hf-save": lambda directory: build_tiny_llm_reranker(directory, st_save=False),
    "templated-classifier": build_tiny_templated_classifier,
}
INSTRUCTION = "Judge whether the passage explains the query"


def reference(model_dir, table: pa.Table, instruction: str | None = None) -> np.ndarray:
    """CrossEncoder.predict's raw scores on the table's pairs."""
    from sentence_transformers import CrossEncoder

    pairs = list(zip(table["query"].to_pylist(), table["passage"].to_pylist(), strict=True))
    return CrossEncoder(str(model_dir)).predict(pairs, prompt=instruction, activation_fn=torch.nn.Identity())


def scored(path) -> pa.Table:
    return pq.read_table(path).sort_by([("qid", "ascending"), ("pid", "ascending")])


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_job_scores_each_family_as_sentence_transformers(tmp_path, name):
    """XLM-R, a modular chain, an LLM reranker (Hugging Face save: sentence-transformers' default chain)
    and a templated classifier: the job's scores equal CrossEncoder.predict's."""
    model_dir = BUILDERS[name](tmp_path / "model")
    pq.write_table(pairs_table(), tmp_path / "in.parquet")
    args = [
        "--model",
        str(model_dir),
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    table = scored(tmp_path / "out")
    np.testing.assert_allclose(table["score"].to_numpy(), reference(model_dir, table), atol=1e-5)


def test_an_llm_reranker_with_an_instruction_in_the_job_and_the_stage(tmp_path, llm_reranker_dir):
    """--instruction reaches the LLM's prompt in the job (and its manifest), and add_scores with the same
    model options gives the same scores."""
    from reranker.settings import ModelOptions

    pq.write_table(pairs_table(), tmp_path / "in.parquet")
    args = ["--model", str(llm_reranker_dir), "--input", str(tmp_path / "in.parquet")]
    assert main([*args, "--output", str(tmp_path / "out"), "--instruction", INSTRUCTION]) == 0
    table = scored(tmp_path / "out")
    expected = reference(llm_reranker_dir, table, INSTRUCTION)
    np.testing.assert_allclose(table["score"].to_numpy(), expected, atol=1e-5)
    assert (np.abs(expected - reference(llm_reranker_dir, table)) > 1e-4).any()  # the instruction matters
    assert INSTRUCTION in (tmp_path / "out" / "_rescore_job.json").read_text()
    options = ModelOptions(model=str(llm_reranker_dir), instruction=INSTRUCTION)
    rows = add_scores(ray.data.from_arrow(pairs_table()), options).take_all()
    staged = pa.Table.from_pylist(rows).sort_by([("qid", "ascending"), ("pid", "ascending")])
    np.testing.assert_allclose(staged["score"].to_numpy(), expected, atol=1e-5)


def test_a_tinybert_to_llm_cascade_in_the_job(tmp_path, tiny_model_dir, tiny_model, llm_reranker_dir):
    """Stage 1 a BERT classifier on every row, stage 2 an LLM reranker (with its own instruction) on each
    query's best 2: each stage's scores equal that model alone on the rows it scored."""
    import json

    pq.write_table(pairs_table(), tmp_path / "in.parquet")
    cascade = [
        {"model": str(tiny_model_dir), "rerank_count": 2},
        {"model": str(llm_reranker_dir), "instruction": INSTRUCTION},
    ]
    args = [
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
        "--group-column",
        "qid",
    ]
    assert main([*args, "--cascade", json.dumps(cascade)]) == 0
    table = scored(tmp_path / "out")
    first = tiny_model.score(table["query"].to_pylist(), table["passage"].to_pylist()).scores
    np.testing.assert_allclose(table["score_stage1"].to_numpy(), first, atol=1e-5)
    second = reference(llm_reranker_dir, table, INSTRUCTION)
    reached = ~np.isnan(table["score_stage2"].to_numpy(zero_copy_only=False).astype(float))
    assert reached.sum() == 3 * 2
    np.testing.assert_allclose(
        table["score_stage2"].to_numpy(zero_copy_only=False)[reached], second[reached], atol=1e-5
    )
