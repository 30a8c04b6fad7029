"""A 3,000-token document in a 512-token model's request, on every route: a 200 whose score is the model's
on the cut text, or, chunked, its best window's (each window scored alone)."""

import numpy as np
import pytest

from reranker.chunking import best_of
from reranker.model import CrossEncoderModel, sigmoid
from tests.helpers import build_tiny_cross_encoder
from tests.model.test_chunking import QUERY, long_document
from tests.serve_helpers import serving

pytestmark = pytest.mark.unit

DOCS = [long_document(3000), "solar panels convert sunlight", long_document(1200, seed=1)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("m512"), max_position=512)


@pytest.fixture(scope="module")
def expected(model_dir):
    """Each document's raw score cut to fit, and as its best window (each window scored alone)."""
    model = CrossEncoderModel(str(model_dir))
    split = model.split_long([QUERY] * 3, DOCS, 10)
    alone = np.array([model.score([QUERY], [window]).scores[0] for window in split.passages])
    first = [split.passages[int(np.flatnonzero(split.owner == i)[0])] for i in range(3)]
    return {"cut": model.score([QUERY] * 3, first).scores, "best": best_of(alone, split.owner)}


def by_index(results, key="relevance_score"):
    return np.array([score for _, score in sorted((r["index"], r[key]) for r in results)])


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_cohere_routes_cut_or_chunk_per_request(model_dir, expected, path):
    """By default the long documents are cut to fit (200, meta counts them); max_chunks_per_doc in the
    request scores each as its best window."""
    with serving(CrossEncoderModel(str(model_dir))) as app:
        cut = app.post(path, json={"query": QUERY, "documents": DOCS}).json()
        chunked = app.post(path, json={"query": QUERY, "documents": DOCS, "max_chunks_per_doc": 10}).json()
    np.testing.assert_allclose(by_index(cut["results"]), sigmoid(expected["cut"]), atol=1e-6)
    assert cut["meta"]["truncated_documents"] == 2
    np.testing.assert_allclose(by_index(chunked["results"]), sigmoid(expected["best"]), atol=1e-6)
    assert chunked["meta"]["truncated_documents"] == 0


def test_every_route_chunks_with_the_deployment_setting(model_dir, expected):
    """max_chunks_per_doc set for the deployment (the model's setting): TEI, Voyage, infinity, NIM, the
    vLLM and our /score all report the best window's score."""
    raw, relevance = expected["best"], sigmoid(expected["best"])
    with serving(CrossEncoderModel(str(model_dir), max_chunks_per_doc=10)) as app:
        tei = app.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
        voyage = app.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_k": 3}).json()
        infinity = app.post("/infinity/rerank", json={"query": QUERY, "documents": DOCS}).json()
        nim = app.post(
            "/v1/ranking", json={"query": {"text": QUERY}, "passages": [{"text": doc} for doc in DOCS]}
        ).json()
        vllm = app.post("/score", json={"queries": QUERY, "documents": DOCS}).json()
        pairs = app.post("/score", json={"pairs": [[QUERY, doc] for doc in DOCS]}).json()
        cut = app.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "max_chunks_per_doc": 1}).json()
    np.testing.assert_allclose(by_index(tei, "score"), raw, atol=1e-5)
    np.testing.assert_allclose(by_index(voyage["data"]), relevance, atol=1e-6)
    np.testing.assert_allclose(by_index(infinity["results"]), relevance, atol=1e-6)
    np.testing.assert_allclose(by_index(nim["rankings"], "logit"), raw, atol=1e-5)  # NIM's NONE: nothing cut
    np.testing.assert_allclose([item["score"] for item in vllm["data"]], relevance, atol=1e-6)
    np.testing.assert_allclose(pairs["scores"], raw, atol=1e-5)
    np.testing.assert_allclose(by_index(cut["results"]), sigmoid(expected["cut"]), atol=1e-6)


def test_a_request_whose_windows_overflow_the_replica_is_refused(model_dir):
    """Chunking multiplies a request's pairs: windows past max_pending_pairs are a 422 naming the setting,
    not a request admitted at any size; the same request with fewer windows is answered."""
    with serving(CrossEncoderModel(str(model_dir)), max_pending_pairs=10) as app:
        body = {"query": QUERY, "documents": DOCS, "max_chunks_per_doc": 10}
        refused = app.post("/v1/rerank", json=body)
        assert refused.status_code == 422 and "max_chunks_per_doc" in refused.json()["error"]["message"]
        assert app.post("/v1/rerank", json={**body, "max_chunks_per_doc": 2}).status_code == 200
