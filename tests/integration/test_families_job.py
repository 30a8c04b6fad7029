"""Every model family through the job and the Ray Data stage: the scores of sentence-transformers'
CrossEncoder.predict on the same pairs (raw, fp32, 1e-5), an instruction where the model takes one."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
import torch

from jobs.rescore import main
from jobs.stage import add_scores
from reranker.model import CrossEncoderModel
from reranker.settings import ModelOptions
from tests.helpers import (
    PLAIN_CHAT_TEMPLATE,
    TWIN_MODEL,
    build_tiny_llm_reranker,
    build_tiny_modular_cross_encoder,
    build_tiny_templated_classifier,
    build_tiny_xlmr_classifier,
    pairs_table,
    require,
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


def job_args(tmp_path, model, *extra: str) -> list[str]:
    pq.write_table(pairs_table(), tmp_path / "in.parquet")
    return [
        "--model",
        str(model),
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
        *extra,
    ]


@pytest.mark.parametrize(
    ("name", "instruction"),
    [(name, None) for name in sorted(BUILDERS)] + [("templated-classifier", INSTRUCTION)],
)
def test_the_job_scores_each_family_as_sentence_transformers(tmp_path, name, instruction):
    """XLM-R, a modular chain, an LLM reranker (Hugging Face save: sentence-transformers' default chain)
    and a templated classifier (without and with an instruction): the job's scores equal
    CrossEncoder.predict's."""
    model_dir = BUILDERS[name](tmp_path / "model")
    extra = ["--instruction", instruction] if instruction else []
    assert main(job_args(tmp_path, model_dir, *extra)) == 0
    table = scored(tmp_path / "out")
    np.testing.assert_allclose(table["score"].to_numpy(), reference(model_dir, table, instruction), atol=1e-5)


def test_a_model_that_cannot_be_scored_right_is_one_line_and_writes_nothing(tmp_path, capsys, tiny_model_dir):
    """A chat model (its template has no query or document roles), and an instruction for a classifier:
    exit 2, one line, no output directory."""
    chat = build_tiny_llm_reranker(tmp_path / "chat", st_save=False, template=PLAIN_CHAT_TEMPLATE)
    cases = {
        "cannot prepare a query-document pair": [chat],
        "instruction: model": [tiny_model_dir, "--instruction", INSTRUCTION],
    }
    for message, (model, *extra) in cases.items():
        capsys.readouterr()
        assert main(job_args(tmp_path, model, *extra)) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], errors
        assert not (tmp_path / "out").exists()


def test_an_llm_reranker_with_an_instruction_in_the_job_and_the_stage(tmp_path, llm_reranker_dir):
    """--instruction reaches the LLM's prompt in the job (and its manifest), and add_scores with the same
    model options gives the same scores."""
    assert main(job_args(tmp_path, llm_reranker_dir, "--instruction", INSTRUCTION)) == 0
    table = scored(tmp_path / "out")
    expected = reference(llm_reranker_dir, table, INSTRUCTION)
    np.testing.assert_allclose(table["score"].to_numpy(), expected, atol=1e-5)
    assert (np.abs(expected - reference(llm_reranker_dir, table)) > 1e-4).any()  # the instruction matters
    manifest = json.loads((tmp_path / "out" / "_rescore_job.json").read_text())
    assert manifest["instruction"] == INSTRUCTION and manifest["family"] == "sentence-transformers"
    assert manifest["true_token"] is None and len(manifest["chat_template"]) == 16  # what defines the scores
    options = ModelOptions(model=str(llm_reranker_dir), instruction=INSTRUCTION)
    rows = add_scores(ray.data.from_arrow(pairs_table()), options).take_all()
    staged = pa.Table.from_pylist(rows).sort_by([("qid", "ascending"), ("pid", "ascending")])
    np.testing.assert_allclose(staged["score"].to_numpy(), expected, atol=1e-5)


def test_a_tinybert_to_llm_cascade_in_the_job(tmp_path, llm_reranker_dir):
    """Stage 1 the TinyBERT-L2 twin on every row, stage 2 an LLM reranker (with its own instruction) on
    each query's best 2: each stage's scores equal that model alone on the rows it scored."""
    twin = require(TWIN_MODEL)
    cascade = [
        {"model": str(twin), "rerank_count": 2},
        {"model": str(llm_reranker_dir), "instruction": INSTRUCTION},
    ]
    assert main(job_args(tmp_path, twin, "--group-column", "qid", "--cascade", json.dumps(cascade))) == 0
    table = scored(tmp_path / "out")
    stages = json.loads((tmp_path / "out" / "_rescore_job.json").read_text())["cascade"]
    assert [(stage["family"], stage["instruction"]) for stage in stages] == [
        ("sequence-classification", None),
        ("sentence-transformers", INSTRUCTION),
    ]
    assert stages[0]["chat_template"] is None and stages[1]["chat_template"] is not None
    first = (
        CrossEncoderModel(str(twin)).score(table["query"].to_pylist(), table["passage"].to_pylist()).scores
    )
    np.testing.assert_allclose(table["score_stage1"].to_numpy(), first, atol=1e-5)
    second = reference(llm_reranker_dir, table, INSTRUCTION)
    stage2 = table["score_stage2"].to_numpy(zero_copy_only=False).astype(float)
    reached = ~np.isnan(stage2)
    assert reached.sum() == 3 * 2
    np.testing.assert_allclose(stage2[reached], second[reached], atol=1e-5)
