"""Every model family behind the routes (in-process): /score and the rerank routes give the scores of
sentence-transformers' CrossEncoder, an instruction where the model takes one, and /v1/models says what
kind of reranker is served; a TinyBERT -> LLM cascade scores each stage as that model alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reranker.model import CrossEncoderModel
from tests.model.test_families import BUILDERS, INSTRUCTION, PAIRS, reference
from tests.serve_helpers import serving

pytestmark = pytest.mark.unit
QUERY = PAIRS[0][0]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def served(request, tmp_path_factory):
    """Each family's tiny model, loaded once: (name, directory, model, kind, takes an instruction)."""
    build, _, kind, takes = BUILDERS[request.param]
    directory = build(tmp_path_factory.mktemp(request.param) / "model")
    return request.param, directory, CrossEncoderModel(str(directory)), kind, takes


def test_score_and_models_for_each_family(served):
    """/score (raw) equals CrossEncoder.predict; an instruction reaches a model that takes one and is a
    422 for one that does not; /v1/models names the kind."""
    _, directory, model, kind, takes = served
    with serving(model) as client:
        scores = client.post("/score", json={"pairs": PAIRS}).json()["scores"]
        listed = client.get("/v1/models").json()["data"][0]
        instructed = client.post("/score", json={"pairs": PAIRS, "instruction": INSTRUCTION})
    np.testing.assert_allclose(scores, reference(directory), atol=1e-5)
    assert (listed["kind"], listed["takes_instruction"]) == (kind, takes)
    assert [stage["kind"] for stage in listed["stages"]] == [kind]
    if takes:
        np.testing.assert_allclose(instructed.json()["scores"], reference(directory, INSTRUCTION), atol=1e-5)
    else:
        assert instructed.status_code == 422 and "instruction" in instructed.json()["error"]["message"]


def test_a_tinybert_to_llm_cascade_scores_each_stage_as_that_model_alone(llm_reranker_dir):
    """Stage 1 (the TinyBERT-L2 twin) scores every document, stage 2 (an LLM reranker) the best two, with
    the request's instruction (stage 1 takes none): each stage's raw score equals that model alone."""
    from sentence_transformers import CrossEncoder

    from tests.helpers import TWIN_MODEL, require

    tiny_model = CrossEncoderModel(str(require(TWIN_MODEL)))
    llm = CrossEncoderModel(str(llm_reranker_dir))
    documents = [passage for _, passage in PAIRS[:4]]
    body = {"query": QUERY, "texts": documents, "raw_scores": True, "return_stage_scores": True}
    with serving([tiny_model, llm], rerank_count=2) as client:
        results = client.post("/rerank", json={**body, "instruction": INSTRUCTION}).json()
        listed = client.get("/v1/models").json()["data"][0]
    first = tiny_model.score([QUERY] * 4, documents).scores
    pairs = [(QUERY, document) for document in documents]
    second = CrossEncoder(str(llm_reranker_dir)).predict(
        pairs, prompt=INSTRUCTION, activation_fn=torch.nn.Identity()
    )
    reached = [r for r in results if r["stage_scores"]["stage2"] is not None]
    assert len(reached) == 2 and {r["index"] for r in reached} == set(np.argsort(-first)[:2].tolist())
    for result in results:
        assert result["stage_scores"]["stage1"] == pytest.approx(float(first[result["index"]]), abs=1e-5)
    for result in reached:
        assert result["stage_scores"]["stage2"] == pytest.approx(float(second[result["index"]]), abs=1e-5)
    assert [stage["kind"] for stage in listed["stages"]] == ["sequence-classification", "llm-yes-no"]
    assert listed["takes_instruction"]
